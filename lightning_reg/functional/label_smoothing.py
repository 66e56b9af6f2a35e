"""Label smoothing (Szegedy et al., 2016), the first target refiner and PS-KD's baseline."""

from __future__ import annotations

from torch import Tensor

__all__ = ["label_smoothing_targets"]


def label_smoothing_targets(target: Tensor, smoothing: float) -> Tensor:
    r"""Smooth a target distribution towards the uniform one.

    .. math:: q = (1 - \varepsilon)\, t + \varepsilon / C

    Paper: *Rethinking the Inception Architecture for Computer Vision*,
    https://arxiv.org/abs/1512.00567. With a one-hot ``t`` this is exactly
    ``torch.nn.functional.cross_entropy(..., label_smoothing=ε)``'s target.

    Args:
        target: ``(B, C)`` target distribution (e.g. one-hot labels), fp32.
        smoothing: ``ε`` in ``[0, 1]``.

    Returns:
        The ``(B, C)`` smoothed target.

    Example:
        >>> import torch
        >>> label_smoothing_targets(torch.tensor([[0.0, 1.0, 0.0, 0.0]]), 0.1)
        tensor([[0.0250, 0.9250, 0.0250, 0.0250]])
    """
    num_classes = target.shape[-1]
    return target * (1.0 - smoothing) + smoothing / num_classes
