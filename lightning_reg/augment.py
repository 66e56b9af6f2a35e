"""Batched, on-device tensor augmentations for consistency training (no torchvision).

Every augmentation transforms a whole batch with a few tensor ops on the
batch's device: no per-sample Python loop, no host sync, and the output keeps
the input's shape (unless documented), device and dtype. Randomness comes from
torch's RNG on the batch's device (seeded by ``torch.manual_seed``, e.g. by
``L.seed_everything``) or from an explicit ``generator`` on that device, so a
fixed seed gives a fixed view.

They are plain picklable classes with CLI-friendly arguments, so LightningCLI
YAML can name them by ``class_path`` and compose them:

.. code-block:: yaml

    augmentation:
      class_path: lightning_reg.augment.Compose
      init_args:
        augmentations:
          - class_path: lightning_reg.augment.RandomFlip
          - class_path: lightning_reg.augment.PatchMask
            init_args: {patch_size: 4, mask_ratio: 0.5}

Which inputs each augmentation suits:

======================  =====================================  ===============================================
augmentation            input shapes                           suits
======================  =====================================  ===============================================
:class:`GaussianNoise`  any float tensor                       any input: tabular features, embeddings,
                                                               audio, images
:class:`PatchMask`      ``(B, D)``, ``(B, C, L)``,             images; sequences and signals (1-D patches);
                        ``(B, C, H, W)``                       tabular (contiguous feature blocks)
:class:`RandomFlip`     any ``(B, ...)``                       images (``dims=[-1]``: horizontal); other data
                                                               only where the flip preserves the label
:class:`RandomResizedCrop`  float ``(B, C, H, W)``             images only
:class:`MultiScale`     float ``(B, C, L)``, ``(B, C, H, W)``  images (and 1-D signals); the model must accept
                                                               the rescaled size unless ``keep_size=True``
======================  =====================================  ===============================================

**Your own augmentation.** Subclass :class:`Augmentation`, take only
CLI-friendly constructor arguments stored as attributes, and implement
``__call__(self, x, generator=None)``; draw every random number on
``x.device`` from ``generator`` (``None`` means torch's global RNG). A
multi-view augmentation also overrides :meth:`Augmentation.views`. Name it by
``class_path`` in YAML like the built-ins.

Example:
    >>> import torch
    >>> x = torch.arange(8.0).reshape(1, 1, 2, 4)
    >>> RandomFlip(p=1.0)(x)[0, 0]
    tensor([[3., 2., 1., 0.],
            [7., 6., 5., 4.]])
    >>> [tuple(v.shape) for v in MultiScale([0.5, 1.0]).views(x.repeat(1, 1, 2, 2))]
    [(1, 1, 2, 4), (1, 1, 4, 8)]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_reg.core.validation import check_bool, check_choice, check_float, check_int, resolve_named

__all__ = [
    "Augmentation",
    "AugmentationLike",
    "Compose",
    "GaussianNoise",
    "MultiScale",
    "PatchMask",
    "RandomFlip",
    "RandomResizedCrop",
    "get_augmentation",
]


class Augmentation:
    """Base class of the batched augmentations: ``view = augmentation(x)``.

    Subclasses implement :meth:`__call__` and may override :meth:`views` to
    return several views of the batch (e.g. :class:`MultiScale`). Instances
    compare equal when they have the same type and attributes.
    """

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:  # pragma: no cover - abstract
        """Return one randomly perturbed view of the batch ``x``.

        Args:
            x: The batch, samples along dimension 0.
            generator: A ``torch.Generator`` on ``x.device``; ``None`` uses torch's global RNG.
        """
        raise NotImplementedError

    def views(self, x: Tensor, generator: torch.Generator | None = None) -> list[Tensor]:
        """All the views a consistency loss compares (one for single-view augmentations)."""
        return [self(x, generator)]

    @property
    def num_views(self) -> int:
        """How many views :meth:`views` returns."""
        return 1

    def view_weights(self) -> list[float]:
        """The weight of each view in a multi-view loss and mean prediction (uniform unless overridden)."""
        return [1.0 / self.num_views] * self.num_views

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and vars(self) == vars(other)

    def __hash__(self) -> int:
        return hash((type(self).__name__, repr(self)))


def _check_batch(x: Any, who: str, dims: Sequence[int] | None = None, floating: bool = True) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"`{who}` expects a tensor batch, but got {type(x).__name__}.")
    if dims is not None and x.dim() not in dims:
        shapes = {2: "(B, D)", 3: "(B, C, L)", 4: "(B, C, H, W)"}
        allowed = " or ".join(shapes.get(d, f"{d}-D") for d in dims)
        raise ValueError(f"`{who}` expects a batch of shape {allowed}, but got shape {tuple(x.shape)}.")
    if floating and not x.is_floating_point():
        raise TypeError(f"`{who}` expects a floating-point batch, but got dtype {x.dtype}. Convert the input first.")
    return x


def _compute_dtype(x: Tensor) -> torch.dtype:
    """fp32 for half types on CPU (where some resampling kernels lack them), else the input dtype."""
    if x.device.type == "cpu" and x.dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return x.dtype


class GaussianNoise(Augmentation):
    r"""Add i.i.d. Gaussian noise: :math:`\tilde x = x + \sigma\,\varepsilon,\ \varepsilon \sim \mathcal N(0, I)`.

    Suits any float input (tabular features, embeddings, audio, images).

    Args:
        std: The noise standard deviation ``σ`` (in the input's units, e.g. of normalised pixels).

    Example:
        >>> _ = torch.manual_seed(0)
        >>> GaussianNoise(std=0.0)(torch.ones(2, 3)).tolist()
        [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]
    """

    def __init__(self, std: float = 0.1) -> None:
        self.std = check_float("std", std, 0.0)

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        _check_batch(x, "GaussianNoise")
        noise = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
        return x + self.std * noise


class PatchMask(Augmentation):
    r"""MIC-style random patch masking: zero each ``patch_size`` patch with probability ``mask_ratio``.

    .. math:: \mathcal M_{mb:(m+1)b,\;nb:(n+1)b} = [v_{mn} > r],\quad v_{mn}\sim\mathcal U(0,1),\quad
              \tilde x = \mathcal M \odot x

    Paper: *MIC: Masked Image Consistency for Context-Enhanced Domain
    Adaptation*, https://arxiv.org/abs/2212.01322 (``b = 32`` px patches and
    ``r = 0.5`` on 224-px images for classification). Masks are drawn
    independently per sample and shared across channels.

    Inputs: ``(B, C, H, W)`` images (square patches), ``(B, C, L)`` sequences
    (1-D patches of ``patch_size`` steps) and ``(B, D)`` tabular rows (blocks of
    ``patch_size`` contiguous features).

    Args:
        patch_size: The patch side ``b`` in pixels (or steps/features). ``None``
            scales MIC's 32 px at 224 px to the input: ``max(1, round(min(H, W) / 7))``.
        mask_ratio: The probability ``r`` in ``[0, 1)`` that a patch is masked.
        fill: The value written into masked patches (MIC: 0).

    Example:
        >>> _ = torch.manual_seed(0)
        >>> PatchMask(patch_size=2, mask_ratio=0.5)(torch.ones(1, 1, 4, 4))[0, 0]
        tensor([[0., 0., 1., 1.],
                [0., 0., 1., 1.],
                [0., 0., 0., 0.],
                [0., 0., 0., 0.]])
    """

    def __init__(self, patch_size: int | None = None, mask_ratio: float = 0.5, fill: float = 0.0) -> None:
        self.patch_size = None if patch_size is None else check_int("patch_size", patch_size, low=1)
        self.mask_ratio = check_float("mask_ratio", mask_ratio, 0.0, 1.0, high_inclusive=False)
        self.fill = check_float("fill", fill)

    def _patch(self, spatial: Sequence[int]) -> int:
        if self.patch_size is not None:
            return self.patch_size
        return max(1, round(min(spatial) / 7))

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        _check_batch(x, "PatchMask", dims=(2, 3, 4), floating=False)
        spatial = tuple(x.shape[2:]) if x.dim() > 2 else (x.shape[1],)
        b = self._patch(spatial)
        grid = tuple(math.ceil(s / b) for s in spatial)
        keep = torch.rand((x.shape[0], *grid), device=x.device, generator=generator) >= self.mask_ratio
        for d in range(1, len(grid) + 1):
            keep = keep.repeat_interleave(b, dim=d)
        keep = keep[(slice(None), *(slice(0, s) for s in spatial))]
        if x.dim() > 2:
            keep = keep.unsqueeze(1)  # shared across channels
        return torch.where(keep, x, torch.full((), self.fill, dtype=x.dtype, device=x.device))


class RandomFlip(Augmentation):
    """Flip each sample along each of ``dims`` independently with probability ``p``.

    Args:
        p: The flip probability per sample and dimension.
        dims: The dimensions to flip, relative to the batch tensor (``-1`` is
            the width of ``(B, C, H, W)`` images: a horizontal flip). The batch
            dimension 0 cannot be flipped.

    Example:
        >>> RandomFlip(p=1.0, dims=[-1])(torch.tensor([[1.0, 2.0, 3.0]])).tolist()
        [[3.0, 2.0, 1.0]]
    """

    def __init__(self, p: float = 0.5, dims: list[int] | None = None) -> None:
        self.p = check_float("p", p, 0.0, 1.0)
        dims = [-1] if dims is None else list(dims)
        if not dims:
            raise ValueError("Expected argument `dims` to be a non-empty list of ints, but got [].")
        for d in dims:
            check_int("dims", d)
            if d == 0:
                raise ValueError("Expected argument `dims` to exclude the batch dimension 0, but got 0.")
        self.dims = dims

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        _check_batch(x, "RandomFlip", floating=False)
        for d in self.dims:
            if not -x.dim() < d < x.dim() or d % x.dim() == 0:
                raise ValueError(f"`RandomFlip` cannot flip dimension {d} of a batch of shape {tuple(x.shape)}.")
        out = x
        for d in self.dims:
            flip = torch.rand(x.shape[0], device=x.device, generator=generator) < self.p
            out = torch.where(flip.view(-1, *([1] * (x.dim() - 1))), out.flip(d), out)
        return out


class RandomResizedCrop(Augmentation):
    r"""Crop a random area and aspect ratio of each image and resize it back, batched with ``grid_sample``.

    Like ``torchvision.transforms.RandomResizedCrop`` with the output size
    equal to the input size: each sample draws an area fraction
    :math:`s \sim \mathcal U(\text{scale})` and a log-uniform aspect ratio
    :math:`\rho`, giving a crop of width :math:`\sqrt{s\rho\,H/W}` and height
    :math:`\sqrt{s/\rho\,W/H}` (fractions of the side, clamped to 1 where
    torchvision would re-draw) at a uniform position. All crops are one
    ``affine_grid`` + ``grid_sample`` call over the batch.

    Args:
        scale: ``[min, max]`` area fraction, within ``(0, 1]``.
        ratio: ``[min, max]`` aspect ratio (width / height), positive.
        mode: ``"bilinear"`` or ``"nearest"`` resampling.

    Example:
        >>> x = torch.arange(16.0).reshape(1, 1, 4, 4)
        >>> torch.equal(RandomResizedCrop(scale=[1.0, 1.0], ratio=[1.0, 1.0])(x), x)
        True
    """

    def __init__(
        self,
        scale: list[float] | None = None,
        ratio: list[float] | None = None,
        mode: Literal["bilinear", "nearest"] = "bilinear",
    ) -> None:
        scale = (
            [0.08, 1.0]
            if scale is None
            else [float(check_float("scale", s, 0.0, 1.0, low_inclusive=False)) for s in scale]
        )
        ratio = [3 / 4, 4 / 3] if ratio is None else [check_float("ratio", r, 0.0, low_inclusive=False) for r in ratio]
        for name, pair in (("scale", scale), ("ratio", ratio)):
            if len(pair) != 2 or pair[0] > pair[1]:
                raise ValueError(f"Expected argument `{name}` to be a [min, max] pair with min <= max, but got {pair}.")
        self.scale = scale
        self.ratio = ratio
        self.mode = check_choice("mode", mode, ["bilinear", "nearest"])

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        _check_batch(x, "RandomResizedCrop", dims=(4,))
        b, _, h, w = x.shape
        u = torch.rand(4, b, device=x.device, generator=generator, dtype=torch.float32)
        area = self.scale[0] + (self.scale[1] - self.scale[0]) * u[0]
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        rho = torch.exp(log_lo + (log_hi - log_lo) * u[1])
        cw = torch.sqrt(area * rho * (h / w)).clamp(max=1.0)
        ch = torch.sqrt(area / rho * (w / h)).clamp(max=1.0)
        cx = (2.0 * u[2] - 1.0) * (1.0 - cw)
        cy = (2.0 * u[3] - 1.0) * (1.0 - ch)
        zero = torch.zeros_like(cw)
        theta = torch.stack([torch.stack([cw, zero, cx], 1), torch.stack([zero, ch, cy], 1)], 1)
        dtype = _compute_dtype(x)
        grid = F.affine_grid(theta.to(dtype), [b, x.shape[1], h, w], align_corners=False)
        out = F.grid_sample(x.to(dtype), grid, mode=self.mode, padding_mode="border", align_corners=False)
        return out.to(x.dtype)


class MultiScale(Augmentation):
    r"""Views of the batch rescaled by each factor in ``scales`` (ADELE's multi-scale consistency).

    Paper: *Adaptive Early-Learning Correction for Segmentation from Noisy
    Annotations* (ADELE), https://arxiv.org/abs/2110.03740: scales
    ``{0.7, 1, 1.5}``, and every scale's prediction is pulled towards the
    (weighted) mean prediction over the scales,

    .. math:: \bar p = \sum_s w_s\, p(x_s),\qquad
              \mathcal L = \tfrac{1}{|S|}\sum_s D(\mathrm{sg}(\bar p) \,\|\, p(x_s)).

    :meth:`views` returns one view per scale (the scale ``1.0`` view is ``x``
    itself, so its forward pass can be reused); calling the augmentation
    returns a single view at one random scale. The model must accept the
    rescaled sizes (e.g. a CNN with adaptive pooling) unless ``keep_size=True``,
    which resizes every view back to the input size, turning the rescale into
    a resolution change that fixed-size models (MLPs) accept.

    Args:
        scales: Rescale factors (``1.0`` is the input itself).
        weights: Non-negative weights ``w_s`` of the scales in the mean
            prediction (normalised); ``None`` is uniform (ADELE's initial weights).
        keep_size: Resize every view back to the input's size.
        mode: ``"bilinear"`` (``"linear"`` is used for ``(B, C, L)``) or ``"nearest"``.

    Example:
        >>> ms = MultiScale(scales=[0.5, 1.0, 2.0])
        >>> x = torch.ones(2, 3, 8, 8)
        >>> [tuple(v.shape[-2:]) for v in ms.views(x)], ms.views(x)[1] is x, ms.view_weights()
        ([(4, 4), (8, 8), (16, 16)], True, [0.3333333333333333, 0.3333333333333333, 0.3333333333333333])
    """

    def __init__(
        self,
        scales: list[float] | None = None,
        weights: list[float] | None = None,
        keep_size: bool = False,
        mode: Literal["bilinear", "nearest"] = "bilinear",
    ) -> None:
        scales = [0.7, 1.0, 1.5] if scales is None else list(scales)
        if not scales:
            raise ValueError("Expected argument `scales` to be a non-empty list of positive floats, but got [].")
        self.scales = [check_float("scales", s, 0.0, low_inclusive=False) for s in scales]
        if weights is not None:
            weights = [check_float("weights", w_, 0.0) for w_ in weights]
            if len(weights) != len(self.scales) or sum(weights) <= 0:
                raise ValueError(
                    f"Expected argument `weights` to hold {len(self.scales)} non-negative floats with a positive sum,"
                    f" but got {weights}."
                )
        self.weights = weights
        self.keep_size = check_bool("keep_size", keep_size)
        self.mode = check_choice("mode", mode, ["bilinear", "nearest"])

    @property
    def num_views(self) -> int:
        return len(self.scales)

    def view_weights(self) -> list[float]:
        """The weights ``w_s`` of the scales, normalised to sum to one."""
        if self.weights is None:
            return [1.0 / len(self.scales)] * len(self.scales)
        total = sum(self.weights)
        return [w_ / total for w_ in self.weights]

    def _rescale(self, x: Tensor, scale: float) -> Tensor:
        if scale == 1.0:
            return x
        mode = self.mode if self.mode == "nearest" else ("linear" if x.dim() == 3 else "bilinear")
        align = None if mode == "nearest" else False
        dtype = _compute_dtype(x)
        out = F.interpolate(x.to(dtype), scale_factor=scale, mode=mode, align_corners=align)
        if self.keep_size:
            out = F.interpolate(out, size=tuple(x.shape[2:]), mode=mode, align_corners=align)
        return out.to(x.dtype)

    def views(self, x: Tensor, generator: torch.Generator | None = None) -> list[Tensor]:
        _check_batch(x, "MultiScale", dims=(3, 4))
        return [self._rescale(x, s) for s in self.scales]

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        _check_batch(x, "MultiScale", dims=(3, 4))
        cpu_gen = generator if generator is not None and generator.device.type == "cpu" else None
        i = int(torch.randint(len(self.scales), (1,), generator=cpu_gen))  # a CPU draw: no device sync
        return self._rescale(x, self.scales[i])


class Compose(Augmentation):
    """Apply augmentations in sequence; multi-view members fan out into several views.

    Args:
        augmentations: The augmentations, applied first to last.

    Example:
        >>> aug = Compose([RandomFlip(p=1.0), MultiScale(scales=[1.0, 2.0])])
        >>> aug.num_views, [tuple(v.shape) for v in aug.views(torch.zeros(1, 1, 2, 2))]
        (2, [(1, 1, 2, 2), (1, 1, 4, 4)])
    """

    def __init__(self, augmentations: list[Augmentation] | None = None) -> None:
        augmentations = [] if augmentations is None else list(augmentations)
        for a in augmentations:
            if not isinstance(a, Augmentation):
                raise TypeError(
                    f"Expected argument `augmentations` to be a list of `Augmentation`s, but got {type(a).__name__}."
                )
        self.augmentations = augmentations

    @property
    def num_views(self) -> int:
        return math.prod(a.num_views for a in self.augmentations)

    def view_weights(self) -> list[float]:
        out = [1.0]
        for a in self.augmentations:
            out = [wp * wa for wp in out for wa in a.view_weights()]
        return out

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        for a in self.augmentations:
            x = a(x) if generator is None else a(x, generator)
        return x

    def views(self, x: Tensor, generator: torch.Generator | None = None) -> list[Tensor]:
        out = [x]
        for a in self.augmentations:
            out = [v for prev in out for v in (a.views(prev) if generator is None else a.views(prev, generator))]
        return out


_NAMED: dict[str, type[Augmentation]] = {
    "gaussian_noise": GaussianNoise,
    "patch_mask": PatchMask,
    "flip": RandomFlip,
    "resized_crop": RandomResizedCrop,
    "multiscale": MultiScale,
}

AugmentationLike = str | Augmentation


def get_augmentation(augmentation: AugmentationLike, name: str = "augmentation") -> Augmentation:
    """Resolve an augmentation given by short name or as an instance.

    Short names build the class with its defaults: ``"gaussian_noise"``,
    ``"patch_mask"``, ``"flip"``, ``"resized_crop"`` and ``"multiscale"``.

    Raises:
        ValueError: For an unknown short name.
        TypeError: For anything else.

    Example:
        >>> get_augmentation("flip")
        RandomFlip(p=0.5, dims=[-1])
    """
    return resolve_named(augmentation, Augmentation, _NAMED, name)
