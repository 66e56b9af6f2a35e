"""One Lightning callback per technique."""

from lightning_reg.callbacks.label_smoothing import LabelSmoothing

__all__ = ["LabelSmoothing"]
