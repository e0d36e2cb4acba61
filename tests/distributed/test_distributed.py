"""mk.distributed: PartitionedMarginSoftmax over gloo, compared to one process.

One spawn per world size (2, 3, 4, then 1 with an initialised group) runs every
distributed check; workers write their results to files and the tests below compare
them with single-process ``mk.margin_cross_entropy`` over the global batch. The spawns
run in that order because the later ones load the checkpoints the earlier ones wrote
(2 -> 3, 4 -> 1).
"""

from __future__ import annotations

import os

import pytest
import torch

import marginkit as mk
from tests.distributed.harness import caught, run_world, save_results
from tests.helpers import rel_err
from marginkit.distributed import (
    PartialFCSGD,
    PartitionedMarginSoftmax,
    load_sharded,
    save_sharded,
    shard_range,
)

from tests.distributed.cases import (
    CASES,
    SIZES,
    TOL,
    C,
    D,
    D_IN,
    case_batch,
    class_margins,
    full_weight,
    global_batch,
    local_rows,
    make_head,
    reference,
)

WORLD_ORDER = (2, 3, 4, 1)
SPAWN_TIMEOUT_S = 120.0


# --------------------------------------------------------------------------- worker side
def _check_equivalence(world, rank):
    out = {}
    for case in CASES:
        x, labels = case_batch(case, 1)
        head = make_head(case)
        xl = local_rows(x, world, rank).clone().requires_grad_(True)
        loss = head(xl, local_rows(labels, world, rank))
        loss.backward()
        out[case] = dict(loss=loss.detach(), grad_x=xl.grad.clone(), grad_w=head.weight.grad.clone())
    return out


TINY_C = 3  # fewer classes than ranks at W = 4: rank 3 owns none


def _tiny_inputs():
    x, labels = global_batch(4)
    return x, torch.where(labels >= 0, labels % TINY_C, labels), torch.randn(TINY_C, D, generator=torch.Generator().manual_seed(8))


def _check_tiny(world, rank):
    x, labels, weight = _tiny_inputs()
    head = PartitionedMarginSoftmax(TINY_C, D, mk.CosFace(0.3), 16.0)
    head.load_full_state_dict({"weight": weight})
    xl = local_rows(x, world, rank).clone().requires_grad_(True)
    loss = head(xl, local_rows(labels, world, rank))
    loss.backward()
    return dict(loss=loss.detach(), grad_x=xl.grad.clone(), grad_w=head.weight.grad.clone())


def _check_init(world, rank):
    head = PartitionedMarginSoftmax(C, D, seed=7)
    return dict(weight=head.full_state_dict()["weight"], local=head.weight.detach().clone())


def _check_partial_fc(world, rank):
    head = make_head("arcface", sample_rate=0.3, seed=5)
    opt = PartialFCSGD(head, lr=0.1, momentum=0.9, weight_decay=5e-4)
    out = {"start": head.class_start}
    for step, seed in enumerate((2, 3)):
        x, labels = global_batch(seed)
        before = {k: v.detach().clone() for k, v in (("weight", head.weight), ("momentum", head.momentum_buffer))}
        xl = local_rows(x, world, rank).clone().requires_grad_(True)
        loss = head(xl, local_rows(labels, world, rank))
        loss.backward()
        rec = dict(
            loss=loss.detach(), grad_x=xl.grad.clone(), grad_w=head.weight.grad.clone(),
            sampled=head.last_sampled.clone() + head.class_start, before=before,
        )
        opt.step()
        opt.zero_grad()
        rec["after"] = dict(weight=head.weight.detach().clone(), momentum=head.momentum_buffer.clone())
        out[step] = rec
    # sample_rate = 1 with the row-sparse optimizer against the dense head with torch.optim.SGD.
    sparse, dense = make_head("cosface"), make_head("cosface")
    opt_sparse = PartialFCSGD(sparse, lr=0.2, momentum=0.9, weight_decay=1e-3)
    opt_dense = torch.optim.SGD([dense.weight], lr=0.2, momentum=0.9, weight_decay=1e-3)
    losses = []
    for seed in (2, 3):
        x, labels = global_batch(seed)
        pair = []
        for head, opt in ((sparse, opt_sparse), (dense, opt_dense)):
            loss = head(local_rows(x, world, rank), local_rows(labels, world, rank))
            loss.backward()
            opt.step()
            opt.zero_grad()
            pair.append(loss.detach())
        losses.append(pair)
    out["rate1"] = dict(losses=losses, sparse=sparse.weight.detach().clone(), dense=dense.weight.detach().clone())
    return out


