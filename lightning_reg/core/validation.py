"""Argument validation with torchmetrics-style messages.

Every public constructor validates its arguments with these helpers, so errors
read the same everywhere::

    Expected argument `beta` to be a float in [0, 1), but got 1.5.

Example:
    >>> check_float("beta", 0.7, low=0.0, high=1.0, high_inclusive=False)
    0.7
    >>> check_float("beta", 1.5, low=0.0, high=1.0, high_inclusive=False)
    Traceback (most recent call last):
    ...
    ValueError: Expected argument `beta` to be a float in [0, 1), but got 1.5.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, TypeVar

__all__ = [
    "check_bool",
    "check_choice",
    "check_float",
    "check_int",
    "check_optional_int",
    "load_true_labels",
    "resolve_named",
]

T = TypeVar("T")


def _fmt(x: float) -> str:
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return f"{x:g}"


def _interval(low: float | None, high: float | None, low_inclusive: bool, high_inclusive: bool) -> str:
    left = "[" if low_inclusive and low is not None else "("
    right = "]" if high_inclusive and high is not None else ")"
    lo = "-inf" if low is None else _fmt(low)
    hi = "inf" if high is None else _fmt(high)
    return f"{left}{lo}, {hi}{right}"


def check_float(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
) -> float:
    """Validate a float argument against an interval and return it as ``float``.

    Args:
        name: The argument name shown in the message.
        value: The value to check. ``bool`` is rejected; ``int`` is accepted.
        low: Lower bound, or ``None`` for none.
        high: Upper bound, or ``None`` for none.
        low_inclusive: Whether ``low`` itself is allowed.
        high_inclusive: Whether ``high`` itself is allowed.

    Raises:
        TypeError: If ``value`` is not a real number.
        ValueError: If ``value`` is NaN or outside the interval.
    """
    interval = _interval(low, high, low_inclusive, high_inclusive)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"Expected argument `{name}` to be a float in {interval}, but got {value!r}.")
    v = float(value)
    ok = not math.isnan(v)
    if ok and low is not None:
        ok = v >= low if low_inclusive else v > low
    if ok and high is not None:
        ok = v <= high if high_inclusive else v < high
    if not ok:
        raise ValueError(f"Expected argument `{name}` to be a float in {interval}, but got {value!r}.")
    return v


def check_int(name: str, value: Any, low: int | None = None, high: int | None = None) -> int:
    """Validate an integer argument in ``[low, high]`` and return it.

    Raises:
        TypeError: If ``value`` is not an ``int`` (``bool`` is rejected).
        ValueError: If ``value`` is out of range.
    """
    interval = _interval(low, high, True, True)
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"Expected argument `{name}` to be an int in {interval}, but got {value!r}.")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"Expected argument `{name}` to be an int in {interval}, but got {value!r}.")
    return value


def check_optional_int(name: str, value: Any, low: int | None = None, high: int | None = None) -> int | None:
    """Like :func:`check_int` but ``None`` passes through."""
    return None if value is None else check_int(name, value, low, high)


def check_choice(name: str, value: T, choices: Sequence[T]) -> T:
    """Validate that ``value`` is one of ``choices``.

    Raises:
        ValueError: If it is not.
    """
    if value not in choices:
        raise ValueError(f"Expected argument `{name}` to be one of {list(choices)}, but got {value!r}.")
    return value


def check_bool(name: str, value: Any) -> bool:
    """Validate a boolean argument.

    Raises:
        TypeError: If ``value`` is not a ``bool``.
    """
    if not isinstance(value, bool):
        raise TypeError(f"Expected argument `{name}` to be a bool, but got {value!r}.")
    return value


def resolve_named(value: Any, base: type[T], registry: dict[str, type[T]], name: str) -> T:
    """Return ``value`` if it is a ``base`` instance, or build ``registry[value]()`` from a short name.

    Args:
        value: An instance of ``base`` or a key of ``registry``.
        base: The accepted class.
        registry: Short names and the classes they build with their defaults.
        name: The argument name used in error messages.

    Raises:
        ValueError: For an unknown short name.
        TypeError: For anything else.

    Example:
        >>> resolve_named("int", int, {"int": int}, "x")
        0
    """
    article = "an" if base.__name__[0].lower() in "aeiou" else "a"
    if isinstance(value, base):
        return value
    if isinstance(value, str):
        if value not in registry:
            raise ValueError(
                f"Expected argument `{name}` to be one of {sorted(registry)} or {article} `{base.__name__}`, but got"
                f" {value!r}."
            )
        return registry[value]()
    raise TypeError(
        f"Expected argument `{name}` to be a str or {article} `{base.__name__}`, but got {type(value).__name__}."
    )


def load_true_labels(path: str, who: str) -> Any:
    """Load a ``torch.save``-d tensor of true labels for diagnostics, or raise a clear error naming ``who``.

    Raises:
        FileNotFoundError: If there is no file at ``path``; the message says how to make one.
    """
    from pathlib import Path

    import torch

    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(
            f"`{who}(true_labels_path=...)` found no file at {str(file)!r}. Save the true labels with"
            " `torch.save(true_labels, path)`, or call `set_true_labels(tensor)` instead."
        )
    return torch.load(file, map_location="cpu", weights_only=True)
