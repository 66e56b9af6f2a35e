"""Conformance cases: one :class:`Case` per callback configuration under test, and how to find them by name.

A case list is given to :func:`~lightning_reg.testing.conformance_tests` as the objects themselves or as an
import path ``"module:attribute"`` whose attribute is a ``{name: Case}`` mapping, an iterable of cases or a
callable returning either. The 2-process DDP check runs in a child process, which finds the cases by that
import path.

Example:
    >>> from lightning_reg import LabelSmoothing
    >>> case = Case(name="ls", factory=lambda: LabelSmoothing(0.1), class_path="lightning_reg.LabelSmoothing")
    >>> list(as_cases([case]))
    ['ls']
    >>> as_cases([case, case])
    Traceback (most recent call last):
    ...
    ValueError: Expected unique case names, but got 'ls' twice.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from lightning.pytorch import Callback

__all__ = ["Case", "CasesLike", "as_cases", "default_companions", "load_cases"]


@dataclass
class Case:
    """One callback configuration under test.

    Attributes:
        name: Unique id (the pytest parameter id).
        factory: Builds the callback with a small valid configuration for the tiny test setup (called once per
            run, so every run gets fresh state).
        class_path: Its import path for YAML (e.g. ``"lightning_reg.LabelSmoothing"``).
        full_init_args: Every documented constructor argument, as YAML would give it.
        bad_args: ``(kwargs, exception type, substring of the message)`` triples; each must raise in ``__init__``.
        math: Checks the functional core against a reference in the given dtype (fp32, fp16, bf16); required.
        requires_index: The technique keeps per-sample state (a batch without index must fail clearly).
        extra_callbacks: Callbacks the case needs beside it (e.g. an ``EMATeacher``).
        model_kwargs: Keyword arguments for the tiny models (e.g. ``dropout=0.1``; see :mod:`.models`).
        ddp_matches_single: A 2-rank DDP run equals a single process on the same global batches.
            False where per-rank randomness (dropout masks, augmentations) makes that impossible;
            ranks must still agree.
        bf16_rtol: Stated tolerance of bf16-mixed vs fp32 (relative L2 distance of the weights).
        composable: Included in the all-together composition check.
        trainer_overrides: Extra ``Trainer`` arguments the case needs.
        layouts: The output layouts the case is run on besides ``"classification"`` (``"dense"``:
            ``(B, C, H, W)`` with ignored pixels, ``"tokens"``: ``(B, T, C)`` with padding); each gets the
            training, resume, DDP and bf16 checks.
        dense_math: Checks the functional core on dense elements (with ``ignore_index``) against a reference;
            required for a loss-side case with ``"dense"`` in ``layouts``.
        refuses: Layout -> substring of the clear error the technique raises for a layout it does not support
            (required for each layout a loss-side case leaves out).
        ddp_matches_single_layouts: Dense layouts on which a 2-rank DDP run must also equal one process (the
            per-rank mean over valid elements makes weights differ whenever ranks hold different counts).
    """

    name: str
    factory: Callable[[], Callback]
    class_path: str
    full_init_args: dict[str, Any] = field(default_factory=dict)
    bad_args: list[tuple[dict[str, Any], type[Exception], str]] = field(default_factory=list)
    math: Callable[[torch.dtype], None] | None = None
    requires_index: bool = False
    extra_callbacks: Callable[[], list[Callback]] = list
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    ddp_matches_single: bool = True
    bf16_rtol: float = 0.05
    composable: bool = True
    trainer_overrides: dict[str, Any] = field(default_factory=dict)
    layouts: tuple[str, ...] = ()
    dense_math: Callable[[torch.dtype], None] | None = None
    refuses: dict[str, str] = field(default_factory=dict)
    ddp_matches_single_layouts: tuple[str, ...] = ()

    @property
    def loss_side(self) -> bool:
        """Whether the technique is a loss-side regularizer (it gets the layout and outside-training checks)."""
        from lightning_reg.core.protocol import LossRegularizer

        return isinstance(self.factory(), LossRegularizer)

    def callbacks(self) -> list[Callback]:
        """Fresh instances of the callback and its :attr:`extra_callbacks`."""
        return [self.factory(), *self.extra_callbacks()]


#: What :func:`as_cases` accepts: a mapping, an iterable, or a callable returning either, of :class:`Case`.
CasesLike = Mapping[str, Case] | Iterable[Case] | Callable[[], Mapping[str, Case] | Iterable[Case]]


def as_cases(cases: CasesLike) -> dict[str, Case]:
    """The cases as a ``{name: Case}`` dict in their given order.

    Raises:
        TypeError: If an entry is not a :class:`Case`.
        ValueError: If two cases share a name, or a mapping key differs from its case's name.
    """
    if callable(cases) and not isinstance(cases, (Mapping, Case)):
        cases = cases()
    items: Iterable[tuple[Any, Any]]
    if isinstance(cases, Mapping):
        items = cases.items()
    else:
        items = ((getattr(c, "name", None), c) for c in cases)
    out: dict[str, Case] = {}
    for key, case in items:
        if not isinstance(case, Case):
            raise TypeError(f"Expected conformance cases of type `lightning_reg.testing.Case`, but got {case!r}.")
        if key != case.name:
            raise ValueError(f"Expected the mapping key to be the case's name, but got {key!r} for {case.name!r}.")
        if case.name in out:
            raise ValueError(f"Expected unique case names, but got {case.name!r} twice.")
        out[case.name] = case
    return out


def load_cases(ref: str) -> dict[str, Case]:
    """Import ``"module:attribute"`` and return its cases (see :func:`as_cases`).

    Raises:
        ValueError: If ``ref`` is not of the form ``"module:attribute"``.
        ImportError: If the module cannot be imported.
        AttributeError: If the module has no such attribute.
    """
    module, sep, attribute = ref.partition(":")
    if not sep or not module or not attribute:
        raise ValueError(
            f"Expected argument `cases` to be an import path 'module:attribute' (e.g. 'tests.test_mine:CASES'),"
            f" but got {ref!r}."
        )
    obj: Any = importlib.import_module(module)
    for part in attribute.split("."):
        obj = getattr(obj, part)
    return as_cases(obj)


def default_companions() -> list[Callback]:
    """The ``lightning_reg`` callbacks a third-party case is composed with by default: an EMA teacher, label
    smoothing and adaptive gradient clipping, in the configurations of our own conformance cases."""
    from lightning_reg import EMATeacher, GradientClipping, LabelSmoothing

    return [
        EMATeacher(decay=0.9),
        LabelSmoothing(0.1),
        GradientClipping(rule="auto", percentile=50.0, history_size=8),
    ]
