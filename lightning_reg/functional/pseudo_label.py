r"""Pseudo-labels from a teacher's confident predictions (FixMatch), with MIC's quality weight for dense outputs.

FixMatch (Sohn et al., NeurIPS 2020, https://arxiv.org/abs/2001.07685): on a batch of
:math:`\mu B` unlabeled samples :math:`u_b`, a teacher predicts
:math:`q_b = \mathrm{softmax}(f(\alpha(u_b)))` on a weak view :math:`\alpha` under no gradient; its hard
pseudo-label :math:`\hat q_b = \arg\max_c q_{bc}` trains the student on a strong view :math:`\mathcal A`
where the teacher is confident:

.. math:: \mathcal L_u = \frac{1}{\mu B}\sum_{b=1}^{\mu B} \mathbb 1[\max_c q_{bc} \ge \tau]\;
          \mathrm{CE}\big(\hat q_b,\ f(\mathcal A(u_b))\big),\qquad \tau = 0.95,\ \lambda_u = 1.

The mean runs over *all* unlabeled samples: masked ones count in the denominator.

Options, as USB (https://github.com/microsoft/Semi-supervised-learning) implements them:

* **Soft pseudo-labels**: the target is the (sharpened) distribution :math:`q_b^{1/T} / \sum_c q_{bc}^{1/T}`
  instead of its arg-max; the mask is unchanged (computed before sharpening).
* **Distribution alignment** (ReMixMatch, https://arxiv.org/abs/1911.09785):
  :math:`\tilde q = \mathrm{normalize}\big(q \cdot (p_\text{target} + \epsilon) / (\bar p_\text{model} + \epsilon)\big)`
  with :math:`\bar p_\text{model}` the running mean of the teacher's predictions on unlabeled data;
  the mask and the pseudo-label are computed from :math:`\tilde q`.

For dense outputs (segmentation) every pixel is an element with its own pseudo-label. MIC
(https://arxiv.org/abs/2212.01322, after DAFormer/DACS) does not mask pixels; it weights the per-pixel CE
of an image by the *quality* :math:`w_b = \frac{1}{HW}\sum_j \mathbb 1[\max_c q_{bjc} \ge \tau]`,
the share of its confident pixels (:func:`confidence_quality`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "align_distribution",
    "confidence_quality",
    "pseudo_label_loss",
    "pseudo_label_targets",
]

_EPS = 1e-6  # USB's DistAlign epsilon


def pseudo_label_targets(
    probs: Tensor,
    threshold: float = 0.95,
    soft: bool = False,
    temperature: float = 1.0,
    dim: int = 1,
) -> tuple[Tensor, Tensor]:
    r"""FixMatch's pseudo-labels and confidence mask from the teacher's probabilities.

    .. math:: m = \mathbb 1[\max_c q_c \ge \tau],\qquad
              \hat q = \arg\max_c q_c\ \ \text{(hard)}\quad\text{or}\quad
              \hat q_c = \frac{q_c^{1/T}}{\sum_{c'} q_{c'}^{1/T}}\ \ \text{(soft)}.

    Paper: FixMatch, https://arxiv.org/abs/2001.07685 (hard, ``τ = 0.95``); soft labels as USB's
    ``PseudoLabelingHook``.

    Args:
        probs: Teacher probabilities with the classes along ``dim`` (``(B, C)``, ``(B, C, H, W)``, ``(B, T, C)``).
        threshold: The confidence threshold ``τ`` (``>=``, as FixMatch).
        soft: Return the (sharpened) distribution instead of its arg-max.
        temperature: The sharpening temperature ``T > 0`` of soft labels (1: the probabilities themselves).
        dim: The class dimension.

    Returns:
        ``(targets, mask)``: hard targets are ``long`` with ``dim`` removed, soft targets fp32 of ``probs``' shape;
        the mask is boolean with ``dim`` removed. Both carry no gradient.

    Example:
        >>> q = torch.tensor([[0.96, 0.04], [0.6, 0.4]])
        >>> pseudo_label_targets(q, 0.95)
        (tensor([0, 0]), tensor([ True, False]))
        >>> pseudo_label_targets(q, 0.95, soft=True, temperature=0.5)[0]  # q² / sum(q²)
        tensor([[0.9983, 0.0017],
                [0.6923, 0.3077]])
    """
    if temperature <= 0:
        raise ValueError(f"Expected argument `temperature` to be a float in (0, inf), but got {temperature}.")
    q = probs.detach().float()
    conf, hard = q.max(dim=dim)
    mask = conf >= threshold
    if not soft:
        return hard, mask
    if temperature == 1.0:
        return q, mask
    logq = torch.log(q.clamp_min(torch.finfo(torch.float32).tiny))
    return torch.softmax(logq / temperature, dim=dim), mask


def align_distribution(probs: Tensor, p_target: Tensor, p_model: Tensor, dim: int = 1, eps: float = _EPS) -> Tensor:
    r"""ReMixMatch's distribution alignment of the teacher's probabilities towards a target class marginal.

    .. math:: \tilde q = \mathrm{normalize}\big(q\,(p_t + \epsilon) / (\bar p_m + \epsilon)\big)

    Paper: *ReMixMatch*, https://arxiv.org/abs/1911.09785 (Sec. 3.2); ``ε = 1e-6`` as USB's ``DistAlign`` hooks.

    Args:
        probs: Teacher probabilities with the classes along ``dim``.
        p_target: ``(C,)`` the target class marginal (uniform, or the labeled data's class prior).
        p_model: ``(C,)`` the running mean of the teacher's predictions on unlabeled data.
        dim: The class dimension of ``probs``.
        eps: Added to both marginals.

    Returns:
        fp32 probabilities of ``probs``' shape (each distribution sums to one along ``dim``).

    Example:
        >>> q = torch.tensor([[0.5, 0.5], [0.9, 0.1]])
        >>> align_distribution(q, torch.tensor([0.5, 0.5]), torch.tensor([0.75, 0.25]))
        tensor([[0.2500, 0.7500],
                [0.7500, 0.2500]])
    """
    shape = [1] * probs.dim()
    shape[dim] = -1
    ratio = ((p_target.float() + eps) / (p_model.float() + eps)).view(shape)
    q = probs.detach().float() * ratio
    return q / q.sum(dim=dim, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)


def confidence_quality(mask: Tensor, valid: Tensor | None = None) -> Tensor:
    r"""MIC's (DAFormer's) pseudo-label quality of each sample: the share of its confident elements.

    .. math:: w_b = \frac{1}{|V_b|}\sum_{j \in V_b} \mathbb 1[\max_c q_{bjc} \ge \tau]

    over the sample's elements :math:`V_b` (all of them, or those ``valid`` marks). DAFormer's
    equation is per image (``H·W`` pixels); its official code pools the count over each GPU's batch.

    Args:
        mask: ``(B, *d)`` boolean confidence mask (from :func:`pseudo_label_targets`).
        valid: Optional ``(B, *d)`` boolean mask of the elements that count.

    Returns:
        ``(B,)`` fp32 weights in ``[0, 1]`` (0 for a sample without valid elements).

    Example:
        >>> confidence_quality(torch.tensor([[True, False, True, True], [False, False, False, True]]))
        tensor([0.7500, 0.2500])
    """
    m = mask.reshape(mask.shape[0], -1).float()
    if valid is None:
        return m.mean(dim=1)
    v = valid.reshape(valid.shape[0], -1).float()
    return (m * v).sum(dim=1) / v.sum(dim=1).clamp_min(1.0)


def pseudo_label_loss(
    logits: Tensor,
    targets: Tensor,
    weight: Tensor,
    dim: int = 1,
    valid: Tensor | None = None,
) -> Tensor:
    r"""FixMatch's unlabeled loss: the weighted CE to the pseudo-labels, averaged over *all* (valid) elements.

    .. math:: \mathcal L_u = \frac{1}{|V|}\sum_{e \in V} w_e\ \mathrm{CE}\big(\hat q_e,\ \mathrm{softmax}(z_e)\big)

    With :math:`w_e = \mathbb 1[\max_c q_{ec} \ge \tau]` and :math:`V` the :math:`\mu B` unlabeled samples this
    is FixMatch's :math:`\frac{1}{\mu B}\sum_b \mathbb 1[\max q_b \ge \tau]\,\mathrm{CE}(\hat q_b, f(\mathcal A(u_b)))`:
    masked elements count in the denominator. With MIC's quality weight, :math:`w_e = w_b` for every pixel
    of image :math:`b` (:func:`confidence_quality`). Computed in fp32; the targets and weights carry no gradient,
    and the gradient with respect to the logits is :math:`w_e(\mathrm{softmax}(z_e) - \hat q_e) / |V|`.

    Args:
        logits: Student logits on the strong view, classes along ``dim`` (any float dtype).
        targets: Hard ``long`` pseudo-labels (``logits`` without ``dim``) or soft targets of ``logits``' shape.
        weight: Per-element weights (``logits`` without ``dim``; bool or float), e.g. the confidence mask.
        dim: The class dimension.
        valid: Optional boolean mask of the elements in :math:`V` (``logits`` without ``dim``); ``None``: all.

    Returns:
        The scalar loss (exactly 0 if :math:`V` is empty).

    Example:
        >>> z = torch.log(torch.tensor([[0.5, 0.5], [0.9, 0.1], [0.2, 0.8]]))
        >>> targets, mask = pseudo_label_targets(torch.tensor([[0.97, 0.03], [0.6, 0.4], [0.01, 0.99]]))
        >>> round(pseudo_label_loss(z, targets, mask).item(), 4)  # (log 2 + 0 - log 0.8) / 3
        0.3054
    """
    logp = F.log_softmax(logits.float(), dim=dim)
    if targets.is_floating_point():
        ce = -(targets.detach().float() * logp).sum(dim=dim)
    else:
        ce = -logp.gather(dim, targets.unsqueeze(dim)).squeeze(dim)
    w = weight.detach().float().expand_as(ce)
    term = w * ce
    if valid is None:
        return term.mean() if term.numel() else term.sum()
    term = torch.where(valid, term, torch.zeros((), device=term.device))
    return term.sum() / valid.sum().clamp_min(1)
