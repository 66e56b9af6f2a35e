r"""Consistency regularization against label noise and ADELE's end-of-early-learning detector.

The consistency term (UDA, Mean Teacher, MIC, ADELE) pulls the model's
prediction on a perturbed view :math:`\tilde x_i` towards a stop-gradient
target :math:`q_i`, the prediction of a teacher (or of the model itself) on the
clean or weakly augmented view:

.. math:: \mathcal L_\text{cons} = w(t)\cdot\frac1B\sum_{i=1}^{B} m_i\,
          D\!\left(\mathrm{sg}(q_i)\,\|\,p(\tilde x_i)\right),\qquad
          m_i = \mathbb 1\!\left[\max_c q_{ic} \ge \text{threshold}\right]

The mean runs over *all* ``B`` samples, masked ones included (UDA), so the
threshold lowers the term's scale as well as selecting samples. On dense
outputs (segmentation ``(B, C, H, W)``, tokens ``(B, T, C)``) ``i`` runs over
the elements (pixels, tokens) that count, with the classes along ``dim``.

ADELE's official multi-scale term (``calc_jsd_multiscale``) differs: it pulls
every scale's prediction and the mean prediction :math:`\bar p` towards each
other, with gradients through both and no sharpening (see
:func:`adele_multiscale_consistency`).

Label correction (ADELE) watches, per class, the agreement between the model's
predictions and the given labels over epochs, fits
:math:`f(x) = a\,(1 - e^{-x^b / c})` to it, and starts correcting a class once
the fitted slope has dropped by a relative ``r = 0.9`` from its value at the
first epoch: early learning has ended and memorization of the noisy labels is
about to start. The curve is fitted on ADELE's axis: the ``T`` points sit at
``linspace(0, T·Δ, T)`` epochs, ``Δ`` epochs apart (:func:`early_learning_axis`).

Papers: UDA https://arxiv.org/abs/1904.12848, Mean Teacher
https://arxiv.org/abs/1703.01780, MIC https://arxiv.org/abs/2212.01322, ADELE
https://arxiv.org/abs/2110.03740.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "adele_confidence",
    "adele_multiscale_consistency",
    "class_agreement_counts",
    "class_iou",
    "confidence_mask",
    "consistency_divergence",
    "consistency_loss",
    "early_learning_axis",
    "early_learning_curve",
    "early_learning_curve_slope",
    "early_learning_end_epoch",
    "end_of_early_learning",
    "fit_early_learning_curve",
    "sharpen",
]

Divergence = Literal["kl", "mse"]


def sharpen(probs: Tensor, temperature: float, dim: int = -1) -> Tensor:
    r"""Sharpen a distribution with temperature :math:`\tau`: :math:`q_c \propto p_c^{1/\tau}`.

    Equal to ``softmax(z / τ)`` when ``probs = softmax(z)`` (UDA's sharpened
    target). ``τ = 1`` returns the input; ``τ < 1`` sharpens. Computed in fp32
    in log space.

    Args:
        probs: Probabilities with the classes along ``dim`` (``(B, C)``, ``(B, C, H, W)``, ``(B, T, C)``).
        temperature: ``τ > 0``.
        dim: The class dimension.

    Example:
        >>> sharpen(torch.tensor([[0.6, 0.4]]), 0.5)
        tensor([[0.6923, 0.3077]])
    """
    if temperature <= 0:
        raise ValueError(f"Expected argument `temperature` to be a float in (0, inf), but got {temperature}.")
    if temperature == 1.0:
        return probs.float()
    logp = torch.log(probs.float().clamp_min(torch.finfo(torch.float32).tiny))
    return torch.softmax(logp / temperature, dim=dim)


def confidence_mask(probs: Tensor, threshold: float, dim: int = -1) -> Tensor:
    r"""The confidence mask :math:`m_i = \mathbb 1[\max_c p_{ic} \ge \text{threshold}]` as fp32, per element.

    Args:
        probs: Probabilities with the classes along ``dim``.
        threshold: The confidence threshold.
        dim: The class dimension (removed from the result).

    Example:
        >>> confidence_mask(torch.tensor([[0.9, 0.1], [0.6, 0.4]]), 0.8)
        tensor([1., 0.])
    """
    return (probs.float().amax(dim=dim) >= threshold).float()


def consistency_divergence(
    student_logits: Tensor, teacher_probs: Tensor, divergence: Divergence = "kl", dim: int = -1
) -> Tensor:
    r"""Per-element divergence :math:`D(q_i \,\|\, p_i)` between a target ``q`` and ``p = softmax(z)``, in fp32.

    * ``"kl"``: :math:`\sum_c q_c(\log q_c - \log p_c)` (with :math:`0 \log 0 = 0`);
    * ``"mse"``: Mean Teacher's softmax MSE, :math:`\frac1C\sum_c (q_c - p_c)^2`.

    The target carries no gradient.

    Args:
        student_logits: Logits of the perturbed view, classes along ``dim`` (``(B, C)``, ``(B, C, H, W)``, ...).
        teacher_probs: Target distributions of the same shape.
        divergence: ``"kl"`` or ``"mse"``.
        dim: The class dimension.

    Returns:
        The divergences, ``dim`` removed (``(B,)`` for classification, ``(B, H, W)`` for segmentation).

    Example:
        >>> z = torch.log(torch.tensor([[0.5, 0.5]]))
        >>> consistency_divergence(z, torch.tensor([[1.0, 0.0]]), "kl")
        tensor([0.6931])
        >>> consistency_divergence(z, torch.tensor([[1.0, 0.0]]), "mse")
        tensor([0.2500])
    """
    q = teacher_probs.detach().float()
    if divergence == "kl":
        logp = F.log_softmax(student_logits.float(), dim=dim)
        return (torch.xlogy(q, q) - q * logp).sum(dim=dim)
    if divergence == "mse":
        p = torch.softmax(student_logits.float(), dim=dim)
        return (q - p).pow(2).mean(dim=dim)
    raise ValueError(f"Expected argument `divergence` to be one of ['kl', 'mse'], but got {divergence!r}.")


def consistency_loss(
    student_logits: Tensor,
    teacher_probs: Tensor,
    mask: Tensor | None = None,
    divergence: Divergence = "kl",
    *,
    dim: int = -1,
    valid: Tensor | None = None,
) -> Tensor:
    r"""The masked consistency loss :math:`\frac{1}{|E|}\sum_{i \in E} m_i\, D(\mathrm{sg}(q_i) \,\|\, p(\tilde x_i))`.

    The mean runs over the elements :math:`E` that count (all samples for classification; the ``valid``
    pixels or tokens on dense outputs), masked ones included; elements outside :math:`E` contribute
    nothing, and no counted element gives exactly 0. Multiply by the weight :math:`w(t)` outside.

    Args:
        student_logits: Logits of the perturbed view (any float dtype; computed in fp32), classes along ``dim``.
        teacher_probs: The (sharpened) target of the same shape, detached.
        mask: Per-element weights ``m_i`` (``dim`` removed; e.g. from :func:`confidence_mask`, or MIC's
            per-image quality weight), or ``None`` for all ones.
        divergence: ``"kl"`` or ``"mse"`` (see :func:`consistency_divergence`).
        dim: The class dimension (``-1`` for ``(B, C)`` and ``(B, T, C)``, ``1`` for ``(B, C, H, W)``).
        valid: Optional boolean mask of the elements :math:`E` (``dim`` removed); ``None``: every element.

    Example:
        >>> z = torch.log(torch.tensor([[0.5, 0.5], [0.9, 0.1]]))
        >>> q = torch.tensor([[1.0, 0.0], [0.9, 0.1]])
        >>> consistency_loss(z, q, mask=torch.tensor([1.0, 0.0]))  # (log 2 + 0) / 2
        tensor(0.3466)
    """
    d = consistency_divergence(student_logits, teacher_probs, divergence, dim=dim)
    if mask is not None:
        d = d * mask.to(d.dtype)
    if valid is None:
        return d.mean()
    return torch.where(valid, d, torch.zeros((), dtype=d.dtype, device=d.device)).sum() / valid.sum().clamp_min(1)


def _compute_dtype(t: Tensor) -> torch.dtype:
    """fp64 stays fp64; every other float dtype is computed in fp32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _adele_weights(n: int, weights: Sequence[float] | None) -> list[float]:
    if weights is None:
        return [1.0 / n] * n
    w = [float(v) for v in weights]
    if len(w) != n or any(not v >= 0 for v in w) or sum(w) <= 0:
        raise ValueError(
            f"Expected argument `weights` to hold {n} non-negative floats with a positive sum, but got {list(weights)}."
        )
    return [v / sum(w) for v in w]


