"""Exponential moving average of weights (Mean Teacher, Tarvainen & Valpola 2017): the functional core.

Everything here is pure torch: the decay warm-ups, the in-place multi-tensor
update and the key clean-up used when exporting EMA weights. The stateful
callback is :class:`lightning_reg.callbacks.ema.EMATeacher`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

__all__ = [
    "EMA_WARMUPS",
    "EMAWarmup",
    "all_finite",
    "clean_state_dict",
    "clean_state_dict_key",
    "ema_decay",
    "ema_update_",
    "group_by_device_and_dtype",
]

EMAWarmup = Literal["none", "mean_teacher", "timm", "power"]
#: The decay warm-ups :func:`ema_decay` knows.
EMA_WARMUPS: tuple[str, ...] = ("none", "mean_teacher", "timm", "power")

# Wrapper prefixes that never belong to the user's model: DDP/DataParallel put ``module.`` in front of every key;
# torch.compile inserts ``_orig_mod.`` (at the root or in front of a compiled submodule); FSDP and activation
# checkpointing insert ``_fsdp_wrapped_module.`` and ``_checkpoint_wrapped_module.`` in front of wrapped submodules.
_LEADING_MODULE = re.compile(r"^(?:module\.)+")
_ANYWHERE = re.compile(r"(?:^|(?<=\.))(?:_orig_mod|_fsdp_wrapped_module|_checkpoint_wrapped_module)\.")


def ema_decay(
    num_updates: int,
    decay: float,
    warmup: str = "none",
    inv_gamma: float = 1.0,
    power: float = 2.0 / 3.0,
) -> float:
    r"""The EMA decay ``a`` for the ``n``-th update (``n`` counts from 1), after a warm-up.

    .. math::

        a_n = \begin{cases}
            a & \text{none} \\
            \min\!\bigl(a,\; 1 - \tfrac{1}{n + 1}\bigr) & \text{mean\_teacher} \\
            \min\!\bigl(a,\; \tfrac{1 + n}{10 + n}\bigr) & \text{timm} \\
            \min\!\bigl(a,\; 1 - (1 + n/\gamma)^{-p}\bigr) & \text{power}
        \end{cases}

    ``mean_teacher`` is the ramp of Mean Teacher's reference code, whose step
    counter is incremented before the update (https://arxiv.org/abs/1703.01780):
    the first update averages the two models equally. ``timm`` is TensorFlow's
    ``ExponentialMovingAverage(num_updates=...)`` ramp. ``power`` is the
    inverse-gamma ramp of timm's ``ModelEmaV3`` and ema-pytorch (``γ = inv_gamma``,
    ``p = power``; ``γ=1, p=2/3`` reaches 0.999 after about 31.6k updates).

    The result is a Python float: computing it never touches a device.

    Args:
        num_updates: ``n``, the 1-based index of the update being applied.
        decay: The target decay ``a`` in ``[0, 1]`` (every warm-up is capped by it).
        warmup: ``"none"``, ``"mean_teacher"``, ``"timm"`` or ``"power"``.
        inv_gamma: ``γ > 0`` of the ``power`` warm-up.
        power: ``p > 0`` of the ``power`` warm-up.

    Example:
        >>> ema_decay(1, 0.999, "mean_teacher"), ema_decay(3, 0.999, "mean_teacher")
        (0.5, 0.75)
        >>> ema_decay(10_000, 0.999, "mean_teacher")
        0.999
        >>> round(ema_decay(1, 0.999, "timm"), 6)  # 2 / 11
        0.181818
        >>> round(ema_decay(1, 0.999, "power", inv_gamma=1.0, power=1.0), 6)  # 1 - 1/2
        0.5
        >>> ema_decay(7, 0.9, "none")
        0.9
    """
    n = float(num_updates)
    if warmup == "none":
        return float(decay)
    if warmup == "mean_teacher":
        value = 1.0 - 1.0 / (n + 1.0)
    elif warmup == "timm":
        value = (1.0 + n) / (10.0 + n)
    elif warmup == "power":
        value = 1.0 - (1.0 + n / inv_gamma) ** -power
    else:
        raise ValueError(f"Expected argument `warmup` to be one of {list(EMA_WARMUPS)}, but got {warmup!r}.")
    return float(min(decay, max(value, 0.0)))


@torch.no_grad()
def ema_update_(ema: Sequence[Tensor], tensors: Sequence[Tensor], decay: float) -> None:
    r"""In place, ``ema ← a·ema + (1 − a)·θ`` for every pair, as one multi-tensor ``lerp_``.

    .. math:: \theta'_t = a\,\theta'_{t-1} + (1 - a)\,\theta_t

    Paper: *Mean teachers are better role models*, https://arxiv.org/abs/1703.01780 (Eq. 1).
    It runs ``torch._foreach_lerp_(ema, tensors, 1 - a)``: one fused kernel per
    device and dtype on CUDA, reading each tensor once and writing the EMA once.
    The lists must share devices and dtypes pairwise (group them once with
    :func:`group_by_device_and_dtype`). ``decay`` is a Python float, so there is
    no host synchronisation. ``lerp_`` with weight 1 (``a = 0``) copies exactly.

    Args:
        ema: The EMA tensors, updated in place.
        tensors: The live tensors ``θ`` (same shapes, devices and dtypes).
        decay: ``a`` in ``[0, 1]``.

    Example:
        >>> e, p = [torch.tensor([0.0, 1.0])], [torch.tensor([1.0, 3.0])]
        >>> ema_update_(e, p, decay=0.75)
        >>> e[0]
        tensor([0.2500, 1.5000])
    """
    if len(ema) != len(tensors):
        raise ValueError(f"Expected as many EMA tensors as live tensors, but got {len(ema)} and {len(tensors)}.")
    if not ema:
        return
    torch._foreach_lerp_(list(ema), list(tensors), 1.0 - float(decay))


@torch.no_grad()
def all_finite(tensors: Sequence[Tensor]) -> Tensor:
    """A 0-dim bool tensor on the tensors' device: whether every entry of every tensor is finite. No host sync.

    It takes one multi-tensor L2 norm (``torch._foreach_norm``, the kernel behind ``clip_grad_norm_``;
    accumulated in fp32 for fp16/bf16) and checks that the norms are finite: a NaN or an infinity anywhere
    makes its tensor's norm non-finite. A finite entry above about ``1e19`` in magnitude would overflow the
    fp32 sum of squares and count as non-finite too, far beyond any trained weight. The tensors must share
    a device and dtype. It reads each tensor once: about a third of an EMA update's memory traffic.

    Example:
        >>> all_finite([torch.ones(3), torch.zeros(2, 2)])
        tensor(True)
        >>> all_finite([torch.ones(3), torch.tensor([1.0, float("nan")])])
        tensor(False)
    """
    tensors = list(tensors)
    if not tensors:
        return torch.ones((), dtype=torch.bool)
    low = tensors[0].dtype in (torch.float16, torch.bfloat16)
    norms = torch._foreach_norm(tensors, 2, dtype=torch.float32) if low else torch._foreach_norm(tensors, 2)
    return torch.isfinite(torch.stack(list(norms))).all()


def group_by_device_and_dtype(
    pairs: Iterable[tuple[Tensor, Tensor]],
) -> dict[tuple[torch.device, torch.dtype], tuple[list[Tensor], list[Tensor]]]:
    """Group ``(ema, live)`` pairs by the live tensor's device and dtype, keeping their order.

    Example:
        >>> a, b = torch.zeros(2), torch.zeros(2, dtype=torch.float64)
        >>> groups = group_by_device_and_dtype([(a.clone(), a), (b.clone(), b)])
        >>> [(str(d), str(t), len(e)) for (d, t), (e, _) in groups.items()]
        [('cpu', 'torch.float32', 1), ('cpu', 'torch.float64', 1)]
    """
    groups: dict[tuple[torch.device, torch.dtype], tuple[list[Tensor], list[Tensor]]] = {}
    for ema, live in pairs:
        if ema.dtype != live.dtype or ema.device != live.device or ema.shape != live.shape:
            raise ValueError(
                "Expected each EMA tensor to match its live tensor in shape, dtype and device, but got"
                f" {tuple(ema.shape)}/{ema.dtype}/{ema.device} vs {tuple(live.shape)}/{live.dtype}/{live.device}."
            )
        e, t = groups.setdefault((live.device, live.dtype), ([], []))
        e.append(ema)
        t.append(live)
    return groups


def clean_state_dict_key(key: str) -> str:
    """Strip wrapper prefixes from a state-dict key so it loads into the bare model.

    A leading ``module.`` (DDP, ``DataParallel``; repeated if nested) is removed,
    and ``_orig_mod.`` (``torch.compile``), ``_fsdp_wrapped_module.`` and
    ``_checkpoint_wrapped_module.`` are removed wherever they occur as a whole
    path component. A user submodule that happens to be called ``module`` deeper
    in the tree is kept.

    Example:
        >>> clean_state_dict_key("module._orig_mod.encoder.module.weight")
        'encoder.module.weight'
        >>> clean_state_dict_key("net._fsdp_wrapped_module.0.bias")
        'net.0.bias'
    """
    key = _ANYWHERE.sub("", key)
    return _LEADING_MODULE.sub("", key)


def clean_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Apply :func:`clean_state_dict_key` to every key; two keys that clean to the same name raise ``ValueError``.

    Example:
        >>> clean_state_dict({"module._orig_mod.w": 1})
        {'w': 1}
    """
    out: dict[str, Any] = {}
    for key, value in state_dict.items():
        clean = clean_state_dict_key(key)
        if clean in out:
            raise ValueError(f"The keys {key!r} and another both clean to {clean!r}; cannot export unambiguously.")
        out[clean] = value
    return out
