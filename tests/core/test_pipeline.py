"""The pipeline's own behaviour: inter-class filtering, and the label check that does not stall
the host (the CUDA path's CPU twin)."""

import os

import pytest
import torch
import torch.nn.functional as F

import marginkit as mk
from marginkit import _pipeline
from tests.helpers import SyncCounter

BACKENDS = ["torch", "triton"] if os.environ.get("TRITON_INTERPRET") == "1" else ["torch"]


def dense_filtered_loss(x, w, y, m, s, threshold):
    """insightface's CombinedMarginLoss + interclass_filtering_threshold, written densely in float64
    (CosFace target; non-target cosines above the threshold set to 0 on labelled rows)."""
    cos = F.normalize(x, dim=1) @ F.normalize(w, dim=1).T
    onehot = F.one_hot(y, w.shape[0]).bool()
    dirty = (cos > threshold) & ~onehot
    cos = torch.where(dirty, torch.zeros_like(cos), cos)
    logits = s * torch.where(onehot, cos - m, cos)
    return F.cross_entropy(logits, y)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("threshold", [0.05, 0.3])
def test_interclass_filtering_matches_the_dense_definition(backend, threshold):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(7, 12, generator=g, dtype=torch.float64)
    w = torch.randn(23, 12, generator=g, dtype=torch.float64)
    w[5] = w[2] + 0.05 * torch.randn(12, generator=g, dtype=torch.float64)  # a near-duplicate identity
    y = torch.randint(0, 23, (7,), generator=g)
    y[0] = 2
    x32, w32 = x.float().requires_grad_(), w.float().requires_grad_()
    loss = mk.margin_cross_entropy(
        x32, w32, y, mk.CosFace(0.35), 16.0, backend=backend, interclass_filtering_threshold=threshold
    )
    loss.backward()
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    ref = dense_filtered_loss(xr, wr, y, 0.35, 16.0, threshold)
    ref.backward()
    assert abs(loss.item() - ref.item()) <= 1e-5 * abs(ref.item())
    for got, want in ((x32.grad, xr.grad), (w32.grad, wr.grad)):
        assert float((got.double() - want).norm() / want.norm()) < 1e-5
    unfiltered = mk.margin_cross_entropy(x32.detach(), w32.detach(), y, mk.CosFace(0.35), 16.0, backend=backend)
    assert unfiltered.item() != pytest.approx(loss.item(), rel=1e-3)  # the filter changed something


def test_interclass_filtering_threshold_is_checked():
    x, w, y = torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="interclass_filtering_threshold"):
        mk.margin_cross_entropy(x, w, y, interclass_filtering_threshold=1.5)
    with pytest.raises(ValueError, match="interclass_filtering_threshold"):
        mk.MarginSoftmax(5, 4, interclass_filtering_threshold=-0.1)(x, y)


@pytest.fixture
def deferred_on_cpu(monkeypatch):
    """Run the CUDA label check (device flag read back without blocking) on CPU tensors."""
    monkeypatch.setattr(_pipeline, "DEFERRED_LABEL_CHECK_DEVICES", ("cpu",))
    _pipeline._pending.clear()
    yield
    _pipeline._pending.clear()


def test_deferred_label_check_leaves_bad_rows_out_and_raises_at_the_next_call(deferred_on_cpu):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 8, generator=g, requires_grad=True)
    w = torch.randn(11, 8, generator=g, requires_grad=True)
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ignored = torch.tensor([1, 4, -100, 3, -100, 7])
    want = mk.margin_cross_entropy(x2, w2, ignored, mk.ArcFace(0.5), 16.0)
    want.backward()
    bad = torch.tensor([1, 4, 11, 3, -100, 7])  # 11 is out of range, -100 ignored
    loss = mk.margin_cross_entropy(x, w, bad, mk.ArcFace(0.5), 16.0)
    loss.backward()
    assert torch.equal(loss, want)  # the bad row contributes nothing ...
    assert torch.equal(w.grad, w2.grad) and torch.equal(x.grad, x2.grad)  # ... and changes no weight
    with pytest.raises(ValueError, match=r"labels contains 11, outside \[0, C\) = \[0, 11\)"):
        mk.margin_cross_entropy(x, w, ignored, mk.ArcFace(0.5), 16.0)
    mk.margin_cross_entropy(x, w, ignored, mk.ArcFace(0.5), 16.0)  # raised once, then clean


