"""Noisy-mask segmentation from real Fashion-MNIST garments, offline: scenes, mask noise and a datamodule.

A **scene** is a ``size × size`` grey canvas (default 48 × 48) with 2–4 real
Fashion-MNIST garments (28 × 28) pasted at random positions; garments may
overlap and later ones lie on top. Each garment's foreground pixels (intensity
above ``threshold``) are labelled with its class + 1, the background with 0:
11 classes (:data:`SCENE_CLASSES`). Everything is composed at construction,
vectorised, from a seed; 6,000 scenes take about a second.

**Mask noise** is per *object*, not per pixel, in the spirit of ADELE
(Liu et al., CVPR 2022, https://arxiv.org/abs/2110.03740), whose
medical-imaging experiment synthesizes annotation noise that mimics human
errors (object boundaries drawn too wide or too narrow) and whose PASCAL VOC
masks carry realistic errors such as whole objects with the wrong class:

* *Class flips*: with probability ``flip_rate`` an object's class is replaced
  by one of the other garment classes, uniformly (the whole object is
  mislabelled).
* *Boundary errors*: with probability ``boundary_rate`` an object's mask is
  dilated or eroded (each with probability 1/2) by a square structuring
  element of radius ``r ~ U{1, …, max_radius}``, computed with ``max_pool2d``
  (:func:`morph_object_masks`). The object stays at its depth, so a dilated
  object behind another one only grows into what is visible.

The clean masks stay available as ``true_masks`` for diagnostics; training
sees ``given_masks``; ``pixel_noise_rate`` is the measured fraction of
(non-ignored) pixels whose given label differs from the true one.

Optionally (``ignore_boundary=True``) a one-pixel band along every object
edge (:func:`boundary_band`) is marked ``ignore_index``, like the void label of PASCAL VOC and Cityscapes:
in the given training masks (band of the given mask) and in the validation and
test masks (band of the clean mask).

Example:
    >>> g = torch.zeros(4, 28, 28, dtype=torch.uint8); g[:, 8:20, 8:20] = 200   # four 12×12 squares
    >>> scenes = FashionMNISTScenes(num_scenes=8, size=32, garments=(g, torch.tensor([0, 1, 2, 3])), seed=0)
    >>> tuple(scenes.images.shape), tuple(scenes.given_masks.shape), scenes.num_classes
    ((8, 1, 32, 32), (8, 32, 32), 11)
    >>> x, mask = scenes[0]
    >>> int(mask.min()) >= 0 and int(mask.max()) <= 4
    True

YAML::

    data:
      class_path: lightning_reg.data.SegmentationDataModule
      init_args: {num_train: 3000, noise_rate: 0.3, batch_size: 32}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import TensorDataset

from lightning_reg.core.validation import check_bool, check_float, check_int
from lightning_reg.data.datamodules import _RAW_CACHE, FASHION_MNIST_MEAN, FASHION_MNIST_STD, SplitLoaders
from lightning_reg.data.fashion_mnist import FASHION_MNIST_CLASSES, load_fashion_mnist, resolve_fashion_mnist_root
from lightning_reg.data.indexed import IndexedDataset

__all__ = [
    "SCENE_CLASSES",
    "FashionMNISTScenes",
    "SegmentationDataModule",
    "boundary_band",
    "morph_object_masks",
    "paint_objects",
    "sample_mask_noise",
]

#: Class names of the scenes: background (0), then the ten Fashion-MNIST classes (1–10).
SCENE_CLASSES: tuple[str, ...] = ("background", *FASHION_MNIST_CLASSES)

_GARMENT = 28  # Fashion-MNIST images are 28×28
_CHUNK = 1024  # scenes composed at once: bounds the (n, K, S, S) intermediates to ~10 MB per tensor


# -- functional core -------------------------------------------------------------------------------------
def paint_objects(footprints: Tensor, classes: Tensor) -> Tensor:
    """Render object footprints into a label map, later objects on top.

    .. math:: M_p = 1 + c_{k^*(p)}, \\quad k^*(p) = \\max\\{k : F_{k,p}\\}; \\qquad M_p = 0 \\text{ if no } F_{k,p}

    Args:
        footprints: ``(N, K, H, W)`` bool, object ``k``'s pixels (slot order is depth order).
        classes: ``(N, K)`` int64 object classes in ``[0, C-1)`` (any value where a slot is empty).

    Returns:
        ``(N, H, W)`` int64 labels: 0 for background, ``class + 1`` elsewhere.

    Example:
        >>> f = torch.zeros(1, 2, 1, 3, dtype=torch.bool); f[0, 0, 0, :2] = True; f[0, 1, 0, 1:] = True
        >>> paint_objects(f, torch.tensor([[4, 7]])).tolist()
        [[[5, 8, 8]]]
    """
    n, k, h, w = footprints.shape
    depth = torch.arange(1, k + 1, device=footprints.device).view(1, k, 1, 1)
    top = torch.where(footprints, depth, 0).amax(dim=1) - 1  # (N, H, W), -1 where nothing
    cls = classes.gather(1, top.clamp(min=0).flatten(1)).view(n, h, w)
    return torch.where(top >= 0, cls + 1, 0)


def morph_object_masks(footprints: Tensor, radius: Tensor) -> Tensor:
    """Dilate (``radius > 0``) or erode (``radius < 0``) each object mask by a square of side ``2|r| + 1``.

    .. math::
        (F \\oplus B_r)_p = \\max_{q \\in B_r(p)} F_q, \\qquad
        (F \\ominus B_r)_p = 1 - \\max_{q \\in B_r(p)} (1 - F_q)

    computed with ``max_pool2d`` (stride 1, padding ``r``; outside the canvas
    counts as neither object nor background). Only the objects that have a
    given radius are pooled with it, so the cost grows with the number of
    distinct radii, not of objects.

    Args:
        footprints: ``(N, K, H, W)`` bool object masks.
        radius: ``(N, K)`` int signed radii; 0 leaves the object unchanged.

    Returns:
        ``(N, K, H, W)`` bool, the perturbed masks.

    Example:
        >>> f = torch.zeros(1, 2, 5, 5, dtype=torch.bool); f[0, :, 1:4, 1:4] = True
        >>> out = morph_object_masks(f, torch.tensor([[1, -1]]))
        >>> int(out[0, 0].sum()), int(out[0, 1].sum())
        (25, 1)
    """
    out = footprints.clone()
    if radius.numel() == 0:
        return out
    r_max = int(radius.abs().max())
    for r in range(1, r_max + 1):
        for sign in (1, -1):
            sel = radius == sign * r
            if not bool(sel.any()):
                continue
            m = footprints[sel].unsqueeze(1).float()  # (M, 1, H, W)
            if sign > 0:
                pooled = F.max_pool2d(m, 2 * r + 1, stride=1, padding=r) > 0.5
            else:
                pooled = F.max_pool2d(1.0 - m, 2 * r + 1, stride=1, padding=r) < 0.5
            out[sel] = pooled.squeeze(1)
    return out


def sample_mask_noise(
    classes: Tensor,
    active: Tensor,
    num_classes: int,
    flip_rate: float,
    boundary_rate: float,
    max_radius: int = 2,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Draw ADELE-style object-level annotation noise: class flips and boundary dilation/erosion.

    Each active object independently

    * has its class replaced, with probability ``flip_rate``, by
      ``(c + u) mod C`` with ``u ~ U{1, …, C-1}`` (uniform over the other classes);
    * has its mask dilated or eroded, with probability ``boundary_rate``, by a radius
      ``r ~ U{1, …, max_radius}`` (sign ±1 with probability 1/2; apply it with
      :func:`morph_object_masks`).

    All draws are made for every slot, so the result for one object does not
    depend on how many objects are active.

    Args:
        classes: ``(N, K)`` int64 true object classes in ``[0, num_classes)``.
        active: ``(N, K)`` bool, which slots hold an object.
        num_classes: ``C``, the number of object classes (background excluded).
        flip_rate: Probability in ``[0, 1]`` of a class flip.
        boundary_rate: Probability in ``[0, 1]`` of a boundary error.
        max_radius: Largest dilation/erosion radius.
        generator: The random generator (seeded by the caller).

    Returns:
        ``(given_classes, radius)``: the ``(N, K)`` given classes and signed radii (0: unchanged).

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> cls, r = sample_mask_noise(torch.zeros(1000, 1, dtype=torch.long), torch.ones(1000, 1, dtype=torch.bool),
        ...                            10, flip_rate=0.3, boundary_rate=0.0, generator=g)
        >>> 0.25 < float((cls != 0).float().mean()) < 0.35, bool((r == 0).all())
        (True, True)
    """
    check_int("num_classes", num_classes, low=2)
    flip_rate = check_float("flip_rate", flip_rate, 0.0, 1.0)
    boundary_rate = check_float("boundary_rate", boundary_rate, 0.0, 1.0)
    max_radius = check_int("max_radius", max_radius, low=1)
    shape = classes.shape
    flip = (torch.rand(shape, generator=generator) < flip_rate) & active
    shift = torch.randint(1, num_classes, shape, generator=generator)
    given = torch.where(flip, (classes + shift) % num_classes, classes)
    morph = (torch.rand(shape, generator=generator) < boundary_rate) & active
    size = torch.randint(1, max_radius + 1, shape, generator=generator)
    sign = torch.randint(0, 2, shape, generator=generator) * 2 - 1
    radius = torch.where(morph, size * sign, 0)
    return given, radius