def _adele_mixture(probs: Sequence[Tensor], w: Sequence[float], eps: float) -> Tensor:
    return torch.stack([wi * p for wi, p in zip(w, probs)]).sum(dim=0).clamp(eps, 1.0 - eps)


def _sample_confidence(mixture: Tensor, valid: Tensor | None, dim: int) -> Tensor:
    """``(B,)``: the largest clipped mean probability over the classes and the sample's valid elements."""
    conf = mixture if valid is None else mixture * valid.unsqueeze(dim).to(mixture.dtype)
    return conf.flatten(1).amax(dim=1)


def adele_confidence(
    view_logits: Sequence[Tensor],
    weights: Sequence[float] | None = None,
    valid: Tensor | None = None,
    eps: float = 1e-3,
    dim: int = 1,
) -> Tensor:
    r"""ADELE's per-sample confidence :math:`\max_{c,\,j \in V_b} \bar p_{bcj}` (detached, fp32 or fp64).

    The quantity :func:`adele_multiscale_consistency` thresholds: the largest clipped mean prediction over
    the classes and the sample's valid elements.

    Example:
        >>> z1 = torch.log(torch.tensor([[0.9, 0.1], [0.6, 0.4]]))
        >>> z2 = torch.log(torch.tensor([[0.7, 0.3], [0.4, 0.6]]))
        >>> adele_confidence([z1, z2])
        tensor([0.8000, 0.5000])
    """
    w = _adele_weights(len(view_logits), weights)
    dtype = _compute_dtype(view_logits[0])
    with torch.no_grad():
        probs = [torch.softmax(z.detach().to(dtype), dim=dim) for z in view_logits]
        return _sample_confidence(_adele_mixture(probs, w, eps), valid, dim)


