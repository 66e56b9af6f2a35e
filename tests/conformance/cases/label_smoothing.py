from __future__ import annotations

import torch
import torch.nn.functional as F

from lightning_reg import LabelSmoothing
from lightning_reg.core.protocol import soft_cross_entropy
from lightning_reg.core.schedules import Linear
from lightning_reg.functional import label_smoothing_targets
from tests.conformance.registry import Case, register


def _math(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 5, generator=g).to(dtype)
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    q = label_smoothing_targets(F.one_hot(y, 5).float(), 0.1)
    # Hand-computed target: 0.9 + 0.02 on the label, 0.02 elsewhere.
    assert torch.allclose(q[0], torch.tensor([0.92, 0.02, 0.02, 0.02, 0.02]))
    ours = soft_cross_entropy(logits, q)
    ref = F.cross_entropy(logits.float(), y, label_smoothing=0.1)
    # Both upcast the same low-precision logits to fp32, so they agree to fp32 rounding in every dtype.
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-6)


register(
    Case(
        name="label_smoothing",
        factory=lambda: LabelSmoothing(0.1),
        class_path="lightning_reg.LabelSmoothing",
        full_init_args={"smoothing": 0.2, "schedule": "linear"},
        bad_args=[
            ({"smoothing": 1.5}, ValueError, "Expected argument `smoothing` to be a float in [0, 1)"),
            ({"smoothing": "a"}, TypeError, "Expected argument `smoothing`"),
            ({"schedule": "nope"}, ValueError, "Expected argument `schedule` to be one of"),
        ],
        math=_math,
    )
)

__all__ = ["Linear"]
