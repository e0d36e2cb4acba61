"""Model-parallel margin softmax over ``torch.distributed`` (NCCL on GPUs, gloo on CPU).

* :func:`shard_range` — which global classes a rank owns.
* :class:`PartitionedMarginSoftmax` — the class-sharded head (optionally Partial FC).
* :class:`PartialFCSGD`, :class:`PartialFCAdamW` — row-sparse optimizers for it.
* :func:`save_sharded`, :func:`load_sharded` — DCP checkpoints that reshard to any
  world size without gathering; ``head.full_state_dict()`` / ``head.load_full_state_dict()``
  for whole tensors.

See docs/scaling.md for the communication volume and a step-time model.
"""

from marginkit.distributed.checkpoint import load_sharded, save_sharded
from marginkit.distributed.partial_fc import PartialFCAdamW, PartialFCSGD
from marginkit.distributed.partitioned import PartitionedMarginSoftmax
from marginkit.distributed.sharding import PER_CLASS_STATE, seeded_normal_rows, shard_range, shard_sizes

__all__ = [
    "PER_CLASS_STATE",
    "PartialFCAdamW",
    "PartialFCSGD",
    "PartitionedMarginSoftmax",
    "load_sharded",
    "save_sharded",
    "seeded_normal_rows",
    "shard_range",
    "shard_sizes",
]
