"""Shared data of the distributed tests: the global batch, the full weight, the cases, and the
single-process reference every partitioned run is compared with."""

from __future__ import annotations

import torch

import marginkit as mk
from marginkit.distributed import PartitionedMarginSoftmax

C, D, D_IN = 103, 16, 8
TOL = 1e-5
SIZES = {1: [23], 2: [9, 14], 3: [8, 0, 15], 4: [6, 7, 3, 7]}  # uneven local batches, one empty


def global_batch(seed: int, batch: int = 23):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, D, generator=g)
    labels = torch.randint(0, C, (batch,), generator=g)
    labels[[3, 11, 20]] = -100  # ignored rows
    return x, labels


def full_weight():
    return torch.randn(C, D, generator=torch.Generator().manual_seed(123))


def class_margins():
    return 0.2 + 0.4 * torch.rand(C, generator=torch.Generator().manual_seed(321))


CASES = {
    "arcface": dict(margin=mk.ArcFace(0.5), scale=64.0),
    "cosface": dict(margin=mk.CosFace(0.35), scale=30.0),
    "class_margins": dict(margin=mk.ArcFace(0.5), scale=64.0, class_margins=True),
    "sphereface": dict(margin=mk.SphereFace(1.7), scale=16.0),
    "cosface_sum": dict(margin=mk.CosFace(0.2), scale=16.0, reduction="sum"),
    "large_scale": dict(margin=mk.CosFace(0.35), scale=400.0),  # the max-then-sum combine path
    "interclass_filter": dict(margin=mk.CosFace(0.35), scale=30.0, interclass_filtering_threshold=0.05),
    # a non-negative ignore_index equal to a later rank's local class id: that class's margin, not
    # its shard's first class's (case_batch puts such labels in the batch)
    "class_margins_ignore_5": dict(margin=mk.CosFace(0.2), scale=16.0, class_margins=True, ignore_index=5),
}

#: global class ids at local id 5 of a rank > 0: shard starts + 5 at W = 2 (52), 3 (35, 69), 4 (26, 52, 78)
LOCAL_ID_5 = [57, 40, 74, 31, 83]


def case_batch(case: str, seed: int):
    """``global_batch(seed)`` as ``case`` sees it: with the case's ignore_index on the ignored rows and,
    for a non-negative one, labels at that local id on every later rank."""
    x, labels = global_batch(seed)
    ignore_index = CASES[case].get("ignore_index")
    if ignore_index is not None:
        labels = torch.where(labels == -100, torch.full_like(labels, ignore_index), labels)
        labels[[0, 1, 2, 4, 5]] = torch.tensor(LOCAL_ID_5)
    return x, labels


def local_rows(t, world, rank):
    offset = sum(SIZES[world][:rank])
    return t[offset : offset + SIZES[world][rank]]


def make_head(case, **kwargs):
    spec = CASES[case]
    cm = class_margins() if spec.get("class_margins") else None
    head = PartitionedMarginSoftmax(
        C, D, spec["margin"], spec["scale"], class_margins=cm, reduction=spec.get("reduction", "mean"),
        interclass_filtering_threshold=spec.get("interclass_filtering_threshold", 0.0),
        ignore_index=spec.get("ignore_index", -100), **kwargs
    )
    state = {"weight": full_weight()}
    if cm is not None:
        state["class_margins"] = cm
    head.load_full_state_dict(state)
    return head


def reference(case, x, labels, weight=None):
    """Single-process loss and gradients over the global batch with the full weight."""
    spec = CASES[case]
    x = x.detach().clone().requires_grad_(True)
    w = (full_weight() if weight is None else weight).detach().clone().requires_grad_(True)
    cm = class_margins() if spec.get("class_margins") else None
    loss = mk.margin_cross_entropy(
        x, w, labels, spec["margin"], spec["scale"], class_margins=cm, reduction=spec.get("reduction", "mean"),
        interclass_filtering_threshold=spec.get("interclass_filtering_threshold", 0.0),
        ignore_index=spec.get("ignore_index", -100),
    )
    loss.backward()
    return loss.detach(), x.grad, w.grad
