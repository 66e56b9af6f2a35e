"""Schedules: pure functions of ``(step, total)``.

A schedule maps the current step (or epoch) and the total number of steps (or
epochs) to a float. It keeps no hidden counter, so restoring the trainer's
global step or epoch restores the schedule exactly on resume.

Every schedule exists twice:

* as a plain function (``linear_schedule(step, total, start, end)``), the
  functional core, and
* as a small picklable class (``Linear(start, end)``) that LightningCLI YAML can
  name by ``class_path``, or by its short name through :func:`get_schedule`.

Example:
    >>> from lightning_reg.core.schedules import Linear, SigmoidRampUp, get_schedule
    >>> Linear(0.0, 1.0)(5, 10)
    0.5
    >>> round(SigmoidRampUp()(0, 10), 6)  # exp(-5)
    0.006738
    >>> get_schedule("cosine")(10, 10)
    0.0
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from lightning_reg.core.validation import resolve_named

__all__ = [
    "Constant",
    "Cosine",
    "Linear",
    "Schedule",
    "ScheduleLike",
    "SigmoidRampUp",
    "Step",
    "Warmup",
    "constant_schedule",
    "cosine_schedule",
    "get_schedule",
    "linear_schedule",
    "sigmoid_rampup",
    "step_schedule",
    "warmup_schedule",
]


def _progress(step: float, total: float) -> float:
    """Return ``step / total`` clipped to ``[0, 1]``; a non-positive total counts as finished."""
    if total <= 0:
        return 1.0
    return min(max(float(step) / float(total), 0.0), 1.0)


def constant_schedule(step: float, total: float, value: float = 1.0) -> float:
    """Return ``value`` for every step.

    Example:
        >>> constant_schedule(3, 10, value=0.1)
        0.1
    """
    return float(value)


def linear_schedule(step: float, total: float, start: float = 0.0, end: float = 1.0) -> float:
    r"""Interpolate linearly from ``start`` to ``end`` over ``total`` steps, then hold ``end``.

    .. math:: v(t) = s + (e - s)\,\min(t / T, 1)

    Example:
        >>> linear_schedule(5, 10, start=0.0, end=0.8)
        0.4
        >>> linear_schedule(20, 10, start=1.0, end=0.0)
        0.0
    """
    return float(start) + (float(end) - float(start)) * _progress(step, total)


def cosine_schedule(step: float, total: float, start: float = 1.0, end: float = 0.0) -> float:
    r"""Half-cosine from ``start`` to ``end`` over ``total`` steps, then hold ``end``.

    .. math:: v(t) = e + \tfrac12 (s - e)\,(1 + \cos(\pi \min(t/T, 1)))

    Example:
        >>> cosine_schedule(5, 10)
        0.5
    """
    p = _progress(step, total)
    return float(end) + 0.5 * (float(start) - float(end)) * (1.0 + math.cos(math.pi * p))


def step_schedule(
    step: float, total: float, milestones: Sequence[float] = (), gamma: float = 0.1, start: float = 1.0
) -> float:
    """Multiply ``start`` by ``gamma`` at every milestone already reached.

    Milestones are in the same unit as ``step``.

    Example:
        >>> step_schedule(5, 10, milestones=[3, 6], gamma=0.5)
        0.5
        >>> step_schedule(6, 10, milestones=[3, 6], gamma=0.5)
        0.25
    """
    reached = sum(1 for m in milestones if step >= m)
    return float(start) * float(gamma) ** reached


def sigmoid_rampup(step: float, total: float) -> float:
    r"""The Mean-Teacher sigmoid ramp-up (Laine & Aila 2017; Tarvainen & Valpola 2017).

    .. math:: w(t) = \exp\!\left(-5\,(1 - \min(t/T, 1))^2\right)

    Example:
        >>> sigmoid_rampup(10, 10)
        1.0
        >>> round(sigmoid_rampup(5, 10), 6)
        0.286505
    """
    p = _progress(step, total)
    return math.exp(-5.0 * (1.0 - p) ** 2)


def warmup_schedule(step: float, total: float, warmup: float = 0.0, start: float = 0.0, end: float = 1.0) -> float:
    """Linear warm-up from ``start`` to ``end`` over the first ``warmup`` steps, then hold ``end``.

    ``total`` is ignored: the warm-up length is absolute.

    Example:
        >>> warmup_schedule(2, 100, warmup=4)
        0.5
        >>> warmup_schedule(50, 100, warmup=4)
        1.0
    """
    if warmup <= 0:
        return float(end)
    return linear_schedule(step, warmup, start, end)


class Schedule:
    """Base class of the YAML-configurable schedules.

    Subclasses implement :meth:`__call__` as a pure function of ``(step, total)``.
    """

    def __call__(self, step: float, total: float) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and vars(self) == vars(other)

    def __hash__(self) -> int:
        return hash((type(self).__name__, tuple(sorted((k, repr(v)) for k, v in vars(self).items()))))


def _check_float(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise TypeError(f"Expected argument `{name}` to be a finite float, but got {value!r}.")
    return float(value)


class Constant(Schedule):
    """``value`` at every step.

    Args:
        value: The constant value.
    """

    def __init__(self, value: float = 1.0) -> None:
        self.value = _check_float("value", value)

    def __call__(self, step: float, total: float) -> float:
        return constant_schedule(step, total, self.value)


class Linear(Schedule):
    """Linear from ``start`` to ``end`` over the total, then ``end`` (see :func:`linear_schedule`).

    Args:
        start: Value at step 0.
        end: Value at and after ``total``.
    """

    def __init__(self, start: float = 0.0, end: float = 1.0) -> None:
        self.start = _check_float("start", start)
        self.end = _check_float("end", end)

    def __call__(self, step: float, total: float) -> float:
        return linear_schedule(step, total, self.start, self.end)


class Cosine(Schedule):
    """Half-cosine from ``start`` to ``end`` (see :func:`cosine_schedule`).

    Args:
        start: Value at step 0.
        end: Value at and after ``total``.
    """

    def __init__(self, start: float = 1.0, end: float = 0.0) -> None:
        self.start = _check_float("start", start)
        self.end = _check_float("end", end)

    def __call__(self, step: float, total: float) -> float:
        return cosine_schedule(step, total, self.start, self.end)


class Step(Schedule):
    """Piecewise constant: ``start · gamma^(milestones reached)`` (see :func:`step_schedule`).

    Args:
        milestones: Steps (or epochs) at which the value is multiplied by ``gamma``.
        gamma: The factor applied at each milestone.
        start: The value before the first milestone.
    """

    def __init__(self, milestones: list[float] | None = None, gamma: float = 0.1, start: float = 1.0) -> None:
        milestones = list(milestones or [])
        for m in milestones:
            _check_float("milestones", m)
        self.milestones = sorted(float(m) for m in milestones)
        self.gamma = _check_float("gamma", gamma)
        self.start = _check_float("start", start)

    def __call__(self, step: float, total: float) -> float:
        return step_schedule(step, total, self.milestones, self.gamma, self.start)


class SigmoidRampUp(Schedule):
    """The Mean-Teacher ramp-up ``exp(-5 (1 - t/T)^2)`` (see :func:`sigmoid_rampup`).

    Args:
        length: If given, the ramp lasts ``length`` steps instead of the caller's total.
    """

    def __init__(self, length: float | None = None) -> None:
        if length is not None and _check_float("length", length) <= 0:
            raise ValueError(f"Expected argument `length` to be a positive float or None, but got {length!r}.")
        self.length = None if length is None else float(length)

    def __call__(self, step: float, total: float) -> float:
        return sigmoid_rampup(step, total if self.length is None else self.length)


class Warmup(Schedule):
    """Linear warm-up over ``warmup`` steps, then ``end`` (see :func:`warmup_schedule`).

    Args:
        warmup: Length of the warm-up in steps (or epochs).
        start: Value at step 0.
        end: Value after the warm-up.
    """

    def __init__(self, warmup: float = 0.0, start: float = 0.0, end: float = 1.0) -> None:
        if _check_float("warmup", warmup) < 0:
            raise ValueError(f"Expected argument `warmup` to be a float >= 0, but got {warmup!r}.")
        self.warmup = float(warmup)
        self.start = _check_float("start", start)
        self.end = _check_float("end", end)

    def __call__(self, step: float, total: float) -> float:
        return warmup_schedule(step, total, self.warmup, self.start, self.end)


_NAMED: dict[str, type[Schedule]] = {
    "constant": Constant,
    "linear": Linear,
    "cosine": Cosine,
    "step": Step,
    "sigmoid_rampup": SigmoidRampUp,
    "warmup": Warmup,
}

ScheduleLike = str | Schedule


def get_schedule(schedule: ScheduleLike, name: str = "schedule") -> Schedule:
    """Resolve a schedule given by short name or as an instance.

    Short names build the class with its defaults: ``"constant"`` (1.0),
    ``"linear"`` (0 → 1), ``"cosine"`` (1 → 0), ``"step"``,
    ``"sigmoid_rampup"`` and ``"warmup"``.

    Args:
        schedule: A :class:`Schedule` instance or one of the short names.
        name: The argument name used in error messages.

    Raises:
        ValueError: For an unknown short name.
        TypeError: For anything else.

    Example:
        >>> get_schedule("linear")
        Linear(start=0.0, end=1.0)
    """
    return resolve_named(schedule, Schedule, _NAMED, name)