def _check_ddp(world, rank):
    from torch.nn.parallel import DistributedDataParallel as DDP

    out = {}
    x, labels = global_batch(1)
    inputs = torch.randn(x.shape[0], D_IN, generator=torch.Generator().manual_seed(9))
    for grad_scale in ("global", "ddp"):
        torch.manual_seed(0)
        backbone = torch.nn.Linear(D_IN, D)
        model = DDP(backbone)
        head = make_head("arcface", grad_scale=grad_scale)
        loss = head(model(local_rows(inputs, world, rank)), local_rows(labels, world, rank))
        loss.backward()
        out[grad_scale] = dict(weight=backbone.weight.grad.clone(), bias=backbone.bias.grad.clone())
    return out


def _paper_heads(ir_seed=11, fair_seed=12, ldam_seed=13):
    torch.manual_seed(ir_seed)
    ir = mk.IRSoftmax(C, D, momentum=0.5)
    torch.manual_seed(fair_seed)
    fair = mk.FairLoss(C, D, update_every=2, min_replay=1, replay_batch=4, train_steps=1, epsilon_start=0.5)
    torch.manual_seed(ldam_seed)
    ldam = mk.LDAMSoftmax(C, D)  # online class counts
    return ir, fair, ldam


PAPER_STEPS = (41, 42, 43, 44)  # global batches: two Fair Loss moves


def paper_state(ir, fair, ldam):
    names = ("class_margins", "margin_level", "seen_counts", "window_counts", "window_cos_sum", "pending_state",
             "pending_score")
    return dict(centers=ir.centers.clone(), **{n: getattr(fair, n).clone() for n in names},
                ldam_counts=ldam.class_counts.clone(), ldam_margins=ldam.class_margins.clone())


def _check_paper_heads(world, rank):
    """IR-Softmax centers, Fair Loss statistics/margins and online LDAM counts from local batches,
    synchronised; then a bad label on one rank: every rank raises its error, and the group goes on."""
    ir, fair, ldam = _paper_heads(ir_seed=11 + rank)  # centers differ at init: the first step shares them
    for seed in PAPER_STEPS:
        x, labels = global_batch(seed)
        for head in (ir, fair, ldam):
            head(local_rows(x, world, rank), local_rows(labels, world, rank))
    out = paper_state(ir, fair, ldam)
    x, labels = global_batch(PAPER_STEPS[0])
    xl, yl = local_rows(x, world, rank), local_rows(labels, world, rank).clone()
    if rank == _bad_rank(world):
        yl[-1] = C + 5
    for name, module in (("ir", ir), ("fair", fair), ("ldam", ldam)):
        try:
            module(xl, yl)
            out[f"{name}_error"] = None
        except ValueError as err:
            out[f"{name}_error"] = str(err)
    ir(local_rows(x, world, rank), local_rows(labels, world, rank))  # still in step
    return out


def _bad_rank(world):
    return 1 if SIZES[world][1] else 2


def _check_bad_inputs(world, rank):
    out = {}
    x, labels = global_batch(1)
    head = make_head("arcface")
    xl, yl = local_rows(x, world, rank), local_rows(labels, world, rank).clone()
    bad = yl.clone()
    if rank == _bad_rank(world):
        bad[-1] = C + 5
    if rank == 3:  # a second bad rank: the first one in rank order is reported
        bad[0] = -7
    try:
        head(xl, bad)
        out["labels"] = None
    except ValueError as err:
        out["labels"] = (type(err).__name__, str(err))
    try:
        head(xl.double() if rank == 0 else xl, yl)
        out["dtype"] = None
    except ValueError as err:
        out["dtype"] = (type(err).__name__, str(err))
    # The group is still in step: a good step works afterwards.
    xl = xl.clone().requires_grad_(True)
    loss = head(xl, yl)
    loss.backward()
    out["after"] = dict(loss=loss.detach(), grad_x=xl.grad.clone())
    return out


