"""Label-noise diagnostics from per-sample soft targets (e.g. ELR's) and model predictions.

During training, techniques such as :class:`~lightning_reg.ELR` keep a soft
target per sample that tracks what the model learned *before* it memorized
the noise. A target whose argmax disagrees with the given label flags a
likely mislabeled sample (ELR paper, Sec. 5), with no cross-validation and no
second training run (cleanlab, by contrast, needs out-of-sample predictions).

With the true noise mask known (e.g. from
:func:`~lightning_reg.data.inject_label_noise`), the flags are scored as a
noisy-label detector, and the model's predictions give the memorization rate:

=====================  ==============================================================
key                    definition
=====================  ==============================================================
``disagreement``        fraction of samples with ``argmax(t_i) != y_i``
``noise_rate``          fraction of samples that are truly noisy (mask known)
``precision``           truly noisy among the flagged samples
``recall``              flagged among the truly noisy samples
``f1``                  harmonic mean of precision and recall
``memorization``        fraction of truly noisy samples where the model predicts the
                        (wrong) given label
=====================  ==============================================================

Precision, recall and F1 are 0 when their denominator is empty (as in torchmetrics).

**Dense outputs.** Every function and :class:`LabelNoiseMetrics` also take per-element inputs:
targets/scores ``(N, C, *d)`` with labels, masks and predicted classes ``(N, *d)`` (a segmentation
mask, token labels). The scores are then over *elements* (pixels, tokens), and elements whose given
label is ``ignore_index`` (default ``-100``: void pixels, padding, unlabeled samples) are left out of
every count. With ``num_classes``, :class:`LabelNoiseMetrics` also reports the per-class IoU of the
predictions against the given labels (``iou_given``, ADELE's agreement curve) and its mean ``miou_given``.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from lightning_reg.core.validation import check_float

__all__ = [
    "LabelNoiseMetrics",
    "SuspectedLabels",
    "label_noise_scores",
    "suspected_mislabeled",
    "write_suspected_csv",
]

_COUNTS = ("total", "disagree", "masked", "noisy", "flagged_masked", "true_pos", "noisy_with_pred", "memorized")


def _flat_scores(x: Tensor) -> Tensor:
    """``(N, C)`` or ``(N, C, *d)`` scores as ``(E, C)`` rows."""
    return x.movedim(1, -1).reshape(-1, x.shape[1]) if x.dim() > 2 else x


def _as_class(x: Tensor, scores: bool) -> Tensor:
    """Flat class ids from class ids (``(N,)``/``(N, *d)``) or scores (``(N, C)``/``(N, C, *d)``)."""
    return _flat_scores(x).argmax(dim=-1) if scores else x.reshape(-1).long()


def _counts(
    soft_targets: Tensor,
    given_labels: Tensor,
    noise_mask: Tensor | None,
    predictions: Tensor | None,
    ignore_index: int = -100,
) -> dict[str, Tensor]:
    if soft_targets.dim() < 2 or soft_targets.dim() != given_labels.dim() + 1:
        raise ValueError(
            "Expected `soft_targets` of shape (N, C) or (N, C, *d) with `given_labels` of shape (N,) or (N, *d), but"
            f" got shapes {tuple(soft_targets.shape)} and {tuple(given_labels.shape)}."
        )
    element_shape = (soft_targets.shape[0], *soft_targets.shape[2:])
    n = element_shape[0]
    for name, t in (("given_labels", given_labels), ("noise_mask", noise_mask), ("predictions", predictions)):
        if t is not None and t.shape[0] != n:
            raise ValueError(f"Expected `{name}` with {n} rows, one per sample, but got shape {tuple(t.shape)}.")
    for name, t in (("given_labels", given_labels), ("noise_mask", noise_mask)):
        if t is not None and tuple(t.shape) != element_shape:
            raise ValueError(
                f"Expected `{name}` of shape {element_shape}, one entry per sample (element), but got shape"
                f" {tuple(t.shape)}."
            )
    if predictions is not None and tuple(predictions.shape) not in (element_shape, tuple(soft_targets.shape)):
        raise ValueError(
            f"Expected `predictions` of shape {element_shape} (classes) or {tuple(soft_targets.shape)} (scores), but"
            f" got shape {tuple(predictions.shape)}."
        )
    dev = soft_targets.device
    y = given_labels.long().to(dev).reshape(-1)
    valid = y != ignore_index
    flagged = (_flat_scores(soft_targets).argmax(dim=-1) != y) & valid
    zero = torch.zeros((), dtype=torch.long, device=dev)
    out = {k: zero for k in _COUNTS}
    out["total"] = valid.sum()
    out["disagree"] = flagged.sum()
    if noise_mask is not None:
        noisy = noise_mask.to(dev).bool().reshape(-1) & valid
        out["masked"] = valid.sum()
        out["noisy"] = noisy.sum()
        out["flagged_masked"] = flagged.sum()
        out["true_pos"] = (flagged & noisy).sum()
        if predictions is not None:
            pred = _as_class(predictions.to(dev), predictions.dim() == soft_targets.dim())
            out["noisy_with_pred"] = noisy.sum()
            out["memorized"] = ((pred == y) & noisy).sum()
    return out


def _safe_div(a: Tensor, b: Tensor) -> Tensor:
    return torch.where(b > 0, a.float() / b.clamp_min(1).float(), torch.zeros((), device=a.device))


def _scores(c: dict[str, Tensor]) -> dict[str, Tensor]:
    out = {"disagreement": _safe_div(c["disagree"], c["total"])}
    if int(c["masked"]) > 0:
        precision = _safe_div(c["true_pos"], c["flagged_masked"])
        recall = _safe_div(c["true_pos"], c["noisy"])
        out["noise_rate"] = _safe_div(c["noisy"], c["masked"])
        out["precision"] = precision
        out["recall"] = recall
        out["f1"] = _safe_div(2 * precision * recall, precision + recall)
        if int(c["noisy_with_pred"]) > 0:
            out["memorization"] = _safe_div(c["memorized"], c["noisy_with_pred"])
    return out


def label_noise_scores(
    soft_targets: Tensor,
    given_labels: Tensor,
    noise_mask: Tensor | None = None,
    predictions: Tensor | None = None,
    ignore_index: int = -100,
) -> dict[str, Tensor]:
    """Score per-sample (or per-element) soft targets as a noisy-label detector (keys: module docstring).

    Args:
        soft_targets: ``(N, C)`` per-sample targets (e.g. :attr:`ELR.targets <lightning_reg.ELR.targets>`),
            or ``(N, C, *d)`` per-element targets or scores (e.g. an EMA teacher's segmentation output).
        given_labels: ``(N,)`` (``(N, *d)``) the labels training saw (possibly noisy).
        noise_mask: ``(N,)`` (``(N, *d)``) bool, ``True`` where the given label is wrong; adds
            ``noise_rate``, ``precision``, ``recall`` and ``f1``.
        predictions: ``(N,)`` (``(N, *d)``) predicted classes or scores of the model's shape;
            with ``noise_mask`` adds ``memorization``.
        ignore_index: Given labels with this value are left out of every count.

    Returns:
        A dict of 0-d fp32 tensors.

    Example:
        >>> t = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
        >>> y = torch.tensor([0, 0, 1, 1])             # samples 1 and 2 are flagged
        >>> mask = torch.tensor([False, True, False, True])  # samples 1 and 3 are truly noisy
        >>> s = label_noise_scores(t, y, mask, predictions=torch.tensor([0, 1, 0, 1]))
        >>> {k: round(v.item(), 4) for k, v in s.items()}
        {'disagreement': 0.5, 'noise_rate': 0.5, 'precision': 0.5, 'recall': 0.5, 'f1': 0.5, 'memorization': 0.5}
    """
    return _scores(_counts(soft_targets, given_labels, noise_mask, predictions, ignore_index))


class LabelNoiseMetrics(Metric):
    """The label-noise diagnostics as a torchmetrics ``Metric`` (DDP-reducible counts).

    Update it with batches (or the whole table at once) of per-sample soft
    targets, given labels and, when known, the noise mask and the model's
    predictions; :meth:`compute` returns the dict of :func:`label_noise_scores`
    (keys that need a noise mask appear only when one was given).

    Example:
        >>> metric = LabelNoiseMetrics()
        >>> t = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
        >>> metric.update(t[:2], torch.tensor([0, 0]), torch.tensor([False, True]))
        >>> metric.update(t[2:], torch.tensor([1, 1]), torch.tensor([False, True]))
        >>> {k: round(v.item(), 4) for k, v in metric.compute().items()}
        {'disagreement': 0.5, 'noise_rate': 0.5, 'precision': 0.5, 'recall': 0.5, 'f1': 0.5}

    Dense outputs (per-pixel scores, with void pixels at ``-100``) and the per-class IoU of the
    predictions against the given masks:

        >>> m = LabelNoiseMetrics(num_classes=2)
        >>> scores = torch.tensor([[[[0.9, 0.2], [0.3, 0.6]], [[0.1, 0.8], [0.7, 0.4]]]])  # (1, 2, 2, 2)
        >>> given = torch.tensor([[[0, 1], [0, -100]]])
        >>> m.update(scores, given, torch.tensor([[[False, False], [True, False]]]), predictions=scores)
        >>> out = m.compute()
        >>> round(out["f1"].item(), 4), [round(v, 4) for v in out["iou_given"].tolist()]
        (1.0, [0.5, 0.5])

    In training, e.g. at the end of each epoch with :class:`~lightning_reg.ELR`::

        metric = LabelNoiseMetrics()
        metric.update(elr.targets[elr.seen], elr.given_labels[elr.seen], noise_mask[elr.seen])
        pl_module.log_dict({f"noise/{k}": v for k, v in metric.compute().items()})
    """

    is_differentiable = False
    higher_is_better: bool | None = None
    full_state_update = False

    total: Tensor
    disagree: Tensor
    masked: Tensor
    noisy: Tensor
    flagged_masked: Tensor
    true_pos: Tensor
    noisy_with_pred: Tensor
    memorized: Tensor
    iou_inter: Tensor
    iou_pred: Tensor
    iou_given: Tensor

    def __init__(self, ignore_index: int = -100, num_classes: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
            raise TypeError(f"Expected argument `ignore_index` to be an int, but got {ignore_index!r}.")
        if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 1):
            raise ValueError(
                f"Expected argument `num_classes` to be an int in [1, inf) or None, but got {num_classes!r}."
            )
        self.ignore_index = ignore_index
        self.num_classes = num_classes
        for name in _COUNTS:
            self.add_state(name, default=torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        if num_classes is not None:
            for name in ("iou_inter", "iou_pred", "iou_given"):
                self.add_state(name, default=torch.zeros(num_classes, dtype=torch.long), dist_reduce_fx="sum")

    def update(
        self,
        soft_targets: Tensor,
        given_labels: Tensor,
        noise_mask: Tensor | None = None,
        predictions: Tensor | None = None,
    ) -> None:
        """Accumulate counts for samples or elements (see :func:`label_noise_scores` for the arguments)."""
        counts = _counts(soft_targets, given_labels, noise_mask, predictions, self.ignore_index)
        for name in _COUNTS:
            setattr(self, name, getattr(self, name) + counts[name].to(self.device))
        if self.num_classes is not None and predictions is not None:
            c = self.num_classes
            y = given_labels.long().reshape(-1).to(self.device)
            valid = y != self.ignore_index
            pred = _as_class(predictions.to(self.device), predictions.dim() == soft_targets.dim())
            ones = valid.long()
            yv = torch.where(valid, y, torch.zeros_like(y))
            pv = torch.where(valid, pred, torch.zeros_like(pred))
            self.iou_pred = self.iou_pred + torch.bincount(pv, weights=ones, minlength=c)[:c].long()
            self.iou_given = self.iou_given + torch.bincount(yv, weights=ones, minlength=c)[:c].long()
            hit = (valid & (pv == yv)).long()
            self.iou_inter = self.iou_inter + torch.bincount(yv, weights=hit, minlength=c)[:c].long()

    def compute(self) -> dict[str, Tensor]:
        """The scores over everything seen since the last reset."""
        out = _scores({name: getattr(self, name) for name in _COUNTS})
        if self.num_classes is not None:
            union = self.iou_pred + self.iou_given - self.iou_inter
            iou = torch.where(union > 0, self.iou_inter.float() / union.clamp_min(1).float(), torch.nan)
            out["iou_given"] = iou
            out["miou_given"] = torch.nanmean(iou) if bool(torch.isfinite(iou).any()) else torch.zeros(())
        return out


@dataclass(frozen=True)
class SuspectedLabels:
    """Samples whose soft target disagrees with the given label, most confident first.

    Attributes:
        index: ``(K,)`` dataset indices.
        given_label: ``(K,)`` the labels training saw.
        suggested_label: ``(K,)`` the argmax of the sample's target.
        confidence: ``(K,)`` the normalised target's probability of the suggested label.
    """

    index: Tensor
    given_label: Tensor
    suggested_label: Tensor
    confidence: Tensor


def suspected_mislabeled(
    soft_targets: Tensor,
    given_labels: Tensor,
    seen: Tensor | None = None,
    min_confidence: float = 0.0,
) -> SuspectedLabels:
    """List the samples whose target's argmax differs from the given label, most confident first.

    The confidence is ``max_c t_ic / Σ_c t_ic`` (ELR's targets sum to
    ``1 - β^k`` after ``k`` visits, so they are normalised first).

    Args:
        soft_targets: ``(N, C)`` per-sample targets.
        given_labels: ``(N,)`` labels training saw.
        seen: Optional ``(N,)`` bool mask of the rows that hold a target; others are skipped.
        min_confidence: Keep only suspects at least this confident, in ``[0, 1]``.

    Example:
        >>> t = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.0, 0.0]])
        >>> s = suspected_mislabeled(t, torch.tensor([0, 0, 1, 1]), seen=torch.tensor([True, True, True, False]))
        >>> s.index.tolist(), s.suggested_label.tolist(), [round(c, 2) for c in s.confidence.tolist()]
        ([1, 2], [1, 0], [0.8, 0.6])
    """
    min_confidence = check_float("min_confidence", min_confidence, 0.0, 1.0)
    t = soft_targets.detach().float()
    y = given_labels.long().to(t.device)
    total = t.sum(dim=-1)
    conf, suggested = (t / total.clamp_min(1e-12).unsqueeze(-1)).max(dim=-1)
    keep = (suggested != y) & (total > 0) & (conf >= min_confidence)
    if seen is not None:
        keep &= seen.to(t.device).bool()
    idx = torch.nonzero(keep).flatten()
    order = torch.argsort(conf[idx], descending=True, stable=True)
    idx = idx[order]
    return SuspectedLabels(idx.cpu(), y[idx].cpu(), suggested[idx].cpu(), conf[idx].cpu())


def write_suspected_csv(path: str | Path, suspects: SuspectedLabels, class_names: list[str] | None = None) -> int:
    """Write suspected mislabeled samples as CSV: ``index,given_label,suggested_label,confidence``.

    Args:
        path: The file to write (parent folders are created).
        suspects: From :func:`suspected_mislabeled` or
            :meth:`ELR.suspected_labels <lightning_reg.ELR.suspected_labels>`.
        class_names: Optional names; adds ``given_name`` and ``suggested_name`` columns.

    Returns:
        The number of rows written (without the header).

    Example:
        >>> import tempfile, os
        >>> s = suspected_mislabeled(torch.tensor([[0.2, 0.8]]), torch.tensor([0]))
        >>> p = os.path.join(tempfile.mkdtemp(), "suspects.csv")
        >>> write_suspected_csv(p, s)
        1
        >>> print(open(p).read().strip())
        index,given_label,suggested_label,confidence
        0,0,1,0.800000
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = ["index", "given_label", "suggested_label", "confidence"]
    if class_names is not None:
        header += ["given_name", "suggested_name"]
    rows = zip(
        suspects.index.tolist(),
        suspects.given_label.tolist(),
        suspects.suggested_label.tolist(),
        suspects.confidence.tolist(),
    )
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        count = 0
        for i, g, s, c in rows:
            row: list[Any] = [i, g, s, f"{c:.6f}"]
            if class_names is not None:
                row += [_name(class_names, g), _name(class_names, s)]
            writer.writerow(row)
            count += 1
    return count


def _name(class_names: list[str], label: int) -> str:
    """The class name of ``label``, or the label itself when the model has more classes than names."""
    return class_names[label] if 0 <= label < len(class_names) else str(label)
