"""Training-time label issues in cleanlab's format: ``label_issues.csv`` and a ``pred_probs`` array.

`cleanlab <https://github.com/cleanlab/cleanlab>`_ finds label issues from the given labels and
predicted class probabilities ``pred_probs`` of shape ``(N, K)``, usually out-of-sample ones from
K-fold cross-validation. Training-time detection gets a comparable array from one run: ELR's
per-sample targets (a running average of the model's early predictions), each row normalised to
sum to 1. This module exports it so that cleanlab's functions take it as it is:

.. code-block:: python

    import numpy as np, pandas as pd, cleanlab
    issues = pd.read_csv("label_issues.csv")
    pred_probs = np.load("pred_probs.npy")            # row i belongs to issues.index[i]
    cleanlab.filter.find_label_issues(issues.given_label.to_numpy(), pred_probs)
    cleanlab.dataset.health_summary(issues.given_label.to_numpy(), pred_probs)

``label_issues.csv`` has one row per sample with a target, in dataset-index order, with the
columns of cleanlab's ``Datalab.get_issues("label")``:

===================  ==========================================================================
``index``            the sample's index in the training set (``IndexedDataset``'s index)
``is_label_issue``   our detector's flag: :math:`\\arg\\max_c p_{ic} \\ne y_i` (and
                     :math:`\\max_c p_{ic} \\ge` ``min_confidence``), as in ``suspected_labels.csv``
``label_score``      the self-confidence :math:`p_{i, y_i}`, cleanlab's default label quality score
                     (``rank_by="self_confidence"``); lower means more likely mislabeled
``given_label``      :math:`y_i`, the label training saw
``predicted_label``  :math:`\\arg\\max_c p_{ic}`
===================  ==========================================================================

with :math:`p_i = t_i / \\sum_c t_{ic}` the normalised target. Rows that never got a target (or hold
a non-finite one) are left out, so the arrays stay valid probability rows; the ``index`` column maps
rows back to samples. The ``.npy`` file is written without needing numpy (numpy reads it).

Note that ELR's targets are in-sample (the model trained on those samples), unlike the out-of-sample
probabilities cleanlab assumes; they are a temporal ensemble of the predictions made *before* the
model memorised the noise, which is what makes them useful for detection (ELR paper, Sec. 5).
"""

from __future__ import annotations

import csv
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from lightning_reg.core.validation import check_float

__all__ = ["LabelIssues", "label_issues_from_targets", "save_npy", "write_label_issues"]


@dataclass(frozen=True)
class LabelIssues:
    """Per-sample label-issue rows in cleanlab's format (see the module docs), in dataset-index order.

    Attributes:
        index: ``(K,)`` dataset indices of the rows.
        is_label_issue: ``(K,)`` bool, our detector's flag.
        label_score: ``(K,)`` the normalised target's probability of the given label.
        given_label: ``(K,)`` the labels training saw.
        predicted_label: ``(K,)`` the argmax of the normalised target.
        pred_probs: ``(K, C)`` fp32 rows summing to 1, cleanlab's ``pred_probs``.
    """

    index: Tensor
    is_label_issue: Tensor
    label_score: Tensor
    given_label: Tensor
    predicted_label: Tensor
    pred_probs: Tensor