def boundary_band(masks: Tensor, background: int = 0) -> Tensor:
    """The object side of every label edge, one pixel wide: a void band like PASCAL VOC's.

    A pixel is in the band when its label is not ``background`` and one of its
    four neighbours has another label (between two objects both sides are in
    the band).

    Args:
        masks: ``(N, H, W)`` integer label maps.
        background: The background label, never in the band.

    Example:
        >>> boundary_band(torch.tensor([[[0, 0, 2, 2, 2, 1, 1]]])).int().tolist()
        [[[0, 0, 1, 0, 1, 1, 0]]]
    """
    padded = F.pad(masks.unsqueeze(1).float(), (1, 1, 1, 1), mode="replicate").squeeze(1).long()
    centre = padded[:, 1:-1, 1:-1]
    differs = (
        (padded[:, :-2, 1:-1] != centre)
        | (padded[:, 2:, 1:-1] != centre)
        | (padded[:, 1:-1, :-2] != centre)
        | (padded[:, 1:-1, 2:] != centre)
    )
    return differs & (masks != background)


def _place(garments: Tensor, oy: Tensor, ox: Tensor, size: int) -> Tensor:
    """Paste ``(n, K, 28, 28)`` garments onto ``(n, K, size, size)`` zero canvases at ``(oy, ox)``."""
    n, k = oy.shape
    canvas = torch.zeros(n, k, size, size, dtype=garments.dtype)
    ar = torch.arange(_GARMENT)
    rows = (oy.unsqueeze(-1) + ar).unsqueeze(-1)  # (n, K, 28, 1)
    cols = (ox.unsqueeze(-1) + ar).unsqueeze(-2)  # (n, K, 1, 28)
    canvas[torch.arange(n).view(n, 1, 1, 1), torch.arange(k).view(1, k, 1, 1), rows, cols] = garments
    return canvas


