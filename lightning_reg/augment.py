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
:class:`WeakAugment`    ``(B, C, H, W)``                       images: FixMatch's weak view (flip + shift)
:class:`RandAugment`    float ``(B, C, H, W)``                 images: FixMatch's strong view (RandAugment +
                                                               Cutout); set ``value_range`` for known ranges
:class:`Cutout`         float ``(B, C, H, W)``                 images
======================  =====================================  ===============================================

**Your own augmentation.** Subclass :class:`Augmentation`, take only
CLI-friendly constructor arguments stored as attributes, and implement
``__call__(self, x, generator=None)``; draw every random number on
``x.device`` from ``generator`` (``None`` means torch's global RNG). A
multi-view augmentation also overrides :meth:`Augmentation.views`. Name it by
``class_path`` in YAML like the built-ins.

**Dense outputs (segmentation, tokens).** A consistency loss on pixels compares
the prediction on a view with the prediction on the input element by element,
which needs to know where each element went. :attr:`Augmentation.moves_elements`
says whether a view moves them (:class:`RandomFlip`, :class:`MultiScale`,
:class:`RandomResizedCrop`, :class:`WeakAugment`, geometric
:class:`RandAugment` ops) or keeps them in place (noise, masking, colour).
Those that move them in an undoable way (:class:`RandomFlip`,
:class:`MultiScale`, a :class:`Compose` of those) map a dense prediction on
the view back with :meth:`Augmentation.invert_output`, using the record
:meth:`Augmentation.views_and_params` returns with the views: the flip is undone
and rescaled predictions are resized back bilinearly, as ADELE does. The others
raise a clear ``ValueError`` there. A custom augmentation that moves elements
overrides ``moves_elements`` (and, if it can, ``can_invert_output``,
``views_and_params`` and ``invert_output``).

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
    "Cutout",
    "GaussianNoise",
    "MultiScale",
    "PatchMask",
    "RandAugment",
    "RandomFlip",
    "RandomResizedCrop",
    "WeakAugment",
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

    # -- geometry: comparing dense predictions (pixels, tokens) across views ---------------------------------------
    @property
    def moves_elements(self) -> bool:
        """Whether a view moves pixels (or tokens) away from their position: a flip, rescale, crop or shift.

        ``False`` (the default: noise, masking, colour) means element ``j`` of the view's dense prediction
        belongs to element ``j`` of the input, so a consistency loss compares the two element by element.
        Override it in a custom augmentation that moves elements.
        """
        return False

    @property
    def can_invert_output(self) -> bool:
        """Whether :meth:`invert_output` maps a dense prediction on a view back onto the input's grid.

        Always true for views that keep the geometry; for those that move elements, only where the move is
        known and undoable (:class:`RandomFlip`, :class:`MultiScale` and :class:`Compose` of those).
        """
        return not self.moves_elements

    def views_and_params(self, x: Tensor, generator: torch.Generator | None = None) -> tuple[list[Tensor], list[Any]]:
        """The same views as :meth:`views` (same random draws) and, per view, what :meth:`invert_output` needs.

        Returns:
            ``(views, params)``: the views and one opaque record per view (``None`` when nothing is needed).
        """
        views = self.views(x) if generator is None else self.views(x, generator)
        return views, [None] * len(views)

    def invert_output(self, out: Tensor, params: Any, size: Sequence[int]) -> Tensor:
        """Map a dense prediction on a view, ``(B, C, *d')``, back onto the grid of the un-augmented input.

        ADELE (and DeepLab's multi-scale inputs) resize each scale's logits back to the original output's size,
        and flip the prediction on a flipped image back, before comparing them. Views that keep the geometry are
        returned as they are.

        Args:
            out: The model's dense output on the view, classes along dimension 1 (``(B, C, H', W')``).
            params: The view's record from :meth:`views_and_params`.
            size: The spatial size ``*d`` of the model's output on the un-augmented input.

        Raises:
            ValueError: If the view moves elements in a way that cannot be undone (a random crop, a shift, a
                rotation), or a view that keeps the geometry has an output of another size.
        """
        if self.moves_elements:
            raise ValueError(
                f"`{type(self).__name__}` moves pixels (or tokens), so its view's prediction at a position belongs to"
                " another position of the input, and it cannot map a dense prediction on its view back onto the"
                " input's grid. For dense outputs use a view that keeps the geometry (`PatchMask`, `GaussianNoise`,"
                " `Cutout`, photometric `RandAugment` ops) or one that can be undone (`RandomFlip`, `MultiScale`)."
            )
        if tuple(out.shape[2:]) != tuple(size):
            raise ValueError(
                f"Expected the output on `{type(self).__name__}`'s view to have the spatial size {tuple(size)} of the"
                f" output on the input (the view keeps the geometry), but got shape {tuple(out.shape)}."
            )
        return out

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

    def _flip(self, x: Tensor, generator: torch.Generator | None) -> tuple[Tensor, list[Tensor]]:
        """The view and, per dimension in ``dims``, the ``(B,)`` mask of the samples it flipped."""
        _check_batch(x, "RandomFlip", floating=False)
        for d in self.dims:
            if not -x.dim() < d < x.dim() or d % x.dim() == 0:
                raise ValueError(f"`RandomFlip` cannot flip dimension {d} of a batch of shape {tuple(x.shape)}.")
        out, flips = x, []
        for d in self.dims:
            flip = torch.rand(x.shape[0], device=x.device, generator=generator) < self.p
            out = torch.where(flip.view(-1, *([1] * (x.dim() - 1))), out.flip(d), out)
            flips.append(flip)
        return out, flips

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return self._flip(x, generator)[0]

    @property
    def moves_elements(self) -> bool:
        return self.p > 0

    @property
    def can_invert_output(self) -> bool:
        return True

    def views_and_params(self, x: Tensor, generator: torch.Generator | None = None) -> tuple[list[Tensor], list[Any]]:
        out, flips = self._flip(x, generator)
        return [out], [(flips, x.dim())]

    def invert_output(self, out: Tensor, params: Any, size: Sequence[int]) -> Tensor:
        """Flip each sample's dense output back along the dimensions its input was flipped along.

        A dimension ``d`` of the ``(B, C_in, *d)`` input is the same dimension of the ``(B, C, *d')`` output;
        only spatial dimensions (``>= 2``) have a meaning there.
        """
        if params is None:
            return super().invert_output(out, params, size)
        flips, ndim = params
        for d, flip in reversed(list(zip(self.dims, flips))):
            dd = d % ndim
            if dd < 2 or out.dim() != ndim:
                raise ValueError(
                    f"`RandomFlip` flipped dimension {d} of a {ndim}-D input, which is not a spatial dimension of the"
                    f" dense output of shape {tuple(out.shape)}, so it cannot map a dense prediction on its view back."
                    " Flip spatial dimensions only (e.g. `dims=[-1]`, the width of (B, C, H, W) images)."
                )
            out = torch.where(flip.view(-1, *([1] * (out.dim() - 1))), out.flip(dd), out)
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

    @property
    def moves_elements(self) -> bool:
        return True


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

    @property
    def moves_elements(self) -> bool:
        return not self.keep_size and any(s != 1.0 for s in self.scales)

    @property
    def can_invert_output(self) -> bool:
        return True

    def invert_output(self, out: Tensor, params: Any, size: Sequence[int]) -> Tensor:
        """Resize a dense output on a rescaled view back to ``size``, bilinearly (linearly for ``(B, C, L)``).

        As ADELE's and DeepLab's multi-scale code, the logits are resized with ``align_corners=False``; an
        output already of ``size`` (the scale-1 view, or ``keep_size=True``) is returned as it is.
        """
        if tuple(out.shape[2:]) == tuple(size):
            return out
        if out.dim() not in (3, 4) or len(size) != out.dim() - 2:
            raise ValueError(
                f"`MultiScale` resizes (B, C, L) or (B, C, H, W) outputs back, but got shape {tuple(out.shape)} and"
                f" size {tuple(size)}."
            )
        mode = "bilinear" if out.dim() == 4 else "linear"
        back = F.interpolate(out.to(_compute_dtype(out)), size=tuple(size), mode=mode, align_corners=False)
        return back.to(out.dtype)

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        _check_batch(x, "MultiScale", dims=(3, 4))
        cpu_gen = generator if generator is not None and generator.device.type == "cpu" else None
        i = int(torch.randint(len(self.scales), (1,), generator=cpu_gen))  # a CPU draw: no device sync
        return self._rescale(x, self.scales[i])


# -- FixMatch's weak and strong views ------------------------------------------------------------------------


def _check_value_range(value_range: Any) -> list[float] | None:
    if value_range is None:
        return None
    ok = isinstance(value_range, (list, tuple)) and len(value_range) == 2
    if ok:
        lo, hi = (check_float("value_range", v) for v in value_range)
        ok = lo < hi
    if not ok:
        raise ValueError(
            "Expected argument `value_range` to be a [low, high] pair with low < high, or None, but got"
            f" {value_range!r}."
        )
    return [lo, hi]


def _internal_dtype(x: Tensor) -> torch.dtype:
    """fp32 for half types (photometric ops need the precision), else the input dtype."""
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def _to_unit(x: Tensor, value_range: list[float] | None) -> tuple[Tensor, Tensor, Tensor]:
    """Map ``x`` to ``u`` in ``[0, 1]``: ``u = clamp((x - lo) / (hi - lo))``; per-image min/max when no range is given.

    Returns ``(u, lo, scale)`` with ``lo`` and ``scale = hi - lo`` broadcastable to ``x``.
    """
    xf = x.to(_internal_dtype(x))
    b = x.shape[0]
    if value_range is None:
        dims = tuple(range(1, x.dim()))
        lo, hi = xf.amin(dim=dims, keepdim=True), xf.amax(dim=dims, keepdim=True)
    else:
        lo = torch.full((b, *([1] * (x.dim() - 1))), value_range[0], dtype=xf.dtype, device=x.device)
        hi = torch.full_like(lo, value_range[1])
    scale = (hi - lo).clamp_min(torch.finfo(xf.dtype).tiny)
    return ((xf - lo) / scale).clamp(0.0, 1.0), lo, scale


def _from_unit(x: Tensor, u_in: Tensor, u_out: Tensor, lo: Tensor, scale: Tensor) -> Tensor:
    """Map back: pixels the ops left untouched keep their exact input value, the rest become ``lo + u·scale``."""
    return torch.where(u_out == u_in, x.to(u_out.dtype), lo + u_out * scale).to(x.dtype)


def _cutout_mask(x: Tensor, size: float, random_size: bool, generator: torch.Generator | None) -> Tensor:
    """A ``(B, 1, H, W)`` mask with one axis-aligned box per image (a square on square images), clipped at the border.

    Side: ``v·H`` by ``v·W`` with ``v ~ U(0, size)`` (``v = size`` if not ``random_size``); centre uniform in the
    image. A pixel is inside when its centre is.
    """
    b, h, w = x.shape[0], x.shape[-2], x.shape[-1]
    r = torch.rand(3, b, device=x.device, generator=generator, dtype=torch.float32)
    frac = size * r[0] if random_size else torch.full_like(r[0], size)
    cy, cx = r[1] * h, r[2] * w
    half_h, half_w = (frac * h / 2).unsqueeze(1), (frac * w / 2).unsqueeze(1)
    rows = torch.arange(h, device=x.device, dtype=torch.float32) + 0.5
    cols = torch.arange(w, device=x.device, dtype=torch.float32) + 0.5
    in_r = (rows >= cy.unsqueeze(1) - half_h) & (rows < cy.unsqueeze(1) + half_h)  # (B, H)
    in_c = (cols >= cx.unsqueeze(1) - half_w) & (cols < cx.unsqueeze(1) + half_w)  # (B, W)
    return (in_r.unsqueeze(2) & in_c.unsqueeze(1)).unsqueeze(1)


class WeakAugment(Augmentation):
    r"""FixMatch's weak view: a random horizontal flip and a random integer translation, batched with index gathers.

    Paper: *FixMatch: Simplifying Semi-Supervised Learning with Consistency
    and Confidence*, https://arxiv.org/abs/2001.07685: "flip-and-shift":
    horizontal flip with probability 0.5, then a translation by up to 12.5 %
    of the image size (on CIFAR, pad 4 px with reflection and crop 32 px back).
    Each sample draws its flip and its shifts
    :math:`d_y \sim \mathcal U\{-p_h..p_h\},\ d_x \sim \mathcal U\{-p_w..p_w\}` with
    :math:`p = \lfloor \text{translate} \cdot \text{size} \rfloor` (3 px on 28-px Fashion-MNIST), and

    .. math:: \tilde x_{c,i,j} = x_{c,\ r(i - d_y),\ f(r(j - d_x))},

    with :math:`r` the reflection at the border (``padding_mode="reflect"``,
    as ``np.pad(mode="reflect")``) and :math:`f(j) = W - 1 - j` for flipped samples.
    ``padding_mode="constant"`` writes ``fill`` where the shifted image does
    not reach instead. Pixel values are copied, never resampled, so integer
    images work too and the view is exact in any dtype.

    Args:
        flip_p: The probability of the horizontal flip.
        translate: The largest shift as a fraction of the height and width, in ``[0, 0.5]``.
        padding_mode: ``"reflect"`` (FixMatch) or ``"constant"``.
        fill: The value of uncovered pixels with ``padding_mode="constant"`` (in the input's units).

    Example:
        >>> x = torch.arange(4.0).reshape(1, 1, 1, 4)
        >>> WeakAugment(flip_p=1.0, translate=0.0)(x)
        tensor([[[[3., 2., 1., 0.]]]])
        >>> _ = torch.manual_seed(0)
        >>> WeakAugment(flip_p=0.0, translate=0.25, padding_mode="constant", fill=-1.0)(x)
        tensor([[[[-1.,  0.,  1.,  2.]]]])
    """

    def __init__(
        self,
        flip_p: float = 0.5,
        translate: float = 0.125,
        padding_mode: Literal["reflect", "constant"] = "reflect",
        fill: float = 0.0,
    ) -> None:
        self.flip_p = check_float("flip_p", flip_p, 0.0, 1.0)
        self.translate = check_float("translate", translate, 0.0, 0.5)
        self.padding_mode = check_choice("padding_mode", padding_mode, ["reflect", "constant"])
        self.fill = check_float("fill", fill)

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        _check_batch(x, "WeakAugment", dims=(4,), floating=False)
        b, c, h, w = x.shape
        dev = x.device
        flip = torch.rand(b, device=dev, generator=generator) < self.flip_p
        ph, pw = int(self.translate * h), int(self.translate * w)
        dy = torch.randint(-ph, ph + 1, (b, 1), device=dev, generator=generator)
        dx = torch.randint(-pw, pw + 1, (b, 1), device=dev, generator=generator)
        rows = torch.arange(h, device=dev) - dy  # (B, H): output row i reads input row i - dy
        cols = torch.arange(w, device=dev) - dx  # (B, W)
        valid_r, valid_c = (rows >= 0) & (rows < h), (cols >= 0) & (cols < w)
        if self.padding_mode == "reflect":  # |shift| <= size / 2 <= size - 1: one reflection suffices
            rows, cols = rows.abs(), cols.abs()
            rows = torch.where(rows >= h, 2 * (h - 1) - rows, rows)
            cols = torch.where(cols >= w, 2 * (w - 1) - cols, cols)
        else:
            rows, cols = rows.clamp(0, h - 1), cols.clamp(0, w - 1)
        cols = torch.where(flip.unsqueeze(1), w - 1 - cols, cols)
        out = x.gather(2, rows.view(b, 1, h, 1).expand(b, c, h, w))
        out = out.gather(3, cols.view(b, 1, 1, w).expand(b, c, h, w))
        if self.padding_mode == "constant":
            valid = valid_r.view(b, 1, h, 1) & valid_c.view(b, 1, 1, w)
            out = torch.where(valid, out, torch.full((), self.fill, dtype=x.dtype, device=dev))
        return out

    @property
    def moves_elements(self) -> bool:
        return self.flip_p > 0 or self.translate > 0


class Cutout(Augmentation):
    r"""Cutout: fill one random box per image (a square of side ``v`` times the image side) with a constant.

    Paper: *Improved Regularization of Convolutional Neural Networks with
    Cutout*, https://arxiv.org/abs/1708.04552; FixMatch
    (https://arxiv.org/abs/2001.07685) ends its strong view with it, a grey
    square of side :math:`v \cdot` width with :math:`v \sim \mathcal U(0, 0.5)`.
    Each image draws :math:`v` (fixed to ``size`` when ``random_size=False``)
    and a uniform centre; the box is clipped at the border and shared by the
    channels. The fill is a fraction of the value range: ``0.5`` (default) is
    FixMatch's grey, ``0`` black. With ``value_range=None`` the range is each
    image's own ``[min, max]``, which suits normalised images: Fashion-MNIST
    standardised by :class:`~lightning_reg.data.datamodules.FashionMNISTDataModule`
    has ``value_range=[-0.8102, 2.0227]`` (``(0 - 0.286) / 0.353``, ``(1 - 0.286) / 0.353``).

    Args:
        size: The largest side ``v`` as a fraction of the image side, in ``[0, 1)``; ``0`` disables it.
        random_size: Draw ``v ~ U(0, size)`` per image (FixMatch); ``False`` always uses ``size``.
        fill: The fill as a fraction of the value range, in ``[0, 1]``.
        value_range: ``[low, high]`` of the pixel values, or ``None`` for each image's ``[min, max]``.

    Example:
        >>> _ = torch.manual_seed(2)
        >>> Cutout(size=0.5, random_size=False, fill=0.0, value_range=[0.0, 1.0])(torch.ones(1, 1, 4, 4))[0, 0]
        tensor([[1., 1., 1., 1.],
                [1., 1., 0., 0.],
                [1., 1., 0., 0.],
                [1., 1., 1., 1.]])
    """

    def __init__(
        self, size: float = 0.5, random_size: bool = True, fill: float = 0.5, value_range: list[float] | None = None
    ) -> None:
        self.size = check_float("size", size, 0.0, 1.0, high_inclusive=False)
        self.random_size = check_bool("random_size", random_size)
        self.fill = check_float("fill", fill, 0.0, 1.0)
        self.value_range = _check_value_range(value_range)

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        _check_batch(x, "Cutout", dims=(4,))
        if self.size == 0.0:
            return x
        u, lo, scale = _to_unit(x, self.value_range)
        mask = _cutout_mask(x, self.size, self.random_size, generator)
        out = torch.where(mask, torch.full((), self.fill, dtype=u.dtype, device=u.device), u)
        return _from_unit(x, u, out, lo, scale)


_GEOMETRIC_OPS = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")
_BLEND_OPS = ("brightness", "color", "contrast", "sharpness")
#: Strength of each op at magnitude 1 (FixMatch/USB ranges): degrees, shear factor, fraction of the size,
#: largest change of the enhancement factor.
_MAX_ROTATE, _MAX_SHEAR, _MAX_TRANSLATE, _MAX_ENHANCE = 30.0, 0.3, 0.3, 0.9


def _grey(u: Tensor) -> Tensor:
    """``(B, 1, H, W)`` luminance (ITU-R 601-2, as PIL) of RGB images, the channel mean otherwise."""
    if u.shape[1] == 3:
        return 0.299 * u[:, 0:1] + 0.587 * u[:, 1:2] + 0.114 * u[:, 2:3]
    return u.mean(1, keepdim=True)


def _sharpness_degenerate(u: Tensor) -> Tensor:
    """PIL's SMOOTH filter ``[[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13`` on interior pixels; the border is kept."""
    if u.shape[-2] < 3 or u.shape[-1] < 3:
        return u
    smooth = (F.avg_pool2d(u, 3, stride=1) * 9.0 + 4.0 * u[..., 1:-1, 1:-1]) / 13.0
    return F.pad(smooth, (1, 1, 1, 1)) + F.pad(torch.zeros_like(smooth), (1, 1, 1, 1), value=1.0) * u


def _equalize(u: Tensor) -> Tensor:
    """Histogram equalization per image and channel of the 8-bit quantised image (torchvision's/PIL's lookup table)."""
    b, c = u.shape[:2]
    q = (u * 255.0).round().long().flatten(2)  # (B, C, N)
    n = q.shape[-1]
    # Counts from sorted values: no atomics (deterministic) and no output-size sync, unlike bincount on CUDA.
    edges = torch.arange(257, device=u.device).expand(b, c, 257).contiguous()
    cum = torch.searchsorted(q.sort(dim=-1).values, edges).to(u.dtype)  # (B, C, 257): pixels below each level
    below, hist = cum[..., :256], cum[..., 1:] - cum[..., :256]
    last = hist.gather(2, q.amax(2, keepdim=True))  # pixels in the highest occupied bin
    step = torch.floor((n - last) / 255.0)
    lut = (torch.floor((below + torch.floor(step / 2)) / step.clamp_min(1.0)).clamp(0, 255)) / 255.0
    out = lut.gather(2, q).view_as(u)
    return torch.where(step.unsqueeze(-1) > 0, out, u)  # a (nearly) constant channel is left as is


def _geometric_theta(op: str, v: Tensor, h: int, w: int) -> Tensor:
    """``(B, 2, 3)`` ``affine_grid`` matrices (output → input, normalised coordinates) about the image centre."""
    one, zero = torch.ones_like(v), torch.zeros_like(v)
    if op == "rotate":
        a = v * (_MAX_ROTATE * math.pi / 180.0)
        cos, sin = torch.cos(a), torch.sin(a)
        rows = [[cos, -sin * (h / w), zero], [sin * (w / h), cos, zero]]
    elif op == "shear_x":
        rows = [[one, v * (_MAX_SHEAR * h / w), zero], [zero, one, zero]]
    elif op == "shear_y":
        rows = [[one, zero, zero], [v * (_MAX_SHEAR * w / h), one, zero]]
    elif op == "translate_x":
        rows = [[one, zero, -2.0 * _MAX_TRANSLATE * v], [zero, one, zero]]
    else:  # translate_y
        rows = [[one, zero, zero], [zero, one, -2.0 * _MAX_TRANSLATE * v]]
    return torch.stack([torch.stack(r, dim=1) for r in rows], dim=1)


def _affine_grid(theta: Tensor, h: int, w: int) -> Tensor:
    """``F.affine_grid(theta, (B, C, h, w), align_corners=False)`` as elementwise ops (faster than its k=3 ``bmm``)."""
    xs = ((torch.arange(w, device=theta.device, dtype=theta.dtype) * 2 + 1) / w - 1).view(1, 1, w)
    ys = ((torch.arange(h, device=theta.device, dtype=theta.dtype) * 2 + 1) / h - 1).view(1, h, 1)
    t = theta.reshape(-1, 6, 1, 1)
    return torch.stack([t[:, 0] * xs + t[:, 1] * ys + t[:, 2], t[:, 3] * xs + t[:, 4] * ys + t[:, 5]], dim=-1)


class RandAugment(Augmentation):
    r"""FixMatch's strong view: RandAugment with per-sample random ops and magnitudes, then Cutout, batched on device.

    Paper: *RandAugment: Practical automated data augmentation with a reduced
    search space*, https://arxiv.org/abs/1909.13719, as FixMatch
    (https://arxiv.org/abs/2001.07685) uses it: each sample applies
    ``num_ops`` ops drawn uniformly (with replacement) from ``ops``, each with
    its own magnitude :math:`m \sim \mathcal U(0, 1)` ("we randomly sample the
    magnitude ... at each training step"; ``magnitude=m`` fixes it as in the
    original RandAugment) and a random sign, then :class:`Cutout` with
    :math:`v \sim \mathcal U(0, \text{cutout})`. Every op runs on the whole
    batch and each sample keeps the result of its own op (``torch.where``):
    no per-sample loop and no host sync. The geometric ops of a round share one
    ``affine_grid`` + ``grid_sample``.

    The ops work on :math:`u = (x - \text{low}) / (\text{high} - \text{low})` clipped
    to :math:`[0, 1]`, with ``value_range=[low, high]`` or, if ``None``, each
    image's own ``[min, max]`` (so normalised images need no conversion; for
    the standardised Fashion-MNIST of the built-in datamodules the exact
    range is ``[-0.8102, 2.0227]``). Pixels an op leaves unchanged keep their
    exact input value; the others are mapped back to ``low + u (high - low)``.
    Half-precision inputs are processed in fp32 and returned in their dtype.

    ===============  =====================================================  ==========================
    op               effect at magnitude ``m`` with a random sign ``s``     ``m = 0``
    ===============  =====================================================  ==========================
    ``identity``     none                                                   identity
    ``autocontrast`` stretch each channel to ``[0, 1]`` (no magnitude)      (not the identity)
    ``equalize``     histogram equalization of the 8-bit quantised image,   (not the identity)
                     torchvision's lookup table (no magnitude)
    ``rotate``       rotate by ``30° · m · s`` about the centre             identity
    ``solarize``     invert pixels ``u >= 1 - m``                           identity
    ``color``        blend with the grey image, factor ``1 + 0.9 m s``      identity
    ``posterize``    keep ``8 - round(4 m)`` bits                           identity (8 bits)
    ``contrast``     blend with the mean grey level, factor ``1 + 0.9 m s`` identity
    ``brightness``   blend with black, factor ``1 + 0.9 m s``               identity
    ``sharpness``    blend with PIL's smoothed image, factor ``1 + 0.9 m s`` identity
    ``shear_x/_y``   shear by ``0.3 m s`` about the centre                  identity
    ``translate_x``  shift by ``0.3 m s`` of the width (height for ``_y``)  identity
    ===============  =====================================================  ==========================

    Geometric ops fill uncovered pixels with black (``u = 0``, PIL's
    default). The results are clipped to ``[0, 1]`` after every op.
    Differences from PIL, documented: ``equalize`` works on the 8-bit
    quantisation of ``u``; shears are about the centre (PIL's about the
    corner, which also shifts the image); ``color`` is the identity on
    single-channel images.

    Args:
        num_ops: Ops per sample (FixMatch: 2).
        magnitude: A fixed magnitude in ``[0, 1]``, or ``None`` to draw ``m ~ U(0, 1)`` per sample and op.
        ops: The op names to draw from (default: all of :attr:`OPS`).
        cutout: The largest Cutout side as a fraction of the image side, in ``[0, 1)`` (FixMatch: 0.5; 0: none).
        cutout_fill: The Cutout fill as a fraction of the value range (0.5: grey, as FixMatch; 0: black).
        value_range: ``[low, high]`` of the pixel values, or ``None`` for each image's ``[min, max]``.
        mode: ``"nearest"`` (as PIL's and torchvision's RandAugment) or ``"bilinear"`` resampling of geometric ops.

    Example:
        >>> x = torch.rand(4, 1, 28, 28)
        >>> torch.equal(RandAugment(magnitude=0.0, ops=["rotate", "solarize"], cutout=0.0)(x), x)
        True
        >>> RandAugment()(x).shape
        torch.Size([4, 1, 28, 28])
    """

    #: The op names, in the order the op index is drawn from.
    OPS: tuple[str, ...] = (
        "identity",
        "autocontrast",
        "equalize",
        "rotate",
        "solarize",
        "color",
        "posterize",
        "contrast",
        "brightness",
        "sharpness",
        "shear_x",
        "shear_y",
        "translate_x",
        "translate_y",
    )

    def __init__(
        self,
        num_ops: int = 2,
        magnitude: float | None = None,
        ops: list[str] | None = None,
        cutout: float = 0.5,
        cutout_fill: float = 0.5,
        value_range: list[float] | None = None,
        mode: Literal["nearest", "bilinear"] = "nearest",
    ) -> None:
        self.num_ops = check_int("num_ops", num_ops, low=0)
        self.magnitude = None if magnitude is None else check_float("magnitude", magnitude, 0.0, 1.0)
        ops = list(self.OPS) if ops is None else list(ops)
        if not ops:
            raise ValueError(f"Expected argument `ops` to be a non-empty list of op names from {list(self.OPS)}.")
        self.ops = [check_choice("ops", op, list(self.OPS)) for op in ops]
        self.cutout = check_float("cutout", cutout, 0.0, 1.0, high_inclusive=False)
        self.cutout_fill = check_float("cutout_fill", cutout_fill, 0.0, 1.0)
        self.value_range = _check_value_range(value_range)
        self.mode = check_choice("mode", mode, ["nearest", "bilinear"])

    def _round(self, u: Tensor, op: Tensor, m: Tensor, sign: Tensor) -> Tensor:
        """One round: sample ``i`` applies op ``self.ops[op[i]]`` with magnitude ``m[i]`` and sign ``sign[i]``."""
        b, _, h, w = u.shape

        def chosen(name: str) -> Tensor:
            hit = torch.zeros(b, dtype=torch.bool, device=u.device)
            for k, op_name in enumerate(self.ops):  # a name may be listed twice (a higher weight)
                if op_name == name:
                    hit = hit | (op == k)
            return hit.view(b, 1, 1, 1)

        names = set(self.ops)
        out = u
        signed = m * sign
        geometric = [n for n in _GEOMETRIC_OPS if n in names]
        if geometric:
            theta = torch.eye(2, 3, dtype=u.dtype, device=u.device).expand(b, 2, 3)
            is_geo = torch.zeros(b, 1, 1, 1, dtype=torch.bool, device=u.device)
            for name in geometric:
                hit = chosen(name)
                theta = torch.where(hit.view(b, 1, 1), _geometric_theta(name, signed, h, w), theta)
                is_geo = is_geo | hit
            grid = _affine_grid(theta, h, w)
            warped = F.grid_sample(u, grid, mode=self.mode, padding_mode="zeros", align_corners=False)
            out = torch.where(is_geo & (m > 0).view(b, 1, 1, 1), warped, out)
        # PIL's ImageEnhance: blend(degenerate, u, f) = u + (1 - f)(degenerate - u), f = 1 + 0.9 m s (exact at f = 1).
        one_minus_f = (-_MAX_ENHANCE * signed).view(b, 1, 1, 1)
        for name in _BLEND_OPS:
            if name not in names:
                continue
            if name == "brightness":
                degenerate = torch.zeros_like(u)
            elif name == "color":
                degenerate = _grey(u).expand_as(u)
            elif name == "contrast":
                degenerate = _grey(u).mean((1, 2, 3), keepdim=True).expand_as(u)
            else:
                degenerate = _sharpness_degenerate(u)
            out = torch.where(chosen(name), u + one_minus_f * (degenerate - u), out)
        if "autocontrast" in names:
            lo, hi = u.amin((2, 3), keepdim=True), u.amax((2, 3), keepdim=True)
            stretched = torch.where(hi > lo, (u - lo) / (hi - lo).clamp_min(torch.finfo(u.dtype).tiny), u)
            out = torch.where(chosen("autocontrast"), stretched, out)
        if "equalize" in names:
            out = torch.where(chosen("equalize"), _equalize(u), out)
        if "solarize" in names:
            invert = (u >= (1.0 - m).view(b, 1, 1, 1)) & (m > 0).view(b, 1, 1, 1)
            out = torch.where(chosen("solarize") & invert, 1.0 - u, out)
        if "posterize" in names:
            levels = torch.exp2(torch.round(4.0 * m)).view(b, 1, 1, 1)  # 2 ** (8 - bits)
            poster = torch.floor(torch.round(u * 255.0) / levels) * levels / 255.0
            out = torch.where(chosen("posterize") & (levels > 1), poster, out)
        return out.clamp(0.0, 1.0)

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        _check_batch(x, "RandAugment", dims=(4,))
        u_in, lo, scale = _to_unit(x, self.value_range)
        b, dev, dtype = x.shape[0], x.device, u_in.dtype
        op = torch.randint(len(self.ops), (self.num_ops, b), device=dev, generator=generator)
        if self.magnitude is None:
            m = torch.rand(self.num_ops, b, device=dev, generator=generator, dtype=dtype)
        else:
            m = torch.full((self.num_ops, b), self.magnitude, device=dev, dtype=dtype)
        sign = torch.where(torch.rand(self.num_ops, b, device=dev, generator=generator) < 0.5, -1.0, 1.0).to(dtype)
        u = u_in
        for k in range(self.num_ops):
            u = self._round(u, op[k], m[k], sign[k])
        if self.cutout > 0:
            mask = _cutout_mask(x, self.cutout, True, generator)
            u = torch.where(mask, torch.full((), self.cutout_fill, dtype=dtype, device=dev), u)
        return _from_unit(x, u_in, u, lo, scale)

    @property
    def moves_elements(self) -> bool:
        return self.num_ops > 0 and any(op in _GEOMETRIC_OPS for op in self.ops)


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

    @property
    def moves_elements(self) -> bool:
        return any(a.moves_elements for a in self.augmentations)

    @property
    def can_invert_output(self) -> bool:
        return all(a.can_invert_output for a in self.augmentations)

    def views_and_params(self, x: Tensor, generator: torch.Generator | None = None) -> tuple[list[Tensor], list[Any]]:
        out: list[tuple[Tensor, list[Any]]] = [(x, [])]
        for a in self.augmentations:
            nxt: list[tuple[Tensor, list[Any]]] = []
            for prev, chain in out:
                views, params = a.views_and_params(prev) if generator is None else a.views_and_params(prev, generator)
                nxt.extend((v, [*chain, p]) for v, p in zip(views, params))
            out = nxt
        return [v for v, _ in out], [chain for _, chain in out]

    def invert_output(self, out: Tensor, params: Any, size: Sequence[int]) -> Tensor:
        """Undo the members' moves last to first (each member's record from :meth:`views_and_params`).

        Every member gets the final ``size``: a flip keeps the output's own grid and a rescale resizes to it,
        so the result is on the input's grid whatever the order.
        """
        chain = [None] * len(self.augmentations) if params is None else params
        for a, p in reversed(list(zip(self.augmentations, chain))):
            out = a.invert_output(out, p, size) if a.moves_elements else out
        if tuple(out.shape[2:]) != tuple(size):
            return super().invert_output(out, None, size)  # a clear error
        return out


_NAMED: dict[str, type[Augmentation]] = {
    "gaussian_noise": GaussianNoise,
    "patch_mask": PatchMask,
    "flip": RandomFlip,
    "resized_crop": RandomResizedCrop,
    "multiscale": MultiScale,
    "weak": WeakAugment,
    "strong": RandAugment,
    "randaugment": RandAugment,
    "cutout": Cutout,
}

AugmentationLike = str | Augmentation


def get_augmentation(augmentation: AugmentationLike, name: str = "augmentation") -> Augmentation:
    """Resolve an augmentation given by short name or as an instance.

    Short names build the class with its defaults: ``"gaussian_noise"``,
    ``"patch_mask"``, ``"flip"``, ``"resized_crop"``, ``"multiscale"``, and
    FixMatch's views ``"weak"`` (:class:`WeakAugment`), ``"strong"`` or
    ``"randaugment"`` (:class:`RandAugment`) and ``"cutout"`` (:class:`Cutout`).

    Raises:
        ValueError: For an unknown short name.
        TypeError: For anything else.

    Example:
        >>> get_augmentation("flip")
        RandomFlip(p=0.5, dims=[-1])
    """
    return resolve_named(augmentation, Augmentation, _NAMED, name)