def _check_stats_heads_agree(world, rank):
    """IRSoftmax / FairLoss built differently on one rank, or fed another dtype: the same error on
    every rank (their state diverged silently, the agent's broadcast hung, or gloo aborted)."""
    x, labels = global_batch(1)
    xl, yl = local_rows(x, world, rank), local_rows(labels, world, rank)
    other = rank == 1
    builds = {
        "ir_momentum": lambda: mk.IRSoftmax(C, D, momentum=0.3 if other else 0.5),
        "fair_update_every": lambda: mk.FairLoss(C, D, update_every=3 if other else 2),
    }
    out = {name: caught(lambda: build()(xl, yl)) for name, build in builds.items()}
    # the same arguments, spelled differently (a default written out on one rank): agreed, trains
    out["ir_spelled"] = caught(lambda: (mk.IRSoftmax(C, D, reduction="mean") if other else mk.IRSoftmax(C, D))(xl, yl))
    out["fair_spelled"] = caught(lambda: (mk.FairLoss(C, D, ignore_index=-100) if other else mk.FairLoss(C, D))(xl, yl))
    head = mk.IRSoftmax(C, D)
    out["ir_dtype"] = caught(lambda: head(xl.to(torch.bfloat16) if rank == 0 else xl, yl))
    out["after"] = caught(lambda: head(xl, yl))  # still in step: a good call works
    return out


def _check_subgroup_checkpoint(world, rank, outdir):
    """A head over the subgroup of global ranks [1, 2] (not 0..n-1) saves and loads sharded."""
    group = torch.distributed.new_group([1, 2])  # every rank creates it
    if rank == 0:
        return None
    head = PartitionedMarginSoftmax(C, D, mk.ArcFace(), 64.0, seed=5, process_group=group)
    path = os.path.join(outdir, "dcp_subgroup")
    save_sharded(head, path)
    fresh = PartitionedMarginSoftmax(C, D, mk.ArcFace(), 64.0, seed=6, process_group=group)
    load_sharded(fresh, path)
    return dict(saved=head.full_state_dict()["weight"], loaded=fresh.full_state_dict()["weight"])


def _checkpoint_head(seed, device="cpu"):
    """A head with weight, class margins and momentum state (after one Partial FC step)."""
    head = PartitionedMarginSoftmax(C, D, mk.ArcFace(), 64.0, sample_rate=0.5, class_margins=class_margins(),
                                    seed=seed, device=device)
    opt = PartialFCSGD(head, lr=0.1, momentum=0.9, weight_decay=5e-4)
    x, labels = global_batch(seed)
    world, rank = head.world_size, head.rank
    head(local_rows(x, world, rank).to(device), local_rows(labels, world, rank).to(device)).backward()
    opt.step()
    return head


def _check_checkpoints(world, rank, outdir):
    out = {}
    if world in (2, 4):  # writers
        head = _checkpoint_head(seed=world)
        full = head.full_state_dict()
        out["saved"] = full
        if rank == 0:
            torch.save(full, os.path.join(outdir, f"full_w{world}.pt"))
        save_sharded(head, os.path.join(outdir, f"dcp_w{world}"))
    source = {3: 2, 1: 4}.get(world)
    if source is not None:  # readers, at another world size
        torch.distributed.barrier()
        fresh = PartitionedMarginSoftmax(C, D, mk.ArcFace(), 64.0, sample_rate=0.5, seed=99)
        load_sharded(fresh, os.path.join(outdir, f"dcp_w{source}"))
        out["dcp"] = fresh.full_state_dict()
        out["dcp_local"] = {n: getattr(fresh, n).detach().clone() for n in fresh.per_class_names()}
        fresh2 = PartitionedMarginSoftmax(C, D, mk.ArcFace(), 64.0, sample_rate=0.5, seed=98)
        fresh2.load_full_state_dict(torch.load(os.path.join(outdir, f"full_w{source}.pt")))
        PartialFCSGD(fresh2, lr=0.1, momentum=0.9)  # picks up the loaded momentum
        out["full"] = fresh2.full_state_dict()
        out["source"] = source
    return out


