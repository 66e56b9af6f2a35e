from __future__ import annotations

import math
from typing import Any

import torch

from lightning_reg import EMATeacher
from lightning_reg.callbacks.elr import ELR
from lightning_reg.functional.elr import elr_regularizer, elr_teacher_targets, elr_updated_targets
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


def _naive_dense(logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, lam: float) -> float:
    """ELR+'s dense term from the formula in float64 Python: λ · mean over labelled pixels of log(1 - <t, p>)."""
    total, count = 0.0, 0
    b, c, h, w = logits.shape
    for i in range(b):
        for r in range(h):
            for s in range(w):
                if int(labels[i, r, s]) == -100:
                    continue
                z = [float(logits[i, k, r, s]) for k in range(c)]
                zt = [float(teacher_logits[i, k, r, s]) for k in range(c)]
                e, et = [math.exp(v - max(z)) for v in z], [math.exp(v - max(zt)) for v in zt]
                p = [min(max(v / sum(e), 1e-4), 1 - 1e-4) for v in e]
                pt = [min(max(v / sum(et), 1e-4), 1 - 1e-4) for v in et]
                t = [v / sum(pt) for v in pt]
                total += math.log(1 - sum(a * q for a, q in zip(t, p)))
                count += 1
    return lam * total / count


def _dense_math(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    logits = (2 * torch.randn(2, 5, 3, 3, generator=g)).to(dtype).requires_grad_()
    teacher_logits = (2 * torch.randn(2, 5, 3, 3, generator=g)).to(dtype)
    labels = torch.randint(0, 5, (2, 3, 3), generator=g)
    labels[0, 0] = -100  # a row of void pixels
    labels[1] = -100  # an image without labels
    valid = labels != -100
    target = elr_teacher_targets(torch.softmax(teacher_logits.float(), 1), dim=1)
    term = elr_regularizer(logits, target, lam=3.0, dim=1, valid=valid)
    ref = _naive_dense(logits.detach(), teacher_logits, labels, 3.0)
    # Both work in fp32 (ours) / fp64 (naive) on the same low-precision logits: they agree to fp32 rounding.
    torch.testing.assert_close(term, torch.tensor(ref, dtype=torch.float32), atol=1e-5, rtol=1e-5)
    assert term.dtype == torch.float32 and float(term) <= 0.0
    (grad,) = torch.autograd.grad(term, logits)
    assert torch.count_nonzero(grad[1]) == 0 and torch.count_nonzero(grad[0, :, 0]) == 0  # ignored: no gradient
    # The token layout (B, T, C) gives the same term along the last dimension.
    tok = logits.detach().movedim(1, -1).reshape(2, 9, 5)
    tok_target = target.movedim(1, -1).reshape(2, 9, 5)
    torch.testing.assert_close(elr_regularizer(tok, tok_target, lam=3.0, valid=valid.reshape(2, 9)), term.detach())


_BAD_ARGS: list[tuple[dict[str, Any], type[Exception], str]] = [
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
]

_FULL_INIT_ARGS: dict[str, Any] = {
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
}

register(
    Case(
        name="elr",
        factory=lambda: ELR(beta=0.7, lam=3.0),
        class_path="lightning_reg.ELR",
        full_init_args=_FULL_INIT_ARGS,
        bad_args=_BAD_ARGS,
        math=_math,
        requires_index=True,
        # Without a teacher ELR needs a per-element table on dense outputs, which it refuses with the size
        # (64 samples x 64 pixels or 8 tokens x 4 classes x 4 bytes) and the fix.
        refuses={
            "dense": "N × prod(d) × C × bytes = 64 × 64 × 4 × 4 B = 64.0 KiB",
            "tokens": "N × prod(d) × C × bytes = 64 × 8 × 4 × 4 B = 8.0 KiB",
        },
    )
)

# ELR+ with an EMA teacher: the classification path (per-sample table, targets from the teacher) and dense
# outputs (no table; the teacher's per-element prediction is the target).
register(
    Case(
        name="elr_ema",
        factory=lambda: ELR(beta=0.7, lam=3.0, teacher="ema"),
        class_path="lightning_reg.ELR",
        full_init_args={**_FULL_INIT_ARGS, "teacher": "ema"},
        bad_args=_BAD_ARGS,
        math=_math,
        requires_index=True,
        extra_callbacks=lambda: [EMATeacher(decay=0.9)],
        layouts=("dense", "tokens"),
        dense_math=_dense_math,
        composable=False,  # the composition test already has ELR and an EMATeacher
    )
)
