"""Progressive self-knowledge distillation (PS-KD; Kim et al., ICCV 2021): the soft target and its schedule.

Paper: *Self-Knowledge Distillation with Progressive Refinement of Targets*,
https://arxiv.org/abs/2006.12000. Reference code: ``lgcnsai/PS-KD-Pytorch``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["pskd_alpha", "pskd_soft_targets", "target_entropy"]


def pskd_alpha(epoch: float, max_epochs: float, alpha_T: float) -> float:
    r"""The paper's linear schedule of the distillation weight.

    .. math:: \alpha_t = \alpha_T \cdot \min(t / T, 1)

    ``t`` counts epochs from one, as the paper does: the reference code uses
    ``alpha_T * (epoch + 1) / end_epoch`` with a zero-based ``epoch``, so
    ``α_t`` reaches ``α_T`` in the last epoch. Pass Lightning's zero-based
    ``current_epoch + 1``. The same formula with steps gives the step-based
    variant.

    Args:
        epoch: ``t``, the one-based epoch (or step) number.
        max_epochs: ``T``, the total number of epochs (or steps); must be positive.
        alpha_T: ``α_T``, the final weight (the paper uses 0.8).

    Returns:
        ``α_t`` as a Python float.

    Raises:
        ValueError: If ``max_epochs`` is not positive.

    Example:
        >>> pskd_alpha(1, 4, 0.8)
        0.2
        >>> pskd_alpha(4, 4, 0.8)
        0.8
        >>> pskd_alpha(0, 4, 0.8)
        0.0
    """
    if not max_epochs > 0 or not math.isfinite(float(max_epochs)):
        raise ValueError(f"Expected argument `max_epochs` to be a positive finite number, but got {max_epochs!r}.")
    return float(alpha_T) * min(max(float(epoch) / float(max_epochs), 0.0), 1.0)


def pskd_soft_targets(
    onehot_or_target: Tensor,
    prev_probs: Tensor,
    alpha: float | Tensor,
    seen: Tensor | None = None,
    *,
    dim: int = -1,
) -> Tensor:
    r"""The PS-KD soft target: the label mixed with the model's previous prediction.

    .. math:: q_i = (1 - \alpha_t)\, y_i + \alpha_t\, P^{\mathrm{prev}}_i

    With soft cross-entropy :math:`-\sum_c q_c \log p_c` the gradient with
    respect to the logits is :math:`p - q`, which the paper reads as
    hard-example mining: the target moves towards what the model already
    believed, so confidently wrong samples keep a large gradient.

    On dense outputs (``(B, C, *d)`` with ``dim=1``, or ``(B, *d, C)``) the same mix applies per
    element, with ``prev_probs`` e.g. an EMA teacher's per-element prediction and ``seen`` the
    labelled elements.

    Args:
        onehot_or_target: ``(B, C)`` target to refine: the one-hot label, or the
            target an earlier refiner produced (e.g. a smoothed label).
        prev_probs: ``(B, C)`` the samples' previous predictions (rows sum to one).
        alpha: ``α_t`` in ``[0, 1]`` (a float or a 0-d tensor).
        seen: Optional bool mask of the target's shape without ``dim`` (``(B,)`` for ``(B, C)``); rows
            (elements) where it is ``False`` (no previous prediction, or no label) get
            ``onehot_or_target`` unchanged. The fallback is a ``torch.where``, with no host sync.
        dim: The class dimension.

    Returns:
        The fp32 soft target of the input's shape; it carries no gradient.

    Example:
        >>> y = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
        >>> prev = torch.tensor([[0.2, 0.5, 0.3], [0.5, 0.25, 0.25]])
        >>> pskd_soft_targets(y, prev, 0.5)
        tensor([[0.1000, 0.7500, 0.1500],
                [0.7500, 0.1250, 0.1250]])
        >>> pskd_soft_targets(y, prev, 0.5, seen=torch.tensor([True, False]))
        tensor([[0.1000, 0.7500, 0.1500],
                [1.0000, 0.0000, 0.0000]])
    """
    if onehot_or_target.shape != prev_probs.shape:
        raise ValueError(
            f"Expected the target and the previous predictions to have the same shape, but got"
            f" {tuple(onehot_or_target.shape)} and {tuple(prev_probs.shape)}."
        )
    target = onehot_or_target.detach().float()
    q = torch.lerp(target, prev_probs.detach().float(), alpha if isinstance(alpha, float) else alpha.float())
    if seen is not None:
        q = torch.where(seen.unsqueeze(dim), q, target)
    return q


def target_entropy(target: Tensor, valid: Tensor | None = None, dim: int = -1) -> Tensor:
    r"""Mean entropy (in nats) of the rows of a target distribution, as a 0-d tensor (no host sync).

    .. math:: H = -\frac{1}{|V|}\sum_{i \in V} \sum_c q_{ic} \log q_{ic}, \quad 0 \log 0 = 0

    Args:
        target: Target distributions with the classes along ``dim``.
        valid: Optional bool mask of the target's shape without ``dim``: the rows (elements) :math:`V`
            to average over (all if ``None``; zero if none).
        dim: The class dimension.

    Example:
        >>> round(target_entropy(torch.tensor([[0.5, 0.5], [1.0, 0.0]])).item(), 4)  # (log 2 + 0) / 2
        0.3466
        >>> round(target_entropy(torch.tensor([[0.5, 0.5], [1.0, 0.0]]), valid=torch.tensor([True, False])).item(), 4)
        0.6931
    """
    per_row = torch.special.entr(target.detach().float()).sum(dim=dim)
    if valid is None:
        return per_row.mean()
    return torch.where(valid, per_row, torch.zeros((), device=per_row.device)).sum() / valid.sum().clamp_min(1)
