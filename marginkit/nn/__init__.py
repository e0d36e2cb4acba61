"""Loss modules holding parameters and per-class state."""

from marginkit.nn.adaptive import (
    AdaCos,
    AdaFace,
    AdaFaceMargin,
    CurricularFace,
    LDAMSoftmax,
    MagFace,
    SubCenterArcFace,
)
from marginkit.nn.fair_loss import FairLoss
from marginkit.nn.ir_softmax import IRSoftmax
from marginkit.nn.margin_softmax import MarginSoftmax
from marginkit.nn.range_loss import RangeLoss

__all__ = [
    "AdaCos",
    "AdaFace",
    "AdaFaceMargin",
    "CurricularFace",
    "FairLoss",
    "IRSoftmax",
    "LDAMSoftmax",
    "MagFace",
    "MarginSoftmax",
    "RangeLoss",
    "SubCenterArcFace",
]
