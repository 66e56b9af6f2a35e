"""Batched tensor augmentations: shape, device, dtype, determinism under a seed, semantics, YAML and pickling."""

from __future__ import annotations

import math
import pickle
from collections.abc import Callable

import pytest
import torch

from lightning_reg.augment import (
    Augmentation,
    Compose,
    GaussianNoise,
    MultiScale,
    PatchMask,
    RandomFlip,
    RandomResizedCrop,
    get_augmentation,
)

DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
    ),
]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]

#: name -> (factory, input shape); every one is random, so two seeds must give two different views.
AUGS: dict[str, tuple[Callable[[], Augmentation], tuple[int, ...]]] = {
    "noise": (lambda: GaussianNoise(std=0.5), (6, 3, 8, 8)),
    "noise_tabular": (lambda: GaussianNoise(std=0.5), (6, 10)),
    "patch_mask_image": (lambda: PatchMask(patch_size=2, mask_ratio=0.5), (6, 3, 8, 8)),
    "patch_mask_sequence": (lambda: PatchMask(patch_size=3, mask_ratio=0.5), (6, 2, 20)),
    "patch_mask_tabular": (lambda: PatchMask(patch_size=2, mask_ratio=0.5), (6, 12)),
    "flip": (lambda: RandomFlip(p=0.5, dims=[-1, -2]), (6, 3, 8, 8)),
    "resized_crop": (lambda: RandomResizedCrop(scale=[0.3, 1.0]), (6, 3, 8, 8)),
    "compose": (lambda: Compose([RandomFlip(), PatchMask(patch_size=2), GaussianNoise(0.1)]), (6, 3, 8, 8)),
}