def adele_multiscale_consistency(
    view_logits: Sequence[Tensor],
    weights: Sequence[float] | None = None,
    threshold: float = 0.8,
    valid: Tensor | None = None,
    eps: float = 1e-3,
    *,
    counted: Tensor | None = None,
    dim: int = 1,
) -> Tensor:
    r"""ADELE's multi-scale consistency term, as the official ``calc_jsd_multiscale`` computes it.

    With :math:`p_s = \mathrm{softmax}(z_s)` the prediction on view (scale) :math:`s`:

    .. math:: \bar p = \mathrm{clip}\!\Big(\sum_s w_s\, p_s,\ \epsilon,\ 1 - \epsilon\Big),\qquad
              m_b = \mathbb 1\!\Big[\max_{c,\,j \in V_b} \bar p_{b c j} \ge \text{threshold}\Big],

    .. math:: \mathcal L = \frac1{|E|}\sum_{(b,j) \in E} m_b \sum_s \mathrm{KL}\!\left(p_{s,bj} \| \bar p_{bj}\right)
              = \frac1{|E|}\sum_{(b,j) \in E} m_b \sum_s \sum_c p_{s,bcj}\,(\log p_{s,bcj} - \log \bar p_{bcj})

    where :math:`j` runs over a sample's elements (one for classification,
    the pixels for segmentation, the tokens of a sequence), :math:`V_b` are sample ``b``'s valid
    elements and :math:`E` the elements averaged over (``counted``; by default *all* of them, as the official
    code). Unlike the UDA-style :func:`consistency_loss`:

    * the KL runs from each view to the mean, :math:`\mathrm{KL}(p_s \| \bar p)`, and is **summed** over the
      views (not averaged, not weighted: the weights only enter :math:`\bar p`);
    * the gradient flows through :math:`\bar p` as well as through every :math:`p_s`; nothing is sharpened;
    * the mask is one flag per *sample*: the largest clipped mean probability over its classes and valid
      elements (for classification: :math:`\max_c \bar p_{bc}`; :func:`adele_confidence`); with
      ``counted=None`` the mean runs over all ``N`` elements, masked and invalid ones included (ADELE's
      default ``Mask_label255_sign='no'``).

    ADELE's weights are ``softmax(weight)`` of a parameter initialised to ones (uniform); ``ε = 10^{-3}``.
    Computed in fp32 (fp64 stays fp64). Paper: https://arxiv.org/abs/2110.03740; code:
    https://github.com/Kangningthu/ADELE (``lib/utils/JSD_loss.py``).

    Args:
        view_logits: At least two logits tensors of one shape, ``(B, C)``, ``(B, C, *d)`` or ``(B, T, C)`` with
            ``dim=-1`` (resize dense predictions to a common size first, as ADELE does:
            :meth:`~lightning_reg.augment.Augmentation.invert_output`).
        weights: Non-negative weights ``w_s`` of the views in :math:`\bar p`, normalised; ``None`` is uniform.
        threshold: The confidence threshold in ``[0, 1]`` for :math:`m_b` (ADELE: 0.8).
        valid: Optional boolean mask of labelled elements (``dim`` removed; ADELE's ``label < 255``): only
            these enter the per-sample maximum.
        eps: The clip :math:`\epsilon` of :math:`\bar p` in ``[0, 0.5)``.
        counted: Optional boolean mask of the elements :math:`E` the mean runs over (``dim`` removed);
            ``None``: all of them (the official term). Elements outside contribute nothing.
        dim: The class dimension (``1``; ``-1`` for ``(B, T, C)`` token logits).

    Returns:
        The scalar term (weight it outside); 0 if no element is counted.

    Example:
        >>> z1 = torch.log(torch.tensor([[0.9, 0.1], [0.6, 0.4]]))
        >>> z2 = torch.log(torch.tensor([[0.7, 0.3], [0.4, 0.6]]))
        >>> # p̄ = (0.8, 0.2) is kept, (0.5, 0.5) is masked; the mean runs over both samples:
        >>> # (0.9 log(0.9/0.8) + 0.1 log(0.1/0.2) + 0.7 log(0.7/0.8) + 0.3 log(0.3/0.2)) / 2
        >>> adele_multiscale_consistency([z1, z2], threshold=0.75)
        tensor(0.0324)
    """
    if len(view_logits) < 2:
        raise ValueError(
            f"Expected argument `view_logits` to hold at least 2 views (one per scale), but got {len(view_logits)}."
        )
    w = _adele_weights(len(view_logits), weights)
    if not 0.0 <= eps < 0.5:
        raise ValueError(f"Expected argument `eps` to be a float in [0, 0.5), but got {eps}.")
    dtype = _compute_dtype(view_logits[0])
    logp = [F.log_softmax(z.to(dtype), dim=dim) for z in view_logits]
    probs = [lp.exp() for lp in logp]
    mixture = _adele_mixture(probs, w, eps)
    with torch.no_grad():
        mask = (_sample_confidence(mixture, valid, dim) >= threshold).to(dtype)  # (B,): one flag per sample
    log_mixture = mixture.log()
    # Σ_s KL(p_s ‖ p̄) per element; p_s·log p_s from log_softmax stays finite (0 where p_s underflows).
    kl = torch.stack([(p * (lp - log_mixture)).sum(dim=dim) for p, lp in zip(probs, logp)]).sum(dim=0)
    kl = kl * mask.view(-1, *([1] * (kl.dim() - 1)))
    if counted is None:
        return kl.mean()
    return torch.where(counted, kl, torch.zeros((), dtype=kl.dtype, device=kl.device)).sum() / counted.sum().clamp_min(
        1
    )


