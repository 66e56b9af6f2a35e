"""Run one conformance case in a 2-process DDP job (or its single-process equivalent) and save the state.

Usage: ``python -m tests.conformance.ddp_worker CASE OUT_DIR [ddp|single] [LAYOUT]``. In DDP mode Lightning
re-launches this module for rank 1. Each rank writes ``OUT_DIR/rank<r>.pt`` with the model weights and
every callback's ``state_dict()``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from lightning_reg.data import IndexedDataset
from tests.conformance.registry import load_all
from tests.helpers import (
    ListBatchSampler,
    StepSeed,
    interleaved_rank_batches,
    make_layout_dataset,
    make_model,
    trainer_kwargs,
)

N, BATCH, WORLD, EPOCHS = 61, 8, 2, 2


class RankSampler(Sampler[int]):
    """``DistributedSampler(shuffle=False)`` (padding included) for the rank known at iteration time."""

    def __len__(self) -> int:
        return -(-N // WORLD)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(DistributedSampler(range(N), num_replicas=WORLD, rank=dist.get_rank(), shuffle=False))


def run(case_name: str, out_dir: str, mode: str, layout: str = "classification") -> dict[str, Any]:
    case = load_all()[case_name]
    L.seed_everything(0, verbose=False)
    model = make_model(layout, **case.model_kwargs)
    cbs = [case.factory(), *case.extra_callbacks()]
    ds = IndexedDataset(make_layout_dataset(N, layout))
    if mode == "ddp":
        loader = DataLoader(ds, batch_size=BATCH, sampler=RankSampler())
        kw = trainer_kwargs(devices=WORLD, strategy="ddp", use_distributed_sampler=False, **case.trainer_overrides)
    else:
        loader = DataLoader(ds, batch_sampler=ListBatchSampler(interleaved_rank_batches(N, WORLD, BATCH)))
        kw = trainer_kwargs(**case.trainer_overrides)
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


if __name__ == "__main__":
    run(
        sys.argv[1],
        sys.argv[2],
        sys.argv[3] if len(sys.argv) > 3 else "ddp",
        sys.argv[4] if len(sys.argv) > 4 else "classification",
    )
