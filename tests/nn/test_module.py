"""mk.MarginSoftmax: the module computes margin_cross_entropy with its own weight."""

import pytest
import torch

import marginkit as mk
from tests.helpers import make_inputs, rel_err


def test_module_equals_functional_and_trains():
    torch.manual_seed(0)
    head = mk.MarginSoftmax(40, 16, mk.CosFace(0.3), scale=16.0, reduction="sum")
    assert head.weight.shape == (40, 16)
    assert abs(float(head.weight.detach().std()) - 0.01) < 0.002  # insightface-style normal(0, 0.01) init
    x, _, y = make_inputs(B=8, C=40, D=16)
    loss = head(x, y)
    expected = mk.reference.margin_cross_entropy(x, head.weight, y, mk.CosFace(0.3), 16.0, reduction="sum")
    assert rel_err(loss, expected) < 1e-5
    optimizer = torch.optim.SGD(head.parameters(), lr=0.5)
    for _ in range(5):
        optimizer.zero_grad()
        head(x, y).backward()
        optimizer.step()
    assert head(x, y) < loss


def test_module_rejects_bad_sizes():
    with pytest.raises(ValueError, match="num_classes"):
        mk.MarginSoftmax(0, 8)
    with pytest.raises(ValueError, match="embedding_dim"):
        mk.MarginSoftmax(10, -1)
    with pytest.raises(ValueError, match="scale"):
        mk.MarginSoftmax(10, 8, scale=0)


@pytest.mark.parametrize(
    "chunk_elements, memory_budget",
    [(None, 0), (16 * (6 + 16), 0), (16 * (6 + 16), None)],
    ids=["dense", "chunked", "chunked-every-chunk-stored"],
)
def test_model_with_the_head_compiles_fullgraph(chunk_elements, memory_budget, monkeypatch):
    """torch.compile(fullgraph=True) traces the whole loss (value checks run eagerly only), on the
    torch backend's dense path and its chunked one (16-class chunks), with and without the store."""
    from marginkit.backends import torch_chunked

    if chunk_elements is not None:
        monkeypatch.setattr(torch_chunked, "CHUNK_ELEMENTS", chunk_elements)
    torch._dynamo.reset()
    torch.manual_seed(0)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(12, 16)
            self.head = mk.MarginSoftmax(40, 16, mk.ArcFace(0.5), 32.0, backend="torch", memory_budget=memory_budget)

        def forward(self, feats, labels):
            return self.head(self.proj(feats), labels)

    model = Model()
    feats, labels = torch.randn(6, 12), torch.randint(0, 40, (6,))
    labels[0] = -100
    eager = model(feats, labels)
    eager.backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    loss = compiled(feats, labels)
    loss.backward()
    assert rel_err(loss, eager) < 1e-6
    for p, g in zip(model.parameters(), eager_grads):
        assert rel_err(p.grad, g) < 1e-6


@pytest.mark.parametrize("dim,batches", [(16, (8, 9, 13, 21)), (512, (2100, 2600, 3001))],
                         ids=["small", "above-the-target-chunk"])  # B·D past 2^20: the eager path splits the rows
