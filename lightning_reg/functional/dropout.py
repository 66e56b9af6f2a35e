r"""Early, late and standard dropout schedules (Liu et al., 2023) and the modules they drive.

Paper: *Dropout Reduces Underfitting* (Liu, Xu, Darrell, Zhang, ICML 2023),
https://arxiv.org/abs/2303.01500. Reference code: ``facebookresearch/dropout``
(``drop_scheduler.py``).

The rate is a pure function of the optimizer step ``t``, the cutoff ``C`` (in
steps) and, for some shapes, the total number of steps ``T``:

.. math::

    r_{\text{standard}}(t) &= p \\
    r_{\text{early}}(t) &= \begin{cases} p \cdot s(t, C) & t < C \\ 0 & t \ge C \end{cases} \\
    r_{\text{late}}(t) &= \begin{cases} 0 & t < C \\ p \cdot s(t - C, T - C) & t \ge C \end{cases}

where the shape ``s(k, L)`` of a phase of ``L`` steps is ``1`` for
``"constant"`` and ``linspace(1, 0, L)[k] = 1 - k / (L - 1)`` for ``"linear"``
in early mode, so early + linear is exactly the reference's
``np.linspace(p, 0, C)`` followed by zeros. Any other schedule from
:mod:`lightning_reg.core.schedules` is evaluated the same way, as
``schedule(k, max(L - 1, 1))``, a multiplier of ``p`` that reaches its end value
on the phase's last step. The reference only allows ``"constant"`` in late
mode; here late + ``"linear"`` ramps from ``0`` at the cutoff to ``p`` on the
last training step (an extension, documented as such).

Stochastic depth uses the same rate for its deepest block: block ``k`` of ``K``
gets ``linspace(0, r, K)[k] = r · k / (K - 1)`` (timm's and the reference's
``torch.linspace(0, drop_path_rate, depth)``).

This module is pure torch: it also finds the modules a schedule drives
(:func:`find_drop_targets`) and writes rates into them (:func:`set_drop_rates_`).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from torch import nn
from torch.nn.modules.dropout import _DropoutNd

from lightning_reg.core.schedules import Constant, Linear, Schedule, ScheduleLike, get_schedule

__all__ = [
    "DEFAULT_RATE_ATTRIBUTES",
    "MODES",
    "DropTarget",
    "drop_path_rates",
    "drop_rate_at",
    "drop_schedule",
    "find_drop_targets",
    "is_drop_path_module",
    "resolve_shape",
    "restore_drop_rates_",
    "set_drop_rates_",
]

#: The schedule modes of the paper.
MODES = ("early", "late", "standard")

#: Float attributes read as dropout rates on any module, by default. They are
#: only taken when the attribute is a plain Python ``float`` stored on the
#: module itself (not a submodule, not an ``int``, not a tensor); submodules of
#: these names (e.g. timm's ``attn_drop = nn.Dropout(...)``) are found as
#: ``nn.Dropout`` modules anyway.
DEFAULT_RATE_ATTRIBUTES: tuple[str, ...] = ("attn_drop", "proj_drop", "attn_dropout", "attention_dropout", "drop_rate")

#: Built-in per-class float attributes that are read at every forward pass.
_CLASS_ATTRIBUTES: tuple[tuple[type[nn.Module], str], ...] = ((nn.MultiheadAttention, "dropout"),)

_DROP_PATH_NAME = re.compile(r"drop_?path|stochastic_?depth", re.IGNORECASE)


def resolve_shape(schedule: ScheduleLike, mode: str, name: str = "schedule") -> Schedule:
    """Turn a schedule argument into the multiplier of ``p`` used inside the active phase.

    ``"linear"`` means ``p → 0`` in early mode and ``0 → p`` in late mode;
    ``"constant"`` is ``1``; other short names and instances come from
    :func:`~lightning_reg.core.schedules.get_schedule` unchanged.

    Example:
        >>> resolve_shape("linear", "early"), resolve_shape("linear", "late")
        (Linear(start=1.0, end=0.0), Linear(start=0.0, end=1.0))
    """
    if schedule == "linear":
        return Linear(1.0, 0.0) if mode == "early" else Linear(0.0, 1.0)
    if schedule == "constant":
        return Constant(1.0)
    return get_schedule(schedule, name)


def _needs_total(shape: Schedule, mode: str) -> bool:
    return mode == "late" and not isinstance(shape, Constant)


def drop_rate_at(
    step: int,
    p: float,
    cutoff: int,
    mode: Literal["early", "late", "standard"] = "early",
    schedule: ScheduleLike = "linear",
    total: int | None = None,
) -> float:
    r"""The drop rate at optimizer step ``step`` (0-based), as defined in the module docstring.

    Args:
        step: The number of optimizer steps taken so far (``trainer.global_step``).
        p: The peak rate.
        cutoff: ``C``, the length of the first phase in optimizer steps.
        mode: ``"early"``, ``"late"`` or ``"standard"``.
        schedule: ``"constant"``, ``"linear"`` or any shared schedule (see :func:`resolve_shape`).
        total: ``T``, the total number of optimizer steps; only needed for late mode with a
            non-constant schedule.

    Raises:
        ValueError: If ``total`` is needed but missing.

    Example:
        >>> [round(drop_rate_at(t, 0.1, 5, "early", "linear"), 4) for t in range(7)]
        [0.1, 0.075, 0.05, 0.025, 0.0, 0.0, 0.0]
        >>> [drop_rate_at(t, 0.1, 2, "early", "constant") for t in range(4)]
        [0.1, 0.1, 0.0, 0.0]
        >>> [drop_rate_at(t, 0.1, 2, "late", "constant") for t in range(4)]
        [0.0, 0.0, 0.1, 0.1]
        >>> [drop_rate_at(t, 0.1, 2, "standard") for t in range(3)]
        [0.1, 0.1, 0.1]
    """
    if mode == "standard":
        return float(p)
    shape = resolve_shape(schedule, mode)
    if mode == "early":
        if step >= cutoff:
            return 0.0
        return float(p) * shape(step, max(cutoff - 1, 1))
    if mode != "late":
        raise ValueError(f"Expected argument `mode` to be one of {list(MODES)}, but got {mode!r}.")
    if step < cutoff:
        return 0.0
    if not _needs_total(shape, mode):
        return float(p) * shape(step - cutoff, 1)
    if total is None:
        raise ValueError(
            f"mode='late' with schedule {schedule!r} ramps over the steps after the cutoff, so it needs `total`."
        )
    return float(p) * shape(step - cutoff, max(total - cutoff - 1, 1))


def drop_schedule(
    p: float,
    total: int,
    cutoff: int,
    mode: Literal["early", "late", "standard"] = "early",
    schedule: ScheduleLike = "linear",
) -> list[float]:
    """The whole per-step schedule, ``[drop_rate_at(t, ...) for t in range(total)]``.

    The same array as the reference's ``drop_scheduler(p, epochs, niter_per_ep, cutoff_epoch, mode, schedule)``
    with ``total = epochs * niter_per_ep`` and ``cutoff = cutoff_epoch * niter_per_ep``.

    Example:
        >>> drop_schedule(0.3, 6, 3, "early", "linear")
        [0.3, 0.15, 0.0, 0.0, 0.0, 0.0]
    """
    return [drop_rate_at(t, p, cutoff, mode, schedule, total) for t in range(total)]


def drop_path_rates(rate: float, depth: int, scaling: Literal["linear", "uniform"] = "linear") -> list[float]:
    r"""Per-block stochastic-depth rates: ``linspace(0, rate, depth)`` or ``rate`` for every block.

    .. math:: r_k = r \cdot \frac{k}{K - 1}, \qquad k = 0, \dots, K - 1

    Computed in double precision; equal to ``torch.linspace(0, rate, depth)`` up to its float32
    rounding. As with ``torch.linspace``, a single block gets ``0`` under ``"linear"``.

    Example:
        >>> drop_path_rates(0.5, 5)
        [0.0, 0.125, 0.25, 0.375, 0.5]
        >>> drop_path_rates(0.3, 2, "uniform")
        [0.3, 0.3]
    """
    if scaling == "uniform":
        return [float(rate)] * depth
    if depth == 1:
        return [0.0]
    # Match the reference's linspace exactly at both ends.
    return [0.0 if k == 0 else float(rate) if k == depth - 1 else float(rate) * k / (depth - 1) for k in range(depth)]


@dataclass
class DropTarget:
    """One rate the schedule drives: ``setattr(module, attr, rate)``.

    Attributes:
        name: The qualified name of ``module`` in the model (``""`` for the root).
        module: The module holding the rate.
        attr: The attribute holding the rate (``"p"``, ``"dropout"``, ``"drop_prob"``...).
        kind: ``"dropout"`` or ``"drop_path"``.
        original: The rate when the target was found (restored at the end of fit).
        block: For drop path, the block index ``k`` (drop-path modules under one parent share it).
        scale: The fraction of the scheduled rate this target gets (``linspace(0, 1, K)[k]`` or 1).
    """

    name: str
    module: nn.Module
    attr: str
    kind: Literal["dropout", "drop_path"]
    original: float
    block: int = 0
    scale: float = 1.0

    @property
    def path(self) -> str:
        """``"<module name>.<attr>"``."""
        return f"{self.name}.{self.attr}" if self.name else self.attr


def is_drop_path_module(module: nn.Module) -> str | None:
    """Return the rate attribute of a drop-path module, or ``None`` if it is not one.

    A drop-path module is :class:`lightning_reg.nn.DropPath`, or any module whose class name matches
    ``DropPath``/``drop_path``/``StochasticDepth`` (timm's ``DropPath``, torchvision's ``StochasticDepth``)
    and that stores a number ``drop_prob`` (preferred) or ``p`` (a Python ``float`` or ``int``).

    Example:
        >>> from lightning_reg.nn import DropPath
        >>> is_drop_path_module(DropPath(0.1)), is_drop_path_module(nn.Dropout(0.1))
        ('drop_prob', None)
    """
    if isinstance(module, _DropoutNd) or not _DROP_PATH_NAME.search(type(module).__name__):
        return None
    for attr in ("drop_prob", "p"):
        value = vars(module).get(attr)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return attr
    return None


def _matches(patterns: Sequence[str], *names: str) -> bool:
    return any(fnmatch.fnmatchcase(n, pat) for pat in patterns for n in names)


def find_drop_targets(
    model: nn.Module,
    targets: Literal["dropout", "drop_path", "both"] = "dropout",
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    attributes: Sequence[str] = DEFAULT_RATE_ATTRIBUTES,
    drop_path_scaling: Literal["linear", "uniform"] = "linear",
) -> list[DropTarget]:
    """Find every rate a dropout schedule should drive, in module order.

    Dropout targets (``targets`` in ``{"dropout", "both"}``):

    * ``p`` of every ``torch.nn`` dropout module (``Dropout``, ``Dropout1d/2d/3d``, ``AlphaDropout``,
      ``FeatureAlphaDropout``: all subclasses of ``torch.nn.modules.dropout._DropoutNd``);
    * ``dropout`` of ``nn.MultiheadAttention`` (a float passed to the attention kernel at every call);
    * every attribute named in ``attributes`` that is a plain Python ``float`` on a module
      (default :data:`DEFAULT_RATE_ATTRIBUTES`: functional rates such as HF's ``attention_dropout``
      or timm's head ``drop_rate``, which their modules pass to ``F.dropout`` at every forward).

    Drop-path targets (``targets`` in ``{"drop_path", "both"}``): every module accepted by
    :func:`is_drop_path_module`. Drop-path modules with the same parent module form one block (timm's
    ``Block.drop_path1``/``drop_path2``), except under a ``ModuleList``/``ModuleDict``, where each module
    is its own block. Block ``k`` of ``K`` gets ``scale = linspace(0, 1, K)[k]`` (or 1 for ``"uniform"``).

    ``include``/``exclude`` are :mod:`fnmatch` patterns matched against the module name and against
    ``"<module name>.<attr>"``; a target is kept if it matches some ``include`` pattern (when given)
    and no ``exclude`` pattern.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.2), nn.MultiheadAttention(4, 2, dropout=0.1))
        >>> [(t.path, t.original) for t in find_drop_targets(net)]
        [('1.p', 0.2), ('2.dropout', 0.1)]
    """
    want_dropout = targets in ("dropout", "both")
    want_path = targets in ("drop_path", "both")
    modules = dict(model.named_modules())
    found: list[DropTarget] = []
    path_blocks: dict[str, int] = {}
    for name, module in modules.items():
        candidates: list[tuple[str, Literal["dropout", "drop_path"]]] = []
        path_attr = is_drop_path_module(module)
        if path_attr is not None:
            if want_path:
                candidates.append((path_attr, "drop_path"))
        elif want_dropout:
            if isinstance(module, _DropoutNd):
                candidates.append(("p", "dropout"))
            for cls, attr in _CLASS_ATTRIBUTES:
                if isinstance(module, cls) and type(vars(module).get(attr)) is float:
                    candidates.append((attr, "dropout"))
            for attr in attributes:
                if type(vars(module).get(attr)) is float and (attr, "dropout") not in candidates:
                    candidates.append((attr, "dropout"))
        for attr, kind in candidates:
            path = f"{name}.{attr}" if name else attr
            if include is not None and not _matches(include, name, path):
                continue
            if exclude is not None and _matches(exclude, name, path):
                continue
            target = DropTarget(name, module, attr, kind, float(getattr(module, attr)))
            if kind == "drop_path":
                parent = name.rpartition(".")[0]
                own_block = not name or isinstance(modules.get(parent), (nn.ModuleList, nn.ModuleDict))
                key = name if own_block else parent
                target.block = path_blocks.setdefault(key, len(path_blocks))
            found.append(target)
    depth = len(path_blocks)
    if depth:
        scales = drop_path_rates(1.0, depth, drop_path_scaling)
        for t in found:
            if t.kind == "drop_path":
                t.scale = scales[t.block]
    return found


def set_drop_rates_(targets: Sequence[DropTarget], rate: float) -> None:
    """Write ``rate`` (times each target's ``scale``) into every target, in place.

    Example:
        >>> from lightning_reg.nn import DropPath
        >>> net = nn.Sequential(nn.Dropout(0.0), nn.ModuleList([DropPath(0.0), DropPath(0.0), DropPath(0.0)]))
        >>> found = find_drop_targets(net, targets="both")
        >>> set_drop_rates_(found, 0.2)
        >>> net[0].p, [m.drop_prob for m in net[1]]
        (0.2, [0.0, 0.1, 0.2])
    """
    for t in targets:
        setattr(t.module, t.attr, rate * t.scale if t.scale != 1.0 else rate)


def restore_drop_rates_(targets: Sequence[DropTarget]) -> None:
    """Write every target's ``original`` rate back, in place."""
    for t in targets:
        setattr(t.module, t.attr, t.original)