def test_pending_label_error_can_be_waited_for(deferred_on_cpu):
    x, w = torch.randn(2, 4), torch.randn(3, 4)
    mk.margin_cross_entropy(x, w, torch.tensor([0, -5]))
    with pytest.raises(ValueError, match="labels contains -5"):
        mk.functional.check_pending_labels(wait=True)


@pytest.mark.parametrize("labels, ignore_index, bad", [
    ([0, 2, 1], -100, None),  # every label good: no error
    ([3, 0, 3, 1], 3, None),  # ignore_index inside [0, C): those rows are ignored, not bad
    ([-7, 2, 9, -100], -100, 9),  # the flag is (min, max) with good rows as ignore_index: max names 9
    ([-7, 2, -100], -100, -7),  # between ignore_index and 0: the max names it
    ([1, 9, -100, 12], -100, 12),
    ([1, -100, -300, 7], -100, -300),  # below ignore_index: the min names it first
])
def test_deferred_flag_finds_every_bad_label_and_nothing_else(deferred_on_cpu, labels, ignore_index, bad):
    x, w = torch.randn(len(labels), 4), torch.randn(5, 4)
    mk.margin_cross_entropy(x, w, torch.tensor(labels), ignore_index=ignore_index)
    if bad is None:
        mk.functional.check_pending_labels(wait=True)
    else:
        with pytest.raises(ValueError, match=rf"labels contains {bad}, outside"):
            mk.functional.check_pending_labels(wait=True)


def test_the_deferred_training_step_reads_no_value_on_the_host(deferred_on_cpu):
    x = torch.randn(8, 16, requires_grad=True)
    w = torch.randn(40, 16, requires_grad=True)
    y = torch.randint(0, 40, (8,))
    y[3] = -100
    head_margins = torch.rand(40) * 0.4
    with SyncCounter() as counter:
        loss = mk.margin_cross_entropy(x, w, y, mk.ArcFace(0.5), 32.0, backend="torch")
        loss.backward()
    assert counter.syncs == []
    # The CPU's eager check does read values: the counter sees it (so it can fail).
    _pipeline.DEFERRED_LABEL_CHECK_DEVICES = ()
    with SyncCounter() as counter:
        mk.margin_cross_entropy(x, w, y, mk.ArcFace(0.5), 32.0, backend="torch", class_margins=head_margins)
    assert counter.syncs


def test_deferred_margin_check_leaves_bad_rows_out_and_raises_at_the_next_call(deferred_on_cpu):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(6, 8, generator=g)
    w = torch.randn(11, 8, generator=g)
    y = torch.tensor([1, 4, 7, 3, -100, 7])
    margins = torch.full((11,), 0.3)
    margins[0] = float("nan")  # the ignored row's gather falls on class 0: it must not count
    good = mk.margin_cross_entropy(x, w, y, mk.ArcFace(0.5), 16.0, class_margins=margins)
    mk.functional.check_pending_labels(wait=True)  # nothing pending: class 0 is used by no valid row
    margins[7] = 3.5  # >= pi for ArcFace, used by rows 2 and 5
    with SyncCounter() as counter:
        loss = mk.margin_cross_entropy(x, w, y, mk.ArcFace(0.5), 16.0, class_margins=margins, reduction="none")
    assert counter.syncs == []  # no host read of the margins on the deferred path
    assert loss[2] == 0 and loss[5] == 0 and torch.isfinite(loss).all()
    assert torch.isfinite(good)
    with pytest.raises(ValueError, match=r"class_margins contains 3.5 .*ArcFace margins must be finite, >= 0 and < 3.14"):
        mk.margin_cross_entropy(x, w, y, mk.ArcFace(0.5), 16.0)