# -- label correction (ADELE) -------------------------------------------------------------------------------------


def class_agreement_counts(pred: Tensor, labels: Tensor, num_classes: int, valid: Tensor | None = None) -> Tensor:
    """Per-class ``[true positives, predicted count, label count]`` of predictions against labels, as ``(3, C)``.

    Any shape: samples, or the pixels/tokens of dense outputs (ADELE counts pixels). Elements outside
    ``valid`` (void pixels, padding, unlabeled samples) are not counted, whatever their label value. Built
    with ``scatter_add_`` (no host sync), so it can run every step.

    Args:
        pred: Predicted classes.
        labels: Given labels of the same shape.
        num_classes: ``C``.
        valid: Optional boolean mask of the elements to count; ``None``: all (every label must be in ``[0, C)``).

    Example:
        >>> class_agreement_counts(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0]), 2)
        tensor([[1, 1],
                [1, 2],
                [2, 1]])
    """
    pred, labels = pred.reshape(-1), labels.reshape(-1)
    counts = torch.zeros(3, num_classes, dtype=torch.long, device=labels.device)
    if valid is None:
        counts[0].scatter_add_(0, labels, (pred == labels).long())
        counts[1].scatter_add_(0, pred, torch.ones_like(pred))
        counts[2].scatter_add_(0, labels, torch.ones_like(labels))
        return counts
    keep = valid.reshape(-1).long()
    safe = torch.where(keep.bool(), labels, torch.zeros_like(labels))
    counts[0].scatter_add_(0, safe, (pred == labels).long() * keep)
    counts[1].scatter_add_(0, pred, keep)
    counts[2].scatter_add_(0, safe, keep)
    return counts


