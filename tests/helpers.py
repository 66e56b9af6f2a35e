"""Small models, data and trainer helpers shared by the tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch import Callback
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, TensorDataset

from lightning_reg.core.protocol import RegularizedModule
from lightning_reg.data import EpochSeededSampler, IndexedDataset, ResumableDataLoader

NUM_CLASSES = 4
IMAGE_SHAPE = (1, 8, 8)


class TinyNet(RegularizedModule, L.LightningModule):
    """An MLP over 1×8×8 "images": Flatten → Linear → (BatchNorm) → ReLU → Dropout → Linear."""

    def __init__(
        self,
        hidden: int = 32,
        num_classes: int = NUM_CLASSES,
        dropout: float = 0.0,
        batchnorm: bool = False,
        lr: float = 0.1,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        layers: list[nn.Module] = [nn.Flatten(), nn.Linear(64, hidden)]
        if batchnorm:
            layers.append(nn.BatchNorm1d(hidden))
        layers += [nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, num_classes)]
        self.net = nn.Sequential(*layers)
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch[0], batch[1]
        acc = (self(x).argmax(-1) == y).float().mean()
        self.log("val/acc", acc, batch_size=len(y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def make_dataset(n: int = 64, seed: int = 0, noise: float = 0.1) -> TensorDataset:
    """A learnable synthetic task: labels from a fixed random linear map, a few flipped."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *IMAGE_SHAPE, generator=g)
    w = torch.randn(64, NUM_CLASSES, generator=g)
    y = (x.flatten(1) @ w).argmax(1)
    flip = torch.rand(n, generator=g) < noise
    y = torch.where(flip, (y + 1) % NUM_CLASSES, y)
    return TensorDataset(x, y)


LAYOUTS = ("classification", "dense", "tokens")


class TinySegNet(RegularizedModule, L.LightningModule):
    """A tiny fully-convolutional segmenter: ``(B, 1, 8, 8)`` -> ``(B, C, 8, 8)`` logits."""

    def __init__(
        self,
        hidden: int = 8,
        num_classes: int = NUM_CLASSES,
        dropout: float = 0.0,
        batchnorm: bool = False,
        lr: float = 0.1,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        layers: list[nn.Module] = [nn.Conv2d(1, hidden, 3, padding=1)]
        if batchnorm:
            layers.append(nn.BatchNorm2d(hidden))
        layers += [nn.ReLU(), nn.Dropout(dropout), nn.Conv2d(hidden, num_classes, 1)]
        self.net = nn.Sequential(*layers)
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


class TinyTagger(RegularizedModule, L.LightningModule):
    """A tiny token classifier: ``(B, 8, 8)`` (8 tokens of 8 features) -> ``(B, 8, C)`` logits."""

    logits_layout = "channels_last"

    def __init__(
        self,
        hidden: int = 16,
        num_classes: int = NUM_CLASSES,
        dropout: float = 0.0,
        batchnorm: bool = False,
        lr: float = 0.1,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(8, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, num_classes))
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.reshape(x.shape[0], 8, 8))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def make_model(layout: str = "classification", **kwargs: Any) -> L.LightningModule:
    """The tiny model for a layout: :class:`TinyNet`, :class:`TinySegNet` or :class:`TinyTagger`."""
    return {"classification": TinyNet, "dense": TinySegNet, "tokens": TinyTagger}[layout](**kwargs)


def make_layout_dataset(n: int = 64, layout: str = "classification", seed: int = 0) -> TensorDataset:
    """:func:`make_dataset` with labels for a layout.

    * ``"dense"``: ``(n, 8, 8)`` pixel labels (the sample's class where the pixel is positive, the next
      class elsewhere), ``-100`` where ``|x| < 0.1``; sample 0 is entirely ``-100`` (an unlabeled image).
    * ``"tokens"``: the 8 rows of each image are tokens; ``(n, 8)`` token labels from a fixed linear map,
      sample ``i`` has ``4 + i % 5`` tokens, the rest is padding (zero input, label ``-100``).
    """
    base = make_dataset(n, seed)
    x, y = base.tensors
    if layout == "classification":
        return base
    if layout == "dense":
        img = x[:, 0]
        labels = torch.where(img > 0, y[:, None, None], (y[:, None, None] + 1) % NUM_CLASSES)
        labels = torch.where(img.abs() < 0.1, torch.full_like(labels, -100), labels)
        labels[0] = -100
        return TensorDataset(x, labels)
    if layout == "tokens":
        g = torch.Generator().manual_seed(seed + 1)
        w = torch.randn(8, NUM_CLASSES, generator=g)
        tokens = x[:, 0].clone()
        labels = (tokens @ w).argmax(-1)
        lengths = 4 + torch.arange(n) % 5
        pad = torch.arange(8)[None, :] >= lengths[:, None]
        tokens[pad] = 0.0
        labels[pad] = -100
        return TensorDataset(tokens[:, None], labels)
    raise ValueError(f"unknown layout {layout!r}")


