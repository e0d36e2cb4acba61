"""backends/common.py: the per-row pieces every backend shares."""

import torch

from marginkit.backends.common import add_rows_


def test_add_rows_sums_duplicates_in_float64_then_rounds_once():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(7, 5, generator=g).to(torch.bfloat16)
    classes = torch.tensor([3, 0, 3, 6, 3, 0])
    rows = torch.randn(6, 5, generator=g, dtype=torch.float64) * 1e-3
    expected = base.clone().to(torch.float64)
    for c, r in zip(classes.tolist(), rows):
        expected[c] += r
    out = add_rows_(base.clone(), classes, rows)
    assert torch.equal(out, expected.to(torch.bfloat16))
    untouched = [1, 2, 4, 5]
    assert torch.equal(out[untouched], base[untouched])


def test_add_rows_with_no_rows_is_a_no_op():
    base = torch.randn(4, 3)
    assert torch.equal(add_rows_(base.clone(), torch.empty(0, dtype=torch.long), torch.empty(0, 3, dtype=torch.float64)), base)
