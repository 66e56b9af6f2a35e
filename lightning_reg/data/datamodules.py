"""Built-in ``LightningDataModule``\\ s: Fashion-MNIST from its IDX files, and a tiny synthetic task.

Both share the same options, so every recipe and notebook can switch between
them:

* label-noise injection (``noise_type``, ``noise_rate``, ``noise_seed``); the
  true labels and the noise mask stay available for diagnostics as
  :attr:`~NoisyDataModule.true_labels` and :attr:`~NoisyDataModule.noise_mask`;
* ``train_subset`` (a seeded random subset of the training set) and
  ``test_subset``;
* ``val_split`` (a fraction of the training data held out for validation).
  By default it carries the **true (clean) labels** (``val_labels="clean"``),
  so a model's ``val/acc`` measures accuracy against clean labels, comparable
  with the test accuracy; ``val_labels="given"`` validates on the injected,
  possibly noisy labels instead, as a real validation set would carry them.
  Both label sets stay available as :attr:`~NoisyDataModule.val_true_labels`
  and :attr:`~NoisyDataModule.val_given_labels`;
* ``batch_size``, ``eval_batch_size``, ``num_workers`` and ``seed``.

Training batches are ``(x, y, index)``: the index is the sample's position in
the training set, which per-sample techniques (PS-KD, ELR, label correction)
key their state by. The train loader is a
:class:`~lightning_reg.data.ResumableDataLoader` over an
:class:`~lightning_reg.data.EpochSeededSampler`, so resuming a mid-epoch
checkpoint continues with exactly the batches an uninterrupted run would see.
Validation and test batches are ``(x, y)``.

Example:
    >>> dm = SyntheticDataModule(num_train=64, num_test=32, batch_size=16, noise_rate=0.25)
    >>> dm.setup("fit")
    >>> x, y, index = next(iter(dm.train_dataloader()))
    >>> tuple(x.shape), int(dm.noise_mask.sum())
    ((16, 1, 28, 28), 16)

YAML::

    data:
      class_path: lightning_reg.data.datamodules.FashionMNISTDataModule
      init_args: {noise_type: symmetric, noise_rate: 0.4, train_subset: 10000, val_split: 0.1}

``val/acc`` of the built-in models is then accuracy against the validation
split's **clean** labels (``val_labels="clean"``, the default).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from lightning_reg.core.validation import check_bool, check_choice, check_float, check_int, check_optional_int
from lightning_reg.data.fashion_mnist import FASHION_MNIST_CLASSES, load_fashion_mnist, resolve_fashion_mnist_root
from lightning_reg.data.indexed import IndexedDataset
from lightning_reg.data.loader import EpochSeededSampler, ResumableDataLoader
from lightning_reg.data.noise import FASHION_MNIST_ASYMMETRIC_MAP, inject_label_noise

__all__ = ["FashionMNISTDataModule", "NoisyDataModule", "SplitLoaders", "SyntheticDataModule"]

NoiseType = Literal["symmetric", "asymmetric", "pairflip"]
ValLabels = Literal["clean", "given"]

#: Fashion-MNIST training-set pixel mean and standard deviation (of ``x / 255``).
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530

# Raw uint8 images and labels per (resolved folder, split); 55 MB for all of Fashion-MNIST.
_RAW_CACHE: dict[tuple[str, str], tuple[Tensor, Tensor]] = {}


class SplitLoaders:
    """The loaders of a datamodule with ``train_dataset`` / ``val_dataset`` / ``test_dataset`` attributes.

    Training: a :class:`~lightning_reg.data.loader.ResumableDataLoader` with an
    :class:`~lightning_reg.data.loader.EpochSeededSampler` (exact mid-epoch resume); evaluation: plain
    in-order loaders of ``eval_batch_size``; no validation set gives no validation loop; predict uses the
    test set. The class reads ``batch_size``, ``eval_batch_size``, ``seed``, ``num_workers`` and
    ``drop_last`` from the datamodule.
    """

    train_dataset: Any
    val_dataset: Any
    test_dataset: Any
    batch_size: int
    eval_batch_size: int
    seed: int
    num_workers: int
    drop_last: bool

    def _require(self, dataset: Any, what: str, stage: str) -> Any:
        if dataset is None:
            raise RuntimeError(f"The {what} set is not set up; call `setup({stage!r})` first.")
        return dataset

    def train_dataloader(self) -> DataLoader:
        ds = self._require(self.train_dataset, "training", "fit")
        return ResumableDataLoader(
            ds,
            batch_size=self.batch_size,
            sampler=EpochSeededSampler(ds, seed=self.seed),
            num_workers=self.num_workers,
            drop_last=self.drop_last,
            persistent_workers=self.num_workers > 0,
        )

    def _eval_loader(self, ds: Any) -> DataLoader:
        return DataLoader(ds, batch_size=self.eval_batch_size, shuffle=False, num_workers=self.num_workers)

    def val_dataloader(self) -> Any:
        if self.val_dataset is None:
            return []  # no validation set (e.g. no `val_split`): Lightning skips the loop
        return self._eval_loader(self.val_dataset)

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self._require(self.test_dataset, "test", "test"))

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()


class NoisyDataModule(SplitLoaders, L.LightningDataModule):
    """Shared logic of the built-in datamodules: subsets, validation split, label noise and loaders.

    Subclasses implement :meth:`load_split`, returning ``(images, labels)`` for
    ``"train"`` and ``"test"``, and may override :meth:`prepare_images`, which
    turns the selected raw images into model inputs (it runs after the subset
    is taken, so a small ``train_subset`` converts only what it uses).

    Args:
        batch_size: Training batch size.
        eval_batch_size: Batch size of the validation, test and predict loaders.
        num_workers: ``DataLoader`` worker processes (0 loads in the main process).
        val_split: Fraction in ``[0, 1)`` of the (subset) training data held out for validation.
        val_labels: Labels of the validation split: ``"clean"`` (the true labels, so ``val/acc``
            is accuracy against clean labels) or ``"given"`` (with the injected noise, as training
            sees them). Without noise both are the same.
        train_subset: Use a seeded random subset of this many training samples (``None``: all).
        test_subset: Use the first this many test samples (``None``: all).
        noise_type: ``"symmetric"``, ``"asymmetric"`` (the dataset's class map) or ``"pairflip"``.
        noise_rate: Fraction of noisy labels in ``[0, 1]``; ``0`` disables noise injection.
        noise_seed: Seed of the noise injection.
        seed: Seed of the subset, the validation split and the training shuffle.
        drop_last: Drop the last incomplete training batch.

    Attributes (after ``setup("fit")``):
        train_dataset: An :class:`~lightning_reg.data.IndexedDataset` yielding ``(x, y, index)``.
        given_labels: The labels training sees (noisy where noise was injected).
        true_labels: The clean labels of the training samples.
        noise_mask: ``given_labels != true_labels`` (all ``False`` without noise).
        val_dataset: ``(x, y)`` of the validation split, ``y`` as chosen by ``val_labels``
            (``None`` without ``val_split``).
        val_given_labels: The validation split's labels with the injected noise.
        val_true_labels: The validation split's clean labels.
    """

    #: The number of classes; subclasses set it.
    num_classes: int = 10
    #: Class names, where known.
    classes: tuple[str, ...] = ()
    #: The class map used for ``noise_type="asymmetric"``.
    asymmetric_map: dict[int, int] | None = None

    def __init__(
        self,
        batch_size: int = 128,
        eval_batch_size: int = 1000,
        num_workers: int = 0,
        val_split: float = 0.0,
        train_subset: int | None = None,
        test_subset: int | None = None,
        noise_type: NoiseType = "symmetric",
        noise_rate: float = 0.0,
        noise_seed: int = 0,
        seed: int = 0,
        drop_last: bool = False,
        val_labels: ValLabels = "clean",
    ) -> None:
        super().__init__()
        self.batch_size = check_int("batch_size", batch_size, low=1)
        self.eval_batch_size = check_int("eval_batch_size", eval_batch_size, low=1)
        self.num_workers = check_int("num_workers", num_workers, low=0)
        self.val_split = check_float("val_split", val_split, 0.0, 1.0, high_inclusive=False)
        self.train_subset = check_optional_int("train_subset", train_subset, low=1)
        self.test_subset = check_optional_int("test_subset", test_subset, low=1)
        self.noise_type = check_choice("noise_type", noise_type, ["symmetric", "asymmetric", "pairflip"])
        self.noise_rate = check_float("noise_rate", noise_rate, 0.0, 1.0)
        self.noise_seed = check_int("noise_seed", noise_seed)
        self.seed = check_int("seed", seed)
        self.drop_last = check_bool("drop_last", drop_last)
        self.val_labels = check_choice("val_labels", val_labels, ["clean", "given"])
        if self.noise_type == "asymmetric" and self.noise_rate > 0 and not self.asymmetric_map:
            raise ValueError(
                f"Expected argument `noise_type` to be one of ['symmetric', 'pairflip'] for"
                f" {type(self).__name__}, which has no asymmetric class map, but got 'asymmetric'."
            )
        self.train_dataset: IndexedDataset | None = None
        self.val_dataset: TensorDataset | None = None
        self.test_dataset: TensorDataset | None = None
        self.given_labels: Tensor | None = None
        self.true_labels: Tensor | None = None
        self.noise_mask: Tensor | None = None
        self.val_given_labels: Tensor | None = None
        self.val_true_labels: Tensor | None = None

    # -- to implement ----------------------------------------------------------------------------
    def load_split(self, split: str) -> tuple[Tensor, Tensor]:
        """Return ``(raw images (N, ...), int64 labels (N,))`` of ``"train"`` or ``"test"``."""
        raise NotImplementedError

    def prepare_images(self, images: Tensor) -> Tensor:
        """Turn selected raw images into float model inputs ``(n, C, H, W)`` (default: unchanged)."""
        return images

    # -- setup -----------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit", "validate") and self.train_dataset is None:
            self._setup_train()
        if stage in (None, "test", "predict") and self.test_dataset is None:
            x, y = self.load_split("test")
            if self.test_subset is not None:
                x, y = x[: self.test_subset], y[: self.test_subset]
            self.test_dataset = TensorDataset(self.prepare_images(x), y.clone())

    def _setup_train(self) -> None:
        x, y = self.load_split("train")
        gen = torch.Generator().manual_seed(self.seed)
        order = torch.randperm(len(y), generator=gen)
        if self.train_subset is not None:
            if self.train_subset > len(y):
                raise ValueError(
                    f"Expected argument `train_subset` to be at most the training-set size {len(y)}, but got"
                    f" {self.train_subset}."
                )
            order = order[: self.train_subset]
        n_val = round(self.val_split * len(order))
        if n_val >= len(order):
            raise ValueError(f"`val_split={self.val_split}` leaves no training samples out of {len(order)}.")
        if self.noise_rate > 0:
            noisy = inject_label_noise(
                y[order],
                self.num_classes,
                self.noise_type,  # type: ignore[arg-type]
                self.noise_rate,
                seed=self.noise_seed,
                class_map=self.asymmetric_map if self.noise_type == "asymmetric" else None,
            )
            given, true = noisy.labels, noisy.true_labels
        else:
            given, true = y[order].clone(), y[order].clone()
        train_sel, val_sel = slice(n_val, None), slice(0, n_val)
        xs = self.prepare_images(x[order])
        self.given_labels = given[train_sel].clone()
        self.true_labels = true[train_sel].clone()
        self.noise_mask = self.given_labels != self.true_labels
        self.train_dataset = IndexedDataset(TensorDataset(xs[train_sel], self.given_labels))
        self.val_given_labels = given[val_sel].clone()
        self.val_true_labels = true[val_sel].clone()
        val_y = self.val_true_labels if self.val_labels == "clean" else self.val_given_labels
        self.val_dataset = TensorDataset(xs[val_sel], val_y.clone()) if n_val > 0 else None

    # -- diagnostics -----------------------------------------------------------------------------
    @property
    def has_noise(self) -> bool:
        """Whether label noise was injected (and :attr:`noise_mask` is meaningful)."""
        return self.noise_rate > 0

    def describe(self) -> dict[str, Any]:
        """A summary for reports: sizes and the realised noise rate."""
        out: dict[str, Any] = {"num_classes": self.num_classes}
        if self.train_dataset is not None:
            out["train"] = len(self.train_dataset)
        if self.val_dataset is not None:
            out["val"] = len(self.val_dataset)
        if self.test_dataset is not None:
            out["test"] = len(self.test_dataset)
        if self.noise_mask is not None and self.has_noise:
            out["noise"] = f"{self.noise_type} {float(self.noise_mask.float().mean()):.1%}"
        return out


class FashionMNISTDataModule(NoisyDataModule):
    """Fashion-MNIST (60,000 train / 10,000 test grey 28×28 images, 10 classes) from its IDX files.

    The files are resolved offline first, in this order: ``root``; the
    ``FASHION_MNIST_ROOT`` environment variable; Debian's
    ``/usr/share/datasets/fashion-mnist`` (``apt-get install dataset-fashion-mnist``);
    the cache ``~/.cache/lightning_reg/fashion-mnist``. If none has them,
    ``download=True`` fetches the official files into the cache; otherwise (or
    if the download fails) a ``FileNotFoundError`` says how to get them.

    Images are scaled to ``[0, 1]`` and, with ``normalize=True``, standardised
    with the training-set mean 0.2860 and std 0.3530. Asymmetric noise uses
    :data:`~lightning_reg.data.FASHION_MNIST_ASYMMETRIC_MAP` (T-shirt↔Shirt,
    Pullover↔Coat, Sandal↔Sneaker).

    Args:
        root: A folder holding the four IDX files (``.gz`` or not), tried first.
        download: Download the official files into the cache if no folder has them.
        normalize: Standardise the pixels.
        **kwargs: See :class:`NoisyDataModule` (``batch_size``, ``val_split``, ``val_labels``,
            ``train_subset``, ``noise_type``, ``noise_rate``, ...).

    Example:
        >>> dm = FashionMNISTDataModule(train_subset=512, noise_rate=0.4, batch_size=64)  # doctest: +SKIP
        >>> dm.setup("fit"); x, y, index = next(iter(dm.train_dataloader()))  # doctest: +SKIP

    YAML::

        data:
          class_path: lightning_reg.data.datamodules.FashionMNISTDataModule
          init_args:
            noise_type: symmetric
            noise_rate: 0.4
            train_subset: 12000
            val_split: 0.1
            batch_size: 128
    """

    num_classes = 10
    classes = FASHION_MNIST_CLASSES
    asymmetric_map = FASHION_MNIST_ASYMMETRIC_MAP

    def __init__(
        self,
        root: str | None = None,
        download: bool = False,
        normalize: bool = True,
        batch_size: int = 128,
        eval_batch_size: int = 1000,
        num_workers: int = 0,
        val_split: float = 0.0,
        train_subset: int | None = None,
        test_subset: int | None = None,
        noise_type: NoiseType = "symmetric",
        noise_rate: float = 0.0,
        noise_seed: int = 0,
        seed: int = 0,
        drop_last: bool = False,
        val_labels: ValLabels = "clean",
    ) -> None:
        super().__init__(
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            val_split=val_split,
            train_subset=train_subset,
            test_subset=test_subset,
            noise_type=noise_type,
            noise_rate=noise_rate,
            noise_seed=noise_seed,
            seed=seed,
            drop_last=drop_last,
            val_labels=val_labels,
        )
        if root is not None and not isinstance(root, (str, Path)):
            raise TypeError(f"Expected argument `root` to be a path or None, but got {root!r}.")
        self.root = None if root is None else str(root)
        self.download = check_bool("download", download)
        self.normalize = check_bool("normalize", normalize)

    def prepare_data(self) -> None:
        # Resolve (and, if asked, download) once, on one process.
        resolve_fashion_mnist_root(self.root, self.download)

    def load_split(self, split: str) -> tuple[Tensor, Tensor]:
        folder = resolve_fashion_mnist_root(self.root, self.download)
        key = (str(folder.resolve()), split)
        if key not in _RAW_CACHE:  # parsed once per process (notebooks and tests build many datamodules)
            _RAW_CACHE[key] = load_fashion_mnist(split, folder)
        return _RAW_CACHE[key]

    def prepare_images(self, images: Tensor) -> Tensor:
        x = images.float().div_(255.0).unsqueeze(1)
        if self.normalize:
            x = x.sub_(FASHION_MNIST_MEAN).div_(FASHION_MNIST_STD)
        return x


class SyntheticDataModule(NoisyDataModule):
    """A tiny offline image-classification task for smoke tests: class prototypes plus Gaussian noise.

    Each class has a fixed random ``shape`` prototype; a sample is its class's
    prototype times a random gain plus unit Gaussian noise, so the task is
    learnable but not trivial. Everything is generated from ``data_seed``.

    Args:
        num_train: Training samples (before ``val_split``).
        num_test: Test samples.
        num_classes: Number of classes.
        shape: Image shape ``[C, H, W]`` (default ``[1, 28, 28]``, the built-in models' input).
        signal: Prototype amplitude; lower is harder.
        data_seed: Seed of the generated data.
        **kwargs: See :class:`NoisyDataModule`.
    """

    def __init__(
        self,
        num_train: int = 512,
        num_test: int = 256,
        num_classes: int = 10,
        shape: list[int] | None = None,
        signal: float = 0.5,
        data_seed: int = 0,
        batch_size: int = 64,
        eval_batch_size: int = 256,
        num_workers: int = 0,
        val_split: float = 0.0,
        train_subset: int | None = None,
        test_subset: int | None = None,
        noise_type: NoiseType = "symmetric",
        noise_rate: float = 0.0,
        noise_seed: int = 0,
        seed: int = 0,
        drop_last: bool = False,
        val_labels: ValLabels = "clean",
    ) -> None:
        self.num_classes = check_int("num_classes", num_classes, low=2)
        self.asymmetric_map = {c: (c + 1) % self.num_classes for c in range(0, self.num_classes, 2)}
        super().__init__(
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            val_split=val_split,
            train_subset=train_subset,
            test_subset=test_subset,
            noise_type=noise_type,
            noise_rate=noise_rate,
            noise_seed=noise_seed,
            seed=seed,
            drop_last=drop_last,
            val_labels=val_labels,
        )
        self.num_train = check_int("num_train", num_train, low=2)
        self.num_test = check_int("num_test", num_test, low=1)
        self.shape = [1, 28, 28] if shape is None else [check_int("shape", s, low=1) for s in shape]
        self.signal = check_float("signal", signal, 0.0, low_inclusive=False)
        self.data_seed = check_int("data_seed", data_seed)
        self.classes = tuple(str(c) for c in range(self.num_classes))

    def load_split(self, split: str) -> tuple[Tensor, Tensor]:
        gen = torch.Generator().manual_seed(self.data_seed)
        prototypes = torch.randn(self.num_classes, *self.shape, generator=gen)
        n = self.num_train if split == "train" else self.num_test
        gen.manual_seed(self.data_seed + (1 if split == "train" else 2))
        y = torch.randint(0, self.num_classes, (n,), generator=gen)
        gain = 1.0 + 0.25 * torch.randn(n, *([1] * len(self.shape)), generator=gen)
        x = self.signal * gain * prototypes[y] + torch.randn(n, *self.shape, generator=gen)
        return x, y
