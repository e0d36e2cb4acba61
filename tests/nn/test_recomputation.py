"""Stateful heads under activation checkpointing (``torch.utils.checkpoint``): a training forward
that moves running state refuses to be recomputed during backward (the recomputation would read
the moved state: wrong gradients), and its state moves exactly once; eval mode and stateless
losses recompute exactly."""

import copy

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import marginkit as mk
from marginkit.distributed import PartitionedMarginSoftmax
from tests.helpers import rel_err

C, D, B = 12, 8, 6

STATEFUL = {
    "IRSoftmax": lambda: mk.IRSoftmax(C, D),
    "CurricularFace": lambda: mk.CurricularFace(C, D),
    "AdaCos": lambda: mk.AdaCos(C, D),
    "AdaFace": lambda: mk.AdaFace(C, D),
    "LDAM-online": lambda: mk.LDAMSoftmax(C, D),
    "FairLoss": lambda: mk.FairLoss(C, D, update_every=1),
    "PartialFC": lambda: PartitionedMarginSoftmax(C, D, sample_rate=0.5),
}
STATELESS = {
    "MarginSoftmax": lambda: mk.MarginSoftmax(C, D),
    "Partitioned-no-sampling": lambda: PartitionedMarginSoftmax(C, D),
}


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, D, generator=g) * 3.0, torch.randint(0, C, (B,), generator=g)


def plain_and_checkpointed(make):
    """(plain head, its x.grad) and (a copy run under checkpoint, its x.grad): same start state."""
    torch.manual_seed(0)
    plain = make()
    ckpt = copy.deepcopy(plain)
    x, y = batch()
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    plain(xa, y).backward()
    return plain, xa, ckpt, xb, y


def same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa if torch.is_tensor(sa[k]))


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("name", list(STATEFUL))
def test_a_stateful_training_forward_refuses_recomputation_and_moves_its_state_once(name, reentrant):
    plain, _, ckpt, xb, y = plain_and_checkpointed(STATEFUL[name])
    with pytest.raises(RuntimeError, match="outside the checkpointed function"):
        checkpoint(ckpt, xb, y, use_reentrant=reentrant).backward()
    assert same_state(ckpt, plain)  # the first forward's move, and no second one


@pytest.mark.parametrize("name", list(STATEFUL))
def test_a_stateful_head_in_eval_mode_recomputes_exactly(name):
    torch.manual_seed(0)
    head = STATEFUL[name]().eval()
    before = copy.deepcopy(head.state_dict())
    x, y = batch(1)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    head(xa, y).backward()
    checkpoint(head, xb, y, use_reentrant=False).backward()
    assert torch.equal(xa.grad, xb.grad)
    assert all(torch.equal(v, head.state_dict()[k]) for k, v in before.items() if torch.is_tensor(v))


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("name", list(STATELESS))
def test_stateless_losses_recompute_exactly(name, reentrant):
    plain, xa, ckpt, xb, y = plain_and_checkpointed(STATELESS[name])
    checkpoint(ckpt, xb, y, use_reentrant=reentrant).backward()
    assert rel_err(xb.grad, xa.grad) == 0.0
    assert torch.equal(ckpt.weight.grad, plain.weight.grad)
