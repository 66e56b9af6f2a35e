"""Run one registered conformance case in a 2-process DDP job (or its single-process equivalent).

Usage: ``python -m tests.conformance.ddp_worker CASE OUT_DIR [ddp|single] [LAYOUT]``, the same as
``python -m lightning_reg.testing.ddp_worker tests.conformance.registry:load_all CASE OUT_DIR ...``, which
the conformance tests run. Each rank writes ``OUT_DIR/<mode>_rank<r>.pt`` with the model weights and every
callback's ``state_dict()``.
"""

from __future__ import annotations

import sys
from typing import Any

from lightning_reg.testing.ddp_worker import main, run_case
from tests.conformance.registry import CASES_REF, load_all


def run(case_name: str, out_dir: str, mode: str, layout: str = "classification") -> dict[str, Any]:
    """Train the registered case ``case_name`` in ``mode`` on ``layout`` and save (and return) the state."""
    return run_case(load_all()[case_name], out_dir, mode, layout)


if __name__ == "__main__":
    main([CASES_REF, *sys.argv[1:]])
