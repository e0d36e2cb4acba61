"""The partitioned head in one process: autocast, its state (updated rows, optimizers, checkpoints),
the device sampler against the csrc op, and the agreement messages."""

from __future__ import annotations

import copy
import os
import pickle
import re

import pytest
import torch

import marginkit as mk
from marginkit.distributed import PartialFCSGD, PartitionedMarginSoftmax, load_sharded, save_sharded
from marginkit.distributed.agreement import head_config, mismatch_error
from marginkit.distributed.device_sampling import sample_classes
from marginkit.ops import partial_fc_sample
from tests.helpers import rel_err


def _batch(seed=0, rows=12, classes=50, dim=8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, dim, generator=g), torch.randint(0, classes, (rows,), generator=g)


def test_autocast_equals_explicit_cast_and_the_float64_truth():
    """Under bf16 autocast (fp32 master weight) forward and backward run on the bf16 embeddings."""
    head = PartitionedMarginSoftmax(50, 8, mk.ArcFace(0.5), 16.0, max_local_batch=16)
    x, y = _batch()
    xa = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = head(xa, y)
    loss.backward()
    grads = xa.grad.clone(), head.weight.grad.clone()
    head.zero_grad()
    xb = x.bfloat16().requires_grad_(True)
    explicit = head(xb, y)
    explicit.backward()
    assert torch.equal(loss, explicit) and torch.equal(grads[1], head.weight.grad)
    assert torch.equal(grads[0], xb.grad.float())
    x64 = x.bfloat16().double().requires_grad_(True)
    w64 = head.weight.detach().double().requires_grad_(True)
    ref = mk.reference.margin_cross_entropy(x64, w64, y, mk.ArcFace(0.5), 16.0)
    ref.backward()
    assert rel_err(loss, ref) < 1e-5
    assert rel_err(grads[1], w64.grad) < 1e-4  # the weight gradient is float32 (master weight)
    assert rel_err(grads[0], x64.grad) < 1e-2  # delivered in bf16, as the embeddings


def test_a_backward_called_inside_autocast_equals_one_called_after_it():
    """The head's backward runs with autocast off, as its forward: inside the autocast block or
    after it, the same bits (its backend's GEMMs ran in bf16 inside)."""
    head = PartitionedMarginSoftmax(50, 8, mk.ArcFace(0.5), 16.0, max_local_batch=16)
    x, y = _batch(seed=3)
    grads = {}
    for inside in (False, True):
        head.zero_grad()
        xa = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = head(xa, y)
            if inside:
                loss.backward()
        if not inside:
            loss.backward()
        grads[inside] = xa.grad.clone(), head.weight.grad.clone()
    assert torch.equal(grads[True][0], grads[False][0]) and torch.equal(grads[True][1], grads[False][1])


def test_updated_rows_stay_bounded_under_a_plain_optimizer():
    """A sampling head stepped by torch.optim keeps one (C_r,) mask, not a tensor per step."""
    head = PartitionedMarginSoftmax(200, 8, mk.CosFace(0.3), 16.0, sample_rate=0.1, max_local_batch=12)
    opt = torch.optim.SGD(head.parameters(), lr=0.1)
    sampled = []
    for step in range(30):
        x, y = _batch(step, classes=200)
        head(x, y).backward()
        sampled.append(head.last_sampled)
        opt.step()
        opt.zero_grad()  # torch.optim's zero_grad: the head's own is never called
    assert head._updated_mask.shape == (200,)
    assert torch.equal(head.take_updated_rows(), torch.unique(torch.cat(sampled)))
    assert head.take_updated_rows().numel() == 0


def test_partial_fc_sgd_deepcopies_and_pickles():
    head = PartitionedMarginSoftmax(60, 8, mk.ArcFace(0.5), 16.0, sample_rate=0.5, seed=3)
    opt = PartialFCSGD(head, lr=0.1, momentum=0.9, weight_decay=1e-3)
    x, y = _batch(1, classes=60)
    head(x, y).backward()
    grad = head.weight.grad.clone()
    copies = [copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))]
    opt.step()
    for other in copies:
        assert other.head is not head and other.param_groups[0]["params"][0] is other.head.weight
        if other.head.weight.grad is None:  # pickle drops .grad (torch's rule for tensors)
            other.head.weight.grad = grad.clone()
        other.step()
        assert torch.equal(other.head.weight, head.weight)
        assert torch.equal(other.head.momentum_buffer, head.momentum_buffer)


