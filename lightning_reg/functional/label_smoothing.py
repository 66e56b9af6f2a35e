"""Label smoothing (Szegedy et al., 2016), the first target refiner and PS-KD's baseline."""

from __future__ import annotations

from torch import Tensor

__all__ = ["label_smoothing_targets"]


def label_smoothing_targets(target: Tensor, smoothing: float, *, dim: int = -1, valid: Tensor | None = None) -> Tensor:
    r"""Smooth a target distribution towards the uniform one.

    .. math:: q = (1 - \varepsilon)\, t + \varepsilon / C

    Paper: *Rethinking the Inception Architecture for Computer Vision*,
    https://arxiv.org/abs/1512.00567. With a one-hot ``t`` this is exactly
    ``torch.nn.functional.cross_entropy(..., label_smoothing=ε)``'s target, in every layout and with
    ``ignore_index`` when ``valid`` marks the labelled elements: an ignored element keeps an all-zero
    target row (no label, so no smoothed label either).

    Args:
        target: Target distribution with the classes along ``dim`` (e.g. one-hot labels), fp32:
            ``(B, C)``, ``(B, C, H, W)`` (``dim=1``) or ``(B, T, C)``.
        smoothing: ``ε`` in ``[0, 1]``.
        dim: The class dimension.
        valid: Optional boolean mask of the elements' shape (``target`` without ``dim``): the elements
            that have a label; the others get a zero row.

    Returns:
        The smoothed target, the shape of ``target``.

    Example:
        >>> import torch
        >>> label_smoothing_targets(torch.tensor([[0.0, 1.0, 0.0, 0.0]]), 0.1)
        tensor([[0.0250, 0.9250, 0.0250, 0.0250]])
        >>> dense = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])  # (B=1, C=2, W=2); the second element is ignored
        >>> label_smoothing_targets(dense, 0.2, dim=1, valid=torch.tensor([[True, False]]))
        tensor([[[0.9000, 0.0000],
                 [0.1000, 0.0000]]])
    """
    num_classes = target.shape[dim]
    out = target * (1.0 - smoothing) + smoothing / num_classes
    if valid is not None:
        out = out * valid.unsqueeze(dim).to(out.dtype)
    return out