def class_iou(counts: Tensor) -> Tensor:
    r"""Per-class IoU :math:`\frac{TP}{|\hat y = c| + |y = c| - TP}` from :func:`class_agreement_counts` (0 if empty).

    ADELE's agreement measure between the predictions and the given labels.

    Example:
        >>> class_iou(torch.tensor([[1, 1], [1, 2], [2, 1]]))
        tensor([0.5000, 0.5000])
    """
    tp, npred, nlab = counts.double()
    union = npred + nlab - tp
    return torch.where(union > 0, tp / union.clamp_min(1), torch.zeros_like(tp)).float()


def early_learning_curve(x: Tensor, a: Tensor, b: Tensor, c: Tensor) -> Tensor:
    r"""ADELE's model of the agreement curve, :math:`f(x) = a\,(1 - e^{-x^b / c})`.

    Example:
        >>> early_learning_curve(torch.tensor(1.0), torch.tensor(1.0), torch.tensor(1.0), torch.tensor(1.0))
        tensor(0.6321)
    """
    return a * (1.0 - torch.exp(-(x**b) / c))


def early_learning_curve_slope(x: Tensor, a: Tensor, b: Tensor, c: Tensor) -> Tensor:
    r"""The derivative :math:`f'(x) = \frac{ab}{c}\, x^{b-1} e^{-x^b / c}` (ADELE adds ``1e-6`` to ``x``).

    Example:
        >>> one = torch.tensor(1.0, dtype=torch.float64)
        >>> round(float(early_learning_curve_slope(one, one, one, one)), 4)
        0.3679
    """
    x = x + 1e-6
    return a * b / c * torch.exp(-(x**b) / c) * x ** (b - 1.0)


def _solve3(a: Tensor, b: Tensor) -> Tensor:
    """Solve a batch of 3×3 systems ``a x = b`` by Cramer's rule (much faster than LAPACK for tiny systems); a
    singular or non-finite system gives a zero step."""
    c0, c1, c2 = a[:, :, 0], a[:, :, 1], a[:, :, 2]
    k12, k20, k01 = torch.linalg.cross(c1, c2), torch.linalg.cross(c2, c0), torch.linalg.cross(c0, c1)
    det = (c0 * k12).sum(dim=1, keepdim=True)
    x = torch.stack([(k12 * b).sum(dim=1), (k20 * b).sum(dim=1), (k01 * b).sum(dim=1)], dim=1) / det
    ok = (det.abs() > 1e-300) & torch.isfinite(x).all(dim=1, keepdim=True)
    return torch.where(ok, x, torch.zeros_like(x))


