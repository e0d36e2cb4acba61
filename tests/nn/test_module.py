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
