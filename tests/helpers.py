"""Small models, data and trainer helpers shared by the tests.

They live in the public conformance kit, :mod:`lightning_reg.testing`; this module re-exports them for the
tests, with :func:`run_ddp_script` run from the repository root.
"""

from __future__ import annotations

import os
from pathlib import Path

from lightning_reg.testing import (
    IMAGE_SHAPE,
    LAYOUTS,
    NUM_CLASSES,
    ListBatchSampler,
    StepSeed,
    TinyNet,
    TinySegNet,
    TinyTagger,
    assert_state_equal,
    fit,
    free_port,
    interleaved_rank_batches,
    make_dataset,
    make_layout_dataset,
    make_loader,
    make_model,
    trainer_kwargs,
)
from lightning_reg.testing import run_ddp_script as _run_ddp_script

__all__ = [
    "ENV_NO_SUMMARY",
    "IMAGE_SHAPE",
    "LAYOUTS",
    "NUM_CLASSES",
    "ROOT",
    "ListBatchSampler",
    "StepSeed",
    "TinyNet",
    "TinySegNet",
    "TinyTagger",
    "assert_state_equal",
    "fit",
    "free_port",
    "have_fashion_mnist",
    "interleaved_rank_batches",
    "make_dataset",
    "make_layout_dataset",
    "make_loader",
    "make_model",
    "run_ddp_script",
    "trainer_kwargs",
]

ROOT = Path(__file__).resolve().parents[1]


def run_ddp_script(module: str, *args: str, timeout: float = 300) -> None:
    """Run ``python -m module *args`` from the repository root as a 2-process DDP launcher (gloo on CPU)."""
    _run_ddp_script(module, *args, timeout=timeout, cwd=ROOT)


def have_fashion_mnist() -> bool:
    """Whether the Fashion-MNIST IDX files can be found offline."""
    from lightning_reg.data.fashion_mnist import resolve_fashion_mnist_root

    try:
        resolve_fashion_mnist_root()
    except FileNotFoundError:
        return False
    return True


ENV_NO_SUMMARY = {"LIGHTNING_REG_SUMMARY": "0"}
os.environ.setdefault("LIGHTNING_REG_SUMMARY", "0")
