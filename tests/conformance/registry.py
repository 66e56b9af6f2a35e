"""The conformance registry: every regularizer with a small valid configuration.

Each technique adds ``tests/conformance/cases/<technique>.py`` that calls :func:`register`. The tests in
``test_conformance.py`` and ``test_layouts.py`` are the public conformance kit's
(:func:`lightning_reg.testing.conformance_tests`) run on :func:`load_all`: math, training, resume, DDP,
precision, CLI, composition, bad-input, layout and outside-training checks. :class:`Case` is
:class:`lightning_reg.testing.Case`.
"""

from __future__ import annotations

import importlib
import pkgutil

from lightning_reg.testing import Case

__all__ = ["REGISTRY", "Case", "load_all", "register"]

#: The import path of the case list, for the DDP worker (``python -m lightning_reg.testing.ddp_worker``).
CASES_REF = "tests.conformance.registry:load_all"

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
