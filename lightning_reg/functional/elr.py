"""Early-learning regularization (ELR; Liu et al., NeurIPS 2020): the temporal-ensemble target and the term.

Paper: *Early-Learning Regularization Prevents Memorization of Noisy Labels*,
https://arxiv.org/abs/2007.00151. Reference code: ``shengliu66/ELR``.

Per training step, for the batch's samples ``i``:

1. ``p_i = clamp(softmax(z_i), 1e-4, 1 - 1e-4)``;
2. ``t_i <- β t_i + (1 - β) p̂_i / Σ_c p̂_ic`` with ``p̂ = p`` detached (``t`` starts at zero);
3. the loss adds ``λ · mean_i log(1 - <t_i, p_i>)``; the gradient flows through ``p`` only.

On dense outputs (``(B, C, *d)`` segmentation, ``(B, T, C)`` tokens) there is no per-element table: the target
of each element is an EMA teacher's clamped, normalised prediction (:func:`elr_teacher_targets`, ELR+'s temporal
ensemble held in the teacher's weights) and the mean runs over the labelled elements (``valid``).

The term is negative (``log`` of a number in ``(0, 1]``), so the total loss
goes negative as the model agrees with its targets; do not early-stop on it.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "ELR_CLAMP",
    "elr_clamp",
    "elr_clamped_probs",
    "elr_mixed_targets",
    "elr_regularizer",
    "elr_teacher_targets",
    "elr_update_targets_",
    "elr_updated_targets",
]

#: The reference code's probability clamp: ``p ∈ [1e-4, 1 - 1e-4]``.
ELR_CLAMP = 1e-4


def elr_clamped_probs(logits: Tensor, eps: float = ELR_CLAMP, dim: int = -1) -> Tensor:
    r"""The clamped softmax ELR works with, in fp32.

    .. math:: p = \mathrm{clamp}(\mathrm{softmax}(z),\ \epsilon,\ 1 - \epsilon), \qquad \epsilon = 10^{-4}

    The clamp bounds ``1 - <t, p>`` away from zero, so the ``log`` stays
    finite; entries outside the clamp range carry no gradient (as in the
    reference code).

    Args:
        logits: ``(B, C)`` logits (or ``(B, C, *d)`` with ``dim=1``), any float dtype (computed in fp32).
        eps: The clamp ``ε``.
        dim: The class dimension.

    Example:
        >>> elr_clamped_probs(torch.tensor([[0.0, 20.0]]))
        tensor([[1.0000e-04, 9.9990e-01]])
    """
    return elr_clamp(torch.softmax(logits.float(), dim=dim), eps)


def elr_clamp(probs: Tensor, eps: float = ELR_CLAMP) -> Tensor:
    """Clamp probabilities (e.g. a shared, already computed softmax) to ``[ε, 1 - ε]`` in fp32, as ELR does.

    Example:
        >>> elr_clamp(torch.tensor([[0.0, 1.0]]))
        tensor([[1.0000e-04, 9.9990e-01]])
    """
    return probs.float().clamp(eps, 1.0 - eps)


def elr_teacher_targets(probs: Tensor, dim: int = -1, eps: float = ELR_CLAMP) -> Tensor:
    r"""ELR's target on dense outputs: the teacher's clamped prediction, normalised (no per-element table).

    .. math::

        t_e = \frac{\hat p_e}{\sum_c \hat p_{ec}}, \qquad
        \hat p_e = \mathrm{clamp}(p^{\mathrm{teacher}}_e, \epsilon, 1 - \epsilon)

    ELR+ (Liu et al., https://arxiv.org/abs/2007.00151, Sec. 4.2) forms its targets from an EMA teacher's
    predictions; the teacher's weights are themselves a temporal ensemble, so on dense outputs, where a
    per-element table does not fit, its current prediction serves as the target directly.

    Args:
        probs: Teacher probabilities with the classes along ``dim`` (detached here).
        dim: The class dimension.
        eps: The clamp ``ε``.

    Example:
        >>> elr_teacher_targets(torch.tensor([[0.0, 1.0]]))
        tensor([[1.0000e-04, 9.9990e-01]])
        >>> elr_teacher_targets(torch.tensor([[[0.5], [0.5]]]), dim=1).flatten().tolist()  # (B, C, T) layout
        [0.5, 0.5]
    """
    p = elr_clamp(probs.detach(), eps)
    return p / p.sum(dim=dim, keepdim=True)


def elr_updated_targets(targets: Tensor, probs: Tensor, beta: float) -> Tensor:
    r"""The ELR temporal-ensemble update of a batch of targets (pure; returns new rows).

    .. math:: t_i \leftarrow \beta\, t_i + (1 - \beta)\, \frac{\hat p_i}{\sum_c \hat p_{ic}}

    where :math:`\hat p` is the (clamped) prediction, detached: the target
    carries no gradient. Paper: https://arxiv.org/abs/2007.00151, Eq. (5)
    and the reference ``elr_loss``.

    Args:
        targets: ``(B, C)`` current targets ``t_i`` (zeros for a sample never seen).
        probs: ``(B, C)`` predictions ``p̂_i``, e.g. :func:`elr_clamped_probs` of the logits, or
            of an EMA teacher's logits (ELR+). Detached here.
        beta: The temporal-ensembling momentum ``β`` in ``[0, 1)``.

    Returns:
        The ``(B, C)`` fp32 updated targets.

    Example:
        >>> t = torch.tensor([[0.0, 1.0]])
        >>> p = torch.tensor([[0.75, 0.25]])
        >>> elr_updated_targets(t, p, beta=0.5)
        tensor([[0.3750, 0.6250]])
        >>> elr_updated_targets(torch.zeros(1, 2), p, beta=0.7)  # from the zero start
        tensor([[0.2250, 0.0750]])
    """
    p = probs.detach().float()
    return float(beta) * targets.detach().float() + (1.0 - float(beta)) * (p / p.sum(dim=-1, keepdim=True))


def elr_update_targets_(targets: Tensor, index: Tensor, probs: Tensor, beta: float) -> Tensor:
    """Update the rows ``index`` of a dense ``(N, C)`` target tensor in place; return the new rows.

    This is the reference code's ``self.target[index] = β·self.target[index] + ...``
    on a plain tensor. :class:`~lightning_reg.ELR` keeps its targets in a
    :class:`~lightning_reg.PerSampleTable` instead (checkpointed, DDP-synced).
    With repeated indices in one batch the last occurrence is stored.

    Args:
        targets: ``(N, C)`` target storage, modified in place.
        index: ``(B,)`` dataset indices of the batch.
        probs: ``(B, C)`` predictions (see :func:`elr_updated_targets`).
        beta: ``β`` in ``[0, 1)``.

    Returns:
        The ``(B, C)`` fp32 updated rows (what the ELR term uses this step).

    Example:
        >>> store = torch.zeros(3, 2)
        >>> rows = elr_update_targets_(store, torch.tensor([2]), torch.tensor([[0.5, 0.5]]), beta=0.5)
        >>> store
        tensor([[0.0000, 0.0000],
                [0.0000, 0.0000],
                [0.2500, 0.2500]])
    """
    idx = index.to(targets.device).long()
    new = elr_updated_targets(targets.index_select(0, idx), probs.to(targets.device), beta)
    targets.index_copy_(0, idx, new.to(targets.dtype))
    return new


def elr_mixed_targets(targets: Tensor, perm: Tensor, lam: float | Tensor) -> Tensor:
    r"""Mix the targets like mixup mixed the inputs (ELR+).

    .. math:: \tilde t_i = \lambda\, t_i + (1 - \lambda)\, t_{\pi(i)}

    Args:
        targets: ``(B, C)`` targets of the un-mixed samples.
        perm: ``(B,)`` the permutation :math:`\pi` mixup used.
        lam: The mixing weight :math:`\lambda`.

    Example:
        >>> elr_mixed_targets(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([1, 0]), 0.75)
        tensor([[0.7500, 0.2500],
                [0.2500, 0.7500]])
    """
    return lam * targets + (1.0 - lam) * targets.index_select(0, perm.to(targets.device))


def elr_regularizer(
    logits: Tensor,
    targets: Tensor,
    lam: float | Tensor = 1.0,
    reduction: Literal["mean", "sum", "none"] = "mean",
    *,
    dim: int = -1,
    valid: Tensor | None = None,
) -> Tensor:
    r"""The ELR term: :math:`\lambda \cdot \frac1B \sum_i \log\left(1 - \langle t_i, p_i \rangle\right)`.

    .. math::

        \mathcal{L}_{\mathrm{ELR}} = \frac{\lambda}{B} \sum_{i=1}^{B} \log\Big(1 - \sum_c t_{ic}\, p_{ic}\Big),
        \qquad p = \mathrm{clamp}(\mathrm{softmax}(z), 10^{-4}, 1 - 10^{-4})

    Paper: https://arxiv.org/abs/2007.00151, Eq. (6). The gradient flows
    through :math:`p` only (the targets are detached); with respect to the
    logits (inside the clamp range) it is
    :math:`\frac{\lambda}{B}\, p_{ij}\,(\langle t_i, p_i\rangle - t_{ij}) / (1 - \langle t_i, p_i\rangle)`,
    which pulls :math:`p_i` towards :math:`t_i`. The term is at most zero.

    With ``valid`` the sum and the mean run over the valid rows (or elements) only: the others add
    nothing and get exactly zero gradient. Dense outputs (``(B, C, *d)`` with ``dim=1``) work the same,
    per element.

    Args:
        logits: ``(B, C)`` logits (any float dtype; computed in fp32), or ``(B, C, *d)`` / ``(B, *d, C)``.
        targets: ELR targets of the logits' shape (e.g. from :func:`elr_updated_targets`); detached.
        lam: The weight :math:`\lambda` (the paper uses 3 for CIFAR-10 symmetric noise).
        reduction: ``"mean"`` (the paper), ``"sum"`` or ``"none"`` (per sample, times ``λ``; zero where invalid).
        dim: The class dimension.
        valid: Optional boolean mask of the logits' shape without ``dim`` (e.g. labelled samples or pixels).

    Returns:
        The fp32 term.

    Example:
        >>> z = torch.tensor([[1.0986123, 0.0]], requires_grad=True)  # softmax = [0.75, 0.25]
        >>> t = torch.tensor([[0.375, 0.625]])
        >>> term = elr_regularizer(z, t)
        >>> round(term.item(), 6)  # log(1 - 0.4375)
        -0.575364
        >>> term.backward()
        >>> z.grad
        tensor([[ 0.0833, -0.0833]])
        >>> # only the labelled rows count (a mean over one row here): log(1 - 0.5)
        >>> elr_regularizer(torch.zeros(2, 2), torch.full((2, 2), 0.5), valid=torch.tensor([True, False]))
        tensor(-0.6931)
    """
    p = elr_clamped_probs(logits, dim=dim)
    inner = (targets.detach().float() * p).sum(dim=dim)
    reg = torch.log1p(-inner) * lam
    if valid is not None:
        reg = torch.where(valid, reg, torch.zeros((), device=reg.device))
    if reduction == "mean":
        return reg.mean() if valid is None else reg.sum() / valid.sum().clamp_min(1)
    if reduction == "sum":
        return reg.sum()
    return reg
