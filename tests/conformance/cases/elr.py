from __future__ import annotations

import math

import torch

from lightning_reg.callbacks.elr import ELR
from lightning_reg.functional.elr import elr_regularizer, elr_updated_targets
from tests.conformance.registry import Case, register


def _naive(logits: torch.Tensor, t_old: torch.Tensor, beta: float, lam: float) -> tuple[list[list[float]], float]:
    """The paper's formulas, written out in float64 Python arithmetic."""
    new_rows, total = [], 0.0
    for z, t in zip(logits.double().tolist(), t_old.double().tolist()):
        e = [math.exp(v - max(z)) for v in z]
        p = [min(max(v / sum(e), 1e-4), 1 - 1e-4) for v in e]
        new = [beta * tc + (1 - beta) * pc / sum(p) for tc, pc in zip(t, p)]
        new_rows.append(new)
        total += math.log(1 - sum(tc * pc for tc, pc in zip(new, p)))
    return new_rows, lam * total / len(new_rows)


def _math(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(6, 5, generator=g)).to(dtype)
    t_old = torch.softmax(torch.randn(6, 5, generator=g), -1) * 0.7
    t_old[0] = 0.0  # a sample seen for the first time
    z = logits.float()
    new = elr_updated_targets(t_old, torch.softmax(z, -1).clamp(1e-4, 1 - 1e-4), 0.7)
    term = elr_regularizer(logits, new, lam=3.0)
    ref_new, ref_term = _naive(logits, t_old, 0.7, 3.0)
    # Both work in fp32 (ours) / fp64 (naive) on the same low-precision logits, so they agree to fp32 rounding.
    torch.testing.assert_close(new, torch.tensor(ref_new, dtype=torch.float32), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(term, torch.tensor(ref_term, dtype=torch.float32), atol=1e-5, rtol=1e-5)
    assert term.dtype == torch.float32 and float(term) <= 0.0


register(
    Case(
        name="elr",
        factory=lambda: ELR(beta=0.7, lam=3.0),
        # Until the lead exports it as `lightning_reg.ELR`.
        class_path="lightning_reg.callbacks.elr.ELR",
        full_init_args={
            "beta": 0.9,
            "lam": 1.0,
            "num_samples": 64,
            "lam_schedule": "sigmoid_rampup",
            "ramp_length": 2,
            "ramp_unit": "step",
            "teacher": "none",
            "table_dtype": "bfloat16",
            "table_device": "cpu",
            "topk": 2,
        },
        bad_args=[
            ({"beta": 1.0}, ValueError, "Expected argument `beta` to be a float in [0, 1), but got 1.0."),
            ({"beta": "a"}, TypeError, "Expected argument `beta`"),
            ({"lam": -1.0}, ValueError, "Expected argument `lam` to be a float in [0, inf)"),
            ({"num_samples": 0}, ValueError, "Expected argument `num_samples` to be an int in [1, inf)"),
            ({"lam_schedule": "nope"}, ValueError, "Expected argument `lam_schedule` to be one of"),
            ({"ramp_length": -1}, ValueError, "Expected argument `ramp_length`"),
            ({"ramp_unit": "iter"}, ValueError, "Expected argument `ramp_unit` to be one of ['epoch', 'step']"),
            ({"teacher": "self"}, ValueError, "Expected argument `teacher` to be one of ['none', 'ema']"),
            ({"table_dtype": "int8"}, ValueError, "Expected argument `table_dtype` to be one of"),
            ({"topk": 0}, ValueError, "Expected argument `topk` to be an int in [1, inf)"),
        ],
        math=_math,
        requires_index=True,
    )
)
