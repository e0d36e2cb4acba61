"""Heads refuse bad constructor arguments with a typed error naming the argument and the value,
at construction: never a torch RuntimeError, a silent coercion or a failure steps later."""

import math

import pytest
import torch

import marginkit as mk
from marginkit import FairLoss

CASES = [
    # (build, error type, message pattern)
    (lambda: FairLoss(10, 4, update_every=1, chunk_elements=-3), ValueError, "chunk_elements must be a positive int, got -3"),
    (lambda: FairLoss(10, 4, chunk_elements=0), ValueError, "chunk_elements must be a positive int, got 0"),
    (lambda: FairLoss(10, 4, seed="a"), TypeError, "seed must be an int, got 'a'"),
    (lambda: FairLoss(10, 4, seed=1.7), TypeError, "seed must be an int, got 1.7"),
    (lambda: FairLoss(10, 4, seed=2**64), ValueError, "seed = 18446744073709551616 does not fit in int64"),
    (lambda: FairLoss(10, 4, count_thresholds=5), TypeError, "count_thresholds must be None or two increasing"),
    (lambda: FairLoss(10, 4, count_thresholds=(3, 1)), ValueError, r"count_thresholds must be two increasing .*\(3, 1\)"),
    (lambda: FairLoss(10, 4, spread_thresholds=(math.nan, 1.0)), ValueError, "spread_thresholds entry must be finite, got nan"),
    (lambda: FairLoss(10, 4, dtype=torch.int64), TypeError, "dtype must be None or one of .*got torch.int64"),
    (lambda: mk.MarginSoftmax(10, 4, dtype=torch.int64), TypeError, "dtype must be None or one of .*got torch.int64"),
    (lambda: mk.PartitionedMarginSoftmax(10, 4, dtype=torch.int32), TypeError, "dtype must be None or one of .*got torch.int32"),
    (lambda: mk.PartitionedMarginSoftmax(10, 4, seed=1.5), TypeError, "seed must be an int, got 1.5"),
    (lambda: mk.RangeLoss(ignore_index="x"), TypeError, "ignore_index must be an int, got 'x'"),
    (lambda: mk.RangeLoss(alpha=-1.0), ValueError, "alpha must be >= 0.0, got -1.0"),
    (lambda: mk.RangeLoss(beta=-0.5), ValueError, "beta must be >= 0.0, got -0.5"),
    (lambda: mk.RangeLoss(margin=-2.0), ValueError, "margin must be >= 0.0, got -2.0"),
    (lambda: mk.IRSoftmax(10, 4, class_margins=torch.zeros(3)), ValueError, r"class_margins must have shape \(C,\) = \(10,\), got \(3,\)"),
    (lambda: mk.IRSoftmax(10, 4, class_margins=torch.full((10,), math.nan)), ValueError, "class_margins contains NaN"),
    (lambda: mk.IRSoftmax(10, 4, class_margins=[0.1] * 10), TypeError, "class_margins must be a torch.Tensor"),
    (lambda: mk.MarginSoftmax(10, 4, sample_margins=[0.1] * 4), TypeError, "sample_margins must be a 1-D float tensor"),
    (lambda: mk.MarginSoftmax(10, 4, memory_budget=math.inf), ValueError, "memory_budget = inf: pass None for no limit"),
]


@pytest.mark.parametrize("build, error, match", CASES, ids=[c[2][:40] for c in CASES])
def test_bad_constructor_argument_is_refused_with_a_named_error(build, error, match):
    with pytest.raises(error, match=match):
        build()


def test_the_checked_arguments_still_take_their_good_values():
    FairLoss(10, 4, chunk_elements=64, seed=3, count_thresholds=(2, 5), spread_thresholds=(0.1, 0.2), dtype=torch.float64)
    FairLoss(10, 4, count_thresholds=torch.tensor([2, 5]), spread_thresholds=torch.tensor([0.1, 0.2]))
    mk.RangeLoss(margin=0.0, alpha=0.0, beta=2.0, ignore_index=None)
    head = mk.IRSoftmax(10, 4, class_margins=torch.full((10,), 0.2))
    x, y = torch.randn(6, 4), torch.arange(6)
    want = mk.margin_cross_entropy(x, head.centers, y, mk.CosFace(0.35), 64.0, class_margins=torch.full((10,), 0.2))
    assert torch.allclose(head.eval()(x, y), want, rtol=1e-6)
