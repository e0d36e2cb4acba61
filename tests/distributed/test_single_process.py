"""mk.distributed without a process group: the one-process head, its init, Partial FC,
optimizers and checkpoints, compared with ``mk.margin_cross_entropy``."""

from __future__ import annotations

import os

import pytest
import torch

import marginkit as mk
from marginkit.distributed import (
    PartialFCAdamW,
    PartialFCSGD,
    PartitionedMarginSoftmax,
    load_sharded,
    save_sharded,
    seeded_normal_rows,
    shard_range,
)
from marginkit.errors import MarginKitTypeError
from tests.distributed.cases import CASES, TOL, C, D, case_batch, class_margins, global_batch, make_head, reference
from tests.helpers import GemmCounter, rel_err


# --------------------------------------------------------------------------- shard_range
def test_shard_range_formula_and_tiling():
    for num_classes in (0, 1, 5, 103, 1_000_003):
        for world in (1, 2, 3, 4, 7, 8, 64):
            ranges = [shard_range(num_classes, world, r) for r in range(world)]
            assert ranges[0][0] == 0 and ranges[-1][1] == num_classes
            for r, (start, stop) in enumerate(ranges):
                assert stop - start == num_classes // world + (r < num_classes % world)
                assert start == num_classes // world * r + min(r, num_classes % world)
                if r:
                    assert start == ranges[r - 1][1]
    assert [shard_range(103, 4, r) for r in range(4)] == [(0, 26), (26, 52), (52, 78), (78, 103)]
    assert [shard_range(10, 4, r) for r in range(4)] == [(0, 3), (3, 6), (6, 8), (8, 10)]
    assert all(isinstance(v, int) for v in shard_range(10, 3, 1))


def test_shard_range_typed_errors():
    for args in ((10, 0, 0), (10, 2, 2), (10, 2, -1), (-1, 2, 0)):
        with pytest.raises(ValueError):
            shard_range(*args)
    for args in ((10.0, 2, 0), (10, "2", 0), (10, 2, True), (None, 1, 0)):
        with pytest.raises(TypeError):
            shard_range(*args)
        with pytest.raises(MarginKitTypeError):
            shard_range(*args)


# --------------------------------------------------------------------------- one process, no group
@pytest.mark.parametrize("case", list(CASES))
def test_single_process_head_equals_margin_cross_entropy(case):
    x, labels = case_batch(case, 1)
    head = make_head(case)
    xg = x.clone().requires_grad_(True)
    loss = head(xg, labels)
    loss.backward()
    ref_loss, ref_gx, ref_gw = reference(case, x, labels)
    assert head.weight.shape == (C, D) and head.world_size == 1
    assert rel_err(loss, ref_loss) < TOL
    assert rel_err(xg.grad, ref_gx) < TOL
    assert rel_err(head.weight.grad, ref_gw) < TOL


@pytest.mark.parametrize("budget", [None, 2 * 23 * 17 * 4], ids=["every-chunk", "two-chunks"])
@pytest.mark.parametrize("case", list(CASES))
def test_single_process_head_with_a_memory_budget_on_the_torch_backend(case, budget, monkeypatch):
    """The torch backend's store through the head's protocol (16-class chunks at N = 23, D = 16):
    the same loss and gradients as margin_cross_entropy, and one GEMM fewer per stored chunk."""
    from marginkit.backends import torch_chunked

    monkeypatch.setattr(torch_chunked, "CHUNK_ELEMENTS", 16 * (23 + D))
    x, labels = case_batch(case, 1)
    ref_loss, ref_gx, ref_gw = reference(case, x, labels)
    gemms = {}
    for kept in (0, budget):
        head = make_head(case, memory_budget=kept)
        xg = x.clone().requires_grad_(True)
        with GemmCounter() as counter:
            loss = head(xg, labels)
            loss.backward()
        gemms[kept] = counter.gemms
        assert rel_err(loss, ref_loss) < TOL
        assert rel_err(xg.grad, ref_gx) < TOL
        assert rel_err(head.weight.grad, ref_gw) < TOL
    assert gemms[0] - gemms[budget] == (7 if budget is None else 2)  # C = 103: 7 chunks of 16 classes


@pytest.mark.parametrize("sparse_grad", [False, True], ids=["dense-grad", "sparse-grad"])
def test_partial_fc_with_a_memory_budget_on_the_torch_backend(sparse_grad, monkeypatch):
    """Partial FC stores over the sampled rows: the same sample, loss and gradients as without a
    budget (the sampler's seed is the head's), and fewer GEMMs."""
    from marginkit.backends import torch_chunked

    monkeypatch.setattr(torch_chunked, "CHUNK_ELEMENTS", 16 * (23 + D))
    x, labels = global_batch(2)
    results = {}
    for kept in (0, None):
        head = make_head("arcface", sample_rate=0.5, sparse_grad=sparse_grad, memory_budget=kept)
        xg = x.clone().requires_grad_(True)
        with GemmCounter() as counter:
            loss = head(xg, labels)
            loss.backward()
        grad_w = head.weight.grad.to_dense() if sparse_grad else head.weight.grad
        results[kept] = (loss.detach(), xg.grad, grad_w, counter.gemms)
    for name, a, b in zip(("loss", "grad x", "grad w"), results[None], results[0]):
        assert rel_err(a, b) < 1e-6, name
    assert results[0][2].abs().sum(dim=1).gt(0).sum() < C  # the sample left classes out
    assert results[None][3] < results[0][3]