@pytest.mark.parametrize("route", ["full", "sharded"])
def test_checkpoints_restore_the_seed(tmp_path, route):
    head = PartitionedMarginSoftmax(60, 8, sample_rate=0.5, seed=7)
    x, y = _batch(2, classes=60)
    head(x, y)
    other = PartitionedMarginSoftmax(60, 8, sample_rate=0.5, seed=99)
    if route == "full":
        other.load_full_state_dict(head.full_state_dict())
    else:
        save_sharded(head, str(tmp_path / "ckpt"))
        load_sharded(other, str(tmp_path / "ckpt"))
    assert other.seed == 7 and torch.equal(other.sample_step, head.sample_step)
    head(x, y)
    other(x, y)
    assert torch.equal(other.last_sampled, head.last_sampled)  # the same sampling stream


def test_sharded_load_checks_shapes_before_dcp(tmp_path):
    path = str(tmp_path / "ckpt")
    save_sharded(PartitionedMarginSoftmax(60, 8), path)
    for wrong in (PartitionedMarginSoftmax(60, 12), PartitionedMarginSoftmax(60, 8, dtype=torch.float64)):
        with pytest.raises(ValueError, match=f"weight in {path} has shape \\(60, 8\\) and dtype torch.float32"):
            load_sharded(wrong, path)


@pytest.mark.parametrize("start,stop,num_sample", [(0, 40, 10), (17, 71, 20), (5, 9, 2)])
def test_device_sampler_equals_the_csrc_op(start, stop, num_sample):
    g = torch.Generator().manual_seed(start)
    for step in range(4):
        labels = torch.randint(-3, 80, (30,), generator=g)
        seed = 5 * (1 << 32) + step
        index, local = partial_fc_sample(labels, start, stop, num_sample, seed)
        mine = sample_classes(labels, start, stop, index.numel(), torch.tensor(seed))
        assert torch.equal(mine[0], index) and torch.equal(mine[1], local)


def test_mismatch_error_names_the_first_field_and_both_values():
    a = head_config(PartitionedMarginSoftmax(60, 8, mk.ArcFace(0.5), 64.0))
    b = head_config(PartitionedMarginSoftmax(60, 8, mk.CosFace(0.35), 30.0))
    err = mismatch_error([a, a, b])
    assert "disagree on margin: rank 0 has ArcFace" in str(err) and "rank 2 has CosFace" in str(err)
    assert mismatch_error([a, a]) is None


def test_constructor_checks_the_new_arguments():
    with pytest.raises(ValueError, match="max_local_batch"):
        PartitionedMarginSoftmax(60, 8, max_local_batch=0)
    with pytest.raises(ValueError, match="grad_reduce_dtype"):
        PartitionedMarginSoftmax(60, 8, grad_reduce_dtype=torch.int8)
    head = PartitionedMarginSoftmax(60, 8, max_local_batch=4)
    x, y = _batch(rows=5, classes=60)
    with pytest.raises(ValueError, match="exceeds max_local_batch = 4"):
        head(x, y)


def test_declared_one_process_defers_a_bad_label_to_the_next_call():
    head = PartitionedMarginSoftmax(60, 8, mk.ArcFace(0.5), 16.0, max_local_batch=12)
    x, y = _batch(3, classes=60)
    head(x, y)
    bad = y.clone()
    bad[2] = 75
    ignored = y.clone()
    ignored[2] = -100
    loss = head(x, bad)
    ref = mk.reference.margin_cross_entropy(x, head.weight.detach(), ignored, mk.ArcFace(0.5), 16.0)
    assert rel_err(loss, ref) < 1e-5
    with pytest.raises(ValueError, match="labels contains 75"):
        head(x, y)
    assert rel_err(head(x, y), mk.reference.margin_cross_entropy(x, head.weight.detach(), y, mk.ArcFace(0.5), 16.0)) < 1e-5


@pytest.mark.parametrize("garbage, shown", [
    (-(1 << 62), str(-(1 << 62))), (1 << 62, str(1 << 62)),
    # a NaN cast to int64 is int64's lowest value, the reject marker's: sent as the fourth lowest
    (-(1 << 63), "-9223372036854775805 or less (a NaN or inf cast to int64 is -9223372036854775808)"),
    (-(1 << 63) + 2, "-9223372036854775805 or less"), (-(1 << 63) + 3, "-9223372036854775805 or less"),
])
def test_declared_one_process_reports_a_garbage_label_as_out_of_range(garbage, shown):
    # Every label <= -2^62 + 2 used to read as a rank's rejected input (a TypeError no rank raised).
    head = PartitionedMarginSoftmax(60, 8, mk.ArcFace(0.5), 16.0, max_local_batch=12)
    x, y = _batch(3, classes=60)
    head(x, y)  # the first call checks on the host; later ones defer to the next call
    bad = y.clone()
    bad[0] = garbage
    ignored = y.clone()
    ignored[0] = -100
    loss = head(x, bad)
    ref = mk.reference.margin_cross_entropy(x, head.weight.detach(), ignored, mk.ArcFace(0.5), 16.0)
    assert rel_err(loss, ref) < 1e-5
    with pytest.raises(ValueError, match=re.escape(f"labels contains {shown}")):
        head(x, y)


