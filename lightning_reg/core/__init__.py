"""Core pieces shared by every technique: the protocol, the per-sample table and schedules."""

from lightning_reg.core.protocol import (
    IGNORE_INDEX,
    ElementView,
    LossRegularizer,
    MissingIndexError,
    RegularizedModule,
    RegularizerCallback,
    StepContext,
    TeacherProvider,
    find_teacher,
    infer_num_samples,
    regularizers_of,
    soft_cross_entropy,
    unpack_batch,
    unpack_semi_supervised_batch,
)
from lightning_reg.core.schedules import (
    Constant,
    Cosine,
    Linear,
    Schedule,
    SigmoidRampUp,
    Step,
    Warmup,
    get_schedule,
)
from lightning_reg.core.steps import optimizer_steps
from lightning_reg.core.table import PerSampleTable, train_batch_size

__all__ = [
    "IGNORE_INDEX",
    "Constant",
    "Cosine",
    "ElementView",
    "Linear",
    "LossRegularizer",
    "MissingIndexError",
    "PerSampleTable",
    "RegularizedModule",
    "RegularizerCallback",
    "Schedule",
    "SigmoidRampUp",
    "Step",
    "StepContext",
    "TeacherProvider",
    "Warmup",
    "find_teacher",
    "get_schedule",
    "infer_num_samples",
    "optimizer_steps",
    "regularizers_of",
    "soft_cross_entropy",
    "train_batch_size",
    "unpack_batch",
    "unpack_semi_supervised_batch",
]
