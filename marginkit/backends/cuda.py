"""Deprecated: the compiled ops moved to :mod:`marginkit.ops` (same names and signatures).

Kept importable for one release; importing it warns.
"""

import warnings

from marginkit.ops import (  # noqa: F401  (re-exported)
    available,
    build_info,
    class_center_update_,
    class_statistics_update_,
    cuda_available,
    partial_fc_sample,
    range_loss,
    sparse_adamw_step_,
    sparse_sgd_step_,
)
from marginkit.ops import __all__  # noqa: F401

warnings.warn(
    "marginkit.backends.cuda is deprecated and will be removed in the next release; "
    "import the compiled ops from marginkit.ops instead",
    DeprecationWarning,
    stacklevel=2,
)
