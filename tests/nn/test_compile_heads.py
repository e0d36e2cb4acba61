"""The heads inside torch.compile: running state moves as in eager mode, bad labels are left out."""

import copy

import pytest
import torch

import marginkit as mk
from tests.helpers import rel_err

C, D, B = 10, 8, 6

STATEFUL = {  # running state in 0-d float64 buffers: their training forward runs outside the graph
    "AdaCos": lambda: mk.AdaCos(C, D),
    "AdaFace": lambda: mk.AdaFace(C, D, t_alpha=0.5),
    "CurricularFace": lambda: mk.CurricularFace(C, D, t_momentum=0.5),
}


@pytest.mark.parametrize("name", list(STATEFUL))
def test_running_state_moves_under_compile_as_in_eager_mode(name):
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = STATEFUL[name]()
    twin = copy.deepcopy(eager)
    compiled = torch.compile(twin, backend="aot_eager")
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.randn(B, D, generator=g) * 5
        y = torch.randint(0, C, (B,), generator=g)
        xe, xc = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        loss_e, loss_c = eager(xe, y), compiled(xc, y)
        loss_e.backward()
        loss_c.backward()
        assert rel_err(loss_c, loss_e) < 1e-6 and rel_err(xc.grad, xe.grad) < 1e-6
    for (key, want), (_, got) in zip(eager.named_buffers(), twin.named_buffers()):
        assert torch.equal(got, want), key  # compiled code dropped these writes (t stayed 0)
    assert any(not torch.equal(v, STATEFUL[name]().state_dict()[k]) for k, v in twin.named_buffers())


@pytest.mark.parametrize("name", ["MagFace", "LDAMSoftmax-online"])
def test_a_bad_label_under_compile_is_left_out_like_an_ignored_row(name):
    # eager mode raises; a compiled step cannot read the host, so the row must count for nothing
    torch._dynamo.reset()
    torch.manual_seed(0)
    make = {"MagFace": lambda: mk.MagFace(C, D), "LDAMSoftmax-online": lambda: mk.LDAMSoftmax(C, D)}[name]
    eager = make()
    twin = copy.deepcopy(eager)
    x = torch.randn(B, D) * 20
    y = torch.arange(B) % C
    bad, ignored = y.clone(), y.clone()
    bad[1], ignored[1] = C, -100
    xe, xc = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    loss_e = eager(xe, ignored)
    loss_c = torch.compile(twin, backend="aot_eager")(xc, bad)
    loss_e.backward()
    loss_c.backward()
    assert rel_err(loss_c, loss_e) < 1e-6 and rel_err(xc.grad, xe.grad) < 1e-6
    assert torch.count_nonzero(xc.grad[1]) == 0
    for (key, want), (_, got) in zip(eager.named_buffers(), twin.named_buffers()):
        assert torch.equal(got, want), key
