"""marginkit: fused large-class margin softmax losses (ArcFace, CosFace, SphereFace, ...).

    import marginkit as mk
    loss = mk.margin_cross_entropy(embeddings, weight, labels, mk.ArcFace(0.5), scale=64.0)
"""

from marginkit import distributed, reference
from marginkit.distributed import PartitionedMarginSoftmax
from marginkit.errors import MarginKitTypeError
from marginkit.functional import margin_cross_entropy
from marginkit.nn import (
    AdaCos,
    AdaFace,
    AdaFaceMargin,
    CurricularFace,
    FairLoss,
    IRSoftmax,
    LDAMSoftmax,
    MagFace,
    MarginSoftmax,
    RangeLoss,
    SubCenterArcFace,
)
from marginkit.specs import ArcFace, CombinedMargin, CosFace, MarginSpec, NoMargin, SphereFace, insightface_margin

__version__ = "0.1.0"

__all__ = [
    "AdaCos",
    "AdaFace",
    "AdaFaceMargin",
    "ArcFace",
    "CombinedMargin",
    "CosFace",
    "CurricularFace",
    "FairLoss",
    "IRSoftmax",
    "LDAMSoftmax",
    "MagFace",
    "MarginKitTypeError",
    "MarginSoftmax",
    "MarginSpec",
    "NoMargin",
    "PartitionedMarginSoftmax",
    "RangeLoss",
    "SphereFace",
    "SubCenterArcFace",
    "distributed",
    "insightface_margin",
    "margin_cross_entropy",
    "reference",
]
