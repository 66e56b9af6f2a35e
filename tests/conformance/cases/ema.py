from __future__ import annotations

import torch

from lightning_reg.callbacks.ema import EMATeacher
from lightning_reg.functional.ema import all_finite, ema_decay, ema_update_
from tests.conformance.registry import Case, register


def _math(dtype: torch.dtype) -> None:
    # Hand-computed warm-ups (n counts updates from 1).
    assert ema_decay(1, 0.999, "mean_teacher") == 0.5
    assert ema_decay(4, 0.999, "mean_teacher") == 0.8
    assert abs(ema_decay(2, 0.999, "timm") - 3 / 12) < 1e-12
    assert abs(ema_decay(3, 0.999, "power", inv_gamma=1.0, power=1.0) - 0.75) < 1e-12
    assert ema_decay(10**6, 0.99, "timm") == 0.99
    # The multi-tensor update against the recurrence a*e + (1-a)*θ, applied three times.
    g = torch.Generator().manual_seed(0)
    shapes = [(3, 4), (5,), (2, 2, 2)]
    ema = [torch.randn(s, generator=g).to(dtype) for s in shapes]
    ref = [e.double() for e in ema]
    for n in (1, 2, 3):
        live = [torch.randn(s, generator=g).to(dtype) for s in shapes]
        a = ema_decay(n, 0.9, "mean_teacher")  # 0.5, 0.666..., 0.75
        ema_update_(ema, live, a)
        ref = [a * r + (1 - a) * t.double() for r, t in zip(ref, live)]
    tol = {torch.float32: 1e-6, torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]
    for e, r in zip(ema, ref):
        assert e.dtype == dtype
        torch.testing.assert_close(e.double(), r, atol=tol, rtol=tol)
    # decay 0 copies exactly, decay 1 leaves the EMA alone.
    e, t = [torch.zeros(3, dtype=dtype)], [torch.tensor([1.0, -2.0, 3.0], dtype=dtype)]
    ema_update_(e, t, 0.0)
    assert torch.equal(e[0], t[0])
    ema_update_(e, [torch.zeros(3, dtype=dtype)], 1.0)
    assert torch.equal(e[0], t[0])
    # The non-finite check: fp16/bf16 norms are accumulated in fp32, so large finite weights are not flagged.
    big = torch.full((4096,), 60000.0 if dtype == torch.float16 else 1e15, dtype=dtype)
    assert bool(all_finite([big, t[0]]))
    assert not bool(all_finite([big, torch.tensor([0.0, float("nan")], dtype=dtype)]))
    assert not bool(all_finite([torch.tensor([float("-inf")], dtype=dtype)]))


register(
    Case(
        name="ema",
        factory=lambda: EMATeacher(decay=0.9),
        class_path="lightning_reg.EMATeacher",
        full_init_args={
            "decay": 0.99,
            "warmup": "power",
            "inv_gamma": 2.0,
            "power": 0.75,
            "update_every": 2,
            "start_step": 1,
            "buffers": "copy",
            "include": ["net.*"],
            "exclude": ["*.num_batches_tracked"],
            "eval_with_ema": False,
            "teacher_mode": "train",
            "overlap": True,
            "nonfinite": "raise",
            "key": "slow",
        },
        bad_args=[
            ({"decay": 1.5}, ValueError, "Expected argument `decay` to be a float in [0, 1]"),
            ({"decay": "a"}, TypeError, "Expected argument `decay`"),
            ({"warmup": "linear"}, ValueError, "Expected argument `warmup` to be one of"),
            ({"inv_gamma": 0.0}, ValueError, "Expected argument `inv_gamma` to be a float in (0, inf)"),
            ({"update_every": 0}, ValueError, "Expected argument `update_every` to be an int in [1, inf)"),
            ({"start_step": -1}, ValueError, "Expected argument `start_step` to be an int in [0, inf)"),
            ({"buffers": "mean"}, ValueError, "Expected argument `buffers` to be one of"),
            ({"include": "net.*"}, TypeError, "Expected argument `include` to be a list of name patterns"),
            ({"exclude": [1]}, TypeError, "Expected argument `exclude` to be a list of name patterns"),
            ({"eval_with_ema": 1}, TypeError, "Expected argument `eval_with_ema` to be a bool"),
            ({"teacher_mode": "student"}, ValueError, "Expected argument `teacher_mode` to be one of"),
            ({"nonfinite": "zero"}, ValueError, "Expected argument `nonfinite` to be one of"),
            ({"key": 1}, TypeError, "Expected argument `key` to be a str or None"),
        ],
        math=_math,
    )
)
