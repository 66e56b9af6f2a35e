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
    Cutout,
    GaussianNoise,
    MultiScale,
    PatchMask,
    RandAugment,
    RandomFlip,
    RandomResizedCrop,
    WeakAugment,
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
    "weak": (lambda: WeakAugment(), (6, 3, 8, 8)),
    "weak_constant": (lambda: WeakAugment(translate=0.25, padding_mode="constant"), (6, 1, 8, 8)),
    "randaugment": (lambda: RandAugment(), (6, 3, 8, 8)),
    "randaugment_fixed_range": (lambda: RandAugment(num_ops=3, magnitude=0.7, value_range=[-2.0, 2.0]), (6, 1, 8, 8)),
    "randaugment_bilinear": (lambda: RandAugment(mode="bilinear", cutout=0.0), (6, 3, 8, 8)),
    "cutout": (lambda: Cutout(), (6, 3, 8, 8)),
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


# -- FixMatch's weak and strong views -----------------------------------------------------------------------


def _coordinates(b: int, h: int, w: int) -> torch.Tensor:
    """``(b, 2, h, w)`` images: channel 0 holds the column index, channel 1 the row index."""
    cols = torch.arange(w, dtype=torch.float32).expand(h, w)
    rows = torch.arange(h, dtype=torch.float32).unsqueeze(1).expand(h, w)
    return torch.stack([cols, rows]).expand(b, 2, h, w).contiguous()


