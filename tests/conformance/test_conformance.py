"""The conformance suite: every registered regularizer passes the same checks (DESIGN.md, "Tests").

The tests are the public conformance kit's (:mod:`lightning_reg.testing`, ``docs/testing.md``), run on every
case of ``tests/conformance/cases``: math, training, resume (mid-epoch and at an epoch boundary), 2-process
DDP, precision, YAML, composition of all cases, and bad input. The layout checks are in ``test_layouts.py``.
"""

from __future__ import annotations

from lightning_reg.testing import conformance_tests
from tests.conformance.registry import CASES_REF

globals().update(conformance_tests(CASES_REF, checks="core", compose_with=None, gpu_mark="gpu"))
