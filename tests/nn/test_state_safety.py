"""Stateful heads never corrupt their state (issue 12, points 2 and 3).

For every head with running state (AdaCos ``.scale``, LDAMSoftmax ``class_counts``/``class_margins``,
AdaFace ``batch_mean``/``batch_std``, CurricularFace ``.t``, IRSoftmax ``.centers``; FairLoss is
tested in test_fair_loss.py): every buffer and parameter is bit-identical after a rejected batch,
after a kernel that raises in the middle of the step, and after a non-finite batch in training
mode (refused with a ValueError naming ``embeddings``); a good batch afterwards works and moves the
state. The stateless losses propagate NaN as torch does.
"""

import pytest
import torch

import marginkit as mk
import marginkit.backends.torch_chunked as torch_backend

C, D, B = 12, 8, 8

HEADS = {
    "AdaCos": lambda: mk.AdaCos(C, D, backend="torch"),
    "LDAMSoftmax": lambda: mk.LDAMSoftmax(C, D, backend="torch"),  # online class counts
    "AdaFace": lambda: mk.AdaFace(C, D, backend="torch"),
    "CurricularFace": lambda: mk.CurricularFace(C, D, backend="torch"),
    "IRSoftmax": lambda: mk.IRSoftmax(C, D, backend="torch"),
}
# The running state each head moves on a good training batch.
RUNNING_STATE = {
    "AdaCos": ["scale"],
    "LDAMSoftmax": ["class_counts", "class_margins"],
    "AdaFace": ["batch_mean", "batch_std"],
    "CurricularFace": ["t"],
    "IRSoftmax": ["centers"],
}


def batch(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, D, generator=g) * 5.0, torch.randint(0, C, (B,), generator=g)


def snapshot(head):
    """Every parameter and buffer (persistent or not) and the state_dict, cloned."""
    state = {f"sd.{k}": v.detach().clone() for k, v in head.state_dict().items()}
    state.update({f"p.{k}": v.detach().clone() for k, v in head.named_parameters()})
    state.update({f"b.{k}": v.detach().clone() for k, v in head.named_buffers()})
    return state


def assert_bit_identical(head, before):
    after = snapshot(head)
    assert after.keys() == before.keys()
    for key, old in before.items():
        new = after[key]
        assert new.dtype == old.dtype and torch.equal(new.view(-1).view(torch.uint8), old.view(-1).view(torch.uint8)), (
            f"{key} changed"
        )


@pytest.fixture(params=sorted(HEADS))
def trained_head(request):
    """(name, head) in training mode after two good steps, so its state is off its initial value."""
    torch.manual_seed(0)
    head = HEADS[request.param]()
    head.train()
    for seed in (1, 2):
        x, y = batch(seed)
        head(x.requires_grad_(), y).backward()
    return request.param, head


def assert_good_batch_moves_state(name, head, before):
    x, y = batch(99)
    x.requires_grad_()
    loss = head(x, y)
    loss.backward()
    assert torch.isfinite(loss) and bool(torch.isfinite(x.grad).all())
    after = snapshot(head)
    for buf in RUNNING_STATE[name]:
        assert bool(torch.isfinite(after[f"b.{buf}"].double()).all())
        assert not torch.equal(after[f"b.{buf}"], before[f"b.{buf}"]), f"{name}.{buf} did not move on a good batch"


def _bad_labels(kind, y):
    if kind == "labels of shape (B, 1)":
        return y[:, None]
    if kind == "a label >= C":
        return torch.where(torch.arange(B) == B - 1, torch.full_like(y, C), y)
    if kind == "int32 labels":
        return y.to(torch.int32)
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["labels of shape (B, 1)", "a label >= C", "int32 labels", "integer embeddings"])
def test_rejected_batch_leaves_state_bit_identical(trained_head, kind):
    name, head = trained_head
    before = snapshot(head)
    x, y = batch(3)
    if kind == "integer embeddings":
        x = x.long()
    else:
        y = _bad_labels(kind, y)
    with pytest.raises((ValueError, TypeError), match="labels|embeddings|dtype"):
        head(x, y)
    assert_bit_identical(head, before)
    assert_good_batch_moves_state(name, head, before)


