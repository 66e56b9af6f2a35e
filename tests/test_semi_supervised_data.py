"""SemiSupervisedDataModule: balanced labelled subset, one training table, both batch forms, exact resume."""

from __future__ import annotations

import gzip
import math
import struct
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.combined_loader import CombinedLoader
from torch.utils.data import DistributedSampler

from lightning_reg.core.protocol import infer_num_samples
from lightning_reg.data import EpochSeededSampler, ResumableDataLoader
from lightning_reg.data.semi_supervised import (
    IGNORE_INDEX,
    SemiSupervisedDataModule,
    SyntheticSemiSupervisedDataModule,
    split_labeled_unlabeled,
)
from tests.helpers import have_fashion_mnist, trainer_kwargs

N_TRAIN, N_TEST = 300, 30


def _write_idx(path: Path, data: torch.Tensor) -> None:
    header = struct.pack(">HBB", 0, 8, data.dim()) + struct.pack(">" + "I" * data.dim(), *data.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + bytes(data.to(torch.uint8).flatten().tolist()))


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Fashion-MNIST-shaped IDX files; training image ``i`` stores ``i`` in pixels (0, 0) and (0, 1)."""
    folder = tmp_path_factory.mktemp("fmnist")
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (N_TRAIN,), generator=g)
    labels[:100] = torch.arange(100) % 10  # at least 10 per class
    images = torch.randint(0, 256, (N_TRAIN, 28, 28), generator=g)
    images[:, 0, 0] = torch.arange(N_TRAIN) % 256
    images[:, 0, 1] = torch.arange(N_TRAIN) // 256
    _write_idx(folder / "train-images-idx3-ubyte.gz", images)
    _write_idx(folder / "train-labels-idx1-ubyte.gz", labels)
    _write_idx(folder / "t10k-images-idx3-ubyte.gz", torch.zeros(N_TEST, 28, 28))
    _write_idx(folder / "t10k-labels-idx1-ubyte.gz", torch.arange(N_TEST) % 10)
    return str(folder)


def _source_labels(root: str) -> torch.Tensor:
    from lightning_reg.data.fashion_mnist import load_fashion_mnist

    return load_fashion_mnist("train", root)[1]


def _position(x: torch.Tensor) -> torch.Tensor:
    """The source position encoded in un-normalised images (``normalize=False``)."""
    raw = (x[:, 0, 0, :2] * 255).round().long()
    return raw[:, 0] + 256 * raw[:, 1]


def _dm(root: str, **kw: Any) -> SemiSupervisedDataModule:
    kw = {"labels_per_class": 4, "batch_size": 8, "mu": 3, "normalize": False, **kw}
    dm = SemiSupervisedDataModule(root=root, **kw)
    dm.setup("fit")
    return dm


def test_balanced_labelled_subset_and_disjoint_parts(root: str) -> None:
    dm = _dm(root, val_size=20)
    n_l, n_u = dm.num_labeled_samples, dm.num_unlabeled_samples
    assert (n_l, n_u) == (40, N_TRAIN - 40 - 20) and dm.num_train_samples == n_l + n_u
    assert torch.equal(dm.true_labels[:n_l].bincount(minlength=10), torch.full((10,), 4))  # type: ignore[index]
    lab, unl, val = dm.labeled_indices, dm.unlabeled_indices, dm.val_indices
    everything = torch.cat([lab, unl, val])
    assert len(everything.unique()) == N_TRAIN  # disjoint, and without a cap they cover the training split
    # The hidden labels are the dataset's own, row for row of the training table.
    source = _source_labels(root)
    assert torch.equal(dm.true_labels, source[torch.cat([lab, unl])])  # type: ignore[arg-type]
    assert torch.equal(dm.unlabeled_true_labels, source[unl])
    assert torch.equal(dm.given_labels[:n_l], source[lab])  # type: ignore[index]
    assert bool((dm.given_labels[n_l:] == IGNORE_INDEX).all())  # type: ignore[index]
    assert not dm.noise_mask.any() and dm.labeled_mask.sum() == n_l  # type: ignore[union-attr]
    # The table's images are the source images of those positions; validation holds its own, with true labels.
    x_table = dm.train_dataset.dataset.tensors[0]  # type: ignore[union-attr]
    assert torch.equal(_position(x_table), torch.cat([lab, unl]))
    x_val, y_val = next(iter(dm.val_dataloader()))
    assert torch.equal(_position(x_val), val) and torch.equal(y_val, source[val])


def test_split_is_deterministic_by_seed_and_caps_the_unlabelled_part(root: str) -> None:
    a, b, c = _dm(root, seed=1), _dm(root, seed=1), _dm(root, seed=2)
    assert torch.equal(a.labeled_indices, b.labeled_indices) and torch.equal(a.unlabeled_indices, b.unlabeled_indices)
    assert not torch.equal(a.labeled_indices, c.labeled_indices)
    capped = _dm(root, seed=1, num_unlabeled=50)
    assert capped.num_unlabeled_samples == 50 and capped.num_train_samples == 90
    assert torch.equal(capped.labeled_indices, a.labeled_indices)  # the cap does not change the labelled subset
    # The pure split function: positions of a balanced subset, the rest, validation.
    labels = torch.arange(100) % 5
    lab, unl, val = split_labeled_unlabeled(labels, num_classes=5, labels_per_class=3, val_size=10, seed=0)
    assert len(lab) == 15 and len(unl) == 75 and len(val) == 10
    assert torch.equal(labels[lab].bincount(minlength=5), torch.full((5,), 3))
    assert len(torch.cat([lab, unl, val]).unique()) == 100


def test_combined_batches_and_index_ranges(root: str) -> None:
    dm = _dm(root)
    n_l, n_u = dm.num_labeled_samples, dm.num_unlabeled_samples
    loader = dm.train_dataloader()
    assert isinstance(loader, CombinedLoader) and loader._mode == "max_size_cycle"
    assert all(isinstance(dl, ResumableDataLoader) for dl in loader.flattened)
    steps = max(math.ceil(n_l / 8), math.ceil(n_u / 24))
    seen_l, seen_u = [], []
    iter(loader)
    assert len(loader) == steps
    for batch, _, _ in loader:
        x_l, y_l, i_l = batch["labeled"]
        x_u, i_u = batch["unlabeled"]
        assert x_l.shape == (8, 1, 28, 28) and x_u.shape == (24, 1, 28, 28)  # every batch is full, mu = 3
        assert bool((i_l >= 0).all() and (i_l < n_l).all())
        assert bool((i_u >= n_l).all() and (i_u < n_l + n_u).all())
        assert torch.equal(y_l, dm.true_labels[i_l])  # type: ignore[index]
        assert torch.equal(_position(x_u), dm.source_indices[i_u])
        seen_l += i_l.tolist()
        seen_u += i_u.tolist()
    assert len(seen_l) == 8 * steps and len(seen_u) == 24 * steps
    assert set(seen_u) == set(range(n_l, n_l + n_u)) and set(seen_l) == set(range(n_l))  # each part covered
    # The per-sample table size Lightning-side helpers infer is the whole training table (the datamodule says it).
    trainer = SimpleNamespace(train_dataloader=loader, datamodule=dm)
    assert infer_num_samples(trainer, "test") == dm.num_train_samples  # type: ignore[arg-type]
    # Without the datamodule the parts' datasets are summed: never smaller than the table needs.
    assert infer_num_samples(SimpleNamespace(train_dataloader=loader), "test") >= dm.num_train_samples  # type: ignore[arg-type]


def test_labelled_stream_reshuffles_every_pass(root: str) -> None:
    dm = _dm(root, labels_per_class=1, batch_size=5)  # 10 labels: two batches per pass, many passes per epoch
    loader = dm.train_dataloader()
    iter(loader)
    passes = [sorted(b["labeled"][2].tolist()) for b, _, _ in loader]
    pairs = {(tuple(passes[k]), tuple(passes[k + 1])) for k in range(0, len(passes) - 1, 2)}
    assert len(pairs) > 1  # not the same two batches over and over
    for k in range(0, len(passes) - 1, 2):
        assert sorted(passes[k] + passes[k + 1]) == list(range(10))  # each pass is a permutation


def test_single_loader_form_marks_unlabelled_samples(root: str) -> None:
    dm = _dm(root, combined=False)
    n_l = dm.num_labeled_samples
    loader = dm.train_dataloader()
    assert isinstance(loader, ResumableDataLoader)
    batches = list(loader)
    assert len(batches) == max(math.ceil(n_l / 8), math.ceil(dm.num_unlabeled_samples / 24))
    for x, y, index in batches:
        assert x.shape[0] == 32 and len(y) == 32  # B labelled + mu * B unlabelled in every batch
        labelled = y != IGNORE_INDEX
        assert int(labelled.sum()) == 8
        assert torch.equal(labelled, index < n_l)
        assert torch.equal(y[labelled], dm.true_labels[index[labelled]])  # type: ignore[index]
        assert torch.equal(_position(x), dm.source_indices[index])
    assert len(dm.train_dataset) == dm.num_train_samples  # type: ignore[arg-type]
    # Under DDP Lightning keeps this sampler (a DistributedSampler); each rank takes whole batches of the stream.
    assert isinstance(loader.sampler, DistributedSampler)


def test_single_loader_form_shards_whole_batches_across_ranks(root: str) -> None:
    from lightning_reg.data.semi_supervised import _MixedSampler

    dm = _dm(root, combined=False)
    mixed = dm.train_dataloader().sampler
    steps, n_l = mixed.steps, dm.num_labeled_samples
    ranks = [
        _MixedSampler(dm.train_dataset, mixed.labeled, mixed.unlabeled, 8, 24, num_replicas=2, rank=r) for r in (0, 1)
    ]
    for s in ranks:
        s.set_epoch(1)
    batches = [torch.tensor(list(s)).view(-1, 32) for s in ranks]
    assert len(batches[0]) == len(batches[1]) == math.ceil(steps / 2) == len(ranks[0]) // 32
    for b in batches:
        assert bool(((b < n_l).sum(1) == 8).all()) and bool((b[:, :8] < n_l).all())
    mixed.set_epoch(1)
    single = torch.tensor(list(mixed)).view(-1, 32)
    interleaved = torch.stack([batches[0], batches[1]], dim=1).flatten(0, 1)[:steps]
    assert torch.equal(interleaved, single)  # rank r gets batches r, r + 2, ... of the single-process stream


def _consume(loader: Any, k: int | None = None) -> list[tuple[list[int], list[int]]]:
    out = []
    for batch, _, _ in loader:
        out.append((batch["labeled"][2].tolist(), batch["unlabeled"][1].tolist()))
        if k is not None and len(out) == k:
            break
    return out


def test_mid_epoch_resume_of_the_iteration_order(root: str) -> None:
    def loader_at(epoch: int) -> CombinedLoader:
        dm = _dm(root, labels_per_class=2)
        loader = dm.train_dataloader()
        for dl in loader.flattened:
            dl.sampler.set_epoch(epoch)
        iter(loader)
        return loader

    full = _consume(loader_at(1))
    assert full != _consume(loader_at(0))  # a new order every epoch
    first = loader_at(1)
    head = _consume(first, 5)
    states = first._state_dicts()
    resumed = loader_at(1)
    resumed._load_state_dicts(states)  # the next iteration skips the consumed batches
    assert head + _consume(resumed) == full
    # The single-loader form resumes the same way.
    dm = _dm(root, combined=False)
    single = dm.train_dataloader()
    it = iter(single)
    head_single = [next(it)[2].tolist() for _ in range(3)]
    again = _dm(root, combined=False).train_dataloader()
    again.load_state_dict(single.state_dict())
    assert head_single + [b[2].tolist() for b in again] == [b[2].tolist() for b in dm.train_dataloader()]


class _Recorder(L.LightningModule):
    """Trains a linear layer on the labelled part and records the indices of every step."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(28 * 28, 10)
        self.steps: list[tuple[list[int], list[int]]] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y, i_l = batch["labeled"]
        _, i_u = batch["unlabeled"]
        self.steps.append((i_l.tolist(), i_u.tolist()))
        return torch.nn.functional.cross_entropy(self.layer(x.flatten(1)), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_trainer_resumes_mid_epoch_with_the_same_batches(root: str, tmp_path: Path) -> None:
    def run(ckpt: str | None = None, callbacks: list[Any] | None = None) -> _Recorder:
        model = _Recorder()
        kw = trainer_kwargs(max_epochs=2, enable_checkpointing=callbacks is not None, callbacks=callbacks or [])
        L.Trainer(**kw).fit(model, datamodule=_dm(root, labels_per_class=2, num_unlabeled=100), ckpt_path=ckpt)
        return model

    # 5 steps per epoch: the step-3 checkpoint falls mid-epoch 0, and the run continues through epoch 1.
    every3 = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1, filename="{step}")
    whole = run(callbacks=[every3])
    assert len(whole.steps) == 10
    tail = run(str(tmp_path / "step=3.ckpt"))
    assert tail.steps == whole.steps[3:]


