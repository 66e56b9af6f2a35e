"""Seeded trainer runs, state comparison and a 2-process DDP launcher for the conformance checks.

Example:
    >>> import torch
    >>> assert_state_equal({"w": torch.ones(2)}, {"w": torch.ones(2)})
    >>> assert_state_equal({"w": torch.ones(2)}, {"w": torch.zeros(2)}, "ema")
    Traceback (most recent call last):
    ...
    AssertionError: ema.w: Tensor-likes are not equal!
    ...
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import sysconfig
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch import Callback
from torch.utils.data import DataLoader

from lightning_reg.testing.data import make_loader
from lightning_reg.testing.models import TinyNet

__all__ = ["StepSeed", "assert_state_equal", "fit", "free_port", "run_ddp_script", "trainer_kwargs"]


class StepSeed(Callback):
    """Re-seed torch's RNG before every batch from ``(seed, global_step, batch_idx, rank)``.

    Lightning does not checkpoint RNG state, so random ops (dropout, augmentations) would differ after a
    resume; seeding per step makes runs bit-reproducible, and different per rank.

    Args:
        seed: The base seed.
    """

    def __init__(self, seed: int = 1234) -> None:
        self.seed = seed

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        torch.manual_seed(self.seed + 1000 * trainer.global_step + batch_idx + 7919 * trainer.global_rank)


def trainer_kwargs(**overrides: Any) -> dict[str, Any]:
    """Quiet CPU ``Trainer`` defaults (no logger, progress bar, summary, checkpointing or sanity check), updated."""
    kw: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        deterministic=False,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
    )
    kw.update(overrides)
    return kw


def fit(
    callbacks: Sequence[Callback],
    model: L.LightningModule | None = None,
    loader: DataLoader | None = None,
    ckpt_path: str | None = None,
    **trainer_overrides: Any,
) -> tuple[L.Trainer, L.LightningModule]:
    """A seeded fit of ``model`` (default ``TinyNet()``) with ``callbacks`` plus :class:`StepSeed`.

    Args:
        callbacks: The callbacks under test.
        model: The module (default ``TinyNet()``).
        loader: The training loader (default :func:`~lightning_reg.testing.make_loader`).
        ckpt_path: A checkpoint to resume from.
        **trainer_overrides: ``Trainer`` arguments over :func:`trainer_kwargs` (e.g. ``max_epochs=2``).

    Returns:
        The trainer and the trained module.
    """
    L.seed_everything(0, verbose=False)
    model = model if model is not None else TinyNet()
    loader = loader if loader is not None else make_loader()
    trainer = L.Trainer(callbacks=[*callbacks, StepSeed()], **trainer_kwargs(**trainer_overrides))
    trainer.fit(model, train_dataloaders=loader, ckpt_path=ckpt_path)
    return trainer, model


def assert_state_equal(a: Any, b: Any, path: str = "", atol: float = 0.0, rtol: float = 0.0) -> None:
    """Recursively compare (callback) state dicts: tensors with ``allclose``, the rest with ``==``.

    Integer and boolean tensors must be equal; floating tensors within ``atol + rtol·|b|`` (exactly equal by
    default). Dicts must have the same keys, sequences the same length.

    Raises:
        AssertionError: Naming the first differing entry by its ``path``.
    """
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), f"{path}: tensor vs {type(b)}"
        assert a.shape == b.shape, f"{path}: shape {a.shape} vs {b.shape}"
        if a.dtype == torch.bool or not a.is_floating_point():
            assert torch.equal(a, b), f"{path}: integer/bool tensors differ"
        else:
            torch.testing.assert_close(a.float(), b.float(), atol=atol, rtol=rtol, msg=lambda m: f"{path}: {m}")
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{path}: keys {sorted(a)} vs {sorted(b)}"
        for k in a:
            assert_state_equal(a[k], b[k], f"{path}.{k}", atol, rtol)
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{path}: length differs"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_state_equal(x, y, f"{path}[{i}]", atol, rtol)
    elif isinstance(a, float) and isinstance(b, float):
        assert abs(a - b) <= atol + rtol * abs(b), f"{path}: {a} vs {b}"
    else:
        assert a == b, f"{path}: {a!r} vs {b!r}"


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for ``MASTER_PORT``)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _child_pythonpath() -> str:
    """This process's import path for a child: ``sys.path`` directories outside the interpreter's own, then
    ``$PYTHONPATH``. A child then imports the same test modules (pytest puts their roots on ``sys.path``)."""
    own = {
        os.path.realpath(p) for key in ("stdlib", "platstdlib", "purelib", "platlib") if (p := sysconfig.get_path(key))
    }
    entries: list[str] = []
    for p in sys.path:
        if not p or not os.path.isdir(p):
            continue
        real = os.path.realpath(p)
        if any(real == o or real.startswith(o + os.sep) for o in own) or p in entries:
            continue
        entries.append(p)
    if os.environ.get("PYTHONPATH"):
        entries.append(os.environ["PYTHONPATH"])
    return os.pathsep.join(entries)


def run_ddp_script(module: str, *args: str, timeout: float = 300, cwd: str | os.PathLike[str] | None = None) -> None:
    """Run ``python -m module *args`` as a 2-process DDP launcher (gloo on CPU).

    The child gets a free ``MASTER_PORT`` and this process's import path (so it can import the test module
    that defines the cases); Lightning's launcher re-runs the module for rank 1.

    Args:
        module: The module to run (e.g. ``"lightning_reg.testing.ddp_worker"``).
        *args: Its command-line arguments.
        timeout: Seconds before the run is killed.
        cwd: Working directory of the child (default: this process's).

    Raises:
        AssertionError: If the run fails, with the end of its stderr.
    """
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "PYTHONPATH": _child_pythonpath(),
    }
    env.pop("LOCAL_RANK", None)
    proc = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=None if cwd is None else Path(cwd),
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
