"""2-process DDP (or single-process) writer for ``PerSampleTable`` tests.

Usage: ``python -m tests.table_ddp_worker OUT_DIR MODE [padded]`` with MODE ``ddp`` or ``single``. With ``padded``
the rows are gathered with :meth:`PerSampleTable.gather` padded to the batch size (no size exchange) together with
a second, scalar table's rows, in one all-gather per step; the gathers and steps are counted.

Every step writes rows that are a deterministic function of (index, step) for the step's global batch,
so the final table depends only on which samples were visited when. The DDP run uses
``DistributedSampler(shuffle=False)`` over 61 samples (so rank 1 gets a padded duplicate of sample 0),
and a final uneven step where rank 0 writes 3 rows and rank 1 writes 1 row.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from lightning_reg.core.table import PerSampleTable
from tests.helpers import ListBatchSampler, interleaved_rank_batches, trainer_kwargs

N, C, BATCH, WORLD = 61, 5, 8, 2


def rows_for(index: torch.Tensor, step: int) -> torch.Tensor:
    base = torch.arange(C, dtype=torch.float32)
    return torch.softmax(torch.sin(index.float().unsqueeze(1) * 0.37 + step * 0.11 + base), dim=1)


class RankBatches(Sampler[list[int]]):
    """Rank r's batches from DistributedSampler, then an uneven extra batch (3 rows on rank 0, 1 on rank 1)."""

    def _batches(self) -> list[list[int]]:
        rank = dist.get_rank() if dist.is_initialized() else 0
        idx = list(DistributedSampler(range(N), num_replicas=WORLD, rank=rank, shuffle=False))
        batches = [idx[i : i + BATCH] for i in range(0, len(idx), BATCH)]
        batches.append([5, 6, 7] if rank == 0 else [6])
        return batches

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._batches())

    def __len__(self) -> int:
        return len(self._batches())


class Writer(L.LightningModule):
    def __init__(self, table: PerSampleTable, padded: bool = False) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.table = table
        self.padded = padded
        self.scalar = PerSampleTable()
        self.gathers = self.steps = 0

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        index = batch
        if not self.table.is_allocated:
            self.table.allocate(N, C, self.device)
            self.scalar.allocate(N, None, self.device)
        rows = rows_for(index, self.global_step)
        strategy = self.trainer.strategy
        if not self.padded:
            self.table.write(index, rows, strategy=strategy)
            return (self.w**2).sum()
        gather = strategy.all_gather

        def counted(*a: Any, **k: Any) -> Any:
            self.gathers += 1
            return gather(*a, **k)

        strategy.all_gather = counted  # type: ignore[method-assign]
        try:
            gathered, (r, s) = PerSampleTable.gather(strategy, index, rows, rows[:, 0] * 2, pad_to=BATCH)
        finally:
            del strategy.all_gather
        self.steps += 1
        self.table.write_gathered(gathered, r)
        self.scalar.write_gathered(gathered, s)
        return (self.w**2).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


def single_batches() -> list[list[int]]:
    batches = interleaved_rank_batches(N, WORLD, BATCH)
    return [*batches, [5, 6, 7, 6]]


def run(
    out_dir: str, mode: str, dtype: str = "float32", topk: int | None = None, padded: bool = False
) -> PerSampleTable:
    table = PerSampleTable(dtype=dtype, topk=topk)
    ds = torch.arange(N)
    if mode == "ddp":
        loader = DataLoader(ds, batch_sampler=RankBatches())
        kw = trainer_kwargs(devices=WORLD, strategy="ddp", use_distributed_sampler=False)
    else:
        loader = DataLoader(ds, batch_sampler=ListBatchSampler(single_batches()))
        kw = trainer_kwargs()
    trainer = L.Trainer(max_epochs=1, **kw)
    writer = Writer(table, padded)
    trainer.fit(writer, train_dataloaders=loader)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    torch.save(table.state_dict(), Path(out_dir) / f"{mode}_rank{trainer.global_rank}.pt")
    if padded:
        extra = {"gathers": writer.gathers, "steps": writer.steps, "scalar": writer.scalar.dense()}
        torch.save(extra, Path(out_dir) / f"{mode}_rank{trainer.global_rank}_extra.pt")
    return table


if __name__ == "__main__":
    run(sys.argv[1], sys.argv[2], padded=sys.argv[3:] == ["padded"])