def label_issues_from_targets(
    soft_targets: Tensor, given_labels: Tensor, seen: Tensor | None = None, min_confidence: float = 0.0
) -> LabelIssues:
    """Normalise per-sample targets into ``pred_probs`` and score every sample's given label.

    .. math::

        p_i = \\frac{t_i}{\\sum_c t_{ic}}, \\quad
        \\text{label\\_score}_i = p_{i, y_i}, \\quad
        \\text{is\\_label\\_issue}_i = [\\arg\\max_c p_{ic} \\ne y_i] \\wedge [\\max_c p_{ic} \\ge \\tau]

    Args:
        soft_targets: ``(N, C)`` per-sample targets (e.g. :attr:`ELR.targets <lightning_reg.ELR.targets>`)
            or predicted probabilities.
        given_labels: ``(N,)`` labels training saw.
        seen: Optional ``(N,)`` bool mask of the rows that hold a target; others are left out.
        min_confidence: :math:`\\tau`, in ``[0, 1]``: flag only when the predicted label has at least this
            probability (the same rule as :func:`~lightning_reg.metrics.suspected_mislabeled`).

    Example:
        >>> t = torch.tensor([[0.45, 0.05], [0.1, 0.8], [0.0, 0.0]])
        >>> issues = label_issues_from_targets(t, torch.tensor([0, 0, 1]))
        >>> issues.index.tolist(), issues.is_label_issue.tolist(), issues.predicted_label.tolist()
        ([0, 1], [False, True], [0, 1])
        >>> [round(s, 3) for s in issues.label_score.tolist()]
        [0.9, 0.111]
    """
    min_confidence = check_float("min_confidence", min_confidence, 0.0, 1.0)
    if soft_targets.dim() != 2:
        raise ValueError(f"Expected `soft_targets` of shape (N, C), but got shape {tuple(soft_targets.shape)}.")
    n = soft_targets.shape[0]
    for name, t in (("given_labels", given_labels), ("seen", seen)):
        if t is not None and (t.dim() != 1 or t.shape[0] != n):
            raise ValueError(f"Expected `{name}` with {n} rows, one per sample, but got shape {tuple(t.shape)}.")
    t = soft_targets.detach().double()
    y = given_labels.long().to(t.device)
    total = t.sum(dim=-1)
    keep = torch.isfinite(total) & (total > 0)
    if seen is not None:
        keep &= seen.to(t.device).bool()
    idx = torch.nonzero(keep).flatten()
    probs = t[idx] / total[idx].unsqueeze(-1)
    y = y[idx]
    conf, predicted = probs.max(dim=-1)
    score = probs.gather(1, y.clamp(0, probs.shape[1] - 1).unsqueeze(1)).squeeze(1)
    flag = (predicted != y) & (conf >= min_confidence)
    return LabelIssues(
        index=idx.cpu(),
        is_label_issue=flag.cpu(),
        label_score=score.float().cpu(),
        given_label=y.cpu(),
        predicted_label=predicted.cpu(),
        pred_probs=probs.float().cpu(),
    )


def write_label_issues(csv_path: str | Path, issues: LabelIssues, pred_probs_path: str | Path | None = None) -> int:
    """Write ``label_issues.csv`` (and, with ``pred_probs_path``, the ``pred_probs`` ``.npy`` array).

    Args:
        csv_path: The CSV to write (parent folders are created): ``index,is_label_issue,label_score,
            given_label,predicted_label``, one row per sample, ``True``/``False`` flags as pandas reads them.
        issues: From :func:`label_issues_from_targets`.
        pred_probs_path: Where to write ``issues.pred_probs`` as a ``.npy`` file, row ``i`` for CSV row ``i``.

    Returns:
        The number of flagged rows.
    """
    path = Path(csv_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = zip(
        issues.index.tolist(),
        issues.is_label_issue.tolist(),
        issues.label_score.tolist(),
        issues.given_label.tolist(),
        issues.predicted_label.tolist(),
    )
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["index", "is_label_issue", "label_score", "given_label", "predicted_label"])
        for i, flag, score, given, predicted in rows:
            writer.writerow([i, bool(flag), f"{score:.6f}", given, predicted])
    if pred_probs_path is not None:
        save_npy(pred_probs_path, issues.pred_probs)
    return int(issues.is_label_issue.sum())


_NPY_DTYPES = {
    torch.float32: "f4",
    torch.float64: "f8",
    torch.float16: "f2",
    torch.int64: "i8",
    torch.int32: "i4",
    torch.uint8: "u1",
    torch.bool: "b1",
}


def save_npy(path: str | Path, tensor: Tensor) -> None:
    """Save a CPU copy of ``tensor`` in numpy's ``.npy`` format (version 1.0) without needing numpy.

    Example:
        >>> import tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "a.npy")
        >>> save_npy(p, torch.tensor([[1.0, 2.0]]))
        >>> open(p, "rb").read(6)
        b'\\x93NUMPY'
    """
    if tensor.dtype not in _NPY_DTYPES:
        raise TypeError(f"Expected a tensor of dtype in {sorted(map(str, _NPY_DTYPES))}, but got {tensor.dtype}.")
    t = tensor.detach().cpu().contiguous()
    order = "|" if t.element_size() == 1 else ("<" if sys.byteorder == "little" else ">")
    shape = tuple(t.shape)
    header = f"{{'descr': '{order}{_NPY_DTYPES[t.dtype]}', 'fortran_order': False, 'shape': {shape!r}, }}"
    header += " " * ((64 - (10 + len(header) + 1) % 64) % 64) + "\n"  # the data starts 64-byte aligned
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        f.write(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode("latin1"))
        f.write(_tensor_bytes(t))


def _tensor_bytes(t: Tensor) -> bytes:
    try:
        return t.numpy().tobytes()
    except (RuntimeError, ImportError, TypeError):  # pragma: no cover - torch built without numpy
        return bytes(t.reshape(-1).view(torch.uint8).tolist()) if t.numel() else b""
