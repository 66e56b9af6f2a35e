"""Noisy-mask segmentation: scene composition, mask noise, the datamodule, SmallUNet and the recipe."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from lightning_reg.data import EpochSeededSampler, IndexedDataset, ResumableDataLoader
from lightning_reg.data.segmentation import (
    SCENE_CLASSES,
    FashionMNISTScenes,
    SegmentationDataModule,
    boundary_band,
    morph_object_masks,
    paint_objects,
    sample_mask_noise,
)
from lightning_reg.models import SmallUNet
from tests.helpers import have_fashion_mnist

ROOT = Path(__file__).resolve().parents[1]
needs_data = pytest.mark.skipif(not have_fashion_mnist(), reason="Fashion-MNIST IDX files not installed")


def _garments(n: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic 28×28 'garments': filled rectangles of varying size and brightness, 10 classes."""
    g = torch.Generator().manual_seed(0)
    images = torch.zeros(n, 28, 28, dtype=torch.uint8)
    for i in range(n):  # test data only
        h, w = (int(v) for v in torch.randint(6, 20, (2,), generator=g))
        images[i, 14 - h // 2 : 14 - h // 2 + h, 14 - w // 2 : 14 - w // 2 + w] = 100 + 10 * (i % 10)
    return images, torch.arange(n) % 10


def _scenes(**kwargs: Any) -> FashionMNISTScenes:
    args: dict[str, Any] = {"num_scenes": 300, "garments": _garments(), "normalize": False}
    args.update(kwargs)
    return FashionMNISTScenes(**args)


# -- functional core ------------------------------------------------------------------------------------
def test_paint_objects_puts_later_objects_on_top() -> None:
    f = torch.zeros(2, 3, 4, 4, dtype=torch.bool)
    f[0, 0, :2, :2] = True
    f[0, 2, 1:3, 1:3] = True  # overlaps object 0 at (1, 1)
    f[1, 1] = True
    classes = torch.tensor([[0, 5, 9], [3, 4, 7]])
    out = paint_objects(f, classes)
    assert out.dtype == torch.long and out.shape == (2, 4, 4)
    assert out[0, 0, 0] == 1 and out[0, 1, 1] == 10 and out[0, 2, 2] == 10 and out[0, 3, 3] == 0
    assert (out[1] == 5).all()


def _naive_morph(mask: torch.Tensor, r: int) -> torch.Tensor:
    """Dilation (r > 0) / erosion (r < 0) by a (2|r|+1)² square, pixel by pixel (pixels outside are ignored)."""
    h, w = mask.shape
    out = torch.zeros_like(mask)
    k = abs(r)
    for i, j in itertools.product(range(h), range(w)):
        window = mask[max(i - k, 0) : i + k + 1, max(j - k, 0) : j + k + 1]
        out[i, j] = window.any() if r > 0 else window.all()
    return out


def test_morph_object_masks_matches_a_naive_reference() -> None:
    g = torch.Generator().manual_seed(1)
    f = torch.rand(3, 4, 9, 9, generator=g) > 0.6
    radius = torch.tensor([[0, 1, -1, 2], [-2, 0, 1, -1], [2, 2, -2, 0]])
    out = morph_object_masks(f, radius)
    for n, k in itertools.product(range(3), range(4)):
        r = int(radius[n, k])
        expected = f[n, k] if r == 0 else _naive_morph(f[n, k], r)
        assert torch.equal(out[n, k], expected), (n, k, r)
    assert torch.equal(morph_object_masks(f, torch.zeros(3, 4, dtype=torch.long)), f)


def test_sample_mask_noise_rates_and_flips_to_another_class() -> None:
    n, k = 4000, 4
    classes = torch.randint(0, 10, (n, k), generator=torch.Generator().manual_seed(0))
    active = torch.arange(k) < torch.randint(1, k + 1, (n, 1), generator=torch.Generator().manual_seed(1))
    given, radius = sample_mask_noise(
        classes, active, 10, flip_rate=0.3, boundary_rate=0.2, max_radius=3, generator=torch.Generator().manual_seed(2)
    )
    flipped = given != classes
    assert not flipped[~active].any() and not radius[~active].any()  # empty slots are never touched
    assert abs(float(flipped[active].float().mean()) - 0.3) < 0.02
    assert abs(float((radius[active] != 0).float().mean()) - 0.2) < 0.02
    assert set(radius.unique().tolist()) == {-3, -2, -1, 0, 1, 2, 3}
    # A flip never keeps the class, and every other class is reached.
    assert set(given[flipped].tolist()) == set(range(10))
    assert abs(float((radius[radius != 0] > 0).float().mean()) - 0.5) < 0.05  # dilation and erosion alike
    with pytest.raises(ValueError, match=r"Expected argument `flip_rate` to be a float in \[0, 1\]"):
        sample_mask_noise(classes, active, 10, flip_rate=1.5, boundary_rate=0.0)


def test_boundary_band_is_the_object_side_of_edges() -> None:
    masks = torch.zeros(1, 6, 6, dtype=torch.long)
    masks[0, 1:5, 1:5] = 3
    band = boundary_band(masks)
    assert band.sum() == 12  # the 4×4 object's outer ring; its 2×2 inside and the background are kept
    assert not band[0, 2:4, 2:4].any() and not band[masks == 0].any()


# -- scenes ---------------------------------------------------------------------------------------------
def test_scenes_shapes_ranges_and_foreground() -> None:
    s = _scenes(size=40, min_objects=2, max_objects=3, threshold=0.2)
    assert s.images.shape == (300, 1, 40, 40) and s.images.dtype == torch.float32
    assert s.true_masks.shape == s.given_masks.shape == (300, 40, 40)
    assert s.true_masks.dtype == s.given_masks.dtype == torch.long
    assert int(s.true_masks.min()) >= 0 and int(s.true_masks.max()) < len(SCENE_CLASSES) == s.num_classes == 11
    assert len(s) == 300
    x, mask = s[5]
    assert x.shape == (1, 40, 40) and mask.shape == (40, 40)
    # The labelled pixels are exactly the pixels above the threshold (normalize=False keeps [0, 1]).
    assert torch.equal(s.true_masks > 0, (s.images[:, 0] * 255).round() > round(0.2 * 255))
    counts = (s.object_classes >= 0).sum(1)
    assert int(counts.min()) == 2 and int(counts.max()) == 3
    # Each scene's labels are among its objects' classes (+ 1) and the background.
    for i in range(20):
        present = set(s.true_masks[i].unique().tolist()) - {0}
        assert present <= {c + 1 for c in s.object_classes[i].tolist() if c >= 0}


def test_scenes_are_deterministic_and_noise_has_its_own_seed() -> None:
    a, b = _scenes(noise_rate=0.3, seed=3), _scenes(noise_rate=0.3, seed=3)
    assert torch.equal(a.images, b.images) and torch.equal(a.given_masks, b.given_masks)
    other = _scenes(noise_rate=0.3, seed=4)
    assert not torch.equal(other.images, a.images)
    renoised = _scenes(noise_rate=0.3, seed=3, noise_seed=1)
    assert torch.equal(renoised.images, a.images) and torch.equal(renoised.true_masks, a.true_masks)
    assert not torch.equal(renoised.given_masks, a.given_masks)
    clean = _scenes(seed=3)
    assert torch.equal(clean.true_masks, a.true_masks)  # the noise never changes the scenes
    assert torch.equal(clean.given_masks, clean.true_masks) and clean.pixel_noise_rate == 0.0


def test_noise_kinds_and_measured_pixel_rate() -> None:
    noisy = _scenes(noise_rate=0.4, num_scenes=600)
    active = noisy.object_classes >= 0
    flips = (noisy.given_object_classes != noisy.object_classes)[active].float().mean()
    assert abs(float(flips) - 0.4) < 0.04
    assert noisy.pixel_noise_rate == pytest.approx(float((noisy.given_masks != noisy.true_masks).float().mean()))
    assert torch.equal(noisy.noisy_pixels, noisy.given_masks != noisy.true_masks)
    assert 0.02 < noisy.pixel_noise_rate < 0.4
    # Class flips only: the labelled region is unchanged; only classes differ.
    flips_only = _scenes(flip_rate=0.5, boundary_rate=0.0)
    assert torch.equal(flips_only.given_masks > 0, flips_only.true_masks > 0)
    assert flips_only.pixel_noise_rate > 0
    # Boundary errors only: classes unchanged, but the labelled region grows or shrinks.
    bounds = _scenes(flip_rate=0.0, boundary_rate=0.5)
    assert torch.equal(bounds.given_object_classes, bounds.object_classes)
    changed = bounds.given_masks != bounds.true_masks
    assert changed.any() and ((bounds.given_masks == 0) | (bounds.true_masks == 0))[changed].float().mean() > 0.5
    # More noise, more wrong pixels.
    assert _scenes(noise_rate=0.1).pixel_noise_rate < _scenes(noise_rate=0.4).pixel_noise_rate


def test_ignore_boundary_marks_a_void_band() -> None:
    s = _scenes(noise_rate=0.2, ignore_boundary=True, ignore_index=255 + 1)
    void = s.given_masks == 256
    assert void.any() and not (s.true_masks == 256).any()  # the clean masks keep every label
    assert 0.01 < float(void.float().mean()) < 0.3
    assert not s.noisy_pixels[void].any()
    assert torch.equal(s.given_masks[~void] > 0, (s.given_masks > 0)[~void])
    with pytest.raises(ValueError, match="Expected argument `ignore_index` to be outside the labels"):
        _scenes(ignore_index=3)


def test_scene_bad_arguments() -> None:
    with pytest.raises(ValueError, match="Expected argument `size`"):
        _scenes(size=20)
    with pytest.raises(ValueError, match="Expected argument `max_objects`"):
        _scenes(min_objects=3, max_objects=2)
    with pytest.raises(ValueError, match="Expected argument `noise_rate`"):
        _scenes(noise_rate=1.5)
    with pytest.raises(ValueError, match="Expected argument `split`"):
        _scenes(split="val")
    with pytest.raises(ValueError, match="Expected argument `garments`"):
        FashionMNISTScenes(garments=(torch.zeros(3, 10, 10, dtype=torch.uint8), torch.zeros(3)))


@needs_data
def test_real_garments_offline() -> None:
    s = FashionMNISTScenes(num_scenes=200, noise_rate=0.3, seed=0)
    assert s.images.shape == (200, 1, 48, 48)
    labelled = s.true_masks > 0
    assert 0.1 < float(labelled.float().mean()) < 0.6
    assert len(s.true_masks.unique()) == 11  # background and all ten garment classes
    assert 0.0 < s.pixel_noise_rate < 0.3


# -- datamodule -----------------------------------------------------------------------------------------
def _dm(**kwargs: Any) -> SegmentationDataModule:
    args: dict[str, Any] = {"num_train": 60, "num_val": 20, "num_test": 30, "batch_size": 16, "noise_rate": 0.3}
    args.update(kwargs)
    return SegmentationDataModule(**args)


@needs_data
def test_datamodule_batches_and_indices() -> None:
    dm = _dm()
    dm.prepare_data()
    dm.setup("fit")
    dm.setup("test")
    loader = dm.train_dataloader()
    assert isinstance(loader, ResumableDataLoader) and isinstance(loader.sampler, EpochSeededSampler)
    assert isinstance(dm.train_dataset, IndexedDataset)
    assert dm.given_masks is not None and dm.true_masks is not None and dm.pixel_noise_rate is not None
    seen = []
    for x, mask, index in loader:
        assert x.shape[1:] == (1, 48, 48) and x.dtype == torch.float32
        assert mask.shape == (len(x), 48, 48) and mask.dtype == torch.long
        assert torch.equal(mask, dm.given_masks[index])
        seen += index.tolist()
    assert sorted(seen) == list(range(60))  # each scene once per epoch, by its index
    assert 0.0 < dm.pixel_noise_rate < 0.5
    assert dm.pixel_noise_rate == pytest.approx(float((dm.given_masks != dm.true_masks).float().mean()))
    # Validation and test: (x, mask) with clean masks.
    for ds, n in ((dm.val_dataset, 20), (dm.test_dataset, 30)):
        assert ds is not None and len(ds) == n and torch.equal(ds.given_masks, ds.true_masks)
    x, mask = next(iter(dm.val_dataloader()))
    assert x.shape == (20, 1, 48, 48) and mask.shape == (20, 48, 48)
    assert len(next(iter(dm.test_dataloader()))) == 2
    assert dm.describe()["train"] == 60 and "pixel_noise" in dm.describe()


@needs_data
def test_datamodule_is_deterministic_and_splits_differ() -> None:
    a, b = _dm(seed=1), _dm(seed=1)
    for dm in (a, b):
        dm.setup("fit")
        dm.setup("test")
    assert torch.equal(a.given_masks, b.given_masks)  # type: ignore[arg-type]
    assert torch.equal(a.test_dataset.images, b.test_dataset.images)  # type: ignore[union-attr]
    # The three splits are different scenes.
    assert not torch.equal(a.train_scenes.images[:20], a.val_dataset.images)  # type: ignore[union-attr]
    assert not torch.equal(a.val_dataset.images[:20], a.test_dataset.images[:20])  # type: ignore[union-attr]
    # The same shuffle as an uninterrupted epoch (resume relies on it).
    order = [i.tolist() for _, _, i in a.train_dataloader()]
    assert order == [i.tolist() for _, _, i in b.train_dataloader()]


@needs_data
def test_datamodule_ignore_boundary_and_no_val() -> None:
    dm = _dm(ignore_boundary=True, num_val=0)
    dm.setup("fit")
    dm.setup("test")
    assert dm.val_dataset is None and dm.val_dataloader() == []
    assert (dm.given_masks == -100).any()  # type: ignore[operator]
    assert (dm.test_dataset.given_masks == -100).any()  # type: ignore[union-attr]
    with pytest.raises(RuntimeError, match=r"call `setup\('fit'\)` first"):
        _dm().train_dataloader()
    with pytest.raises(ValueError, match="Expected argument `num_train`"):
        _dm(num_train=0)


# -- model ----------------------------------------------------------------------------------------------
def test_small_unet_forward_shapes() -> None:
    model = SmallUNet(num_classes=11, channels=[4, 8, 16])
    assert model(torch.zeros(2, 1, 48, 48)).shape == (2, 11, 48, 48)
    assert model(torch.zeros(2, 1, 30, 30)).shape == (2, 11, 30, 30)  # sizes not divisible by 4 work too
    assert SmallUNet(num_classes=3, in_channels=3, channels=[4, 8, 8])(torch.zeros(1, 3, 16, 20)).shape == (
        1,
        3,
        16,
        20,
    )
    assert SmallUNet(channels=[4, 8, 8, 16])(torch.zeros(1, 1, 48, 48)).shape == (1, 11, 48, 48)  # four levels
    assert SmallUNet(channels=[4, 8])(torch.zeros(1, 1, 9, 9)).shape == (1, 11, 9, 9)
    with pytest.raises(ValueError, match="Expected argument `channels` to be a list of at least 2 widths"):
        SmallUNet(channels=[4])
    with pytest.raises(ValueError, match="Expected argument `ignore_index` to be outside the labels"):
        SmallUNet(ignore_index=0)


class _TinyScenes(L.LightningDataModule):
    """Tiny segmentation data without Fashion-MNIST (synthetic garments), with a void band."""

    def __init__(self) -> None:
        super().__init__()
        self.train = FashionMNISTScenes(num_scenes=16, size=32, garments=_garments(), noise_rate=0.3)
        self.test = FashionMNISTScenes(num_scenes=8, size=32, garments=_garments(), seed=1, ignore_boundary=True)

    def train_dataloader(self) -> Any:
        ds = IndexedDataset(self.train)
        return ResumableDataLoader(ds, batch_size=8, sampler=EpochSeededSampler(ds))

    def val_dataloader(self) -> Any:
        return torch.utils.data.DataLoader(self.test, batch_size=4)

    test_dataloader = val_dataloader


def _trainer(**kwargs: Any) -> L.Trainer:
    args: dict[str, Any] = {
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "accelerator": "cpu",
    }
    args.update(kwargs)
    return L.Trainer(**args)


def test_validation_and_test_log_miou_and_pixel_accuracy() -> None:
    torch.manual_seed(0)
    model = SmallUNet(channels=[4, 8, 8])
    dm = _TinyScenes()
    val = _trainer(fast_dev_run=True).validate(model, datamodule=dm, verbose=False)[0]
    assert {"val/mIoU", "val/pixel_acc", "val/loss"} <= set(val)
    test = _trainer(fast_dev_run=True).test(model, datamodule=dm, verbose=False)[0]
    assert {"test/mIoU", "test/pixel_acc", "test/loss", "test/ece"} <= set(test)
    # The logged values equal the metrics computed directly on the batch, void pixels left out.
    model.eval()
    x, y = next(iter(dm.val_dataloader()))
    with torch.no_grad():
        logits = model(x)
    valid = y != -100
    assert not valid.all()
    pred = logits.argmax(1)
    assert val["val/pixel_acc"] == pytest.approx(float((pred == y)[valid].float().mean()), abs=1e-6)
    assert val["val/loss"] == pytest.approx(float(F.cross_entropy(logits, y, ignore_index=-100)), rel=1e-5)
    ious = []
    for c in range(11):
        p, t = (pred == c) & valid, (y == c) & valid
        union = int((p | t).sum())
        if union:
            ious.append(int((p & t).sum()) / union)
    assert val["val/mIoU"] == pytest.approx(sum(ious) / len(ious), abs=1e-5)


def test_small_unet_trains_through_the_regularized_pipeline() -> None:
    """The mixin's training_step on (B, C, H, W) logits and (B, H, W) masks (dense support in core)."""
    from lightning_reg import EMATeacher

    torch.manual_seed(0)
    model = SmallUNet(channels=[4, 8, 8], lr=0.01, optimizer="adamw")
    before = [p.detach().clone() for p in model.parameters()]
    trainer = _trainer(fast_dev_run=2, callbacks=[EMATeacher(decay=0.99)])
    trainer.fit(model, datamodule=_TinyScenes())
    assert trainer.global_step == 2
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert "val/mIoU" in trainer.callback_metrics


# -- the recipe -----------------------------------------------------------------------------------------
@needs_data
def test_recipe_fast_dev_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_reg.cli import cli_main

    monkeypatch.chdir(tmp_path)
    config = ROOT / "configs" / "noisy_segmentation.yaml"
    cli = cli_main(
        [
            "fit",
            "--config",
            str(config),
            "--trainer.fast_dev_run=2",
            "--data.init_args.num_train=64",
            "--data.init_args.num_val=32",
            "--data.init_args.num_test=32",
        ]
    )
    assert cli.trainer.state.finished and cli.trainer.global_step == 2
    assert isinstance(cli.model, SmallUNet) and isinstance(cli.datamodule, SegmentationDataModule)
    report = next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "ResultsReport")
    results = report.results
    assert 0.0 <= results["test_mIoU"] <= 1.0 and 0.0 <= results["test_mIoU_ema"] <= 1.0
    assert 0.0 <= results["test_pixel_acc"] <= 1.0