def _worker(rank, world, port, outdir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)

    def compute():
        results = dict(
            range=(shard_range(C, world, rank)),
            equivalence=_check_equivalence(world, rank),
            init=_check_init(world, rank),
            tiny=_check_tiny(world, rank),
            checkpoints=_check_checkpoints(world, rank, outdir),
        )
        if world > 1:
            results["partial_fc"] = _check_partial_fc(world, rank)
            results["ddp"] = _check_ddp(world, rank)
            results["papers"] = _check_paper_heads(world, rank)
            results["bad"] = _check_bad_inputs(world, rank)
            results["stats_agree"] = _check_stats_heads_agree(world, rank)
        if world == 3:
            results["subgroup_checkpoint"] = _check_subgroup_checkpoint(world, rank, outdir)
        return results

    save_results(compute, world, rank, outdir)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    outdir = str(tmp_path_factory.mktemp("distributed"))
    return {world: run_world(world, outdir, SPAWN_TIMEOUT_S, _worker) for world in WORLD_ORDER}


WORLDS = pytest.mark.parametrize("world", WORLD_ORDER)


# --------------------------------------------------------------------------- gloo runs
@WORLDS
def test_ranks_own_their_shard(runs, world):
    assert [r["range"] for r in runs[world]] == [shard_range(C, world, r) for r in range(world)]


@WORLDS
@pytest.mark.parametrize("case", list(CASES))
def test_partitioned_equals_single_process(runs, world, case):
    x, labels = case_batch(case, 1)
    ref_loss, ref_gx, ref_gw = reference(case, x, labels)
    results = [r["equivalence"][case] for r in runs[world]]
    for res in results:  # the same loss on every rank, bit for bit
        assert torch.equal(res["loss"], results[0]["loss"])
    assert rel_err(results[0]["loss"], ref_loss) < TOL
    grad_x = torch.cat([res["grad_x"] for res in results])
    assert grad_x.shape == ref_gx.shape
    assert rel_err(grad_x, ref_gx) < TOL
    for r, res in enumerate(results):  # each rank's rows, not just the sum
        assert rel_err(res["grad_x"], local_rows(ref_gx, world, r)) < TOL or SIZES[world][r] == 0
    grad_w = torch.cat([res["grad_w"] for res in results])
    for r, res in enumerate(results):
        assert res["grad_w"].shape == (shard_range(C, world, r)[1] - shard_range(C, world, r)[0], D)
    assert rel_err(grad_w, ref_gw) < TOL


@WORLDS
def test_fewer_classes_than_ranks(runs, world):
    x, labels, weight = _tiny_inputs()
    w = weight.clone().requires_grad_(True)
    xg = x.clone().requires_grad_(True)
    ref = mk.margin_cross_entropy(xg, w, labels, mk.CosFace(0.3), 16.0)
    ref.backward()
    results = [r["tiny"] for r in runs[world]]
    assert all(torch.equal(res["loss"], results[0]["loss"]) for res in results)
    assert rel_err(results[0]["loss"], ref) < TOL
    assert rel_err(torch.cat([res["grad_x"] for res in results]), xg.grad) < TOL
    assert rel_err(torch.cat([res["grad_w"] for res in results]), w.grad) < TOL
    if world == 4:
        assert results[3]["grad_w"].shape == (0, D)


@WORLDS
def test_init_is_the_same_global_weight_at_every_world_size(runs, world):
    expected = PartitionedMarginSoftmax(C, D, seed=7).weight.detach()
    for r, res in enumerate(runs[world]):
        assert torch.equal(res["init"]["weight"], expected)
        start, stop = shard_range(C, world, r)
        assert torch.equal(res["init"]["local"], expected[start:stop])