def early_learning_axis(num_points: int, interval: float = 1.0) -> Tensor:
    r"""ADELE's abscissae of ``T`` agreement points taken ``Δ`` epochs apart: ``linspace(0, T·Δ, T)`` (fp64).

    The official code fits the curve at ``np.linspace(0, len(iou) * eval_interval / num_iter_per_epoch,
    len(iou))``: the first point at ``x = 0`` and the last at ``T·Δ`` (so the spacing is ``T·Δ / (T − 1)``, a
    little more than ``Δ``). With one point per epoch (``Δ = 1``, ADELE's SegThor code) that is
    ``linspace(0, T, T)``; ADELE's VOC code takes a point every 100 iterations of 1058 per epoch
    (``Δ = 100 / 1058.1``).

    Args:
        num_points: ``T``, the number of points on the curve.
        interval: ``Δ``, the epochs between two points (``eval_interval / num_iter_per_epoch``).

    Example:
        >>> early_learning_axis(5)
        tensor([0.0000, 1.2500, 2.5000, 3.7500, 5.0000], dtype=torch.float64)
    """
    return torch.linspace(0.0, num_points * interval, num_points, dtype=torch.float64)


def fit_early_learning_curve(y: Tensor, x: Tensor | None = None, max_iter: int = 200) -> tuple[Tensor, Tensor, Tensor]:
    r"""Fit :math:`f(x) = a(1 - e^{-x^b/c})` to one or several agreement curves, as ADELE does.

    ADELE fits with ``scipy.optimize.curve_fit`` under the bounds
    :math:`a, b \in [0, 1]`, :math:`c \ge 0` and the per-point uncertainties
    ``σ = geomspace(1, 0.1, T)`` (later points weigh up to 100× more). This is
    the same weighted least squares, solved in pure torch for all curves at
    once: a batched, projected Levenberg–Marquardt in fp64 on CPU over
    :math:`(a, b, \log c)` with :math:`a, b` projected onto ``[0, 1]``,
    from three starts per curve (ADELE's ``p0 = (1, 1, 1)`` among them),
    keeping the lowest cost. Every curve has its own damping, so each
    converges as if fitted alone. It is deterministic, so every DDP rank gets
    the same fit.

    Args:
        y: ``(T,)`` or ``(T, C)`` agreement values in ``[0, 1]``, one row per epoch.
        x: ``(T,)`` abscissae ``>= 0``; default ADELE's axis for one point per epoch,
            :func:`early_learning_axis` ``(T)`` = ``linspace(0, T, T)``.
        max_iter: Levenberg–Marquardt iterations (it stops earlier once no curve improves).

    Returns:
        ``(a, b, c)``, each ``(C,)`` (or scalars for a 1-D ``y``), fp64.

    Example:
        >>> x = early_learning_axis(8)
        >>> a, b, c = fit_early_learning_curve(early_learning_curve(x, 0.8, 0.6, 1.5))
        >>> [round(float(v), 3) for v in (a, b, c)]
        [0.8, 0.6, 1.5]
    """
    squeeze = y.dim() == 1
    yy = (y.unsqueeze(1) if squeeze else y).detach().to("cpu", torch.float64)
    t, n = yy.shape
    xx = early_learning_axis(t) if x is None else x.detach().to("cpu", torch.float64)
    xx = xx.unsqueeze(1)  # (T, 1)
    if xx.shape[0] != t or bool((xx < 0).any()):
        raise ValueError(f"Expected argument `x` to hold {t} abscissae >= 0, but got {x}.")
    positive = xx > 0  # ADELE's axis starts at x = 0, where x^b = 0 (b > 0) or 1 (b = 0), as numpy computes it
    log_x = torch.where(positive, torch.log(xx.clamp_min(1e-300)), torch.zeros_like(xx))
    w = torch.logspace(0, -1, t, dtype=torch.float64).pow(-2)  # 1 / σ², (T,)
    lo = torch.tensor([0.0, 0.0, -30.0], dtype=torch.float64).unsqueeze(1)
    hi = torch.tensor([1.0, 1.0, 30.0], dtype=torch.float64).unsqueeze(1)

    def residual_and_jacobian(p: Tensor) -> tuple[Tensor, Tensor]:
        a, b, c = p[0], p[1], torch.exp(p[2])
        xb = torch.where(positive, torch.exp(log_x * b), (b == 0).to(torch.float64))
        e = torch.exp(-xb / c)
        r = a * (1.0 - e) - yy
        j = torch.stack([1.0 - e, a * e * xb * log_x / c, -a * e * xb / c], dim=-1)  # d f / d(a, b, log c)
        return r, j

    def loss_of(r: Tensor) -> Tensor:
        return (w.unsqueeze(1) * r.pow(2)).sum(dim=0)

    # Three starts per curve, fitted side by side; the lowest cost wins: ADELE's p0 = (1, 1, 1),
    # (max y, 0.5, 1) and a slow curve (1, 0.5, e^2). Parameters: (a, b, log c), a and b projected on [0, 1].
    starts = torch.tensor([[1.0, 1.0, 0.0], [0.5, 0.5, 0.0], [1.0, 0.5, 2.0]], dtype=torch.float64)
    p = starts.repeat_interleave(n, dim=0).T.contiguous()  # (3, K*C)
    p[0, n : 2 * n] = yy.amax(dim=0).clamp(0.0, 1.0)
    yy = yy.repeat(1, len(starts))
    r, j = residual_and_jacobian(p)
    loss = loss_of(r)
    lam = torch.full_like(loss, 1e-3)
    done = torch.zeros_like(loss, dtype=torch.bool)
    eye = torch.eye(3, dtype=torch.float64)
    for _ in range(max_iter):
        g = torch.einsum("tci,tc,t->ci", j, r, w)
        # Active set: a parameter on a bound whose descent direction leaves the box is held fixed this step.
        held = ((p.T <= lo.T) & (g > 0)) | ((p.T >= hi.T) & (g < 0))  # (K*C, 3)
        jf = j * (~held).unsqueeze(0)
        g = g * ~held
        jtj = torch.einsum("tci,tcj,t->cij", jf, jf, w) + torch.diag_embed(held.double())
        damp = lam[:, None, None] * (torch.diag_embed(torch.diagonal(jtj, dim1=1, dim2=2)) + 1e-9 * eye)
        step = _solve3(jtj + damp, -g)
        p_new = torch.minimum(torch.maximum(p + step.T, lo), hi)  # projected onto the bounds
        r_new, j_new = residual_and_jacobian(p_new)
        loss_new = loss_of(r_new)
        better = torch.isfinite(loss_new) & (loss_new < loss) & ~done
        # scipy's stopping rules (ftol = xtol = 1e-8): a tiny relative decrease of the cost or a tiny step.
        moved = (p_new - p).norm(dim=0)
        small = ((loss - loss_new) < 1e-8 * loss) | (moved < 1e-8 * (p.norm(dim=0) + 1e-8)) | (loss_new < 1e-24)
        p = torch.where(better, p_new, p)
        r = torch.where(better, r_new, r)
        j = torch.where(better[None, :, None], j_new, j)
        loss = torch.where(better, loss_new, loss)
        lam = torch.where(better, lam / 3.0, lam * 3.0).clamp(1e-12, 1e12)
        done |= (better & small) | (lam >= 1e10)
        if bool(done.all()):
            break
    best = loss.view(len(starts), n).argmin(dim=0) * n + torch.arange(n)
    p = p[:, best]
    a, b, c = p[0], p[1], torch.exp(p[2])
    if squeeze:
        return a[0], b[0], c[0]
    return a, b, c


