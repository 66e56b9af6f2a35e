from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from lightning_reg import EMATeacher
from lightning_reg.callbacks.pskd import PSKD
from lightning_reg.core.protocol import soft_cross_entropy
from lightning_reg.functional.pskd import pskd_alpha, pskd_soft_targets
from tests.conformance.registry import Case, register


def _math(dtype: torch.dtype) -> None:
    # Hand-computed: y = class 1 of 3, previous prediction (0.2, 0.5, 0.3), alpha = 0.5.
    y = F.one_hot(torch.tensor([1]), 3).float()
    prev = torch.tensor([[0.2, 0.5, 0.3]]).to(dtype)
    q = pskd_soft_targets(y, prev, 0.5)
    assert q.dtype == torch.float32
    torch.testing.assert_close(q, torch.tensor([[0.1, 0.75, 0.15]]).to(dtype).float(), atol=1e-3, rtol=0)
    assert pskd_alpha(3, 4, 0.8) == 0.8 * 3 / 4
    # Gradient of the soft CE w.r.t. the logits is (p - q) / B, in every logits dtype.
    logits = torch.tensor([[1.0, 2.0, 0.0], [0.5, -1.0, 0.25]]).to(dtype).requires_grad_()
    prev2 = torch.tensor([[0.2, 0.5, 0.3], [0.6, 0.3, 0.1]])
    q2 = pskd_soft_targets(F.one_hot(torch.tensor([1, 0]), 3).float(), prev2, 0.4, seen=torch.tensor([True, False]))
    torch.testing.assert_close(q2[1], torch.tensor([1.0, 0.0, 0.0]))  # unseen row: hard label
    soft_cross_entropy(logits, q2).backward()
    assert logits.grad is not None
    expected = (torch.softmax(logits.detach().float(), -1) - q2) / 2
    torch.testing.assert_close(logits.grad.float(), expected.to(dtype).float(), atol=1e-6, rtol=0)


def _naive_dense_target(teacher_logits: torch.Tensor, labels: torch.Tensor, alpha: float) -> list[list[float]]:
    """q_e = (1 - α) one_hot(y_e) + α softmax(teacher)_e per labelled pixel, in float64 Python (rows: pixels)."""
    rows = []
    b, c, h, w = teacher_logits.shape
    for i in range(b):
        for r in range(h):
            for s in range(w):
                y = int(labels[i, r, s])
                if y == -100:
                    rows.append([0.0] * c)  # an ignored pixel keeps its (zero) target
                    continue
                z = [float(teacher_logits[i, k, r, s]) for k in range(c)]
                e = [math.exp(v - max(z)) for v in z]
                rows.append([(1 - alpha) * (k == y) + alpha * e[k] / sum(e) for k in range(c)])
    return rows


def _dense_math(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 3, 3, generator=g).to(dtype).requires_grad_()
    teacher_logits = (2 * torch.randn(2, 4, 3, 3, generator=g)).to(dtype)
    labels = torch.randint(0, 4, (2, 3, 3), generator=g)
    labels[0, 1, :2] = -100
    labels[1] = -100  # an image without labels
    valid = labels != -100
    onehot = F.one_hot(labels.clamp_min(0), 4).float().mul(valid.unsqueeze(-1)).movedim(-1, 1)
    q = pskd_soft_targets(onehot, torch.softmax(teacher_logits.float(), 1), 0.6, valid, dim=1)
    ref = torch.tensor(_naive_dense_target(teacher_logits, labels, 0.6), dtype=torch.float64)
    torch.testing.assert_close(q.movedim(1, -1).reshape(-1, 4).double(), ref, atol=1e-6, rtol=1e-6)
    # The base loss is the soft CE over labelled pixels: gradient (p - q) / |V| there, exactly zero elsewhere.
    loss = soft_cross_entropy(logits, q, dim=1, valid=valid)
    (grad,) = torch.autograd.grad(loss, logits)
    p = torch.softmax(logits.detach().float(), 1)
    expected = (p - q) * valid.unsqueeze(1) / valid.sum()
    torch.testing.assert_close(grad.float(), expected.to(dtype).float(), atol=1e-6, rtol=0)
    assert torch.count_nonzero(grad[1]) == 0


_FULL_INIT_ARGS: dict[str, Any] = {
    "alpha_T": 0.5,
    "schedule": "cosine",
    "schedule_unit": "step",
    "teacher": "self",
    "num_samples": 64,
    "table_dtype": "bfloat16",
    "table_device": "cpu",
    "topk": 2,
}
_BAD_ARGS: list[tuple[dict[str, Any], type[Exception], str]] = [
    ({"alpha_T": 1.5}, ValueError, "Expected argument `alpha_T` to be a float in [0, 1]"),
    ({"alpha_T": "a"}, TypeError, "Expected argument `alpha_T`"),
    ({"schedule": "nope"}, ValueError, "Expected argument `schedule` to be one of"),
    ({"schedule_unit": "batch"}, ValueError, "Expected argument `schedule_unit` to be one of"),
    ({"teacher": "swa"}, ValueError, "Expected argument `teacher` to be one of"),
    ({"num_samples": 0}, ValueError, "Expected argument `num_samples` to be an int"),
    ({"table_dtype": "int8"}, ValueError, "Expected argument `table_dtype` to be one of"),
    ({"table_device": "gpu"}, ValueError, "Expected argument `table_device` to be one of"),
    ({"topk": 0}, ValueError, "Expected argument `topk` to be an int"),
]

register(
    Case(
        name="pskd",
        factory=lambda: PSKD(alpha_T=0.8),
        class_path="lightning_reg.PSKD",
        full_init_args=_FULL_INIT_ARGS,
        bad_args=_BAD_ARGS,
        math=_math,
        requires_index=True,
        # With the paper's self-teacher PS-KD needs a per-element table on dense outputs, which it refuses with
        # the size (64 samples x 64 pixels or 8 tokens x 4 classes x 4 bytes) and the fix.
        refuses={
            "dense": "N × prod(d) × C × bytes = 64 × 64 × 4 × 4 B = 64.0 KiB",
            "tokens": "N × prod(d) × C × bytes = 64 × 8 × 4 × 4 B = 8.0 KiB",
        },
    )
)

# PS-KD with an EMA teacher: the table stores the teacher's predictions (classification); on dense outputs the
# teacher's per-element prediction stands in for the previous one (no table).
register(
    Case(
        name="pskd_ema",
        factory=lambda: PSKD(alpha_T=0.8, teacher="ema"),
        class_path="lightning_reg.PSKD",
        full_init_args={**_FULL_INIT_ARGS, "teacher": "ema"},
        bad_args=_BAD_ARGS,
        math=_math,
        requires_index=True,
        extra_callbacks=lambda: [EMATeacher(decay=0.9)],
        layouts=("dense", "tokens"),
        dense_math=_dense_math,
        composable=False,  # the composition test already has PSKD and an EMATeacher
    )
)