def _fashion_like(b: int = 16, seed: int = 0) -> torch.Tensor:
    """Normalised Fashion-MNIST-like images: ``(u - 0.286) / 0.353`` with ``u`` in [0, 1] and a black border."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(b, 1, 28, 28, generator=g)
    u[..., :3, :] = 0.0
    u[..., 5, 5] = 1.0
    return (u - 0.2860) / 0.3530


def test_weak_augment_flips_and_translates_within_bounds() -> None:
    b, h, w = 400, 16, 32
    x = _coordinates(b, h, w)
    assert torch.equal(WeakAugment(flip_p=0.0, translate=0.0)(x), x)
    assert torch.equal(WeakAugment(flip_p=1.0, translate=0.0)(x), x.flip(-1))
    torch.manual_seed(0)
    flipped_only = WeakAugment(flip_p=0.5, translate=0.0)(x)
    flipped = (flipped_only == x.flip(-1)).flatten(1).all(1)
    assert bool(((flipped_only == x).flatten(1).all(1) | flipped).all()) and 150 < int(flipped.sum()) < 250
    # Translation only: integer shifts up to int(0.125 * size) pixels with reflect padding (FixMatch's pad + crop).
    torch.manual_seed(1)
    out = WeakAugment(flip_p=0.0)(x)
    pw, ph = int(0.125 * w), int(0.125 * h)
    dx = pw - out[:, 0, 0, pw]  # output column j reads input column j - dx (no reflection needed at j = pw)
    dy = ph - out[:, 1, ph, 0]
    assert set(dx.long().tolist()) == set(range(-pw, pw + 1))
    assert set(dy.long().tolist()) == set(range(-ph, ph + 1))

    def reflect(k: torch.Tensor, n: int) -> torch.Tensor:
        k = k.abs()
        return torch.where(k >= n, 2 * (n - 1) - k, k)

    cols = reflect(torch.arange(w) - dx.long()[:, None], w).float()
    rows = reflect(torch.arange(h) - dy.long()[:, None], h).float()
    assert torch.equal(out[:, 0], cols[:, None, :].expand(b, h, w))
    assert torch.equal(out[:, 1], rows[:, :, None].expand(b, h, w))
    # Constant padding fills the uncovered border; the content is still an exact shift.
    torch.manual_seed(2)
    ones = torch.ones(b, 1, h, w)
    const = WeakAugment(flip_p=0.0, translate=0.25, padding_mode="constant", fill=-1.0)(ones)
    filled = (const == -1.0).float().sum((1, 2, 3))
    assert float(filled.max()) > 0 and float(filled.max()) <= (4 * w + 8 * h)  # at most 4 rows and 8 columns
    # Integer images work too (index gathers, no resampling).
    img = torch.arange(16).reshape(1, 1, 4, 4)
    assert torch.equal(WeakAugment(flip_p=1.0, translate=0.0)(img), img.flip(-1))


def test_randaugment_magnitude_zero_is_the_identity() -> None:
    x = _fashion_like()
    ops = [op for op in RandAugment.OPS if op not in ("autocontrast", "equalize")]  # these have no magnitude
    for value_range in (None, [-0.81, 2.03], [-0.5, 1.0]):  # the last clips some pixels: still untouched
        aug = RandAugment(num_ops=3, magnitude=0.0, ops=ops, cutout=0.0, value_range=value_range)
        for seed in range(3):
            torch.manual_seed(seed)
            assert torch.equal(aug(x), x)
    assert torch.equal(RandAugment(ops=["identity"], cutout=0.0)(x), x)
    assert torch.equal(RandAugment(num_ops=0, cutout=0.0)(x), x)
    half = x.to(torch.bfloat16)
    assert torch.equal(RandAugment(num_ops=2, magnitude=0.0, ops=ops, cutout=0.0)(half), half)


def test_randaugment_ops_semantics() -> None:
    x = _fashion_like()
    lo, hi = -0.2860 / 0.3530, (1 - 0.2860) / 0.3530
    vr = [lo, hi]

    def run(op: str, magnitude: float = 1.0, inp: torch.Tensor = x, **kw: object) -> torch.Tensor:
        torch.manual_seed(0)
        return RandAugment(num_ops=1, magnitude=magnitude, ops=[op], cutout=0.0, value_range=vr, **kw)(inp)  # type: ignore[arg-type]

    u = (x - lo) / (hi - lo)
    # Solarize at full magnitude inverts every pixel (threshold 0) within the value range.
    torch.testing.assert_close(run("solarize"), lo + hi - x, atol=1e-5, rtol=0)
    # Posterize at full magnitude keeps 4 bits: multiples of 16 / 255.
    post = ((run("posterize") - lo) / (hi - lo) * 255).round()
    assert bool((post % 16 == 0).all())
    # Brightness scales the [0, 1] image by one factor per image, 1 ± 0.9 m, then clips.
    bright = (run("brightness", 0.5) - lo) / (hi - lo)
    keep = (u > 0.05) & (u < 0.65)  # not clipped at 1
    ratio = bright[keep] / u[keep]
    assert bool(((ratio - 0.55).abs() < 1e-4).logical_or((ratio - 1.45).abs() < 1e-4).all())
    # Translation moves the content by ± 0.3 of the width (nearest resampling keeps pixel values).
    coords = _coordinates(8, 20, 20)
    torch.manual_seed(0)
    moved = RandAugment(num_ops=1, magnitude=1.0, ops=["translate_x"], cutout=0.0, value_range=[0.0, 19.0])(coords)
    shift = moved[:, 0, :, 10] - 10
    assert set(shift.unique().round().tolist()) <= {-6.0, 6.0}
    # Rotation and shear keep the centre pixel of an odd-sized image and change the rest.
    for op in ("rotate", "shear_x", "shear_y"):
        odd = _fashion_like(4)[..., :27, :27]
        out = run(op, inp=odd)
        torch.testing.assert_close(out[..., 13, 13], odd[..., 13, 13])
        assert not torch.equal(out, odd)
    # Equalize is monotone and spreads a low-contrast image over the whole range.
    dim = lo + 0.2 * (hi - lo) * torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    eq = run("equalize", inp=dim)
    flat_in, flat_out = dim.flatten(1), eq.flatten(1)
    order = flat_in.argsort(1)
    assert bool((flat_out.gather(1, order).diff(dim=1) >= -1e-6).all())
    assert float(eq.amax()) > hi - 0.05 * (hi - lo)
    # Autocontrast stretches each channel to the full range.
    rgb = 0.25 + 0.5 * torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    torch.manual_seed(0)
    ac = RandAugment(num_ops=1, ops=["autocontrast"], cutout=0.0, value_range=[0.0, 1.0])(rgb)
    torch.testing.assert_close(ac.amin((2, 3)), torch.zeros(3, 3))
    torch.testing.assert_close(ac.amax((2, 3)), torch.ones(3, 3))
    # The output stays in the value range whatever the ops.
    torch.manual_seed(5)
    strong = RandAugment(num_ops=4, value_range=vr)(x)
    assert float(strong.amin()) >= lo - 1e-5 and float(strong.amax()) <= hi + 1e-5


def test_randaugment_draws_per_sample() -> None:
    x = _fashion_like(64)
    torch.manual_seed(0)
    out = RandAugment(num_ops=2, cutout=0.0)(x)
    changed = (out != x).flatten(1).float().mean(1)
    assert len(set(changed.tolist())) > 20  # per-sample ops and magnitudes, not one draw per batch
    # A fixed magnitude still draws the ops per sample.
    torch.manual_seed(0)
    fixed = RandAugment(num_ops=1, magnitude=0.9, ops=["brightness", "solarize", "translate_y"], cutout=0.0)(x)
    assert len({tuple(r) for r in (fixed != x).flatten(1)[:, :100].tolist()}) > 3


def test_cutout_area_is_bounded() -> None:
    b, h, w = 500, 20, 30
    x = torch.ones(b, 3, h, w)
    torch.manual_seed(0)
    out = Cutout(size=0.5, fill=0.0, value_range=[0.0, 1.0])(x)
    hole = out == 0.0
    assert bool((hole == hole[:, :1]).all())  # shared by the channels
    rows, cols = hole[:, 0].any(2).sum(1), hole[:, 0].any(1).sum(1)
    assert torch.equal(hole[:, 0].sum((1, 2)), rows * cols)  # one axis-aligned rectangle per image
    assert int(rows.max()) <= 0.5 * h + 1 and int(cols.max()) <= 0.5 * w + 1
    assert int((rows * cols).gt(0).sum()) > 0 and len(set((rows * cols).tolist())) > 20  # random sizes
    # A fixed size: the full square unless clipped by the border.
    torch.manual_seed(1)
    fixed = Cutout(size=0.5, random_size=False, fill=0.0, value_range=[0.0, 1.0])(x) == 0.0
    assert int(fixed[:, 0].any(2).sum(1).max()) == h // 2 and int(fixed[:, 0].any(1).sum(1).max()) == w // 2
    # The default fill is mid-grey of the value range (of each image when no range is given).
    torch.manual_seed(2)
    img = torch.cat([torch.zeros(b, 1, h, w // 2), torch.full((b, 1, h, w - w // 2), 4.0)], dim=-1)
    grey = Cutout()(img)
    assert set(grey.unique().tolist()) == {0.0, 2.0, 4.0}
    assert torch.equal(Cutout(size=0.0)(img), img)
    # RandAugment ends with the same cutout.
    torch.manual_seed(3)
    ra = RandAugment(num_ops=0, cutout=0.5, cutout_fill=0.0, value_range=[0.0, 1.0])(x)
    assert bool((ra == 0.0).any()) and set(ra.unique().tolist()) == {0.0, 1.0}


@pytest.mark.parametrize("aug", [WeakAugment(), RandAugment(), Cutout()], ids=lambda a: type(a).__name__)
def test_fixmatch_views_on_bf16_normalised_images(aug: Augmentation) -> None:
    x = _fashion_like(8).to(torch.bfloat16)
    torch.manual_seed(0)
    out = aug(x)
    assert out.dtype == torch.bfloat16 and out.shape == x.shape and torch.isfinite(out.float()).all()
    assert not torch.equal(out, x)


def test_fixmatch_views_names_and_pickling() -> None:
    assert get_augmentation("weak") == WeakAugment()
    assert get_augmentation("strong") == RandAugment() == get_augmentation("randaugment")
    assert get_augmentation("cutout") == Cutout()
    for aug in (WeakAugment(translate=0.2), RandAugment(ops=["rotate"], magnitude=0.5), Cutout(size=0.3)):
        assert pickle.loads(pickle.dumps(aug)) == aug


@pytest.mark.parametrize(
    ("factory", "exc", "match"),
    [
        (lambda: WeakAugment(flip_p=1.5), ValueError, "Expected argument `flip_p` to be a float in [0, 1]"),
        (lambda: WeakAugment(translate=0.6), ValueError, "Expected argument `translate` to be a float in [0, 0.5]"),
        (lambda: WeakAugment(padding_mode="zeros"), ValueError, "Expected argument `padding_mode` to be one of"),  # type: ignore[arg-type]
        (lambda: RandAugment(num_ops=-1), ValueError, "Expected argument `num_ops` to be an int in [0, inf)"),
        (lambda: RandAugment(magnitude=1.5), ValueError, "Expected argument `magnitude` to be a float in [0, 1]"),
        (lambda: RandAugment(ops=["blur"]), ValueError, "Expected argument `ops` to be one of"),
        (lambda: RandAugment(ops=[]), ValueError, "non-empty list"),
        (lambda: RandAugment(cutout=1.0), ValueError, "Expected argument `cutout` to be a float in [0, 1)"),
        (lambda: RandAugment(mode="bicubic"), ValueError, "Expected argument `mode` to be one of"),  # type: ignore[arg-type]
        (lambda: Cutout(size=1.0), ValueError, "Expected argument `size` to be a float in [0, 1)"),
        (lambda: Cutout(fill=2.0), ValueError, "Expected argument `fill` to be a float in [0, 1]"),
        (lambda: Cutout(value_range=[1.0, 0.0]), ValueError, "Expected argument `value_range` to be a [low, high]"),
    ],
)
def test_fixmatch_views_bad_arguments(factory: Callable[[], object], exc: type[Exception], match: str) -> None:
    with pytest.raises(exc) as info:
        factory()
    assert match in str(info.value)


def test_fixmatch_views_bad_inputs() -> None:
    with pytest.raises(ValueError, match=r"expects a batch of shape \(B, C, H, W\)"):
        WeakAugment()(torch.zeros(2, 3))
    with pytest.raises(TypeError, match="expects a floating-point batch"):
        RandAugment()(torch.zeros(2, 1, 4, 4, dtype=torch.long))


def test_randaugment_photometric_ops_match_pil() -> None:
    """The photometric ops against PIL's ``ImageOps``/``ImageEnhance`` on 8-bit grey images."""
    pil_image = pytest.importorskip("PIL.Image")
    from PIL import ImageEnhance, ImageOps

    g = torch.Generator().manual_seed(0)
    imgs = (torch.rand(6, 1, 16, 16, generator=g) * 180 + 40 * torch.rand(6, 1, 1, 1, generator=g)).round()
    m = 0.6
    f_up, f_down = 1 + 0.9 * m, 1 - 0.9 * m

    def pil(i: int) -> object:
        return pil_image.fromarray(imgs[i, 0].to(torch.uint8).numpy(), mode="L")

    def back(img: object) -> torch.Tensor:
        return torch.tensor(list(img.getdata()), dtype=torch.float32).view(16, 16)  # type: ignore[attr-defined]

    references = {
        "equalize": lambda i: [back(ImageOps.equalize(pil(i)))],
        "autocontrast": lambda i: [back(ImageOps.autocontrast(pil(i)))],
        "posterize": lambda i: [back(ImageOps.posterize(pil(i), 8 - round(4 * m)))],
        "solarize": lambda i: [back(ImageOps.solarize(pil(i), 255 * (1 - m)))],
        "brightness": lambda i: [back(ImageEnhance.Brightness(pil(i)).enhance(f)) for f in (f_up, f_down)],
        "contrast": lambda i: [back(ImageEnhance.Contrast(pil(i)).enhance(f)) for f in (f_up, f_down)],
        "sharpness": lambda i: [back(ImageEnhance.Sharpness(pil(i)).enhance(f)) for f in (f_up, f_down)],
    }
    for op, reference in references.items():
        torch.manual_seed(0)
        out = RandAugment(num_ops=1, magnitude=m, ops=[op], cutout=0.0, value_range=[0.0, 255.0])(imgs)
        for i in range(len(imgs)):
            err = min(float((out[i, 0] - ref).abs().max()) for ref in reference(i))
            # PIL rounds its intermediate images (the smoothed image, the mean) to 8 bits: up to 1.5 levels.
            tol = 0.0 if op in ("equalize", "posterize") else 1.5
            assert err <= tol + 1e-3, f"{op}: sample {i} differs from PIL by {err} levels"


