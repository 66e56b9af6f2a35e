"""Tiny learnable datasets and resumable loaders for the conformance checks, one per output layout.

Example:
    >>> ds = make_layout_dataset(16, "tokens")
    >>> [tuple(t.shape) for t in ds.tensors]
    [(16, 1, 8, 8), (16, 8)]
    >>> x, y, index = next(iter(make_loader(16, batch_size=4)))
    >>> tuple(x.shape), tuple(y.shape), index.tolist()
    ((4, 1, 8, 8), (4,), [12, 10, 9, 6])
    >>> interleaved_rank_batches(5, 2, 2)
    [[0, 2, 1, 3], [4, 0]]
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, TensorDataset

from lightning_reg.data import EpochSeededSampler, IndexedDataset, ResumableDataLoader
from lightning_reg.testing.models import IMAGE_SHAPE, NUM_CLASSES

__all__ = [
    "ListBatchSampler",
    "interleaved_rank_batches",
    "make_dataset",
    "make_layout_dataset",
    "make_loader",
]


def make_dataset(n: int = 64, seed: int = 0, noise: float = 0.1) -> TensorDataset:
    """A learnable synthetic classification task: labels from a fixed random linear map, a few flipped.

    Args:
        n: Number of samples.
        seed: Seed of the inputs, the map and the flips.
        noise: Fraction of labels moved to the next class.

    Returns:
        ``TensorDataset(x, y)`` with ``x`` of shape ``(n, 1, 8, 8)`` and ``y`` in ``[0, 4)``.
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *IMAGE_SHAPE, generator=g)
    w = torch.randn(64, NUM_CLASSES, generator=g)
    y = (x.flatten(1) @ w).argmax(1)
    flip = torch.rand(n, generator=g) < noise
    y = torch.where(flip, (y + 1) % NUM_CLASSES, y)
    return TensorDataset(x, y)


def make_layout_dataset(n: int = 64, layout: str = "classification", seed: int = 0) -> TensorDataset:
    """:func:`make_dataset` with labels for a layout.

    * ``"classification"``: :func:`make_dataset` itself.
    * ``"dense"``: ``(n, 8, 8)`` pixel labels (the sample's class where the pixel is positive, the next
      class elsewhere), ``-100`` where ``|x| < 0.1``; sample 0 is entirely ``-100`` (an unlabeled image).
    * ``"tokens"``: the 8 rows of each image are tokens; ``(n, 8)`` token labels from a fixed linear map,
      sample ``i`` has ``4 + i % 5`` tokens, the rest is padding (zero input, label ``-100``).

    Args:
        n: Number of samples.
        layout: ``"classification"``, ``"dense"`` or ``"tokens"``.
        seed: Seed of the task.
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
    raise ValueError(
        f"Expected argument `layout` to be one of ['classification', 'dense', 'tokens'], but got {layout!r}."
    )


def make_loader(
    n: int = 64,
    batch_size: int = 16,
    shuffle: bool = True,
    seed: int = 0,
    indexed: bool = True,
    layout: str = "classification",
) -> DataLoader:
    """A resumable loader over :func:`make_layout_dataset` yielding ``(x, y, index)`` (``(x, y)`` if not indexed).

    The sampler is an :class:`~lightning_reg.data.EpochSeededSampler` inside a
    :class:`~lightning_reg.data.ResumableDataLoader`, so a run resumed mid-epoch sees exactly the batches an
    uninterrupted run sees.
    """
    base = make_layout_dataset(n, layout, seed)
    ds: Any = IndexedDataset(base) if indexed else base
    sampler = EpochSeededSampler(ds, seed=seed, shuffle=shuffle)
    return ResumableDataLoader(ds, batch_size=batch_size, sampler=sampler)


def interleaved_rank_batches(n: int, world_size: int, batch_size: int) -> list[list[int]]:
    """The global batches a ``world_size``-rank DDP run with ``DistributedSampler(shuffle=False)`` trains on.

    Step ``s`` of the single-process equivalent is rank 0's batch ``s``, then rank 1's, and so on,
    including the duplicate indices ``DistributedSampler`` pads with.
    """
    per_rank = []
    for r in range(world_size):
        indices: Any = range(n)  # DistributedSampler only needs len()
        s: DistributedSampler[int] = DistributedSampler(indices, num_replicas=world_size, rank=r, shuffle=False)
        per_rank.append(list(BatchSampler(list(iter(s)), batch_size, drop_last=False)))
    return [[j for r in range(world_size) for j in per_rank[r][i]] for i in range(len(per_rank[0]))]


class ListBatchSampler:
    """A batch sampler over a fixed list of batches (e.g. :func:`interleaved_rank_batches`)."""

    def __init__(self, batches: list[list[int]]) -> None:
        self.batches = batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)