def _load_garments(split: str, root: str | None, download: bool) -> tuple[Tensor, Tensor]:
    """Fashion-MNIST ``(uint8 images, labels)`` of a split, resolved offline first; parsed once per process."""
    folder = resolve_fashion_mnist_root(root, download)
    key = (str(folder.resolve()), split)
    if key not in _RAW_CACHE:  # shared with FashionMNISTDataModule
        _RAW_CACHE[key] = load_fashion_mnist(split, folder)
    return _RAW_CACHE[key]


# -- dataset --------------------------------------------------------------------------------------------
class FashionMNISTScenes(TensorDataset):
    """Scenes of 2–4 real Fashion-MNIST garments with per-pixel class masks, optionally with noisy masks.

    Items are ``(x, mask)``: ``x`` is ``(1, size, size)`` float, ``mask`` is
    ``(size, size)`` int64 (the *given* mask: noisy when noise was injected,
    ``ignore_index`` on the boundary band with ``ignore_boundary``). The whole
    set is built at construction from ``seed`` (composition) and
    ``noise_seed`` (noise), so the same arguments give the same tensors, and
    changing only the noise keeps the scenes.

    Args:
        num_scenes: Number of scenes.
        split: Fashion-MNIST split the garments come from: ``"train"`` or ``"test"``.
        size: Canvas side (at least 28).
        min_objects: Fewest garments per scene.
        max_objects: Most garments per scene.
        threshold: Foreground threshold on the garment's intensity in ``[0, 1)``.
        noise_rate: Default of ``flip_rate`` and ``boundary_rate``; ``0`` gives clean masks.
        flip_rate: Probability of a whole-object class flip (``None``: ``noise_rate``).
        boundary_rate: Probability of an object's dilation or erosion (``None``: ``noise_rate``).
        max_radius: Largest dilation/erosion radius in pixels.
        ignore_boundary: Mark a band along label boundaries as ``ignore_index`` (a void label).
        ignore_index: The label of ignored pixels.
        normalize: Standardise pixels with the Fashion-MNIST mean and std (else ``[0, 1]``).
        seed: Seed of the composition (garments, counts, positions).
        noise_seed: Seed of the mask noise.
        root: Folder with the Fashion-MNIST IDX files (see
            :func:`~lightning_reg.data.fashion_mnist.resolve_fashion_mnist_root`).
        download: Download the files if no folder holds them.
        garments: ``(uint8 images (M, 28, 28), labels (M,) in [0, 10))`` to draw from instead of ``split``.

    Attributes:
        images: ``(N, 1, size, size)`` float inputs.
        true_masks: ``(N, size, size)`` int64 clean masks (no ignore band).
        given_masks: ``(N, size, size)`` int64 masks training sees.
        noisy_pixels: ``(N, size, size)`` bool, non-ignored pixels whose given label is wrong.
        pixel_noise_rate: ``noisy_pixels`` as a fraction of the non-ignored pixels.
        object_classes: ``(N, max_objects)`` true garment classes (``-1``: empty slot), in depth order.
        given_object_classes: The same after class flips.
    """

    num_classes = len(SCENE_CLASSES)
    classes = SCENE_CLASSES

    def __init__(
        self,
        num_scenes: int = 1000,
        split: str = "train",
        size: int = 48,
        min_objects: int = 2,
        max_objects: int = 4,
        threshold: float = 0.1,
        noise_rate: float = 0.0,
        flip_rate: float | None = None,
        boundary_rate: float | None = None,
        max_radius: int = 2,
        ignore_boundary: bool = False,
        ignore_index: int = -100,
        normalize: bool = True,
        seed: int = 0,
        noise_seed: int = 0,
        root: str | None = None,
        download: bool = False,
        garments: tuple[Tensor, Tensor] | None = None,
    ) -> None:
        self.num_scenes = check_int("num_scenes", num_scenes, low=1)
        if split not in ("train", "test"):
            raise ValueError(f"Expected argument `split` to be one of ['train', 'test'], but got {split!r}.")
        self.split = split
        self.size = check_int("size", size, low=_GARMENT)
        self.min_objects = check_int("min_objects", min_objects, low=1)
        self.max_objects = check_int("max_objects", max_objects, low=self.min_objects)
        self.threshold = check_float("threshold", threshold, 0.0, 1.0, high_inclusive=False)
        self.noise_rate = check_float("noise_rate", noise_rate, 0.0, 1.0)
        self.flip_rate = self.noise_rate if flip_rate is None else check_float("flip_rate", flip_rate, 0.0, 1.0)
        self.boundary_rate = (
            self.noise_rate if boundary_rate is None else check_float("boundary_rate", boundary_rate, 0.0, 1.0)
        )
        self.max_radius = check_int("max_radius", max_radius, low=1)
        self.ignore_boundary = check_bool("ignore_boundary", ignore_boundary)
        self.ignore_index = check_int("ignore_index", ignore_index)
        if 0 <= self.ignore_index < self.num_classes:
            raise ValueError(
                f"Expected argument `ignore_index` to be outside the labels [0, {self.num_classes}), but got"
                f" {ignore_index}."
            )
        self.normalize = check_bool("normalize", normalize)
        self.seed = check_int("seed", seed)
        self.noise_seed = check_int("noise_seed", noise_seed)
        if garments is None:
            pool, pool_labels = _load_garments(split, root, check_bool("download", download))
        else:
            pool, pool_labels = garments
            if pool.dim() != 3 or tuple(pool.shape[1:]) != (_GARMENT, _GARMENT) or len(pool_labels) != len(pool):
                raise ValueError(
                    "Expected argument `garments` to be (images (M, 28, 28), labels (M,)), but got shapes"
                    f" {tuple(pool.shape)} and {tuple(pool_labels.shape)}."
                )
        self._build(pool.to(torch.uint8), pool_labels.long())
        super().__init__(self.images, self.given_masks)

    def _build(self, pool: Tensor, pool_labels: Tensor) -> None:
        n, k, s = self.num_scenes, self.max_objects, self.size
        gen = torch.Generator().manual_seed(self.seed)
        pick = torch.randint(0, len(pool), (n, k), generator=gen)
        count = torch.randint(self.min_objects, self.max_objects + 1, (n, 1), generator=gen)
        oy = torch.randint(0, s - _GARMENT + 1, (n, k), generator=gen)
        ox = torch.randint(0, s - _GARMENT + 1, (n, k), generator=gen)
        active = torch.arange(k).unsqueeze(0) < count
        classes = torch.where(active, pool_labels[pick], -1)
        noise_gen = torch.Generator().manual_seed(self.noise_seed)
        given_classes, radius = sample_mask_noise(
            classes.clamp(min=0),
            active,
            len(FASHION_MNIST_CLASSES),
            self.flip_rate,
            self.boundary_rate,
            self.max_radius,
            generator=noise_gen,
        )
        self.object_classes = classes
        self.given_object_classes = torch.where(active, given_classes, -1)
        threshold = round(self.threshold * 255)
        images = torch.empty(n, 1, s, s)
        true_masks = torch.empty(n, s, s, dtype=torch.long)
        given_masks = torch.empty(n, s, s, dtype=torch.long)
        for start in range(0, n, _CHUNK):  # chunks bound the memory; every random draw was made above
            sl = slice(start, min(start + _CHUNK, n))
            garments = pool[pick[sl]] * active[sl].view(-1, k, 1, 1).to(torch.uint8)
            canvas = _place(garments, oy[sl], ox[sl], s)  # (c, K, S, S) uint8
            fg = canvas > threshold
            true = paint_objects(fg, classes[sl].clamp(min=0))
            depth = torch.arange(1, k + 1).view(1, k, 1, 1)
            top = torch.where(fg, depth, 0).amax(dim=1, keepdim=True) - 1
            pixels = torch.where(
                top >= 0, canvas.gather(1, top.clamp(min=0)), canvas.amax(dim=1, keepdim=True)
            )  # the top garment's pixel; elsewhere the faint (sub-threshold) garment pixels
            images[sl] = pixels.float().div_(255.0)
            true_masks[sl] = true
            given_masks[sl] = paint_objects(morph_object_masks(fg, radius[sl]), given_classes[sl])
        if self.normalize:
            images.sub_(FASHION_MNIST_MEAN).div_(FASHION_MNIST_STD)
        self.images = images
        self.true_masks = true_masks
        if self.ignore_boundary:
            given_masks[boundary_band(given_masks)] = self.ignore_index
        self.given_masks = given_masks
        valid = given_masks != self.ignore_index
        self.noisy_pixels = valid & (given_masks != true_masks)
        self.pixel_noise_rate = float(self.noisy_pixels.sum()) / max(int(valid.sum()), 1)

    def describe(self) -> dict[str, Any]:
        """A summary: scenes, canvas, classes and the measured pixel noise."""
        return {
            "scenes": self.num_scenes,
            "size": self.size,
            "num_classes": self.num_classes,
            "pixel_noise_rate": round(self.pixel_noise_rate, 4),
        }


