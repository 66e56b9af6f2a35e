r"""CutMix (Yun et al., ICCV 2019) and copy-paste of label maps (BCP, Bai et al., CVPR 2023).

Papers: *CutMix: Regularization Strategy to Train Strong Classifiers with Localizable Features*,
https://arxiv.org/abs/1905.04899; *Bidirectional Copy-Paste for Semi-Supervised Medical Image
Segmentation*, https://arxiv.org/abs/2305.00673.

A box :math:`B` is cut from a partner image :math:`x_{\pi(i)}` and pasted into :math:`x_i`:

.. math:: \tilde x_i = M \odot x_i + (1 - M) \odot x_{\pi(i)}, \qquad M = 1 - \mathbb{1}_B

For classification the target is mixed with the share of the image that was kept,
:math:`\tilde q_i = \lambda' q_i + (1 - \lambda') q_{\pi(i)}`,
:math:`\lambda' = 1 - |B| / (HW)`; for segmentation the label map is pasted with the same box,
:math:`\tilde y_i = M \odot y_i + (1 - M) \odot y_{\pi(i)}`.

Boxes are ``(N, 4)`` integer tensors of half-open ``[y0, y1) × [x0, x1)`` rows and columns over the
last two (spatial) dimensions, drawn on the CPU (reproducible under ``torch.manual_seed`` whatever
the device). ``N`` is 1 (one box for the batch, as the paper) or the batch size (one per sample):
the masks are built by broadcasting, without Python loops over samples.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["copy_paste_partners", "cutmix_area_lambda", "cutmix_box", "cutmix_mask", "paste_box"]


def cutmix_box(
    lam: float | Tensor, size: tuple[int, int], num_boxes: int = 1, generator: torch.Generator | None = None
) -> Tensor:
    r"""Draw boxes of area about :math:`(1 - \lambda) HW` at uniformly random centres, clipped to the image.

    As the official code (``rand_bbox``):

    .. math::
        r_h = \lfloor H \sqrt{1 - \lambda} \rfloor,\quad r_w = \lfloor W \sqrt{1 - \lambda} \rfloor,\quad
        c_y \sim \mathcal{U}\{0, \dots, H - 1\},\quad c_x \sim \mathcal{U}\{0, \dots, W - 1\},

        y_0 = \mathrm{clip}(c_y - \lfloor r_h / 2 \rfloor, 0, H),\quad
        y_1 = \mathrm{clip}(c_y + \lfloor r_h / 2 \rfloor, 0, H)

    and the same for :math:`x_0, x_1`. Clipping makes the box smaller, so mix targets with the
    actual kept share :func:`cutmix_area_lambda`, not :math:`\lambda`.

    Args:
        lam: :math:`\lambda \in [0, 1]` (a float, or an ``(N,)`` tensor with one per box).
        size: The spatial size ``(H, W)``.
        num_boxes: ``N``, the number of boxes (1 for the batch, or one per sample).
        generator: An optional CPU generator (default: torch's global one).

    Returns:
        ``(N, 4)`` int64 CPU tensor of ``(y0, y1, x0, x1)``.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> cutmix_box(0.75, (8, 8), generator=g)  # a 4 x 4 box centred at (4, 7), clipped at the right edge
        tensor([[2, 6, 5, 8]])
    """
    h, w = int(size[0]), int(size[1])
    lam_t = torch.as_tensor(lam, dtype=torch.float64).reshape(-1).expand(num_boxes)
    rat = torch.sqrt((1.0 - lam_t).clamp(0.0, 1.0))
    half_h = torch.floor(h * rat).long() // 2
    half_w = torch.floor(w * rat).long() // 2
    cy = torch.randint(h, (num_boxes,), generator=generator)
    cx = torch.randint(w, (num_boxes,), generator=generator)
    return torch.stack(
        [(cy - half_h).clamp(0, h), (cy + half_h).clamp(0, h), (cx - half_w).clamp(0, w), (cx + half_w).clamp(0, w)],
        dim=1,
    )


def cutmix_area_lambda(box: Tensor, size: tuple[int, int]) -> Tensor:
    r"""The share of each image a box leaves in place: :math:`\lambda' = 1 - (y_1 - y_0)(x_1 - x_0) / (HW)`.

    Args:
        box: ``(N, 4)`` boxes ``(y0, y1, x0, x1)``.
        size: The spatial size ``(H, W)``.

    Returns:
        ``(N,)`` float64 tensor on the box's device.

    Example:
        >>> cutmix_area_lambda(torch.tensor([[2, 6, 5, 8], [0, 0, 0, 0]]), (8, 8))
        tensor([0.8125, 1.0000], dtype=torch.float64)
    """
    area = (box[:, 1] - box[:, 0]) * (box[:, 3] - box[:, 2])
    return 1.0 - area.double() / float(size[0] * size[1])


def cutmix_mask(box: Tensor, size: tuple[int, int], device: torch.device | str | None = None) -> Tensor:
    r"""The boxes as boolean masks :math:`\mathbb{1}_B` (``True`` inside: the pasted region, i.e. :math:`1 - M`).

    Built by broadcasting row and column ranges against the box edges (no loop over boxes).

    Args:
        box: ``(N, 4)`` boxes ``(y0, y1, x0, x1)``.
        size: The spatial size ``(H, W)``.
        device: Where to build the mask (default: the box's device).

    Returns:
        ``(N, H, W)`` boolean tensor.

    Example:
        >>> cutmix_mask(torch.tensor([[1, 3, 0, 2]]), (3, 4)).int()
        tensor([[[0, 0, 0, 0],
                 [1, 1, 0, 0],
                 [1, 1, 0, 0]]], dtype=torch.int32)
    """
    b = box.to(device if device is not None else box.device)
    rows = torch.arange(int(size[0]), device=b.device).view(1, -1, 1)
    cols = torch.arange(int(size[1]), device=b.device).view(1, 1, -1)
    y0, y1, x0, x1 = (b[:, k].view(-1, 1, 1) for k in range(4))
    return (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)


def paste_box(x: Tensor, perm: Tensor, box: Tensor) -> Tensor:
    r"""Paste each partner's box into each sample: :math:`\tilde x_i = M \odot x_i + (1 - M) \odot x_{\pi(i)}`.

    The box covers the last two dimensions of ``x``: it works alike for images ``(B, C, H, W)``, label
    maps ``(B, H, W)`` (integer; ``ignore_index`` pixels of the partner stay ignored where pasted)
    and soft targets ``(B, C, H, W)``. The result is an exact copy of one of the two (no blending).

    Args:
        x: ``(B, *, H, W)`` tensor of any dtype.
        perm: ``(B,)`` the partner :math:`\pi(i)` of each sample (a permutation, or any index).
        box: ``(1, 4)`` (one box for the batch) or ``(B, 4)`` (one per sample) boxes ``(y0, y1, x0, x1)``.

    Returns:
        The pasted tensor, the shape and dtype of ``x``.

    Example:
        >>> y = torch.tensor([[[0, 0], [0, 0]], [[1, 1], [-100, 1]]])
        >>> paste_box(y, torch.tensor([1, 0]), torch.tensor([[1, 2, 0, 2]]))
        tensor([[[   0,    0],
                 [-100,    1]],
        <BLANKLINE>
                [[   1,    1],
                 [   0,    0]]])
    """
    if x.dim() < 3:
        raise ValueError(f"Expected a tensor of shape (batch, ..., height, width), but got shape {tuple(x.shape)}.")
    mask = cutmix_mask(box, (x.shape[-2], x.shape[-1]), device=x.device)
    mask = mask.view(mask.shape[0], *([1] * (x.dim() - 3)), *mask.shape[1:])
    return torch.where(mask, x.index_select(0, perm.to(x.device)), x)


def copy_paste_partners(num_labeled: int, batch_size: int, device: torch.device | str | None = None) -> Tensor:
    r"""Partners across the labeled/unlabeled split, as Bidirectional Copy-Paste pairs images.

    The first ``num_labeled`` rows are labeled, the rest unlabeled. Each labeled row gets an unlabeled
    partner and each unlabeled row a labeled one (both directions: BCP's outward and inward images),
    drawn without replacement while the other part has enough rows (cycling a random order otherwise).
    If either part is empty, the partners are a random permutation of the batch.

    Args:
        num_labeled: The number of labeled rows (first).
        batch_size: The number of rows.
        device: Where to draw (torch's global RNG of that device).

    Returns:
        ``(batch_size,)`` int64 partner indices.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> p = copy_paste_partners(2, 5)
        >>> bool((p[:2] >= 2).all()), bool((p[2:] < 2).all())
        (True, True)
    """
    n_l, n_u = int(num_labeled), int(batch_size) - int(num_labeled)
    if n_l <= 0 or n_u <= 0:
        return torch.randperm(int(batch_size), device=device)
    to_unlabeled = n_l + torch.randperm(n_u, device=device)[torch.arange(n_l, device=device) % n_u]
    to_labeled = torch.randperm(n_l, device=device)[torch.arange(n_u, device=device) % n_l]
    return torch.cat([to_unlabeled, to_labeled])
