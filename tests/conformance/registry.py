"""The conformance registry: every regularizer with a small valid configuration.

Each technique adds ``tests/conformance/cases/<technique>.py`` that calls
:func:`register`. The parametrized tests in ``test_conformance.py`` run every
registered case through math, training, resume, DDP, precision, CLI,
composition and bad-input checks.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from lightning.pytorch import Callback


@dataclass
class Case:
    """One regularizer under test.

    Attributes:
        name: Unique id (pytest parameter id).
        factory: Builds the callback with a small valid configuration for the tiny test setup.
        class_path: Its import path for YAML (e.g. ``"lightning_reg.LabelSmoothing"``).
        full_init_args: Every documented constructor argument, as YAML would give it.
        bad_args: ``(kwargs, exception type, substring of the message)`` triples; each must raise in ``__init__``.
        math: Checks the functional core against a reference in the given dtype (fp32, fp16, bf16).
        requires_index: The technique keeps per-sample state (a batch without index must fail clearly).
        extra_callbacks: Callbacks the case needs beside it (e.g. an ``EMATeacher``).
        model_kwargs: Keyword arguments for ``TinyNet`` (e.g. ``dropout=0.1``).
        ddp_matches_single: A 2-rank DDP run equals a single process on the same global batches.
            False where per-rank randomness (dropout masks, augmentations) makes that impossible;
            ranks must still agree.
        bf16_rtol: Stated tolerance of bf16-mixed vs fp32 (relative L2 distance of the weights).
        composable: Included in the all-together composition test.
        trainer_overrides: Extra ``Trainer`` arguments the case needs.
        layouts: The output layouts the case is run on besides ``"classification"`` (``"dense"``:
            ``(B, C, H, W)`` with ignored pixels, ``"tokens"``: ``(B, T, C)`` with padding); each gets the
            training, resume, DDP and bf16 checks.
        dense_math: Checks the functional core on dense elements (with ``ignore_index``) against a reference.
        refuses: Layout -> substring of the clear error the technique raises for a layout it does not support.
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


REGISTRY: dict[str, Case] = {}


def register(case: Case) -> Case:
    """Add a case; names must be unique."""
    if case.name in REGISTRY:
        raise ValueError(f"duplicate conformance case {case.name!r}")
    REGISTRY[case.name] = case
    return case


def load_all() -> dict[str, Case]:
    """Import every module in ``tests/conformance/cases`` and return the registry."""
    from tests.conformance import cases

    for mod in sorted(pkgutil.iter_modules(cases.__path__), key=lambda m: m.name):
        importlib.import_module(f"tests.conformance.cases.{mod.name}")
    return REGISTRY
