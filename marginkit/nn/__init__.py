"""Loss modules holding parameters and per-class state."""

from marginkit.nn.margin_softmax import MarginSoftmax

__all__ = ["MarginSoftmax"]
