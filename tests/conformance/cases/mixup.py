from __future__ import annotations

import torch
import torch.nn.functional as F

from lightning_reg.callbacks.mixup import Mixup
from lightning_reg.core.protocol import soft_cross_entropy
from lightning_reg.functional.mixup import mixup_tensors
from tests.conformance.registry import Case, register


def _math(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, generator=g).to(dtype)
    perm = torch.tensor([3, 0, 5, 1, 2, 4])
    mixed = mixup_tensors(x, perm, 0.7)
    assert mixed.dtype == dtype
    ref = 0.7 * x.double() + 0.3 * x.double()[perm]
    tol = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(mixed.double(), ref, atol=tol, rtol=tol)
    # Soft CE on the mixed one-hot target is the lam-weighted sum of the two hard CEs.
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    logits = torch.randn(6, 5, generator=g).to(dtype)
    target = mixup_tensors(F.one_hot(y, 5).float(), perm, 0.7)
    ours = soft_cross_entropy(logits, target)
    expected = 0.7 * F.cross_entropy(logits.float(), y) + 0.3 * F.cross_entropy(logits.float(), y[perm])
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


register(
    Case(
        name="mixup",
        factory=lambda: Mixup(alpha=1.0),
        # Until the lead exports it as `lightning_reg.Mixup`.
        class_path="lightning_reg.callbacks.mixup.Mixup",
        full_init_args={"alpha": 0.4, "max_lam": True},
        bad_args=[
            ({"alpha": 0.0}, ValueError, "Expected argument `alpha` to be a float in (0, inf), but got 0.0."),
            ({"alpha": "a"}, TypeError, "Expected argument `alpha`"),
            ({"max_lam": 1}, TypeError, "Expected argument `max_lam` to be a bool"),
        ],
        math=_math,
        # Each rank mixes within its own batch, so a DDP run cannot equal one process on the joint batch;
        # ranks still agree.
        ddp_matches_single=False,
        # Mixing inputs changes what per-sample techniques record (PS-KD's or ELR's predictions), so mixup is
        # composed deliberately (ELR+ = Mixup + EMATeacher + ELR(teacher="ema"); see tests/test_elr.py),
        # not thrown into the all-together test.
        composable=False,
        # Per sample, classification only: dense outputs are refused, naming the input-stage fix for segmentation.
        refuses={"dense": "use `CutMix`", "tokens": "`Mixup` does not support dense outputs"},
    )
)
