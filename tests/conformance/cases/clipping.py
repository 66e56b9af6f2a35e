from __future__ import annotations

import torch

from lightning_reg.callbacks.clipping import GradientClipping
from lightning_reg.functional.clipping import (
    adaptive_clip_grad_,
    clip_grad_norm_,
    clip_grad_norm_per_tensor_,
    clip_grad_value_,
    percentile_threshold,
)
from tests.conformance.registry import Case, register

# Scaling a low-precision gradient rounds once: allow one ulp-ish of relative error per dtype.
_RTOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _grads(dtype: torch.dtype) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    shapes = [(5, 3, 2, 2), (5,), (4, 6), (4,), (3,)]
    weights = [torch.randn(s, generator=g).to(dtype) for s in shapes]
    grads = [(torch.randn(s, generator=g) * 0.3).to(dtype) for s in shapes]
    return weights, grads


def _close(ours: list[torch.Tensor], ref: list[torch.Tensor], dtype: torch.dtype) -> None:
    for a, b in zip(ours, ref):
        assert a.dtype == dtype
        torch.testing.assert_close(a.float(), b, rtol=_RTOL[dtype], atol=1e-6)


def _math(dtype: torch.dtype) -> None:
    _, base = _grads(dtype)
    f32 = [t.float() for t in base]
    c = 1.0
    # Norm clipping: g * min(1, c / (||g|| + 1e-6)) with the global fp32 norm of the (rounded) gradients.
    total = torch.cat([t.flatten() for t in f32]).norm()
    assert total > 2 * c  # the example really clips
    grads = [t.clone() for t in base]
    pre = clip_grad_norm_(grads, c)
    torch.testing.assert_close(pre, total, rtol=1e-6, atol=0)
    _close(grads, [t * (c / (total + 1e-6)) for t in f32], dtype)
    if dtype == torch.float32:  # identical to torch's own implementation
        params = [torch.nn.Parameter(t.clone()) for t in base]
        for p_, t in zip(params, base):
            p_.grad = t.clone()
        ref_total = torch.nn.utils.clip_grad_norm_(params, c, foreach=True)
        torch.testing.assert_close(pre, ref_total)
        _close(grads, [p_.grad for p_ in params], dtype)
    # inf-norm and p = 3 norms.
    for p in (float("inf"), 3.0):
        grads = [t.clone() for t in base]
        ref_norm = torch.linalg.vector_norm(torch.cat([t.flatten() for t in f32]), p)
        torch.testing.assert_close(clip_grad_norm_(grads, 0.1, p), ref_norm, rtol=1e-5, atol=0)
        _close(grads, [t * (0.1 / (ref_norm + 1e-6)) for t in f32], dtype)
    # Value clipping.
    grads = [t.clone() for t in base]
    clip_grad_value_(grads, 0.2)
    _close(grads, [t.clamp(-0.2, 0.2) for t in f32], dtype)
    # Component-wise: every tensor on its own.
    grads = [t.clone() for t in base]
    norms = clip_grad_norm_per_tensor_(grads, 0.5)
    torch.testing.assert_close(norms, torch.stack([t.norm() for t in f32]), rtol=1e-6, atol=0)
    _close(grads, [t * min(1.0, 0.5 / (float(t.norm()) + 1e-6)) for t in f32], dtype)
    # AGC: a per-row Python loop of the NFNets formula as the reference.
    weights, base = _grads(dtype)
    grads = [t.clone() for t in base]
    adaptive_clip_grad_(weights, grads, clip_factor=0.05, eps=1e-3)
    ref = []
    for w, g in zip(weights, base):
        w32, g32 = w.float(), g.float()
        if g.dim() <= 1:
            w32, g32 = w32.reshape(1, -1), g32.reshape(1, -1)
        rows = []
        for wr, gr in zip(w32, g32):
            limit = 0.05 * max(float(wr.norm()), 1e-3)
            gn = float(gr.norm())
            rows.append(gr * (limit / max(gn, 1e-6)) if gn > limit else gr)
        ref.append(torch.stack(rows).reshape(g.shape))
    _close(grads, ref, dtype)
    # Percentile threshold: linear interpolation between order statistics, NaN slots ignored.
    h = torch.tensor([4.0, 1.0, float("nan"), 3.0, 2.0])
    assert float(percentile_threshold(h, 50.0)) == 2.5
    assert float(percentile_threshold(h, 100.0)) == 4.0


register(
    Case(
        name="clipping",
        factory=lambda: GradientClipping(rule="auto", percentile=50.0, history_size=8),
        class_path="lightning_reg.GradientClipping",
        full_init_args={
            "max_norm": 0.5,
            "rule": "norm",
            "norm_type": 2.0,
            "thresholds": {"net.4": 0.25},
            "clip_factor": 0.02,
            "eps": 0.001,
            "agc_exclude": ["net.4"],
            "percentile": 50.0,
            "history_size": 16,
            "nonfinite": "raise",
            "log_module_norms_every_n_steps": 2,
        },
        bad_args=[
            ({"max_norm": 0.0}, ValueError, "Expected argument `max_norm` to be a float in (0, inf)"),
            ({"max_norm": "1"}, TypeError, "Expected argument `max_norm`"),
            ({"rule": "clip"}, ValueError, "Expected argument `rule` to be one of"),
            ({"norm_type": -1.0}, ValueError, "Expected argument `norm_type` to be a float in (0, inf)"),
            ({"thresholds": {"head": -1.0}}, ValueError, "Expected argument `thresholds['head']`"),
            ({"thresholds": ["head"]}, TypeError, "Expected argument `thresholds` to be a mapping"),
            ({"rule": "auto", "thresholds": {"head": 0.5}}, ValueError, "Expected argument `thresholds` to be empty"),
            ({"clip_factor": 0.0}, ValueError, "Expected argument `clip_factor`"),
            ({"agc_exclude": "fc"}, TypeError, "Expected argument `agc_exclude` to be a list"),
            ({"percentile": 0.0}, ValueError, "Expected argument `percentile` to be a float in (0, 100]"),
            ({"history_size": 0}, ValueError, "Expected argument `history_size` to be an int in [1, inf)"),
            ({"nonfinite": "drop"}, ValueError, "Expected argument `nonfinite` to be one of"),
            ({"log_module_norms_every_n_steps": 0}, ValueError, "Expected argument `log_module_norms_every_n_steps`"),
        ],
        math=_math,
    )
)