def test_dynamic_batch_sizes_compile_once_fullgraph(dim, batches):
    """torch.compile(dynamic=True, fullgraph=True) traces the loss once for every batch size: floats
    arrive as SymFloats (the argument checks must not call math.isfinite on them) and no Python loop
    may run over the symbolic row count (it pinned B: a recompile per size, an error past 8)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(40, dim))
    spec = mk.ArcFace(0.5)  # built outside: torch 2.11's dynamo cannot build it (see README)

    def step(x, y, scale):
        return mk.margin_cross_entropy(x, weight, y, spec, scale, backend="torch")

    compiled = torch.compile(step, fullgraph=True, dynamic=True, backend="aot_eager")
    for batch, scale in zip(batches, (16.0, 20.0, 16.0, 24.0)):
        x = torch.randn(batch, dim, requires_grad=True)
        y = torch.randint(0, 40, (batch,))
        loss = compiled(x, y, scale)
        (gx,) = torch.autograd.grad(loss, x)
        want = mk.reference.margin_cross_entropy(x.double(), weight.double(), y, mk.ArcFace(0.5), scale)
        (want_gx,) = torch.autograd.grad(want, x)
        assert rel_err(loss, want) < 1e-5 and rel_err(gx, want_gx) < 1e-5
    assert counters["stats"]["unique_graphs"] == 1


def _tensors_outside_state(module: torch.nn.Module) -> list:
    """Paths of tensors a module holds in plain attributes (dicts, lists...): `.to(device)` leaves them behind."""
    found = []

    def walk(value, path):
        if torch.is_tensor(value):
            found.append(path)
        elif isinstance(value, dict):
            for key, item in value.items():
                walk(item, f"{path}[{key!r}]")
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                walk(item, f"{path}[{i}]")

    for prefix, sub in module.named_modules():
        for name, value in vars(sub).items():
            if name not in ("_parameters", "_buffers", "_modules") and not name.endswith("hooks"):
                walk(value, f"{prefix}.{name}")
    return found


C_HELD, D_HELD, B_HELD = 12, 8, 6
HEADS_WITH_TENSORS = {
    "MarginSoftmax-class_margins": lambda: mk.MarginSoftmax(
        C_HELD, D_HELD, mk.CosFace(0.2), 16.0, class_margins=torch.linspace(0.1, 0.4, C_HELD)),
    "MarginSoftmax-sample_margins": lambda: mk.MarginSoftmax(
        C_HELD, D_HELD, mk.ArcFace(0.2), 16.0, sample_margins=torch.linspace(0.1, 0.4, B_HELD)),
    "IRSoftmax-class_margins": lambda: mk.IRSoftmax(C_HELD, D_HELD, class_margins=torch.linspace(0.1, 0.4, C_HELD)),
    "SubCenterArcFace": lambda: mk.SubCenterArcFace(C_HELD, D_HELD, k=2),
    "AdaCos": lambda: mk.AdaCos(C_HELD, D_HELD),
    "AdaFace": lambda: mk.AdaFace(C_HELD, D_HELD),
    "CurricularFace": lambda: mk.CurricularFace(C_HELD, D_HELD),
    "LDAMSoftmax-online": lambda: mk.LDAMSoftmax(C_HELD, D_HELD),
    "MagFace": lambda: mk.MagFace(C_HELD, D_HELD),
    "FairLoss": lambda: mk.FairLoss(C_HELD, D_HELD, update_every=1),
}


@pytest.mark.parametrize("name", list(HEADS_WITH_TENSORS))
def test_every_tensor_a_head_holds_moves_with_it(name):
    # a tensor kept in a plain attribute stays on the CPU under head.cuda(): the next forward fails
    torch.manual_seed(0)
    head = HEADS_WITH_TENSORS[name]()
    x = torch.randn(B_HELD, D_HELD, requires_grad=True)
    head(x, torch.arange(B_HELD) % C_HELD).backward()  # the state a training step leaves
    assert _tensors_outside_state(head) == []
    moved = head.to("meta")
    assert all(t.device.type == "meta" for t in list(moved.parameters()) + list(moved.buffers()))


@pytest.mark.parametrize("keyword", ["class_margins", "sample_margins"])
def test_fixed_margin_tensors_are_used_and_keep_their_dtype(keyword):
    torch.manual_seed(1)
    margins = torch.linspace(0.1, 0.4, C_HELD if keyword == "class_margins" else B_HELD)
    head = mk.MarginSoftmax(C_HELD, D_HELD, mk.CosFace(0.2), 16.0, **{keyword: margins}).double()
    assert getattr(head, keyword).dtype == torch.float32 and keyword not in head.state_dict()
    x, _, y = make_inputs(B=B_HELD, C=C_HELD, D=D_HELD, dtype=torch.float64)
    expected = mk.reference.margin_cross_entropy(x, head.weight, y, mk.CosFace(0.2), 16.0, **{keyword: margins})
    assert rel_err(head(x, y), expected) < 1e-12
