r"""Semi-supervised data: a few labels per class, the rest of the training split unlabeled.

:class:`SemiSupervisedDataModule` (Fashion-MNIST) and
:class:`SyntheticSemiSupervisedDataModule` (offline smoke tests) keep a
balanced labeled subset of ``labels_per_class`` samples per class, chosen by
``seed``, and hand the rest of the training split (optionally capped at
``num_unlabeled``) to training without labels. Their true labels stay
available for diagnostics only (e.g. the accuracy of pseudo-labels).

**One training table.** Labeled and unlabeled samples are rows of one
training table, and every batch carries each sample's row as its ``index``:

* labeled samples are rows ``[0, n_l)``;
* unlabeled samples are rows ``[n_l, n_l + n_u)``.

So per-sample state (tables of PS-KD, ELR, label correction, teachers' caches)
has one row per training sample, :attr:`~SemiSupervisedDataModule.num_train_samples`
``= n_l + n_u`` rows in all, and ``true_labels[index]`` is the hidden label of
any sample. ``given_labels[index]`` is ``ignore_index`` (-100) for unlabeled
rows.

**Two batch forms** (``combined``):

* ``combined=True`` (default): Lightning's
  ``CombinedLoader({"labeled": ..., "unlabeled": ...}, mode="max_size_cycle")``.
  ``"labeled"`` yields ``(x, y, index)`` batches of ``batch_size``;
  ``"unlabeled"`` yields ``(x, index)`` batches of ``mu * batch_size``
  (FixMatch: ``μ = 7``).
* ``combined=False``: one loader of ``(x, y, index)`` batches of
  ``(1 + mu) * batch_size`` samples: ``batch_size`` labeled ones first, then
  ``mu * batch_size`` unlabeled ones with ``y = ignore_index``, in every
  batch; under DDP too (each rank takes whole batches of the stream, and the
  epoch has ``⌈steps / world_size⌉`` steps per rank).

**Epochs.** An epoch has ``max(⌈n_l / B⌉, ⌈n_u / (μB)⌉)`` steps, so the
larger part is seen once (plus a few samples of its next pass, to fill the
last batch) and the smaller part cycles. Each part draws a fresh permutation
for every pass (one generator per part, seeded by ``(seed, part, epoch)``),
so every batch is full and the same labeled batches do not repeat pass after
pass; with fewer labeled samples than ``B``, a batch holds each of them
several times, like FixMatch's expanded labeled set. The loaders are
:class:`~lightning_reg.data.ResumableDataLoader`\ s over
:class:`~lightning_reg.data.EpochSeededSampler`\ s: resuming a mid-epoch
checkpoint continues with exactly the batches of an uninterrupted run. Under
DDP, Lightning's distributed sampler shards (and deterministically reshuffles)
each part of the combined form.

The loaders yield clean images: FixMatch's weak and strong views are made on
device by the callbacks, with :class:`~lightning_reg.augment.WeakAugment` and
:class:`~lightning_reg.augment.RandAugment` (pass ``value_range=dm.value_range``).

Validation (``val_size`` samples held out of the training split, with their
true labels) and test batches are ``(x, y)``, as in the other built-in
datamodules.

Example:
    >>> dm = SyntheticSemiSupervisedDataModule(num_train=200, num_classes=4, labels_per_class=5, mu=2, batch_size=8)
    >>> dm.setup("fit")
    >>> dm.num_labeled_samples, dm.num_unlabeled_samples, dm.num_train_samples
    (20, 180, 200)
    >>> loader = dm.train_dataloader(); _ = iter(loader)
    >>> batch, _, _ = next(iter(loader))
    >>> x_l, y_l, index_l = batch["labeled"]; x_u, index_u = batch["unlabeled"]
    >>> tuple(x_l.shape), tuple(x_u.shape), bool((index_l < 20).all()), bool((index_u >= 20).all())
    ((8, 1, 28, 28), (16, 1, 28, 28), True, True)

YAML::

    data:
      class_path: lightning_reg.data.SemiSupervisedDataModule
      init_args: {labels_per_class: 10, mu: 7, batch_size: 64, val_size: 1000}
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import Dataset, DistributedSampler, Sampler, TensorDataset

from lightning_reg.core.validation import check_bool, check_int, check_optional_int
from lightning_reg.data.datamodules import (
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    FashionMNISTDataModule,
    NoisyDataModule,
    SyntheticDataModule,
)
from lightning_reg.data.indexed import IndexedDataset
from lightning_reg.data.loader import EpochSeededSampler, ResumableDataLoader

__all__ = [
    "IGNORE_INDEX",
    "SemiSupervisedDataModule",
    "SyntheticSemiSupervisedDataModule",
    "split_labeled_unlabeled",
]

#: The label of unlabeled samples in the single-loader form (PyTorch's ``cross_entropy`` default).
IGNORE_INDEX = -100


def split_labeled_unlabeled(
    labels: Tensor,
    num_classes: int,
    labels_per_class: int,
    num_unlabeled: int | None = None,
    val_size: int = 0,
    seed: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Split positions ``0..N-1`` into a balanced labeled subset, an unlabeled rest and a validation set.

    A permutation seeded by ``seed`` orders the samples; its first
    ``val_size`` are the validation set; of the others, the first
    ``labels_per_class`` of each class (in permutation order) are labeled and
    the rest unlabeled (the first ``num_unlabeled`` of them, if given). All
    three keep the permutation's order, so classes are mixed.

    Args:
        labels: ``(N,)`` integer labels of the training split.
        num_classes: The number of classes.
        labels_per_class: Labeled samples per class.
        num_unlabeled: Keep at most this many unlabeled samples (``None``: all).
        val_size: Samples held out for validation.
        seed: Seed of the permutation.

    Returns:
        ``(labeled, unlabeled, val)`` int64 positions into ``labels``, disjoint.

    Raises:
        ValueError: If a class has fewer than ``labels_per_class`` samples outside the validation set.

    Example:
        >>> lab, unl, val = split_labeled_unlabeled(torch.arange(12) % 3, 3, labels_per_class=2, val_size=3)
        >>> len(lab), len(unl), len(val), (torch.arange(12) % 3)[lab].bincount().tolist()
        (6, 3, 3, [2, 2, 2])
    """
    if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.is_floating_point():
        raise TypeError("Expected `labels` to be a 1-D integer tensor.")
    num_classes = check_int("num_classes", num_classes, low=1)
    labels_per_class = check_int("labels_per_class", labels_per_class, low=1)
    num_unlabeled = check_optional_int("num_unlabeled", num_unlabeled, low=0)
    n = len(labels)
    val_size = check_int("val_size", val_size, low=0, high=max(n - 1, 0))
    labels = labels.long()
    if n and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"Expected labels in [0, {num_classes}), but got min {int(labels.min())}, max {int(labels.max())}."
        )
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    val, rest = order[:val_size], order[val_size:]
    cls = labels[rest]
    counts = torch.bincount(cls, minlength=num_classes)
    short = torch.nonzero(counts < labels_per_class).flatten().tolist()
    if short:
        c = short[0]
        raise ValueError(
            f"Class {c} has only {int(counts[c])} training samples outside the validation set, fewer than"
            f" `labels_per_class={labels_per_class}`. Lower `labels_per_class` or `val_size`."
        )
    # Rank of each sample within its class, in permutation order.
    sorted_cls, perm = torch.sort(cls, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(perm)
    rank[perm] = torch.arange(len(rest)) - starts[sorted_cls]
    take = rank < labels_per_class
    unlabeled = rest[~take]
    if num_unlabeled is not None:
        unlabeled = unlabeled[:num_unlabeled]
    return rest[take], unlabeled, val


class _Unlabeled(Dataset):
    """``(x, index)`` items of an ``(x, y, index)`` dataset: the label is dropped."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        x, _, i = self.dataset[index]
        return x, i


class _PartSampler(EpochSeededSampler):
    """``num_samples`` rows of ``[offset, offset + count)``: a fresh permutation per pass, seeded by the epoch.

    Seed of epoch ``e``: ``(2 seed + part) · 1000003 + e``; passes within an epoch continue the same generator.
    """

    def __init__(self, offset: int, count: int, num_samples: int, seed: int, part: int) -> None:
        super().__init__(range(num_samples), seed=seed)
        self.offset, self.count, self.part = int(offset), int(count), int(part)

    def __iter__(self) -> Iterator[int]:
        gen = torch.Generator().manual_seed((2 * self.seed + self.part) * 1_000_003 + self.epoch)
        passes = math.ceil(self.num_samples / self.count)
        rows = torch.cat([torch.randperm(self.count, generator=gen) for _ in range(passes)])[: self.num_samples]
        return iter((rows + self.offset).tolist())


class _MixedSampler(DistributedSampler):
    """Chunks of ``batch_l`` labeled rows then ``batch_u`` unlabeled rows: one chunk per batch (single-loader form).

    A ``DistributedSampler`` so that Lightning keeps it under DDP instead of wrapping it in a sampler that would
    reshuffle the stream: each rank takes whole chunks (every ``world_size``-th, wrapping around so all ranks have
    as many), so every batch on every rank holds exactly ``batch_l`` labeled samples.
    """

    def __init__(
        self,
        dataset: Any,
        labeled: _PartSampler,
        unlabeled: _PartSampler,
        batch_l: int,
        batch_u: int,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        if num_replicas is None or rank is None:  # the process group, if any (it exists when Lightning asks)
            distributed = dist.is_available() and dist.is_initialized()
            num_replicas, rank = (dist.get_world_size(), dist.get_rank()) if distributed else (1, 0)
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)
        self.labeled, self.unlabeled = labeled, unlabeled
        self.batch_l, self.batch_u = batch_l, batch_u
        self.steps = len(labeled) // batch_l
        self.steps_per_rank = math.ceil(self.steps / num_replicas)

    def set_epoch(self, epoch: int) -> None:
        """Select the permutations of ``epoch`` in both parts."""
        super().set_epoch(epoch)
        self.labeled.set_epoch(epoch)
        self.unlabeled.set_epoch(epoch)

    def __len__(self) -> int:
        return self.steps_per_rank * (self.batch_l + self.batch_u)

    def __iter__(self) -> Iterator[int]:
        lab = torch.tensor(list(self.labeled)).view(self.steps, self.batch_l)
        unl = torch.tensor(list(self.unlabeled)).view(self.steps, self.batch_u)
        chunks = torch.arange(self.steps_per_rank * self.num_replicas) % self.steps
        mine = chunks[self.rank :: self.num_replicas]
        return iter(torch.cat([lab, unl], dim=1)[mine].flatten().tolist())


class _SemiSupervised(NoisyDataModule):
    """The semi-supervised split and loaders, on top of any :class:`NoisyDataModule`'s ``load_split``."""

    labels_per_class: int
    num_unlabeled: int | None
    mu: int
    val_size: int
    combined: bool
    ignore_index: int

    def _init_semi_supervised(
        self,
        labels_per_class: int,
        num_unlabeled: int | None,
        mu: int,
        val_size: int,
        combined: bool,
        ignore_index: int,
    ) -> None:
        self.labels_per_class = check_int("labels_per_class", labels_per_class, low=1)
        self.num_unlabeled = check_optional_int("num_unlabeled", num_unlabeled, low=1)
        self.mu = check_int("mu", mu, low=1)
        self.val_size = check_int("val_size", val_size, low=0)
        self.combined = check_bool("combined", combined)
        self.ignore_index = check_int("ignore_index", ignore_index)
        if 0 <= self.ignore_index < self.num_classes:
            raise ValueError(
                f"Expected argument `ignore_index` to be outside the class range [0, {self.num_classes}), but got"
                f" {self.ignore_index}."
            )
        self.labeled_indices: Tensor | None = None
        self.unlabeled_indices: Tensor | None = None
        self.val_indices: Tensor | None = None
        self.labeled_mask: Tensor | None = None

    def _setup_train(self) -> None:
        x, y = self.load_split("train")
        if self.val_size >= len(y):
            raise ValueError(
                f"Expected argument `val_size` to be less than the training-set size {len(y)}, but got {self.val_size}."
            )
        lab, unl, val = split_labeled_unlabeled(
            y, self.num_classes, self.labels_per_class, self.num_unlabeled, self.val_size, self.seed
        )
        if len(unl) == 0:
            raise ValueError(
                f"`labels_per_class={self.labels_per_class}` and `val_size={self.val_size}` leave no unlabeled samples"
                f" out of {len(y)}. Lower `labels_per_class` or `val_size`."
            )
        source = torch.cat([lab, unl])
        true = y[source].long().clone()
        self.labeled_indices, self.unlabeled_indices, self.val_indices = lab, unl, val
        self.labeled_mask = torch.arange(len(source)) < len(lab)
        self.true_labels = true
        self.given_labels = torch.where(self.labeled_mask, true, torch.full_like(true, self.ignore_index))
        self.noise_mask = torch.zeros(len(source), dtype=torch.bool)
        self.train_dataset = IndexedDataset(TensorDataset(self.prepare_images(x[source]), self.given_labels))
        self.val_dataset = TensorDataset(self.prepare_images(x[val]), y[val].long().clone()) if len(val) else None

    # -- sizes and hidden labels -----------------------------------------------------------------
    def _setup_done(self) -> Tensor:
        if self.labeled_mask is None:
            raise RuntimeError("The training set is not set up; call `setup('fit')` first.")
        return self.labeled_mask

    @property
    def num_labeled_samples(self) -> int:
        """``n_l``: labeled rows ``[0, n_l)`` of the training table."""
        return int(self._setup_done().sum())

    @property
    def num_unlabeled_samples(self) -> int:
        """``n_u``: unlabeled rows ``[n_l, n_l + n_u)`` of the training table."""
        mask = self._setup_done()
        return len(mask) - int(mask.sum())

    @property
    def num_train_samples(self) -> int:
        """``n_l + n_u``: the rows of the training table (and of every per-sample table)."""
        return len(self._setup_done())

    @property
    def source_indices(self) -> Tensor:
        """``(n_l + n_u,)`` positions in the source training split of the table's rows."""
        self._setup_done()
        assert self.labeled_indices is not None and self.unlabeled_indices is not None
        return torch.cat([self.labeled_indices, self.unlabeled_indices])

    @property
    def unlabeled_true_labels(self) -> Tensor:
        """``(n_u,)`` hidden true labels of the unlabeled rows (row ``n_l + j`` is entry ``j``); diagnostics only."""
        n_l = self.num_labeled_samples
        assert self.true_labels is not None
        return self.true_labels[n_l:]

    # -- loaders ---------------------------------------------------------------------------------
    def _loader(self, dataset: Any, batch_size: int, sampler: Sampler[int]) -> ResumableDataLoader:
        return ResumableDataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> Any:
        """A ``CombinedLoader`` of ``"labeled"`` and ``"unlabeled"``, or one mixed loader with ``combined=False``."""
        ds = self._require(self.train_dataset, "training", "fit")
        n_l, n_u = self.num_labeled_samples, self.num_unlabeled_samples
        b_l, b_u = self.batch_size, self.mu * self.batch_size
        steps = max(math.ceil(n_l / b_l), math.ceil(n_u / b_u))
        lab = _PartSampler(0, n_l, steps * b_l, self.seed, part=0)
        unl = _PartSampler(n_l, n_u, steps * b_u, self.seed, part=1)
        if not self.combined:
            return self._loader(ds, b_l + b_u, _MixedSampler(ds, lab, unl, b_l, b_u))
        from lightning.pytorch.utilities.combined_loader import CombinedLoader

        loaders = {"labeled": self._loader(ds, b_l, lab), "unlabeled": self._loader(_Unlabeled(ds), b_u, unl)}
        return CombinedLoader(loaders, mode="max_size_cycle")

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        if self.labeled_mask is not None:
            out["labeled"] = self.num_labeled_samples
            out["unlabeled"] = self.num_unlabeled_samples
        return out


class SemiSupervisedDataModule(_SemiSupervised, FashionMNISTDataModule):
    """Fashion-MNIST with ``labels_per_class`` labels per class and the rest of the training split unlabeled.

    See the module docstring for the training table (labeled rows
    ``[0, n_l)``, unlabeled rows ``[n_l, n_l + n_u)``), the two batch forms and
    the epoch length. The files are found offline as by
    :class:`~lightning_reg.data.datamodules.FashionMNISTDataModule`; images are
    scaled to ``[0, 1]`` and, with ``normalize=True``, standardised (their
    range is then :attr:`value_range`, to pass to the augmentations).

    Args:
        labels_per_class: Labeled samples per class (FixMatch's "40 labels" on 10 classes: 4).
        num_unlabeled: Keep at most this many unlabeled samples (``None``: the whole rest of the split).
        mu: Unlabeled samples per labeled one in a step (FixMatch: 7).
        batch_size: Labeled samples per step ``B``; the unlabeled batch has ``mu * B``.
        eval_batch_size: Batch size of the validation and test loaders.
        num_workers: ``DataLoader`` worker processes.
        val_size: Training samples held out for validation, with their true labels (``0``: none).
        test_subset: Use the first this many test samples (``None``: all).
        combined: ``True``: a ``CombinedLoader`` of ``"labeled"`` and ``"unlabeled"``; ``False``: one loader whose
            unlabeled samples carry ``ignore_index``.
        ignore_index: The label of unlabeled samples in :attr:`given_labels` and the single-loader form.
        seed: Seed of the split and of the training order.
        root: A folder holding the four IDX files, tried first.
        download: Download the official files into the cache if no folder has them.
        normalize: Standardise the pixels with the training-set mean and std.

    Attributes (after ``setup("fit")``):
        train_dataset: The training table, an :class:`~lightning_reg.data.IndexedDataset` of ``(x, y, index)``
            with ``y = ignore_index`` on unlabeled rows.
        true_labels: ``(n_l + n_u,)`` true labels of every row; for diagnostics only on unlabeled rows.
        given_labels: ``(n_l + n_u,)`` the labels training may use: true on labeled rows, ``ignore_index`` else.
        labeled_mask: ``(n_l + n_u,)`` ``True`` on labeled rows.
        labeled_indices, unlabeled_indices, val_indices: Positions in the Fashion-MNIST training split.
        noise_mask: All ``False`` (no label noise).

    Example:
        >>> dm = SemiSupervisedDataModule(labels_per_class=4, batch_size=16)  # doctest: +SKIP
        >>> dm.setup("fit"); dm.num_labeled_samples, dm.num_unlabeled_samples  # doctest: +SKIP
        (40, 59960)
    """

    def __init__(
        self,
        labels_per_class: int = 10,
        num_unlabeled: int | None = None,
        mu: int = 7,
        batch_size: int = 64,
        eval_batch_size: int = 1000,
        num_workers: int = 0,
        val_size: int = 0,
        test_subset: int | None = None,
        combined: bool = True,
        ignore_index: int = IGNORE_INDEX,
        seed: int = 0,
        root: str | None = None,
        download: bool = False,
        normalize: bool = True,
    ) -> None:
        super().__init__(
            root=root,
            download=download,
            normalize=normalize,
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            test_subset=test_subset,
            seed=seed,
        )
        self._init_semi_supervised(labels_per_class, num_unlabeled, mu, val_size, combined, ignore_index)

    @property
    def value_range(self) -> list[float]:
        """``[low, high]`` of the pixel values: ``[0, 1]``, standardised if ``normalize`` (for ``value_range=``)."""
        if not self.normalize:
            return [0.0, 1.0]
        return [(0.0 - FASHION_MNIST_MEAN) / FASHION_MNIST_STD, (1.0 - FASHION_MNIST_MEAN) / FASHION_MNIST_STD]


class SyntheticSemiSupervisedDataModule(_SemiSupervised, SyntheticDataModule):
    """The synthetic task, split and loaded as :class:`SemiSupervisedDataModule` does Fashion-MNIST.

    The data of :class:`~lightning_reg.data.datamodules.SyntheticDataModule`: offline and fast, for smoke tests of
    semi-supervised callbacks.

    Args:
        num_train: Training samples (labeled, unlabeled and validation together).
        num_test: Test samples.
        num_classes: Number of classes.
        shape: Image shape ``[C, H, W]``.
        signal: Prototype amplitude; lower is harder.
        data_seed: Seed of the generated data.
        labels_per_class, num_unlabeled, mu, batch_size, eval_batch_size, num_workers, val_size, combined,
        ignore_index, seed: See :class:`SemiSupervisedDataModule`.
    """

    def __init__(
        self,
        num_train: int = 512,
        num_test: int = 256,
        num_classes: int = 10,
        shape: list[int] | None = None,
        signal: float = 0.5,
        data_seed: int = 0,
        labels_per_class: int = 4,
        num_unlabeled: int | None = None,
        mu: int = 7,
        batch_size: int = 16,
        eval_batch_size: int = 256,
        num_workers: int = 0,
        val_size: int = 0,
        combined: bool = True,
        ignore_index: int = IGNORE_INDEX,
        seed: int = 0,
    ) -> None:
        super().__init__(
            num_train=num_train,
            num_test=num_test,
            num_classes=num_classes,
            shape=shape,
            signal=signal,
            data_seed=data_seed,
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            seed=seed,
        )
        self._init_semi_supervised(labels_per_class, num_unlabeled, mu, val_size, combined, ignore_index)