def _input(shape: tuple[int, ...], dtype: torch.dtype = torch.float32, device: str = "cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(123)
    return torch.randn(shape, generator=g).to(device=device, dtype=dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("name", sorted(AUGS))
def test_shape_device_dtype(name: str, dtype: torch.dtype, device: str) -> None:
    factory, shape = AUGS[name]
    x = _input(shape, dtype, device)
    torch.manual_seed(0)
    out = factory()(x)
    assert out.shape == x.shape
    assert out.dtype == dtype
    assert out.device == x.device
    assert torch.isfinite(out.float()).all()


@pytest.mark.parametrize("name", sorted(AUGS))
def test_deterministic_under_a_seed(name: str) -> None:
    factory, shape = AUGS[name]
    aug, x = factory(), _input(shape)
    torch.manual_seed(7)
    a = aug(x)
    torch.manual_seed(7)
    b = aug(x)
    torch.manual_seed(8)
    c = aug(x)
    assert torch.equal(a, b)
    assert not torch.equal(a, c), "a different seed should give a different view"
    # An explicit generator gives the same view as the global RNG with the same seed, and leaves the latter alone.
    torch.manual_seed(99)
    before = torch.get_rng_state()
    d = aug(x, torch.Generator().manual_seed(7))
    assert torch.equal(d, a)
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_multiscale_views_shape_dtype_and_determinism(dtype: torch.dtype) -> None:
    x = _input((4, 3, 10, 10), dtype)
    ms = MultiScale()  # ADELE's {0.7, 1, 1.5}
    views = ms.views(x)
    assert [tuple(v.shape) for v in views] == [(4, 3, 7, 7), (4, 3, 10, 10), (4, 3, 15, 15)]
    assert all(v.dtype == dtype and v.device == x.device for v in views)
    assert views[1] is x  # the scale-1 view is the input itself (its forward pass can be reused)
    again = ms.views(x)
    assert all(torch.equal(a, b) for a, b in zip(views, again))  # no randomness in the views
    kept = MultiScale(keep_size=True).views(x)
    assert all(v.shape == x.shape and v.dtype == dtype for v in kept)
    # Downscaling then upscaling back loses detail: the 0.7 view is not the input.
    assert not torch.equal(kept[0], x)
    # One random scale per call, deterministic under a seed.
    torch.manual_seed(3)
    a = ms(x)
    torch.manual_seed(3)
    assert torch.equal(a, ms(x))
    shapes = set()
    for s in range(20):
        torch.manual_seed(s)
        shapes.add(tuple(ms(x).shape))
    assert shapes == {(4, 3, 7, 7), (4, 3, 10, 10), (4, 3, 15, 15)}


def test_multiscale_values_match_interpolate_and_weights() -> None:
    x = _input((2, 1, 6, 6))
    ms = MultiScale(scales=[0.5, 2.0], weights=[1.0, 3.0])
    small, big = ms.views(x)
    torch.testing.assert_close(
        small, torch.nn.functional.interpolate(x, scale_factor=0.5, mode="bilinear", align_corners=False)
    )
    assert big.shape == (2, 1, 12, 12)
    assert ms.view_weights() == [0.25, 0.75]
    seq = MultiScale(scales=[0.5, 1.0]).views(_input((2, 3, 8)))  # 1-D signals use linear interpolation
    assert [tuple(v.shape) for v in seq] == [(2, 3, 4), (2, 3, 8)]
    with pytest.raises(ValueError, match=r"expects a batch of shape \(B, C, L\) or \(B, C, H, W\)"):
        ms.views(_input((2, 5)))


def test_gaussian_noise_statistics() -> None:
    x = torch.full((64, 1000), 3.0)
    torch.manual_seed(0)
    out = GaussianNoise(std=0.2)(x)
    noise = out - x
    assert abs(float(noise.mean())) < 0.01
    assert abs(float(noise.std()) - 0.2) < 0.005


def test_patch_mask_patches_channels_and_ratio() -> None:
    x = torch.ones(200, 3, 16, 16)
    torch.manual_seed(0)
    out = PatchMask(patch_size=4, mask_ratio=0.3, fill=-1.0)(x)
    assert set(out.unique().tolist()) == {-1.0, 1.0}
    # Constant within every 4x4 patch and shared by the channels.
    patches = out.unfold(2, 4, 4).unfold(3, 4, 4)  # (B, C, 4, 4, 4, 4)
    assert (patches.amax(dim=(-1, -2)) == patches.amin(dim=(-1, -2))).all()
    assert (out == out[:, :1]).all()
    masked = float((out[:, 0] == -1.0).float().mean())
    assert abs(masked - 0.3) < 0.02
    # Ragged edges: a 10x10 image with 4-px patches still masks whole (cropped) patches.
    torch.manual_seed(1)
    ragged = PatchMask(patch_size=4, mask_ratio=0.5)(torch.ones(50, 1, 10, 10))
    assert ragged.shape == (50, 1, 10, 10)
    assert (ragged[:, :, 8:, 8:] == ragged[:, :, 8:9, 8:9]).all()
    # mask_ratio=0 keeps everything; the automatic patch size is MIC's 32/224 of the shorter side.
    assert torch.equal(PatchMask(mask_ratio=0.0)(x), x)
    assert PatchMask()._patch((224, 224)) == 32 and PatchMask()._patch((8, 8)) == 1


def test_random_flip_semantics() -> None:
    x = _input((100, 2, 4, 5))
    assert torch.equal(RandomFlip(p=0.0)(x), x)
    assert torch.equal(RandomFlip(p=1.0)(x), x.flip(-1))
    assert torch.equal(RandomFlip(p=1.0, dims=[2, 3])(x), x.flip(2).flip(3))
    torch.manual_seed(0)
    out = RandomFlip(p=0.5)(x)
    same = (out == x).flatten(1).all(1)
    flipped = (out == x.flip(-1)).flatten(1).all(1)
    assert bool((same | flipped).all())  # each sample is either untouched or flipped whole
    assert 30 < int(flipped.sum()) < 70
    with pytest.raises(ValueError, match="cannot flip dimension 5"):
        RandomFlip(dims=[5])(x)


def test_random_resized_crop_semantics() -> None:
    # Coordinate images: channel 0 holds the column, channel 1 the row. With nearest sampling each output
    # pixel copies one input pixel, so the crop's extent can be read off the output.
    b, h, w = 256, 32, 32
    cols = torch.arange(w, dtype=torch.float32).expand(h, w)
    rows = torch.arange(h, dtype=torch.float32).unsqueeze(1).expand(h, w)
    x = torch.stack([cols, rows]).expand(b, 2, h, w).contiguous()
    torch.manual_seed(0)
    out = RandomResizedCrop(scale=[0.25, 0.5], ratio=[0.5, 2.0], mode="nearest")(x)
    # Axis-aligned: columns constant down each output column, rows constant along each output row.
    assert (out[:, 0] == out[:, 0, :1]).all() and (out[:, 1] == out[:, 1, :, :1]).all()
    width = out[:, 0].amax((1, 2)) - out[:, 0].amin((1, 2)) + 1
    height = out[:, 1].amax((1, 2)) - out[:, 1].amin((1, 2)) + 1
    area = width * height / (h * w)
    assert float(area.min()) > 0.25 * 0.8 and float(area.max()) < 0.5 * 1.25  # pixel rounding
    ratio = width / height
    assert float(ratio.min()) > 0.5 * 0.8 and float(ratio.max()) < 2.0 * 1.25
    assert len({(float(a), float(r)) for a, r in zip(area, ratio)}) > 50  # per-sample crops, not one per batch
    # The full-image crop is the identity (bilinear).
    torch.testing.assert_close(RandomResizedCrop(scale=[1.0, 1.0], ratio=[1.0, 1.0])(x), x)


def test_compose_order_views_and_weights() -> None:
    x = _input((2, 1, 4, 4))
    torch.manual_seed(0)
    composed = Compose([RandomFlip(p=1.0), GaussianNoise(0.0)])(x)
    assert torch.equal(composed, x.flip(-1))
    aug = Compose([RandomFlip(p=1.0), MultiScale(scales=[1.0, 0.5], weights=[3.0, 1.0])])
    assert aug.num_views == 2
    views = aug.views(x)
    assert [tuple(v.shape) for v in views] == [(2, 1, 4, 4), (2, 1, 2, 2)]
    assert torch.equal(views[0], x.flip(-1))
    assert aug.view_weights() == [0.75, 0.25]
    assert Compose().num_views == 1 and torch.equal(Compose()(x), x)


def test_pickle_equality_and_names() -> None:
    for factory, _ in AUGS.values():
        aug = factory()
        clone = pickle.loads(pickle.dumps(aug))
        assert clone == aug and repr(clone) == repr(aug)
    assert MultiScale() == pickle.loads(pickle.dumps(MultiScale()))
    assert get_augmentation("patch_mask") == PatchMask()
    assert get_augmentation("multiscale") == MultiScale(scales=[0.7, 1.0, 1.5])
    flip = RandomFlip(p=0.2)
    assert get_augmentation(flip) is flip


def test_user_extension_point() -> None:
    class Invert(Augmentation):
        """A user augmentation: negate a random half of the batch."""

        def __init__(self, p: float = 0.5) -> None:
            self.p = p

        def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
            flip = torch.rand(x.shape[0], device=x.device, generator=generator) < self.p
            return torch.where(flip.view(-1, *([1] * (x.dim() - 1))), -x, x)

    x = _input((4, 3))
    assert torch.equal(Invert(p=1.0)(x), -x)
    assert torch.equal(Compose([Invert(p=1.0), RandomFlip(p=1.0)])(x), -x.flip(-1))
    assert Invert().views(x)[0].shape == x.shape and Invert().num_views == 1


@pytest.mark.parametrize(
    ("factory", "exc", "match"),
    [
        (lambda: GaussianNoise(std=-1.0), ValueError, "Expected argument `std` to be a float in [0, inf)"),
        (lambda: PatchMask(patch_size=0), ValueError, "Expected argument `patch_size` to be an int in [1, inf)"),
        (lambda: PatchMask(mask_ratio=1.0), ValueError, "Expected argument `mask_ratio` to be a float in [0, 1)"),
        (lambda: RandomFlip(p=2.0), ValueError, "Expected argument `p` to be a float in [0, 1]"),
        (lambda: RandomFlip(dims=[0]), ValueError, "exclude the batch dimension"),
        (lambda: RandomFlip(dims=[]), ValueError, "non-empty list"),
        (lambda: RandomResizedCrop(scale=[0.0, 1.0]), ValueError, "Expected argument `scale` to be a float in (0, 1]"),
        (lambda: RandomResizedCrop(scale=[0.9, 0.5]), ValueError, "[min, max] pair"),
        (lambda: RandomResizedCrop(ratio=[1.0]), ValueError, "[min, max] pair"),
        (lambda: RandomResizedCrop(mode="bicubic"), ValueError, "Expected argument `mode` to be one of"),  # type: ignore[arg-type]
        (lambda: MultiScale(scales=[]), ValueError, "non-empty list"),
        (lambda: MultiScale(scales=[0.0]), ValueError, "Expected argument `scales` to be a float in (0, inf)"),
        (lambda: MultiScale(weights=[1.0]), ValueError, "Expected argument `weights` to hold 3"),
        (lambda: Compose([3]), TypeError, "list of `Augmentation`s"),  # type: ignore[list-item]
        (lambda: get_augmentation("rotate"), ValueError, "Expected argument `augmentation` to be one of"),
    ],
)
def test_bad_arguments(factory: Callable[[], object], exc: type[Exception], match: str) -> None:
    with pytest.raises(exc) as info:
        factory()
    assert match in str(info.value)


def test_bad_inputs_are_clear() -> None:
    with pytest.raises(TypeError, match="expects a floating-point batch"):
        GaussianNoise()(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"expects a batch of shape \(B, C, H, W\)"):
        RandomResizedCrop()(torch.zeros(2, 3))
    with pytest.raises(TypeError, match="expects a tensor batch"):
        PatchMask()([1, 2])  # type: ignore[arg-type]
    # Integer images can be masked and flipped.
    img = torch.arange(16).reshape(1, 1, 4, 4)
    assert PatchMask(patch_size=2)(img).dtype == torch.long
    assert torch.equal(RandomFlip(p=1.0)(img), img.flip(-1))
    assert math.isclose(sum(MultiScale().view_weights()), 1.0)
