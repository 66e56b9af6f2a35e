"""The conformance suite on dense and sequence outputs, and the "no state change outside training" check.

Every registered case lists the layouts it supports in ``Case.layouts`` (``"dense"``: ``(B, C, H, W)`` logits
with ignored pixels and one all-ignored image; ``"tokens"``: ``(B, T, C)`` logits with padding). Each gets the
dense math, training, exact mid-epoch resume, 2-process DDP and bf16-mixed checks on that layout. A loss-side
case that does not support a layout must say so with a clear error (``Case.refuses``). The tests are the public
conformance kit's (:mod:`lightning_reg.testing`).
"""

from __future__ import annotations

from lightning_reg.testing import conformance_tests
from tests.conformance.registry import CASES_REF

globals().update(conformance_tests(CASES_REF, checks="layouts"))