def early_learning_end_epoch(a: Tensor, b: Tensor, c: Tensor, r: float = 0.9, horizon: int = 1000) -> Tensor:
    r"""ADELE's update epoch: one plus the number of epochs whose relative slope change is at most ``r``.

    .. math:: \delta(e) = \frac{|f'(e) - f'(1)|}{f'(1)},\qquad
              e^\star = 1 + \#\{e \in \{1, \dots, \text{horizon} - 1\} : \delta(e) \le r\}

    (values :math:`\delta > 1` count as 0 and undefined ones, :math:`0/0`, are not
    counted, as in ADELE's numpy code: a flat curve with :math:`a = 0` gives
    :math:`e^\star = 1`). For the decreasing slopes the bounds allow,
    :math:`e^\star` is the first epoch at which the slope has fallen below
    :math:`(1 - r)` of its value at epoch 1.

    Args:
        a, b, c: Fitted parameters, ``(C,)`` or scalars.
        r: The relative-change threshold (ADELE: 0.9).
        horizon: ADELE's ``n_epoch``: the last epoch considered is ``horizon - 1``.

    Returns:
        The update epochs as ``long``, shaped like ``a``.

    Example:
        >>> one = torch.tensor(1.0, dtype=torch.float64)
        >>> int(early_learning_end_epoch(one, one, one, r=0.9))  # exp(-(e - 1)) < 0.1 first at e = 4
        4
    """
    e = torch.arange(1, horizon, dtype=torch.float64).view(-1, *([1] * a.dim()))
    a, b, c = (v.to(torch.float64) for v in (a, b, c))
    ref = early_learning_curve_slope(torch.ones((), dtype=torch.float64), a, b, c)
    rel = (early_learning_curve_slope(e, a, b, c).abs() - ref.abs()).abs() / ref.abs()
    rel = torch.where(rel > 1, torch.zeros_like(rel), rel)  # NaN > 1 is False and NaN <= r is False, as in numpy
    return (rel <= r).sum(dim=0) + 1