def test_checkpoints_record_the_same_config_fields_as_before():
    """grad_scale and class_margins are compared across ranks but not recorded: a sharded state dict
    saved before they were compared must still load through ``dcp.load(head.sharded_state_dict())``."""
    from marginkit.distributed.agreement import COMPARED_ONLY, FIELDS

    head = make_head("class_margins")
    recorded = head.sharded_state_dict()["config"]
    assert list(recorded) == list(FIELDS) and not set(COMPARED_ONLY) & set(recorded)
    assert set(COMPARED_ONLY) <= set(head.config())


def test_seeded_init_does_not_depend_on_sharding():
    full = seeded_normal_rows(0, 10_000, 10_000, 4, seed=3, std=0.01, device="cpu", dtype=torch.float32)
    for world in (2, 3, 7):
        parts = [seeded_normal_rows(*shard_range(10_000, world, r), 10_000, 4, 3, 0.01, "cpu", torch.float32)
                 for r in range(world)]
        assert torch.equal(torch.cat(parts), full)
    assert abs(float(full.std()) - 0.01) < 1e-3
    other = seeded_normal_rows(0, 10_000, 10_000, 4, seed=4, std=0.01, device="cpu", dtype=torch.float32)
    assert not torch.equal(other, full)


def test_partial_fc_one_process_properties():
    x, labels = global_batch(2)
    head = make_head("arcface", sample_rate=0.2)
    opt = PartialFCSGD(head, lr=0.1, momentum=0.9, weight_decay=5e-4)
    for _ in range(3):
        before_w, before_m = head.weight.detach().clone(), head.momentum_buffer.clone()
        loss = head(x, labels)
        loss.backward()
        sampled = head.last_sampled
        positives = labels[labels >= 0].unique()
        assert set(positives.tolist()) <= set(sampled.tolist())
        assert sampled.numel() == max(positives.numel(), int(0.2 * C))
        untouched = torch.ones(C, dtype=torch.bool)
        untouched[sampled] = False
        assert torch.count_nonzero(head.weight.grad[untouched]) == 0
        opt.step()
        opt.zero_grad()
        assert torch.equal(head.weight.detach()[untouched], before_w[untouched])
        assert torch.equal(head.momentum_buffer[untouched], before_m[untouched])
        assert not torch.equal(head.weight.detach()[sampled], before_w[sampled])
    head.eval()  # evaluation uses every class
    assert rel_err(head(x, labels), reference("arcface", x, labels, head.weight)[0]) < TOL


@pytest.mark.parametrize("max_local_batch", [None, 8], ids=["host-sampling", "device-sampling"])
def test_compiled_partial_fc_head_equals_eager_step_after_step(max_local_batch):
    # the host sampler's seed reached the op as a SymInt from the second compiled step on (a TypeError)
    import copy

    torch._dynamo.reset()
    torch.manual_seed(0)
    head = PartitionedMarginSoftmax(200, 8, mk.ArcFace(0.5), 32.0, sample_rate=0.2, max_local_batch=max_local_batch)
    twin = copy.deepcopy(head)
    compiled = torch.compile(twin, backend="aot_eager")
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        x, y = torch.randn(8, 8, generator=g), torch.randint(0, 200, (8,), generator=g)
        xe, xc = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        loss_e, loss_c = head(xe, y), compiled(xc, y)
        loss_e.backward()
        loss_c.backward()
        assert torch.equal(twin.last_sampled, head.last_sampled)
        assert rel_err(loss_c, loss_e) < 1e-6 and rel_err(xc.grad, xe.grad) < 1e-6
    assert int(twin.sample_step) == int(head.sample_step) == 3


def test_sparse_grad_matches_dense_grad_with_accumulation():
    """sparse_grad=True: a COO gradient of the sampled rows; the same steps as the dense one,
    also when two backward passes (different samples) accumulate before a step."""
    heads = [make_head("arcface", sample_rate=0.2, sparse_grad=flag) for flag in (False, True)]
    opts = [PartialFCSGD(h, lr=0.1, momentum=0.9, weight_decay=5e-4) for h in heads]
    for step in range(2):
        for head, opt in zip(heads, opts):
            for seed in (2, 3):
                x, labels = global_batch(seed + 10 * step)
                head(x, labels).backward()
        assert heads[1].weight.grad.is_sparse
        assert torch.equal(heads[0].weight.grad, heads[1].weight.grad.to_dense())
        for opt in opts:
            opt.step()
            opt.zero_grad()
        assert torch.equal(heads[0].weight, heads[1].weight)
        assert torch.equal(heads[0].momentum_buffer, heads[1].momentum_buffer)