def test_eval_loaders_and_describe(root: str) -> None:
    dm = _dm(root, val_size=10, test_subset=12)
    dm.setup("test")
    x, y = next(iter(dm.test_dataloader()))
    assert x.shape == (12, 1, 28, 28) and len(y) == 12
    info = dm.describe()
    assert info["labeled"] == 40 and info["unlabeled"] == N_TRAIN - 50 and info["val"] == 10
    assert dm.value_range == [0.0, 1.0]
    normalised = SemiSupervisedDataModule(root=root)
    assert normalised.value_range == pytest.approx([-0.2860 / 0.3530, (1 - 0.2860) / 0.3530])


def test_synthetic_variant() -> None:
    dm = SyntheticSemiSupervisedDataModule(num_train=200, num_classes=4, shape=[1, 8, 8], labels_per_class=5, mu=2)
    dm.setup("fit")
    assert dm.num_labeled_samples == 20 and dm.num_train_samples == 200
    assert torch.equal(dm.true_labels[:20].bincount(minlength=4), torch.full((4,), 5))  # type: ignore[index]
    loader = dm.train_dataloader()
    iter(loader)
    batch, _, _ = next(iter(loader))
    assert batch["labeled"][0].shape == (dm.batch_size, 1, 8, 8)
    assert batch["unlabeled"][0].shape == (2 * dm.batch_size, 1, 8, 8)


