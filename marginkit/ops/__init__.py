"""The compiled ops of ``marginkit._C`` (csrc/), one module per op.

csrc is plain C++17/CUDA without torch headers: its entries take raw pointers, sizes, dtype
codes and a CUDA stream handle, and check what they are given. These modules validate
tensors (typed errors naming the argument, the value and what is allowed), allocate outputs
and scratch space with torch, keep every tensor whose pointer they pass alive for the call,
dispatch to the CPU or CUDA entry by device, and register each op as
``torch.ops.marginkit.<name>`` with a fake (``torch.compile``, ``torch.library.opcheck``).

* ``class_center_update_``      IR-Softmax centers, in place
* ``class_statistics_update_``  per-class counts / cos / spread
* ``range_loss``                [range_loss_forward, range_loss_backward] with autograd
* ``partial_fc_sample``         Partial FC class sampling
* ``sparse_sgd_step_``          row-sparse torch.optim.SGD
* ``sparse_adamw_step_``        row-sparse torch.optim.AdamW

Determinism: every op visits rows in a stable label-sorted order and reduces segments in a
fixed order (no floating-point atomics), on CPU and CUDA; CPU and CUDA agree to rounding,
``partial_fc_sample`` bit for bit.
"""

from marginkit.ops._library import available, build_info, cuda_available
from marginkit.ops.class_center_update import class_center_update_
from marginkit.ops.class_statistics import class_statistics_update_
from marginkit.ops.partial_fc_sample import partial_fc_sample
from marginkit.ops.range_loss import range_loss
from marginkit.ops.sparse_optim import sparse_adamw_step_, sparse_sgd_step_

__all__ = [
    "available",
    "cuda_available",
    "build_info",
    "class_center_update_",
    "class_statistics_update_",
    "range_loss",
    "partial_fc_sample",
    "sparse_sgd_step_",
    "sparse_adamw_step_",
]