def test_raising_kernel_leaves_state_bit_identical(trained_head, monkeypatch):
    """A failure in the middle of the step (the backend's row_losses raises after every check and
    every proposed state update were computed) leaves no partial update."""
    name, head = trained_head
    before = snapshot(head)

    def failing_row_losses(*args, **kwargs):
        raise RuntimeError("simulated kernel failure")

    with monkeypatch.context() as patch:
        patch.setattr(torch_backend, "row_losses", failing_row_losses)
        with pytest.raises(RuntimeError, match="simulated kernel failure"):
            head(*batch(4))
    assert_bit_identical(head, before)
    assert_good_batch_moves_state(name, head, before)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_training_batch_refused_naming_embeddings(trained_head, bad):
    name, head = trained_head
    before = snapshot(head)
    x, y = batch(5)
    x[2, 3] = bad
    with pytest.raises(ValueError, match=f"^embeddings contain NaN or infinite values; {name} (keeps running|refuses)") as err:
        head(x, y)
    assert "sample_margins" not in str(err.value) and "class_margins" not in str(err.value)
    assert_bit_identical(head, before)
    assert_good_batch_moves_state(name, head, before)


def test_non_finite_batch_in_eval_mode_propagates_nan_and_keeps_state(trained_head):
    """Eval mode moves no state, so the head is a plain loss there: NaN in, NaN out (as torch).
    AdaFace alone refuses, naming embeddings: its per-row margin comes from the row's norm, and a
    NaN norm has no margin (it used to fail naming a sample_margins the user never passed)."""
    name, head = trained_head
    head.eval()
    before = snapshot(head)
    x, y = batch(6)
    x[0, 0] = float("nan")
    if name == "AdaFace":
        with pytest.raises(ValueError, match="^embeddings contain NaN.*AdaFace takes each row's margin from its norm"):
            head(x, y)
    else:
        assert torch.isnan(head(x, y))
    assert_bit_identical(head, before)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_stateless_loss_propagates_nan_like_torch(backend):
    """A NaN row gives a NaN loss for that row; the other rows' losses are untouched (as
    torch's cross_entropy with reduction='none'); the mean is NaN."""
    x, y = batch(7)
    w = torch.randn(C, D, generator=torch.Generator().manual_seed(8))
    clean = mk.margin_cross_entropy(x, w, y, mk.CosFace(0.35), 16.0, reduction="none", backend=backend)
    x[1, 2] = float("nan")
    rows = mk.margin_cross_entropy(x, w, y, mk.CosFace(0.35), 16.0, reduction="none", backend=backend)
    assert torch.isnan(rows[1]) and torch.equal(rows[torch.arange(B) != 1], clean[torch.arange(B) != 1])
    assert torch.isnan(mk.margin_cross_entropy(x, w, y, mk.CosFace(0.35), 16.0, backend=backend))


def test_ldam_with_fixed_counts_is_stateless_and_propagates_nan():
    """Given class_counts, LDAMSoftmax keeps no running state: a NaN batch is a NaN loss, not an error."""
    head = mk.LDAMSoftmax(C, D, class_counts=torch.arange(1, C + 1), backend="torch").train()
    before = snapshot(head)
    x, y = batch(9)
    x[0, 0] = float("nan")
    assert torch.isnan(head(x, y))
    assert_bit_identical(head, before)


def test_range_loss_propagates_nan_row():
    # issue 12 point 3: it used to drop a NaN row silently (finite loss and gradients)
    x, y = batch(10)
    y = torch.arange(B) // 2  # classes of two rows each
    x[1, 0] = float("nan")
    x.requires_grad_()
    loss = mk.RangeLoss()(x, y)
    loss.backward()
    assert torch.isnan(loss)
    assert bool(torch.isnan(x.grad[:2]).any())


def test_the_range_loss_op_called_directly_propagates_nan_too():
    """marginkit.ops.range_loss (no module in between) does not drop a NaN row either."""
    x, y = batch(11)
    y = torch.arange(B) // 2
    clean = mk.ops.range_loss(x, y)
    assert torch.isfinite(clean)
    for bad in (float("nan"), float("inf")):  # the raw op gave a finite 13.07 for the NaN row, inf for inf
        x[3, 1] = bad
        assert torch.isnan(mk.ops.range_loss(x, y))


def test_magface_refuses_a_non_finite_batch_for_its_own_reason():
    # MagFace has no running state: the message must not claim it keeps some
    head = mk.MagFace(10, 6)
    x, y = torch.randn(4, 6) * 20, torch.arange(4)
    x[1, 0] = float("nan")
    for mode in (head.train, head.eval):
        mode()
        with pytest.raises(ValueError, match="^embeddings contain NaN.*MagFace takes each row's margin from its norm"):
            head(x, y)
