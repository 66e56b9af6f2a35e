"""Shared pieces of the benchmarks: Fashion-MNIST tensors, a seeded Lightning fit, and mean ± std."""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch import Callback
from torch.utils.data import DataLoader, TensorDataset

from lightning_reg.data import IndexedDataset, inject_label_noise
from lightning_reg.data.fashion_mnist import load_fashion_mnist
from lightning_reg.data.noise import FASHION_MNIST_ASYMMETRIC_MAP

os.environ.setdefault("LIGHTNING_REG_SUMMARY", "0")

MEAN, STD = 0.2860, 0.3530  # Fashion-MNIST training-set pixel statistics

_CACHE: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}


def fashion_mnist(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised ``(N, 1, 28, 28)`` float images and labels, cached in memory."""
    if split not in _CACHE:
        x, y = load_fashion_mnist(split)
        _CACHE[split] = (((x.float() / 255.0) - MEAN) / STD).unsqueeze(1), y
    return _CACHE[split]


def make_data(
    train_size: int | None = None,
    noise_type: str | None = None,
    noise_rate: float = 0.0,
    seed: int = 0,
    batch_size: int = 128,
) -> dict[str, Any]:
    """Train/test loaders (train yields ``(x, y, index)``) and the noise bookkeeping."""
    x, y = fashion_mnist("train")
    if train_size is not None and train_size < len(y):
        sel = torch.randperm(len(y), generator=torch.Generator().manual_seed(1000 + seed))[:train_size]
        x, y = x[sel], y[sel]
    true_y, noise_mask = y, torch.zeros_like(y, dtype=torch.bool)
    if noise_type is not None and noise_rate > 0:
        noisy = inject_label_noise(
            y,
            10,
            noise_type,
            noise_rate,
            seed=seed,
            class_map=FASHION_MNIST_ASYMMETRIC_MAP if noise_type == "asymmetric" else None,  # type: ignore[arg-type]
        )
        y, noise_mask = noisy.labels, noisy.noise_mask
    train = IndexedDataset(TensorDataset(x, y))
    tx, ty = fashion_mnist("test")
    gen = torch.Generator().manual_seed(seed)
    return {
        "train": DataLoader(train, batch_size=batch_size, shuffle=True, generator=gen),
        "test": DataLoader(TensorDataset(tx, ty), batch_size=1000),
        "given_labels": y,
        "true_labels": true_y,
        "noise_mask": noise_mask,
        "train_x": x,
    }


class EpochTestAccuracy(Callback):
    """Evaluates test accuracy after every training epoch (for best-vs-final and stability)."""

    def __init__(self, test_loader: DataLoader) -> None:
        self.test_loader = test_loader
        self.history: list[float] = []

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.history.append(evaluate(pl_module, self.test_loader)["acc"])


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: DataLoader) -> dict[str, float]:
    """Accuracy, 15-bin ECE and mean CE of ``model`` on ``loader`` (restores train mode)."""
    from torchmetrics.functional.classification import multiclass_calibration_error

    was_training = model.training
    model.eval()
    probs, labels = [], []
    for batch in loader:
        x, y = batch[0], batch[1]
        probs.append(model(x.to(next(model.parameters()).device)).float().softmax(-1).cpu())
        labels.append(y)
    model.train(was_training)
    p, y = torch.cat(probs), torch.cat(labels)
    ece = float(multiclass_calibration_error(p, y, num_classes=p.shape[1], n_bins=15, norm="l1"))
    return {
        "acc": float((p.argmax(1) == y).float().mean()),
        "ece": ece,
        "nll": float(torch.nn.functional.nll_loss(p.clamp_min(1e-12).log(), y)),
    }


@torch.no_grad()
def train_loss(model: torch.nn.Module, loader: DataLoader) -> float:
    """Mean CE over the training set in eval mode (dropout off), against the labels the loader yields."""
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    for batch in loader:
        x, y = batch[0], batch[1]
        total += float(torch.nn.functional.cross_entropy(model(x).float(), y, reduction="sum"))
        n += len(y)
    model.train(was_training)
    return total / max(n, 1)


def fit(
    model: L.LightningModule,
    train: DataLoader,
    callbacks: Sequence[Callback] = (),
    epochs: int = 3,
    seed: int = 0,
    **trainer_kwargs: Any,
) -> tuple[L.Trainer, float]:
    """Seeded CPU fit without logging or checkpoints; returns the trainer and wall seconds."""
    L.seed_everything(seed, verbose=False)
    kw: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    kw.update(trainer_kwargs)
    trainer = L.Trainer(callbacks=list(callbacks), **kw)
    t0 = time.perf_counter()
    trainer.fit(model, train_dataloaders=train)
    return trainer, time.perf_counter() - t0


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the headless Agg backend, or ``None`` without matplotlib (plots are optional)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:  # pragma: no cover - optional
        return None
    return plt


def mean_std(values: Sequence[float], digits: int = 2, scale: float = 1.0) -> str:
    """``"m ± s"`` over seeds (sample std; ``± 0`` for one value)."""
    vals = [v * scale for v in values]
    m = statistics.fmean(vals)
    s = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def rich_table(title: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> Any:
    """A ``rich`` table for the console."""
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for h in header:
        table.add_column(str(h))
    for row in rows:
        table.add_row(*(str(c) for c in row))
    return table


def time_fn(fn: Callable[[], Any], repeat: int = 20, warmup: int = 3) -> float:
    """Median seconds of ``fn()`` over ``repeat`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def finite_or_nan(x: float) -> float:
    return x if math.isfinite(x) else float("nan")


def load_note() -> str:
    """A sentence with the machine's measured 1-minute load average (timings are noisy when it exceeds the cores)."""
    try:
        load = os.getloadavg()[0]
    except OSError:  # pragma: no cover - platforms without getloadavg
        return ""
    cores = os.cpu_count() or 1
    busy = "busy: absolute times are noisy" if load > cores else "otherwise idle"
    return f"Load average at the end of this benchmark: {load:.1f} on {cores} cores ({busy})."


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` torch CPU threads, then restore the previous count (also on error)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def suite_config(suite: str, suites: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The settings of ``suite``, or a clear error naming the suites there are."""
    if suite not in suites:
        raise ValueError(f"Expected argument `suite` to be one of {sorted(suites)}, but got {suite!r}.")
    return suites[suite]
