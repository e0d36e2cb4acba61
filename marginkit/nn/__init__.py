"""Loss modules holding parameters and per-class state, one file per head."""

from marginkit.nn.adacos import AdaCos
from marginkit.nn.adaface import AdaFace, AdaFaceMargin
from marginkit.nn.curricular_face import CurricularFace, curricular_cross_entropy
from marginkit.nn.fair_loss import FairLoss
from marginkit.nn.ir_softmax import IRSoftmax
from marginkit.nn.ldam import LDAMSoftmax, ldam_margins
from marginkit.nn.magface import MagFace
from marginkit.nn.margin_softmax import MarginSoftmax
from marginkit.nn.range_loss import RangeLoss
from marginkit.nn.sub_center import SubCenterArcFace, sub_center_cross_entropy

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
    "curricular_cross_entropy",
    "ldam_margins",
    "sub_center_cross_entropy",
]
