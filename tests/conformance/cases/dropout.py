from __future__ import annotations

import numpy as np
import torch

from lightning_reg.callbacks.dropout import DropoutSchedule
from lightning_reg.functional.dropout import drop_path_rates, drop_schedule
from lightning_reg.nn import drop_path
from tests.conformance.registry import Case, register


def _math(dtype: torch.dtype) -> None:
    # The schedule: the reference's np.linspace(p, 0, C) then zeros (early + linear), p then 0 (early + constant),
    # 0 then p (late), in double precision whatever the model's dtype.
    np.testing.assert_allclose(
        drop_schedule(0.1, 8, 5, "early", "linear"), [*np.linspace(0.1, 0.0, 5), 0.0, 0.0, 0.0], atol=1e-15
    )
    assert drop_schedule(0.1, 4, 2, "early", "constant") == [0.1, 0.1, 0.0, 0.0]
    assert drop_schedule(0.1, 4, 2, "late", "constant") == [0.0, 0.0, 0.1, 0.1]
    np.testing.assert_allclose(drop_path_rates(0.5, 6), torch.linspace(0, 0.5, 6).tolist(), atol=1e-7)
    # Drop path in the given dtype: every sample is either dropped or scaled by 1 / (1 - p), exactly.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, 4, generator=g).to(dtype)
    torch.manual_seed(0)
    y = drop_path(x, 0.5, training=True)
    assert y.dtype == dtype
    kept = (y != 0).flatten(1).any(1)
    assert 0 < int(kept.sum()) < 64
    torch.testing.assert_close(y[kept], x[kept] * 2, atol=0, rtol=0)
    assert torch.equal(y[~kept], torch.zeros_like(y[~kept]))


register(
    Case(
        name="dropout",
        # 4 optimizer steps per epoch in the tiny setup: the rate changes every step for 2.5 epochs, so resumes
        # mid-schedule and at an epoch boundary are both exercised.
        factory=lambda: DropoutSchedule(p=0.3, mode="early", schedule="linear", cutoff_epochs=2.5),
        class_path="lightning_reg.callbacks.dropout.DropoutSchedule",
        full_init_args={
            "p": 0.2,
            "mode": "late",
            "schedule": "constant",
            "cutoff_epochs": 1.5,
            "cutoff_steps": 10,
            "targets": "both",
            "include": ["net.*"],
            "exclude": ["*.attn_drop"],
            "attributes": ["attention_dropout"],
            "drop_path_scaling": "uniform",
        },
        bad_args=[
            ({"p": 1.5}, ValueError, "Expected argument `p` to be a float in [0, 1)"),
            ({"p": "a"}, TypeError, "Expected argument `p`"),
            ({"mode": "middle"}, ValueError, "Expected argument `mode` to be one of"),
            ({"schedule": "nope"}, ValueError, "Expected argument `schedule` to be one of"),
            ({"cutoff_epochs": -1.0}, ValueError, "Expected argument `cutoff_epochs` to be a float in [0, inf)"),
            ({"targets": "weights"}, ValueError, "Expected argument `targets` to be one of"),
            ({"include": "net.*"}, TypeError, "Expected argument `include` to be a list of str"),
        ],
        math=_math,
        model_kwargs={"dropout": 0.1},
        # Dropout masks are drawn per rank, so 2-rank DDP cannot equal one process; ranks still agree.
        ddp_matches_single=False,
    )
)
