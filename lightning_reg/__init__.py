"""lightning-reg: training-regularization techniques as composable PyTorch Lightning callbacks."""

from lightning_reg.callbacks import LabelSmoothing
from lightning_reg.core import (
    LossRegularizer,
    PerSampleTable,
    RegularizedModule,
    RegularizerCallback,
    StepContext,
)
from lightning_reg.data import IndexedDataset, inject_label_noise

__version__ = "0.1.0"

__all__ = [
    "IndexedDataset",
    "LabelSmoothing",
    "LossRegularizer",
    "PerSampleTable",
    "RegularizedModule",
    "RegularizerCallback",
    "StepContext",
    "__version__",
    "inject_label_noise",
]
