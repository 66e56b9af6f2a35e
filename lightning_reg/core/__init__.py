"""Core pieces shared by every technique: the protocol, the per-sample table and schedules."""

from lightning_reg.core.protocol import (
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
from lightning_reg.core.table import PerSampleTable

__all__ = [
    "Constant",
    "Cosine",
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
    "regularizers_of",
    "soft_cross_entropy",
    "unpack_batch",
]