def make_loader(
    n: int = 64,
    batch_size: int = 16,
    shuffle: bool = True,
    seed: int = 0,
    indexed: bool = True,
    layout: str = "classification",
) -> DataLoader:
    """A resumable loader over :func:`make_layout_dataset` yielding ``(x, y, index)``."""
    base = make_layout_dataset(n, layout, seed)
    ds: Any = IndexedDataset(base) if indexed else base
    sampler = EpochSeededSampler(ds, seed=seed, shuffle=shuffle)
    return ResumableDataLoader(ds, batch_size=batch_size, sampler=sampler)


class StepSeed(Callback):
    """Re-seed torch's RNG before every batch from ``(seed, global_step, rank)``.

    Lightning does not checkpoint RNG state, so random ops (dropout, augmentations)
    would differ after a resume; seeding per step makes runs bit-reproducible.
    """

    def __init__(self, seed: int = 1234) -> None:
        self.seed = seed

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        torch.manual_seed(self.seed + 1000 * trainer.global_step + batch_idx + 7919 * trainer.global_rank)


def trainer_kwargs(**overrides: Any) -> dict[str, Any]:
    """Quiet CPU trainer defaults for tests."""
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
    """Seeded fit of ``model`` (default :class:`TinyNet`) with ``callbacks`` plus :class:`StepSeed`."""
    L.seed_everything(0, verbose=False)
    model = model if model is not None else TinyNet()
    loader = loader if loader is not None else make_loader()
    trainer = L.Trainer(callbacks=[*callbacks, StepSeed()], **trainer_kwargs(**trainer_overrides))
    trainer.fit(model, train_dataloaders=loader, ckpt_path=ckpt_path)
    return trainer, model


def interleaved_rank_batches(n: int, world_size: int, batch_size: int) -> list[list[int]]:
    """The global batches a ``world_size``-rank DDP run with ``DistributedSampler(shuffle=False)`` trains on.

    Step ``s`` of the single-process equivalent is rank 0's batch ``s``, then rank 1's, and so on,
    including the duplicate indices ``DistributedSampler`` pads with.
    """
    per_rank = []
    for r in range(world_size):
        s = DistributedSampler(range(n), num_replicas=world_size, rank=r, shuffle=False)
        per_rank.append(list(BatchSampler(list(iter(s)), batch_size, drop_last=False)))
    return [[j for r in range(world_size) for j in per_rank[r][i]] for i in range(len(per_rank[0]))]


class ListBatchSampler:
    """A batch sampler over a fixed list of batches."""

    def __init__(self, batches: list[list[int]]) -> None:
        self.batches = batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


ROOT = Path(__file__).resolve().parents[1]


def run_ddp_script(module: str, *args: str, timeout: float = 300) -> None:
    """Run ``python -m module *args`` as a 2-process DDP launcher (gloo on CPU) and fail with its stderr."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "PYTHONPATH": str(ROOT)}
    env.pop("LOCAL_RANK", None)
    proc = subprocess.run(
        [sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stderr[-4000:]


def have_fashion_mnist() -> bool:
    """Whether the Fashion-MNIST IDX files can be found offline."""
    from lightning_reg.data.fashion_mnist import resolve_fashion_mnist_root

    try:
        resolve_fashion_mnist_root()
    except FileNotFoundError:
        return False
    return True


def assert_state_equal(a: Any, b: Any, path: str = "", atol: float = 0.0, rtol: float = 0.0) -> None:
    """Recursively compare (callback) state dicts: tensors with allclose, the rest with ==."""
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


ENV_NO_SUMMARY = {"LIGHTNING_REG_SUMMARY": "0"}
os.environ.setdefault("LIGHTNING_REG_SUMMARY", "0")