def test_bad_arguments(root: str) -> None:
    with pytest.raises(ValueError, match=r"Expected argument `labels_per_class` to be an int in \[1, inf\)"):
        SemiSupervisedDataModule(labels_per_class=0)
    with pytest.raises(ValueError, match=r"Expected argument `mu` to be an int in \[1, inf\)"):
        SemiSupervisedDataModule(mu=0)
    with pytest.raises(ValueError, match=r"Expected argument `num_unlabeled` to be an int in \[1, inf\)"):
        SemiSupervisedDataModule(num_unlabeled=0)
    with pytest.raises(ValueError, match=r"Expected argument `val_size` to be an int in \[0, inf\)"):
        SemiSupervisedDataModule(val_size=-1)
    with pytest.raises(TypeError, match="Expected argument `combined` to be a bool"):
        SemiSupervisedDataModule(combined="yes")  # type: ignore[arg-type]
    dm = SemiSupervisedDataModule(root=root, labels_per_class=40)
    with pytest.raises(ValueError, match="has only"):
        dm.setup("fit")
    tiny = SyntheticSemiSupervisedDataModule(num_classes=2, labels_per_class=10)
    tiny.load_split = lambda split: (torch.zeros(20, 1, 8, 8), torch.arange(20) % 2)  # type: ignore[method-assign]
    with pytest.raises(ValueError, match="leave no unlabeled samples"):
        tiny.setup("fit")
    with pytest.raises(ValueError, match="Expected argument `ignore_index` to be outside the class range"):
        SemiSupervisedDataModule(ignore_index=3)
    with pytest.raises(RuntimeError, match="setup"):
        SemiSupervisedDataModule(root=root).train_dataloader()


@pytest.mark.skipif(not have_fashion_mnist(), reason="Fashion-MNIST files not installed")
def test_real_fashion_mnist() -> None:
    from lightning_reg.data.fashion_mnist import load_fashion_mnist

    dm = SemiSupervisedDataModule(labels_per_class=10, val_size=1000, batch_size=16)
    dm.setup("fit")
    assert dm.num_labeled_samples == 100 and dm.num_unlabeled_samples == 60000 - 1100
    _, labels = load_fashion_mnist("train")
    assert torch.equal(dm.unlabeled_true_labels, labels[dm.unlabeled_indices])
    assert torch.equal(dm.true_labels[:100].bincount(minlength=10), torch.full((10,), 10))  # type: ignore[index]
    batch, _, _ = next(iter(dm.train_dataloader()))
    x_u, _ = batch["unlabeled"]
    assert x_u.shape == (112, 1, 28, 28) and abs(float(x_u.mean())) < 0.3  # standardised
    assert isinstance(dm.train_dataloader().flattened[0].sampler, EpochSeededSampler)