def test_affine_grid_matches_torch() -> None:
    from lightning_reg.augment import _affine_grid

    theta = torch.randn(5, 2, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected = torch.nn.functional.affine_grid(theta, [5, 1, 6, 9], align_corners=False)
    torch.testing.assert_close(_affine_grid(theta, 6, 9), expected)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fixmatch_views_do_not_sync_with_the_host() -> None:
    x = _fashion_like(64).cuda()
    augs = [WeakAugment(), WeakAugment(padding_mode="constant"), RandAugment(), RandAugment(magnitude=0.5), Cutout()]
    for aug in augs:  # warm-up (lazy CUDA initialisation may sync)
        aug(x)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for aug in augs:
            aug(x)
            aug(x.to(torch.bfloat16))
    finally:
        torch.cuda.set_sync_debug_mode("default")


# -- geometry: which views move elements, and mapping dense predictions back (consistency on dense outputs) -------
def test_geometry_flags() -> None:
    keeps = [
        GaussianNoise(),
        PatchMask(),
        Cutout(),
        RandAugment(ops=["brightness", "contrast", "solarize"]),
        RandomFlip(p=0.0),
        MultiScale(keep_size=True),
        MultiScale(scales=[1.0]),
        Compose([GaussianNoise(), PatchMask()]),
    ]
    for aug in keeps:
        assert not aug.moves_elements and aug.can_invert_output, aug
    moves = {
        RandomFlip(): True,
        MultiScale(): True,
        Compose([PatchMask(), RandomFlip(dims=[-1, -2])]): True,
        Compose([RandomFlip(), MultiScale(scales=[0.5, 1.0])]): True,
        RandomResizedCrop(): False,
        WeakAugment(): False,
        RandAugment(): False,
        Compose([RandomFlip(), RandomResizedCrop()]): False,
    }
    for aug, invertible in moves.items():
        assert aug.moves_elements and aug.can_invert_output == invertible, aug


def test_views_and_params_leave_the_views_unchanged() -> None:
    x = torch.randn(6, 2, 5, 7)
    for aug in (RandomFlip(dims=[-1, -2]), MultiScale(), GaussianNoise(), Compose([RandomFlip(), PatchMask(2)])):
        torch.manual_seed(3)
        plain = aug.views(x)
        torch.manual_seed(3)
        views, params = aug.views_and_params(x)
        assert len(views) == len(params) == aug.num_views
        for a, b in zip(plain, views):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_random_flip_output_is_flipped_back_per_sample() -> None:
    # An "identity model": the output is the input, so the inverse must give the input back exactly.
    x = torch.randn(8, 3, 4, 6)
    aug = RandomFlip(p=0.5, dims=[-1, -2])
    torch.manual_seed(0)
    (view,), (param,) = aug.views_and_params(x)
    assert not torch.equal(view, x)  # the seed flips some samples
    torch.testing.assert_close(aug.invert_output(view, param, (4, 6)), x, rtol=0, atol=0)
    # The output may have another channel count (classes) than the input: the spatial dims are flipped back.
    out = view.repeat(1, 2, 1, 1)
    torch.testing.assert_close(aug.invert_output(out, param, (4, 6)), x.repeat(1, 2, 1, 1), rtol=0, atol=0)
    # A flip of the channel dimension has no spatial meaning on the output: a clear error.
    bad = RandomFlip(p=1.0, dims=[1])
    (_,), (p1,) = bad.views_and_params(x)
    with pytest.raises(ValueError, match=r"`RandomFlip` flipped dimension 1 .* not a spatial dimension"):
        bad.invert_output(x, p1, (4, 6))


def test_multiscale_output_is_resized_back_bilinearly() -> None:
    x = torch.randn(2, 1, 8, 8)
    ms = MultiScale(scales=[0.5, 1.0, 1.5])
    views, params = ms.views_and_params(x)
    for v, p in zip(views, params):
        out = torch.randn(2, 4, *v.shape[2:])
        back = ms.invert_output(out, p, (8, 8))
        if v.shape[2:] == x.shape[2:]:
            assert back is out  # the scale-1 view's output is already on the grid
        else:
            expected = torch.nn.functional.interpolate(out, size=(8, 8), mode="bilinear", align_corners=False)
            torch.testing.assert_close(back, expected, rtol=0, atol=0)
    # (B, C, L) signals resize linearly; half precision on the CPU is computed in fp32 and returned as is.
    out = torch.randn(2, 3, 12, dtype=torch.bfloat16)
    back = ms.invert_output(out, None, (8,))
    assert back.shape == (2, 3, 8) and back.dtype == torch.bfloat16


def test_compose_maps_back_in_reverse_order() -> None:
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    aug = Compose([RandomFlip(p=1.0), MultiScale(scales=[2.0])])
    (view,), (param,) = aug.views_and_params(x)
    assert view.shape == (1, 1, 8, 8)
    back = aug.invert_output(view, param, (4, 4))
    expected = torch.nn.functional.interpolate(view, size=(4, 4), mode="bilinear", align_corners=False).flip(-1)
    torch.testing.assert_close(back, expected, rtol=0, atol=0)


def test_views_that_cannot_be_mapped_back_say_so() -> None:
    x = torch.randn(2, 1, 8, 8)
    for aug in (RandomResizedCrop(), WeakAugment(), RandAugment(), Compose([RandomFlip(), WeakAugment()])):
        _, params = aug.views_and_params(x)
        with pytest.raises(ValueError, match=r"cannot map a dense prediction on its view back"):
            aug.invert_output(torch.randn(2, 4, 8, 8), params[0], (8, 8))
    # A view that keeps the geometry maps back as is, but only onto its own grid.
    out = torch.randn(2, 4, 8, 8)
    assert PatchMask(2).invert_output(out, None, (8, 8)) is out
    with pytest.raises(ValueError, match=r"Expected the output on `PatchMask`'s view to have the spatial size"):
        PatchMask(2).invert_output(out, None, (4, 4))
