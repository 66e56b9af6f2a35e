"""Pure-torch functional cores of every technique (no Lightning import)."""

from lightning_reg.core.protocol import soft_cross_entropy
from lightning_reg.functional.label_smoothing import label_smoothing_targets

__all__ = ["label_smoothing_targets", "soft_cross_entropy"]