# -- datamodule -----------------------------------------------------------------------------------------
class SegmentationDataModule(SplitLoaders, L.LightningDataModule):
    """Noisy-mask semantic segmentation on :class:`FashionMNISTScenes`, offline.

    * **train**: ``num_train`` scenes of garments from the first 50,000
      Fashion-MNIST training images, with mask noise (``noise_rate``, …);
      batches are ``(x, mask, index)`` with ``x`` ``(B, 1, S, S)`` and
      ``mask`` ``(B, S, S)`` int64; the loader is a
      :class:`~lightning_reg.data.ResumableDataLoader` over an
      :class:`~lightning_reg.data.EpochSeededSampler`, so a mid-epoch resume
      is exact.
    * **val**: ``num_val`` scenes from the last 10,000 training images, clean masks.
    * **test**: ``num_test`` scenes from the Fashion-MNIST test split, clean masks.

    Validation and test batches are ``(x, mask)``. With ``ignore_boundary``
    a band along label boundaries is ``ignore_index`` in every split (the
    given band in training; the clean band in validation and test).

    Args:
        num_train: Training scenes.
        num_val: Validation scenes (``0``: no validation loop).
        num_test: Test scenes.
        size: Canvas side.
        min_objects: Fewest garments per scene.
        max_objects: Most garments per scene.
        threshold: Foreground threshold in ``[0, 1)``.
        noise_rate: Object-level mask noise of the training split (see :class:`FashionMNISTScenes`).
        flip_rate: Class-flip probability (``None``: ``noise_rate``).
        boundary_rate: Dilation/erosion probability (``None``: ``noise_rate``).
        max_radius: Largest dilation/erosion radius.
        ignore_boundary: Mark label boundaries as ``ignore_index``.
        ignore_index: The ignored label (``F.cross_entropy``'s default, −100).
        normalize: Standardise the pixels.
        root: Folder with the Fashion-MNIST IDX files.
        download: Download them if no folder holds them.
        batch_size: Training batch size.
        eval_batch_size: Validation and test batch size.
        num_workers: ``DataLoader`` workers.
        seed: Seed of the composition and of the training shuffle.
        noise_seed: Seed of the mask noise.
        drop_last: Drop the last incomplete training batch.

    Attributes (after ``setup("fit")``):
        train_dataset: An :class:`~lightning_reg.data.IndexedDataset` over the training scenes.
        true_masks: The clean training masks ``(num_train, S, S)``.
        given_masks: The training masks as given (noisy).
        pixel_noise_rate: The measured fraction of non-ignored training pixels with a wrong label.

    Example:
        >>> dm = SegmentationDataModule(num_train=64, num_val=16, noise_rate=0.3, batch_size=8)  # doctest: +SKIP
        >>> dm.setup("fit"); x, mask, index = next(iter(dm.train_dataloader()))  # doctest: +SKIP
        >>> tuple(x.shape), tuple(mask.shape)  # doctest: +SKIP
        ((8, 1, 48, 48), (8, 48, 48))
    """

    num_classes = len(SCENE_CLASSES)
    classes = SCENE_CLASSES
    #: Fashion-MNIST training images reserved for the training scenes; the rest build the validation scenes.
    train_pool = 50_000

    def __init__(
        self,
        num_train: int = 4000,
        num_val: int = 500,
        num_test: int = 1000,
        size: int = 48,
        min_objects: int = 2,
        max_objects: int = 4,
        threshold: float = 0.1,
        noise_rate: float = 0.0,
        flip_rate: float | None = None,
        boundary_rate: float | None = None,
        max_radius: int = 2,
        ignore_boundary: bool = False,
        ignore_index: int = -100,
        normalize: bool = True,
        root: str | None = None,
        download: bool = False,
        batch_size: int = 32,
        eval_batch_size: int = 256,
        num_workers: int = 0,
        seed: int = 0,
        noise_seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        super().__init__()
        self.num_train = check_int("num_train", num_train, low=1)
        self.num_val = check_int("num_val", num_val, low=0)
        self.num_test = check_int("num_test", num_test, low=1)
        self.scene_args: dict[str, Any] = {
            "size": check_int("size", size, low=_GARMENT),
            "min_objects": check_int("min_objects", min_objects, low=1),
            "max_objects": check_int("max_objects", max_objects, low=min_objects),
            "threshold": check_float("threshold", threshold, 0.0, 1.0, high_inclusive=False),
            "ignore_boundary": check_bool("ignore_boundary", ignore_boundary),
            "ignore_index": check_int("ignore_index", ignore_index),
            "normalize": check_bool("normalize", normalize),
        }
        self.size, self.min_objects, self.max_objects = size, min_objects, max_objects
        self.threshold, self.ignore_boundary, self.ignore_index = threshold, ignore_boundary, ignore_index
        self.normalize = normalize
        self.noise_rate = check_float("noise_rate", noise_rate, 0.0, 1.0)
        self.flip_rate = None if flip_rate is None else check_float("flip_rate", flip_rate, 0.0, 1.0)
        self.boundary_rate = None if boundary_rate is None else check_float("boundary_rate", boundary_rate, 0.0, 1.0)
        self.max_radius = check_int("max_radius", max_radius, low=1)
        if root is not None and not isinstance(root, (str, Path)):
            raise TypeError(f"Expected argument `root` to be a path or None, but got {root!r}.")
        self.root = None if root is None else str(root)
        self.download = check_bool("download", download)
        self.batch_size = check_int("batch_size", batch_size, low=1)
        self.eval_batch_size = check_int("eval_batch_size", eval_batch_size, low=1)
        self.num_workers = check_int("num_workers", num_workers, low=0)
        self.seed = check_int("seed", seed)
        self.noise_seed = check_int("noise_seed", noise_seed)
        self.drop_last = check_bool("drop_last", drop_last)
        self.train_scenes: FashionMNISTScenes | None = None
        self.train_dataset: IndexedDataset | None = None
        self.val_dataset: FashionMNISTScenes | None = None
        self.test_dataset: FashionMNISTScenes | None = None
        self.true_masks: Tensor | None = None
        self.given_masks: Tensor | None = None
        self.pixel_noise_rate: float | None = None

    def prepare_data(self) -> None:
        resolve_fashion_mnist_root(self.root, self.download)

    def _scenes(self, num: int, garments: tuple[Tensor, Tensor], seed: int, noisy: bool) -> FashionMNISTScenes:
        noise: dict[str, Any] = {"noise_rate": 0.0, "flip_rate": None, "boundary_rate": None}
        if noisy:
            noise = {"noise_rate": self.noise_rate, "flip_rate": self.flip_rate, "boundary_rate": self.boundary_rate}
        return FashionMNISTScenes(
            num_scenes=num,
            max_radius=self.max_radius,
            seed=seed,
            noise_seed=self.noise_seed,
            garments=garments,
            **noise,
            **self.scene_args,
        )

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit", "validate") and self.train_dataset is None:
            images, labels = _load_garments("train", self.root, self.download)
            cut = min(self.train_pool, len(labels) - 1)
            self.train_scenes = self._scenes(self.num_train, (images[:cut], labels[:cut]), self.seed, noisy=True)
            self.train_dataset = IndexedDataset(self.train_scenes)
            self.true_masks = self.train_scenes.true_masks
            self.given_masks = self.train_scenes.given_masks
            self.pixel_noise_rate = self.train_scenes.pixel_noise_rate
            if self.num_val > 0:
                self.val_dataset = self._scenes(self.num_val, (images[cut:], labels[cut:]), self.seed + 1, False)
        if stage in (None, "test", "predict") and self.test_dataset is None:
            self.test_dataset = self._scenes(
                self.num_test, _load_garments("test", self.root, self.download), self.seed + 2, noisy=False
            )

    def describe(self) -> dict[str, Any]:
        """A summary for reports: sizes, classes and the measured pixel noise of the training masks."""
        out: dict[str, Any] = {"num_classes": self.num_classes}
        for name in ("train", "val", "test"):
            ds = getattr(self, f"{name}_dataset")
            if ds is not None:
                out[name] = len(ds)
        if self.pixel_noise_rate is not None:
            out["pixel_noise"] = f"{self.pixel_noise_rate:.1%}"
        return out
