"""lightning-reg: training-regularization techniques as composable PyTorch Lightning callbacks."""

from lightning_reg.callbacks import (
    ELR,
    PSKD,
    CutMix,
    DropoutSchedule,
    EarlyDropout,
    EMATeacher,
    GradientClipping,
    LabelCorrection,
    LabelSmoothing,
    LateDropout,
    Mixup,
    NoisyLabelConsistency,
    PseudoLabel,
    ResultsReport,
    export_ema_state_dict,
)
from lightning_reg.core import (
    LossRegularizer,
    PerSampleTable,
    RegularizedModule,
    RegularizerCallback,
    StepContext,
)
from lightning_reg.data import IndexedDataset, inject_label_noise
from lightning_reg.metrics import LabelNoiseMetrics
from lightning_reg.nn import DropPath

__version__ = "0.1.0"

__all__ = [
    "ELR",
    "PSKD",
    "CutMix",
    "DropPath",
    "DropoutSchedule",
    "EMATeacher",
    "EarlyDropout",
    "GradientClipping",
    "IndexedDataset",
    "LabelCorrection",
    "LabelNoiseMetrics",
    "LabelSmoothing",
    "LateDropout",
    "LossRegularizer",
    "Mixup",
    "NoisyLabelConsistency",
    "PerSampleTable",
    "PseudoLabel",
    "RegularizedModule",
    "RegularizerCallback",
    "ResultsReport",
    "StepContext",
    "__version__",
    "export_ema_state_dict",
    "inject_label_noise",
]