@pytest.mark.parametrize("reader", [3, 1])
def test_checkpoints_reshard_bitwise(runs, reader):
    """Saved at 2 -> loaded at 3 and saved at 4 -> loaded at 1, full and DCP-sharded."""
    source = runs[reader][0]["checkpoints"]["source"]
    saved = runs[source][0]["checkpoints"]["saved"]
    assert set(saved) == {"weight", "class_margins", "momentum_buffer", "momentum_initialized", "sample_step", "seed"}
    assert torch.count_nonzero(saved["momentum_buffer"]) > 0  # optimizer state really travels
    for res in runs[source]:  # full_state_dict is the same global state on every rank
        for name in saved:
            assert torch.equal(res["checkpoints"]["saved"][name], saved[name])
    for r, res in enumerate(runs[reader]):
        ck = res["checkpoints"]
        for route in ("dcp", "full"):
            assert set(ck[route]) == set(saved), route
            for name in saved:
                assert ck[route][name].dtype == saved[name].dtype
                assert torch.equal(ck[route][name], saved[name]), (route, name)
        start, stop = shard_range(C, reader, r)
        for name, local in ck["dcp_local"].items():
            assert torch.equal(local, saved[name][start:stop]), name


def _partial_fc_oracle(x, labels, sampled):
    """Loss and gradients of margin_cross_entropy over the sampled classes only."""
    keep = torch.sort(sampled).values
    remap = torch.full((C,), -1, dtype=torch.int64)
    remap[keep] = torch.arange(keep.numel())
    sub_labels = torch.where(labels >= 0, remap[labels.clamp_min(0)], labels)
    assert (sub_labels[labels >= 0] >= 0).all()
    loss, gx, gw_sub = reference("arcface", x, sub_labels, full_weight()[keep])
    gw = torch.zeros(C, D)
    gw[keep] = gw_sub
    return loss, gx, gw


@pytest.mark.parametrize("world", [2, 3, 4])
def test_partial_fc_distributed(runs, world):
    results = [r["partial_fc"] for r in runs[world]]
    for step, seed in enumerate((2, 3)):
        x, labels = global_batch(seed)
        recs = [res[step] for res in results]
        sampled = torch.cat([rec["sampled"] for rec in recs])
        assert sampled.unique().numel() == sampled.numel()
        for r, rec in enumerate(recs):
            start, stop = shard_range(C, world, r)
            assert ((rec["sampled"] >= start) & (rec["sampled"] < stop)).all()
        assert set(labels[labels >= 0].tolist()) <= set(sampled.tolist())  # every positive kept
        assert sampled.numel() < C
        for rec in recs:
            assert torch.equal(rec["loss"], recs[0]["loss"])
        grad_w = torch.cat([rec["grad_w"] for rec in recs])
        if step == 0:  # the sampled loss equals one process over the sampled classes
            ref_loss, ref_gx, ref_gw = _partial_fc_oracle(x, labels, sampled)
            assert rel_err(recs[0]["loss"], ref_loss) < TOL
            assert rel_err(torch.cat([rec["grad_x"] for rec in recs]), ref_gx) < TOL
            assert rel_err(grad_w, ref_gw) < TOL
        unsampled = torch.ones(C, dtype=torch.bool)
        unsampled[sampled] = False
        assert torch.count_nonzero(grad_w[unsampled]) == 0
        before_w = torch.cat([rec["before"]["weight"] for rec in recs])
        before_m = torch.cat([rec["before"]["momentum"] for rec in recs])
        after_w = torch.cat([rec["after"]["weight"] for rec in recs])
        after_m = torch.cat([rec["after"]["momentum"] for rec in recs])
        assert torch.equal(after_w[unsampled], before_w[unsampled])
        assert torch.equal(after_m[unsampled], before_m[unsampled])
        assert (after_w[~unsampled] != before_w[~unsampled]).any(dim=1).all()
        if step == 1:  # rows with momentum from step 0 that step 1 did not sample kept it
            assert torch.count_nonzero(before_m[unsampled]) > 0