@pytest.mark.parametrize("ignore_index", [-(1 << 63), -(1 << 63) + 3, 1 << 63])
def test_an_ignore_index_outside_int64_or_on_the_reject_marker_is_refused(ignore_index):
    with pytest.raises(ValueError, match=rf"ignore_index (= {ignore_index} does not fit in int64|must be >= {-(1 << 63) + 4} "
                                         rf"\(int64's four lowest values are reserved\), got {ignore_index})"):
        PartitionedMarginSoftmax(60, 8, ignore_index=ignore_index)
    PartitionedMarginSoftmax(60, 8, ignore_index=-(1 << 63) + 4)


def test_partial_fc_sgd_steps_after_load_state_dict():
    # load_state_dict goes through __setstate__ with no head in the state (it raised AttributeError).
    head = PartitionedMarginSoftmax(60, 8, mk.ArcFace(0.5), 16.0, sample_rate=0.5, seed=3)
    twin = copy.deepcopy(head)
    opt, twin_opt = PartialFCSGD(head, lr=0.1, momentum=0.9), PartialFCSGD(twin, lr=0.5, momentum=0.0)
    for step in range(2):
        x, y = _batch(step, classes=60)
        head(x, y).backward()
        opt.step()
        opt.zero_grad()
    twin.load_state_dict(head.state_dict())
    twin_opt.load_state_dict(opt.state_dict())
    assert twin_opt.head is twin and twin_opt.param_groups[0]["lr"] == 0.1
    x, y = _batch(5, classes=60)
    for h, o in ((head, opt), (twin, twin_opt)):
        h(x, y).backward()
        o.step()
    assert torch.equal(twin.weight, head.weight)


def test_a_raising_kernel_leaves_the_partial_fc_state_untouched(monkeypatch):
    from marginkit.backends import torch_chunked

    head = PartitionedMarginSoftmax(60, 8, mk.ArcFace(0.5), 16.0, sample_rate=0.5, seed=3)
    x, y = _batch(1, classes=60)
    head(x, y).backward()
    before = {k: v.clone() for k, v in head.state_dict().items()}
    mask = head._updated_mask.clone()

    def broken(*args, **kwargs):
        raise RuntimeError("kernel failed")

    monkeypatch.setattr(torch_chunked, "lse_partials", broken)
    with pytest.raises(RuntimeError, match="kernel failed"):
        head(x, y)
    after = head.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert torch.equal(head._updated_mask, mask)
    monkeypatch.undo()
    head(x, y)
    assert int(head.sample_step) == int(before["sample_step"]) + 1


def test_input_dtype_may_change_between_calls_without_a_declared_batch():
    head = PartitionedMarginSoftmax(60, 8, mk.ArcFace(0.5), 16.0)
    x, y = _batch(1, classes=60)
    head(x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the rows on the wire are bf16 now
        loss = head(x, y)
    assert torch.isfinite(loss)


def test_class_margins_checked_whole_and_against_the_spec():
    bad = torch.full((60,), 0.3)
    bad[59] = float("nan")  # in the last rank's slice at any world size: every rank must reject it
    with pytest.raises(ValueError, match="finite"):
        PartitionedMarginSoftmax(60, 8, mk.ArcFace(0.5), 16.0, class_margins=bad)
    with pytest.raises(ValueError, match="ArcFace margins must lie in"):
        PartitionedMarginSoftmax(60, 8, mk.ArcFace(0.5), 16.0, class_margins=torch.full((60,), 4.0))


@pytest.mark.parametrize("sample_rate", [1.0, 0.5])
def test_every_tensor_the_head_holds_moves_with_it(sample_rate):
    """``.to(device)`` moves parameters and buffers only: a tensor kept as a plain attribute stays behind
    (the updated-rows mask did, and Partial FC's backward then indexed a CPU mask with CUDA rows)."""
    head = PartitionedMarginSoftmax(60, 8, mk.ArcFace(0.5), 16.0, sample_rate=sample_rate,
                                    class_margins=torch.full((60,), 0.3))
    x, y = _batch(0, classes=60)
    head(x, y).backward()  # the state a step leaves
    plain = [name for name, value in vars(head).items() if torch.is_tensor(value) and name != "last_sampled"]
    assert plain == [], f"tensors outside the module's buffers: {plain}"
    moved = head.to("meta")
    assert all(t.device.type == "meta" for t in list(moved.parameters()) + list(moved.buffers()))
    assert "_updated_mask" not in head.state_dict()  # not checkpointed
