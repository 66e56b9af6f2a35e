"""The built-in datamodules: IDX resolution order, noise options, subsets, indexed batches, errors."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import pytest
import torch

from lightning_reg.data import EpochSeededSampler, ResumableDataLoader
from lightning_reg.data import fashion_mnist as fm
from lightning_reg.data.datamodules import FashionMNISTDataModule, SyntheticDataModule
from lightning_reg.data.noise import FASHION_MNIST_ASYMMETRIC_MAP

N_TRAIN, N_TEST = 40, 20


def _write_idx(path: Path, data: torch.Tensor) -> None:
    header = struct.pack(">HBB", 0, 8, data.dim()) + struct.pack(">" + "I" * data.dim(), *data.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + bytes(data.to(torch.uint8).flatten().tolist()))


def _make_root(folder: Path, marker: int) -> Path:
    """Tiny Fashion-MNIST-shaped IDX files; every training pixel equals ``marker`` to tell folders apart."""
    folder.mkdir(parents=True, exist_ok=True)
    labels = torch.arange(N_TRAIN) % 10
    _write_idx(folder / "train-images-idx3-ubyte.gz", torch.full((N_TRAIN, 28, 28), marker))
    _write_idx(folder / "train-labels-idx1-ubyte.gz", labels)
    _write_idx(folder / "t10k-images-idx3-ubyte.gz", torch.full((N_TEST, 28, 28), marker))
    _write_idx(folder / "t10k-labels-idx1-ubyte.gz", torch.arange(N_TEST) % 10)
    return folder


@pytest.fixture
def places(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """Four candidate folders (explicit, env, Debian, cache), each with its own marker; env and cache wired up."""
    roots = {
        "root": _make_root(tmp_path / "explicit", 1),
        "env": _make_root(tmp_path / "env", 2),
        "debian": _make_root(tmp_path / "debian", 3),
        "cache": _make_root(tmp_path / "xdg" / "lightning_reg" / "fashion-mnist", 4),
    }
    monkeypatch.setenv(fm.ENV_VAR, str(roots["env"]))
    monkeypatch.setattr(fm, "DEBIAN_ROOT", roots["debian"])
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return roots


def _marker(root: str | None = None) -> int:
    images, _ = fm.load_fashion_mnist("train", root)
    return int(images[0, 0, 0])


def test_resolution_order(places: dict[str, Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert _marker(str(places["root"])) == 1  # 1. explicit root
    assert _marker() == 2  # 2. the environment variable
    monkeypatch.delenv(fm.ENV_VAR)
    assert _marker() == 3  # 3. Debian's folder
    monkeypatch.setattr(fm, "DEBIAN_ROOT", tmp_path / "nowhere")
    assert _marker() == 4  # 4. the cache
    # An incomplete folder is skipped, not half-used.
    (places["root"] / "t10k-labels-idx1-ubyte.gz").unlink()
    assert _marker(str(places["root"])) == 4


def test_datamodule_uses_root(places: dict[str, Path]) -> None:
    dm = FashionMNISTDataModule(root=str(places["root"]), normalize=False, batch_size=8)
    dm.prepare_data()
    dm.setup("fit")
    x, _y, _index = next(iter(dm.train_dataloader()))
    assert torch.allclose(x, torch.full_like(x, 1 / 255))
    assert x.shape == (8, 1, 28, 28)


def test_missing_files_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(fm.ENV_VAR, raising=False)
    monkeypatch.setattr(fm, "DEBIAN_ROOT", tmp_path / "no-debian")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "no-cache"))
    dm = FashionMNISTDataModule(root=str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError) as info:
        dm.prepare_data()
    msg = str(info.value)
    assert "apt-get install dataset-fashion-mnist" in msg and fm.ENV_VAR in msg and "download=True" in msg
    assert str(tmp_path / "empty") in msg

    def offline(*args: object, **kwargs: object) -> None:
        raise OSError("network unreachable")

    monkeypatch.setattr(fm.urllib.request, "urlopen", offline)
    with pytest.raises(FileNotFoundError, match="The download failed: network unreachable"):
        FashionMNISTDataModule(root=str(tmp_path / "empty"), download=True).prepare_data()


def test_noise_keeps_true_labels_and_mask(places: dict[str, Path]) -> None:
    dm = FashionMNISTDataModule(root=str(places["root"]), noise_rate=0.4, noise_seed=3)
    dm.setup("fit")
    assert dm.noise_mask is not None and dm.true_labels is not None and dm.given_labels is not None
    assert int(dm.noise_mask.sum()) == round(0.4 * N_TRAIN)  # exactly the rate, as in the ELR protocol
    assert torch.equal(dm.noise_mask, dm.given_labels != dm.true_labels)
    # The training set carries the noisy labels; the true ones stay for diagnostics.
    assert torch.equal(dm.train_dataset.dataset.tensors[1], dm.given_labels)  # type: ignore[union-attr]
    # Same noise seed, same noise; another seed, other noise.
    again = FashionMNISTDataModule(root=str(places["root"]), noise_rate=0.4, noise_seed=3)
    again.setup("fit")
    assert torch.equal(again.given_labels, dm.given_labels)  # type: ignore[arg-type]
    other = FashionMNISTDataModule(root=str(places["root"]), noise_rate=0.4, noise_seed=4)
    other.setup("fit")
    assert not torch.equal(other.noise_mask, dm.noise_mask)  # type: ignore[arg-type]
    # No noise: the mask is all False and the labels are the true ones.
    clean = FashionMNISTDataModule(root=str(places["root"]))
    clean.setup("fit")
    assert not clean.noise_mask.any() and not clean.has_noise  # type: ignore[union-attr]


def test_asymmetric_noise_follows_the_class_map(places: dict[str, Path]) -> None:
    dm = FashionMNISTDataModule(root=str(places["root"]), noise_type="asymmetric", noise_rate=0.5)
    dm.setup("fit")
    assert dm.noise_mask is not None and dm.noise_mask.any()
    for true, given in zip(dm.true_labels[dm.noise_mask].tolist(), dm.given_labels[dm.noise_mask].tolist()):  # type: ignore[index]
        assert FASHION_MNIST_ASYMMETRIC_MAP[true] == given


def test_subset_split_and_indexed_batches(places: dict[str, Path]) -> None:
    dm = FashionMNISTDataModule(
        root=str(places["root"]), train_subset=30, val_split=0.2, noise_rate=0.5, batch_size=7, test_subset=5
    )
    dm.setup("fit")
    dm.setup("test")
    assert len(dm.train_dataset) == 24 and len(dm.val_dataset) == 6  # type: ignore[arg-type]
    assert len(dm.given_labels) == 24 and len(dm.noise_mask) == 24  # type: ignore[arg-type]
    assert len(dm.test_dataset) == 5  # type: ignore[arg-type]
    loader = dm.train_dataloader()
    assert isinstance(loader, ResumableDataLoader) and isinstance(loader.sampler, EpochSeededSampler)
    seen = []
    for _x, y, index in loader:
        assert torch.equal(y, dm.given_labels[index])  # type: ignore[index]
        seen += index.tolist()
    assert sorted(seen) == list(range(24))  # every training sample once per epoch, by its index
    val_batch = next(iter(dm.val_dataloader()))
    assert len(val_batch) == 2  # validation and test batches are (x, y)
    # The subset and the split depend on `seed` only.
    again = FashionMNISTDataModule(root=str(places["root"]), train_subset=30, val_split=0.2, noise_rate=0.5)
    again.setup("fit")
    assert torch.equal(again.true_labels, dm.true_labels)  # type: ignore[arg-type]


def test_bad_arguments(places: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match=r"Expected argument `val_split` to be a float in \[0, 1\)"):
        FashionMNISTDataModule(val_split=1.0)
    with pytest.raises(ValueError, match=r"Expected argument `noise_rate` to be a float in \[0, 1\]"):
        FashionMNISTDataModule(noise_rate=1.5)
    with pytest.raises(ValueError, match="Expected argument `noise_type`"):
        FashionMNISTDataModule(noise_type="uniform")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="Expected argument `batch_size`"):
        FashionMNISTDataModule(batch_size=1.5)  # type: ignore[arg-type]
    dm = FashionMNISTDataModule(root=str(places["root"]), train_subset=N_TRAIN + 1)
    with pytest.raises(ValueError, match="`train_subset` to be at most the training-set size 40"):
        dm.setup("fit")


def test_real_fashion_mnist_if_installed() -> None:
    try:
        fm.resolve_fashion_mnist_root()
    except FileNotFoundError:
        pytest.skip("Fashion-MNIST files not installed")
    dm = FashionMNISTDataModule(train_subset=2000, noise_rate=0.4, batch_size=100)
    dm.setup("fit")
    x, _y, _index = next(iter(dm.train_dataloader()))
    assert x.shape == (100, 1, 28, 28) and x.dtype == torch.float32
    full = dm.train_dataset.dataset.tensors[0]  # type: ignore[union-attr]
    assert abs(float(full.mean())) < 0.1 and abs(float(full.std()) - 1.0) < 0.1  # standardised
    assert int(dm.noise_mask.sum()) == 800  # type: ignore[union-attr]


def test_synthetic_datamodule() -> None:
    dm = SyntheticDataModule(num_train=50, num_test=10, num_classes=4, shape=[1, 8, 8], noise_rate=0.2)
    dm.setup("fit")
    dm.setup("test")
    x, y, _index = next(iter(dm.train_dataloader()))
    assert x.shape[1:] == (1, 8, 8) and int(y.max()) < 4
    assert int(dm.noise_mask.sum()) == 10  # type: ignore[union-attr]
    again = SyntheticDataModule(num_train=50, num_test=10, num_classes=4, shape=[1, 8, 8], noise_rate=0.2)
    again.setup("fit")
    assert torch.equal(again.train_dataset.dataset.tensors[0], dm.train_dataset.dataset.tensors[0])  # type: ignore[union-attr]


def test_validation_uses_the_true_labels_by_default(places: dict[str, Path]) -> None:
    """`val/acc` measures against clean labels: the validation split keeps its true labels (issue 15)."""
    args = dict(root=str(places["root"]), train_subset=30, val_split=0.4, noise_rate=0.5, noise_seed=1)
    dm = FashionMNISTDataModule(**args)  # type: ignore[arg-type]
    dm.setup("fit")
    clean = FashionMNISTDataModule(**{**args, "noise_rate": 0.0})  # type: ignore[arg-type]
    clean.setup("fit")
    val_y = dm.val_dataset.tensors[1]  # type: ignore[union-attr]
    assert torch.equal(val_y, clean.val_dataset.tensors[1])  # type: ignore[union-attr]
    assert torch.equal(val_y, dm.val_true_labels) and (dm.val_given_labels != dm.val_true_labels).any()  # type: ignore[operator]
    # `val_labels="given"` validates on the noisy labels, as a real validation set would carry them.
    given = FashionMNISTDataModule(**args, val_labels="given")  # type: ignore[arg-type]
    given.setup("fit")
    assert torch.equal(given.val_dataset.tensors[1], dm.val_given_labels)  # type: ignore[union-attr,arg-type]
    with pytest.raises(ValueError, match=r"Expected argument `val_labels` to be one of \['clean', 'given'\]"):
        FashionMNISTDataModule(val_labels="noisy")  # type: ignore[arg-type]
    syn = SyntheticDataModule(
        num_train=40, num_test=8, shape=[1, 4, 4], val_split=0.5, noise_rate=0.5, val_labels="given"
    )
    syn.setup("fit")
    assert torch.equal(syn.val_dataset.tensors[1], syn.val_given_labels)  # type: ignore[union-attr,arg-type]