@pytest.mark.parametrize("world", [2, 3, 4])
def test_sample_rate_one_is_the_dense_path(runs, world):
    for res in runs[world]:
        rate1 = res["partial_fc"]["rate1"]
        for sparse_loss, dense_loss in rate1["losses"]:
            assert torch.equal(sparse_loss, dense_loss)
        # sparse_sgd_step_ rounds once from float64: equal to torch.optim.SGD to an ulp.
        assert torch.allclose(rate1["sparse"], rate1["dense"], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_ddp_backbone_gradient_scale(runs, world):
    x, labels = global_batch(1)
    inputs = torch.randn(x.shape[0], D_IN, generator=torch.Generator().manual_seed(9))
    torch.manual_seed(0)
    backbone = torch.nn.Linear(D_IN, D)
    loss = mk.margin_cross_entropy(backbone(inputs), full_weight(), labels, mk.ArcFace(0.5), 64.0)
    loss.backward()
    for res in runs[world]:
        for name in ("weight", "bias"):
            expected = getattr(backbone, name).grad
            # DDP averages over ranks: the global-mean loss's gradient / W by default ...
            assert rel_err(res["ddp"]["global"][name], expected / world) < TOL
            # ... and exactly that gradient with grad_scale="ddp" (insightface's convention).
            assert rel_err(res["ddp"]["ddp"][name], expected) < TOL


@pytest.mark.parametrize("world", [2, 3, 4])
def test_paper_heads_update_from_the_global_batch_on_every_rank(runs, world):
    """IR-Softmax's centers, Fair Loss's statistics, agent moves and margins, and online LDAM's
    counts and margins, trained on uneven local batches (one empty at W = 3), equal one
    process's on the global batches, bit for bit, on every rank."""
    ir, fair, ldam = _paper_heads()  # rank 0's seeds: its centers are the ones shared
    for seed in PAPER_STEPS:
        x, labels = global_batch(seed)
        for head in (ir, fair, ldam):
            head(x, labels)
    want = paper_state(ir, fair, ldam)
    assert int(fair.agent_moves) == 2 and bool((want["pending_state"] >= 0).any())
    for res in runs[world]:
        for name, value in want.items():
            assert torch.equal(res["papers"][name], value), name
        for name in ("ir_error", "fair_error", "ldam_error"):  # the bad rank's error, raised on every rank
            assert res["papers"][name].startswith(f"rank {_bad_rank(world)} of {world}: labels contains {C + 5}")


@pytest.mark.parametrize("world", [2, 3, 4])
def test_bad_labels_raise_the_same_error_on_every_rank(runs, world):
    bad = [res["bad"] for res in runs[world]]
    labels_err = [b["labels"] for b in bad]
    assert all(e is not None and e[0] == "ValueError" for e in labels_err)
    assert len({e[1] for e in labels_err}) == 1
    assert f"rank {_bad_rank(world)} of {world}" in labels_err[0][1] and str(C + 5) in labels_err[0][1]
    dtype_err = [b["dtype"] for b in bad]
    assert all(e is not None and e[0] == "MarginKitTypeError" for e in dtype_err)
    assert len({e[1] for e in dtype_err}) == 1 and "float64" in dtype_err[0][1]
    x, labels = global_batch(1)
    ref_loss, ref_gx, _ = reference("arcface", x, labels)
    assert rel_err(bad[0]["after"]["loss"], ref_loss) < TOL
    assert rel_err(torch.cat([b["after"]["grad_x"] for b in bad]), ref_gx) < TOL


@pytest.mark.parametrize("world", [2, 3])
def test_stats_heads_built_or_fed_differently_raise_the_same_error_on_every_rank(runs, world):
    outs = [res["stats_agree"] for res in runs[world]]
    expected = {
        "ir_momentum": ("ValueError", "IRSoftmax ranks disagree on momentum: rank 0 has 0.5, rank 1 has 0.3"),
        "fair_update_every": ("ValueError", "FairLoss ranks disagree on update_every: rank 0 has 2, rank 1 has 3"),
        "ir_dtype": ("MarginKitTypeError", "embeddings dtype differs between ranks: ['torch.bfloat16'"),
    }
    for name, (kind, text) in expected.items():
        errors = [o[name] for o in outs]
        assert all(e == errors[0] for e in errors), name
        assert errors[0][0] == kind and text in errors[0][1], errors[0]
    assert all(o["after"] is None and o["ir_spelled"] is None and o["fair_spelled"] is None for o in outs)


def test_a_subgroup_of_other_ranks_saves_and_loads_sharded(runs):
    outs = [res["subgroup_checkpoint"] for res in runs[3]]
    assert outs[0] is None
    for out in outs[1:]:
        assert torch.equal(out["loaded"], out["saved"])
    assert torch.equal(outs[1]["saved"], outs[2]["saved"])