def test_partial_fc_adamw_moves_only_sampled_rows():
    x, labels = global_batch(3)
    head = make_head("cosface", sample_rate=0.25)
    opt = PartialFCAdamW(head, lr=1e-2)
    steps = torch.zeros(C, dtype=torch.int64)
    for _ in range(2):
        before = head.weight.detach().clone()
        head(x, labels).backward()
        sampled = head.last_sampled
        opt.step()
        opt.zero_grad()
        steps[sampled] += 1
        mask = torch.ones(C, dtype=torch.bool)
        mask[sampled] = False
        assert torch.equal(head.weight.detach()[mask], before[mask])
    assert torch.equal(head.adam_step, steps)


def test_one_process_full_and_sharded_checkpoint_roundtrip(tmp_path):
    head = make_head("class_margins", sample_rate=0.5)
    PartialFCSGD(head, lr=0.1, momentum=0.9)
    x, labels = global_batch(2)
    head(x, labels).backward()
    head.zero_grad()
    full = head.full_state_dict()
    assert set(full) == {"weight", "class_margins", "momentum_buffer", "momentum_initialized", "sample_step", "seed"}
    save_sharded(head, str(tmp_path / "ck"))
    for loader in ("full", "sharded"):
        fresh = PartitionedMarginSoftmax(C, D, mk.ArcFace(), 64.0, sample_rate=0.5, seed=11)
        if loader == "full":
            fresh.load_full_state_dict(full)
        else:
            load_sharded(fresh, str(tmp_path / "ck"))
        got = fresh.full_state_dict()
        assert set(got) == set(full)
        for name in full:
            assert torch.equal(got[name], full[name]), (loader, name)
    with pytest.raises(ValueError, match="classes"):
        fresh.load_full_state_dict({"weight": torch.zeros(C + 1, D)}, strict=False)


def test_head_validates_arguments_and_inputs():
    with pytest.raises(ValueError, match="num_classes"):
        PartitionedMarginSoftmax(0, D)
    with pytest.raises(ValueError, match="sample_rate"):
        PartitionedMarginSoftmax(C, D, sample_rate=0.0)
    with pytest.raises(ValueError, match="grad_scale"):
        PartitionedMarginSoftmax(C, D, grad_scale="sum")
    with pytest.raises(ValueError, match="class_margins"):
        PartitionedMarginSoftmax(C, D, mk.SphereFace(), class_margins=class_margins())
    head = PartitionedMarginSoftmax(C, D)
    x, labels = global_batch(1)
    with pytest.raises(ValueError, match=str(C + 2)):
        head(x, torch.where(labels == 5, labels, torch.full_like(labels, C + 2)))
    with pytest.raises(MarginKitTypeError, match="int64"):
        head(x, labels.int())
    with pytest.raises(ValueError, match="embedding_dim"):
        head(x[:, :4], labels)


def test_empty_and_all_ignored_batch_backpropagates():
    head = make_head("arcface")
    x = torch.zeros(0, D, requires_grad=True)
    loss = head(x, torch.zeros(0, dtype=torch.int64))
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.count_nonzero(head.weight.grad) == 0
    x = torch.randn(3, D, requires_grad=True)
    loss = head(x, torch.full((3,), -100))
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.count_nonzero(x.grad) == 0
    sampled = make_head("arcface", sample_rate=0.005)  # nothing to keep: no positive, 0 negatives
    x = torch.randn(3, D, requires_grad=True)
    loss = sampled(x, torch.full((3,), -100))
    loss.backward()
    assert sampled.last_sampled.numel() == 0 and float(loss.detach()) == 0.0
    assert torch.count_nonzero(x.grad) == 0 and torch.count_nonzero(sampled.weight.grad) == 0


def test_full_state_dict_of_a_dense_head_is_only_per_class_tensors():
    head = make_head("class_margins")
    full = head.full_state_dict()
    assert set(full) == {"weight", "class_margins"}
    assert all(t.shape[0] == C for t in full.values())


def test_triton_backend_runs_the_two_phases():
    """The head drives backends.triton's lse_partials / grads_from_lse (interpreter on CPU)."""
    pytest.importorskip("triton")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton needs CUDA or TRITON_INTERPRET=1")
    x, labels = global_batch(1)
    head = make_head("class_margins", backend="triton")
    xg = x.clone().requires_grad_(True)
    loss = head(xg, labels)
    loss.backward()
    ref_loss, ref_gx, ref_gw = reference("class_margins", x, labels)
    assert rel_err(loss, ref_loss) < TOL
    assert rel_err(xg.grad, ref_gx) < TOL
    assert rel_err(head.weight.grad, ref_gw) < TOL


