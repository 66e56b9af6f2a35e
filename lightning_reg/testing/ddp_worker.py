"""Run one conformance case in a 2-process DDP job (or its single-process equivalent) and save the state.

Usage::

    python -m lightning_reg.testing.ddp_worker CASES CASE OUT_DIR [ddp|single] [LAYOUT]

``CASES`` is the import path ``"module:attribute"`` of the case list (see
:func:`~lightning_reg.testing.load_cases`), ``CASE`` a case name. In DDP mode Lightning re-launches this module
for rank 1. Each rank writes ``OUT_DIR/<mode>_rank<r>.pt`` with the model weights, every callback's
``state_dict()``, the logged metrics and the global step.

61 samples in batches of 8 over 2 ranks: ``DistributedSampler`` pads one duplicate sample and the last batch
is short, so uneven batches are exercised too.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from lightning_reg.data import IndexedDataset
from lightning_reg.testing.data import ListBatchSampler, interleaved_rank_batches, make_layout_dataset
from lightning_reg.testing.models import make_model
from lightning_reg.testing.registry import Case, load_cases
from lightning_reg.testing.training import StepSeed, trainer_kwargs

__all__ = ["BATCH", "EPOCHS", "WORLD", "N", "main", "run_case"]

N, BATCH, WORLD, EPOCHS = 61, 8, 2, 2


class RankSampler(Sampler[int]):
    """``DistributedSampler(shuffle=False)`` (padding included) for the rank known at iteration time."""

    def __len__(self) -> int:
        return -(-N // WORLD)

    def __iter__(self) -> Iterator[int]:
        indices: Any = range(N)  # DistributedSampler only needs len()
        return iter(DistributedSampler(indices, num_replicas=WORLD, rank=dist.get_rank(), shuffle=False))


def run_case(case: Case, out_dir: str, mode: str = "ddp", layout: str = "classification") -> dict[str, Any]:
    """Train ``case`` for 2 epochs in ``mode`` (``"ddp"``: 2 ranks, ``"single"``: the same global batches in
    one process) on ``layout`` and save (and return) the state."""
    L.seed_everything(0, verbose=False)
    model = make_model(layout, **case.model_kwargs)
    cbs = case.callbacks()
    ds = IndexedDataset(make_layout_dataset(N, layout))
    if mode == "ddp":
        loader = DataLoader(ds, batch_size=BATCH, sampler=RankSampler())
        kw = trainer_kwargs(devices=WORLD, strategy="ddp", use_distributed_sampler=False, **case.trainer_overrides)
    elif mode == "single":
        loader = DataLoader(ds, batch_sampler=ListBatchSampler(interleaved_rank_batches(N, WORLD, BATCH)))
        kw = trainer_kwargs(**case.trainer_overrides)
    else:
        raise ValueError(f"Expected argument `mode` to be one of ['ddp', 'single'], but got {mode!r}.")
    trainer = L.Trainer(callbacks=[*cbs, StepSeed()], max_epochs=EPOCHS, **kw)
    trainer.fit(model, train_dataloaders=loader)
    state = {
        "model": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "callbacks": [cb.state_dict() for cb in cbs],
        "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
        "global_step": trainer.global_step,
    }
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    torch.save(state, Path(out_dir) / f"{mode}_rank{trainer.global_rank}.pt")
    return state


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point (see the module docstring)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 3:
        raise SystemExit(
            f"usage: python -m {__spec__.name if __spec__ else __name__} CASES CASE OUT_DIR [MODE] [LAYOUT]"
        )
    os.environ.setdefault("LIGHTNING_REG_SUMMARY", "0")
    ref, name, out_dir = args[:3]
    mode = args[3] if len(args) > 3 else "ddp"
    layout = args[4] if len(args) > 4 else "classification"
    cases = load_cases(ref)
    if name not in cases:
        raise SystemExit(f"no case {name!r} in {ref}; the cases are {sorted(cases)}")
    run_case(cases[name], out_dir, mode, layout)


if __name__ == "__main__":
    main()
