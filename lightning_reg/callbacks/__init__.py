"""One Lightning callback per technique."""

from lightning_reg.callbacks.clipping import GradientClipping
from lightning_reg.callbacks.consistency import LabelCorrection, NoisyLabelConsistency
from lightning_reg.callbacks.cutmix import CutMix
from lightning_reg.callbacks.dropout import DropoutSchedule, EarlyDropout, LateDropout
from lightning_reg.callbacks.elr import ELR
from lightning_reg.callbacks.ema import EMATeacher, export_ema_state_dict
from lightning_reg.callbacks.label_smoothing import LabelSmoothing
from lightning_reg.callbacks.mixup import Mixup
from lightning_reg.callbacks.pseudo_label import PseudoLabel
from lightning_reg.callbacks.pskd import PSKD
from lightning_reg.callbacks.report import ResultsReport

__all__ = [
    "ELR",
    "PSKD",
    "CutMix",
    "DropoutSchedule",
    "EMATeacher",
    "EarlyDropout",
    "GradientClipping",
    "LabelCorrection",
    "LabelSmoothing",
    "LateDropout",
    "Mixup",
    "NoisyLabelConsistency",
    "PseudoLabel",
    "ResultsReport",
    "export_ema_state_dict",
]