def end_of_early_learning(
    history: Tensor,
    r: float = 0.9,
    horizon: int = 1000,
    min_epochs: int = 3,
    interval: float = 1.0,
    current_epoch: int | None = None,
) -> Tensor:
    r"""Whether early learning has ended for each class, given its agreement curve so far: ADELE's ``if_update``.

    Fits :func:`fit_early_learning_curve` to each column of ``history`` on
    ADELE's axis :func:`early_learning_axis` ``(T, interval)`` and reports
    ``current_epoch >= early_learning_end_epoch(...)``, where
    ``current_epoch`` is the 0-based epoch that just ended (ADELE's
    ``if_update(iou, epoch)``); never before ``min_epochs`` points exist
    (three parameters need three points).

    Args:
        history: ``(T, C)`` per-class agreement (e.g. :func:`class_iou`), one row per point.
        r: The relative slope-change threshold (ADELE: 0.9).
        horizon: The last epoch considered (ADELE's ``n_epoch``), e.g. the run's ``max_epochs``.
        min_epochs: Points needed before deciding.
        interval: Epochs between two points (1: one point per epoch, as ADELE's SegThor code).
        current_epoch: The 0-based epoch that just ended; ``None``: ``T − 1``, right for one point per epoch.

    Returns:
        ``(C,)`` bool.

    Example:
        >>> x = early_learning_axis(7)
        >>> fast, slow = early_learning_curve(x, 0.9, 1.0, 1.0), early_learning_curve(x, 0.9, 1.0, 20.0)
        >>> end_of_early_learning(torch.stack([fast, slow], 1), horizon=100).tolist()
        [True, False]
    """
    t = history.shape[0]
    if t < min_epochs:
        return torch.zeros(history.shape[1], dtype=torch.bool)
    a, b, c = fit_early_learning_curve(history, early_learning_axis(t, interval))
    epoch = t - 1 if current_epoch is None else current_epoch
    return epoch >= early_learning_end_epoch(a, b, c, r=r, horizon=horizon)
