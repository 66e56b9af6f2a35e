from __future__ import annotations

import torch
import torch.nn.functional as F

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


register(
    Case(
        name="pskd",
        factory=lambda: PSKD(alpha_T=0.8),
        class_path="lightning_reg.PSKD",
        full_init_args={
            "alpha_T": 0.5,
            "schedule": "cosine",
            "schedule_unit": "step",
            "teacher": "self",
            "num_samples": 64,
            "table_dtype": "bfloat16",
            "table_device": "cpu",
            "topk": 2,
        },
        bad_args=[
            ({"alpha_T": 1.5}, ValueError, "Expected argument `alpha_T` to be a float in [0, 1]"),
            ({"alpha_T": "a"}, TypeError, "Expected argument `alpha_T`"),
            ({"schedule": "nope"}, ValueError, "Expected argument `schedule` to be one of"),
            ({"schedule_unit": "batch"}, ValueError, "Expected argument `schedule_unit` to be one of"),
            ({"teacher": "swa"}, ValueError, "Expected argument `teacher` to be one of"),
            ({"num_samples": 0}, ValueError, "Expected argument `num_samples` to be an int"),
            ({"table_dtype": "int8"}, ValueError, "Expected argument `table_dtype` to be one of"),
            ({"table_device": "gpu"}, ValueError, "Expected argument `table_device` to be one of"),
            ({"topk": 0}, ValueError, "Expected argument `topk` to be an int"),
        ],
        math=_math,
        requires_index=True,
    )
)
