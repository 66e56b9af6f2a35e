"""Pure-torch functional cores of every technique (no Lightning import)."""

from lightning_reg.core.protocol import soft_cross_entropy
from lightning_reg.functional.clipping import (
    adaptive_clip_grad_,
    clip_grad_norm_,
    clip_grad_norm_per_tensor_,
    clip_grad_value_,
    percentile_threshold,
)
from lightning_reg.functional.consistency import consistency_loss, end_of_early_learning, sharpen
from lightning_reg.functional.cutmix import copy_paste_partners, cutmix_area_lambda, cutmix_box, cutmix_mask, paste_box
from lightning_reg.functional.dropout import drop_path_rates, drop_rate_at
from lightning_reg.functional.elr import elr_regularizer, elr_update_targets_, elr_updated_targets
from lightning_reg.functional.ema import ema_decay, ema_update_
from lightning_reg.functional.label_smoothing import label_smoothing_targets
from lightning_reg.functional.mixup import mixup_lambda, mixup_permutation, mixup_tensors
from lightning_reg.functional.pseudo_label import (
    align_distribution,
    confidence_quality,
    pseudo_label_loss,
    pseudo_label_targets,
)
from lightning_reg.functional.pskd import pskd_alpha, pskd_soft_targets

__all__ = [
    "adaptive_clip_grad_",
    "align_distribution",
    "clip_grad_norm_",
    "clip_grad_norm_per_tensor_",
    "clip_grad_value_",
    "confidence_quality",
    "consistency_loss",
    "copy_paste_partners",
    "cutmix_area_lambda",
    "cutmix_box",
    "cutmix_mask",
    "drop_path_rates",
    "drop_rate_at",
    "elr_regularizer",
    "elr_update_targets_",
    "elr_updated_targets",
    "ema_decay",
    "ema_update_",
    "end_of_early_learning",
    "label_smoothing_targets",
    "mixup_lambda",
    "mixup_permutation",
    "mixup_tensors",
    "paste_box",
    "percentile_threshold",
    "pseudo_label_loss",
    "pseudo_label_targets",
    "pskd_alpha",
    "pskd_soft_targets",
    "sharpen",
    "soft_cross_entropy",
]
