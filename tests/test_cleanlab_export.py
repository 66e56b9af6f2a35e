"""Label issues in cleanlab's format: ``label_issues.csv`` and ``pred_probs.npy`` that cleanlab accepts as they are."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import pytest
import torch

from lightning_reg.callbacks.elr import ELR
from lightning_reg.callbacks.report import ResultsReport
from lightning_reg.data.datamodules import SyntheticDataModule
from lightning_reg.metrics import label_issues_from_targets, save_npy, write_label_issues
from lightning_reg.models import MLPClassifier
from tests.helpers import trainer_kwargs

COLUMNS = ["index", "is_label_issue", "label_score", "given_label", "predicted_label"]


def _read(path: Path) -> list[dict[str, str]]:
    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_label_issues_from_targets() -> None:
    # ELR-like targets: rows sum to 1 - beta^k, one row never seen.
    t = torch.tensor([[0.45, 0.05], [0.1, 0.8], [0.2, 0.4], [0.0, 0.0]])
    issues = label_issues_from_targets(t, torch.tensor([0, 0, 1, 1]), seen=torch.tensor([True, True, True, False]))
    assert issues.index.tolist() == [0, 1, 2]  # the unseen row is left out
    torch.testing.assert_close(issues.pred_probs.sum(-1), torch.ones(3))
    assert issues.pred_probs.dtype == torch.float32
    assert issues.is_label_issue.tolist() == [False, True, False]
    assert issues.predicted_label.tolist() == [0, 1, 1]
    torch.testing.assert_close(issues.label_score, torch.tensor([0.9, 1 / 9, 2 / 3]))
    # `min_confidence` as for the suspects CSV: a flag needs that much probability on the predicted label.
    assert label_issues_from_targets(t, torch.tensor([0, 0, 1, 1]), min_confidence=0.95).is_label_issue.sum() == 0
    with pytest.raises(ValueError, match=r"Expected `soft_targets` of shape \(N, C\)"):
        label_issues_from_targets(torch.zeros(3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="Expected `given_labels` with 4 rows"):
        label_issues_from_targets(t, torch.zeros(3, dtype=torch.long))


def test_write_label_issues_and_npy(tmp_path: Path) -> None:
    np = pytest.importorskip("numpy")
    t = torch.tensor([[0.45, 0.05], [0.1, 0.8], [0.2, 0.4]])
    issues = label_issues_from_targets(t, torch.tensor([0, 0, 1]))
    n = write_label_issues(tmp_path / "label_issues.csv", issues, tmp_path / "pred_probs.npy")
    assert n == 1
    rows = _read(tmp_path / "label_issues.csv")
    assert list(rows[0]) == COLUMNS and len(rows) == 3
    assert [r["is_label_issue"] for r in rows] == ["False", "True", "False"]
    assert [int(r["predicted_label"]) for r in rows] == [0, 1, 1]
    probs = np.load(tmp_path / "pred_probs.npy")
    assert probs.shape == (3, 2) and probs.dtype == np.float32
    np.testing.assert_allclose(probs, issues.pred_probs.numpy())
    for value in (torch.arange(5), torch.ones(2, 3, dtype=torch.float64), torch.tensor([True, False])):
        save_npy(tmp_path / "x.npy", value)
        np.testing.assert_array_equal(np.load(tmp_path / "x.npy"), value.numpy())


def _fit_report(tmp_path: Path) -> tuple[ResultsReport, ELR, SyntheticDataModule]:
    dm = SyntheticDataModule(
        num_train=160, num_test=32, num_classes=4, shape=[1, 8, 8], noise_rate=0.3, batch_size=32, signal=1.0
    )
    model = MLPClassifier(in_features=64, hidden=[32], num_classes=4, lr=0.1)
    elr, report = ELR(), ResultsReport(output_dir=str(tmp_path), print_table=False, plot=False)
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(callbacks=[elr, report], **trainer_kwargs(max_epochs=3))
    trainer.fit(model, datamodule=dm)
    report.finalize(trainer, model, dm)
    return report, elr, dm


def test_results_report_writes_the_cleanlab_files(tmp_path: Path) -> None:
    np = pytest.importorskip("numpy")
    report, elr, _dm = _fit_report(tmp_path)
    rows = _read(tmp_path / "label_issues.csv")
    assert list(rows[0]) == COLUMNS and len(rows) == int(elr.seen.sum())
    flagged = sorted(int(r["index"]) for r in rows if r["is_label_issue"] == "True")
    assert flagged == sorted(elr.suspected_labels().index.tolist())  # the same detector as suspected_labels.csv
    assert report.results["label_issues"] == len(flagged)
    probs = np.load(tmp_path / "pred_probs.npy")
    assert probs.shape == (len(rows), 4)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    assert {"label_issues", "pred_probs"} <= set(report.results["files"])


def test_cleanlab_accepts_our_export(tmp_path: Path) -> None:
    """Feed the report's files to cleanlab as they are: its filter, ranking and dataset health summary run."""
    pytest.importorskip("cleanlab")
    np = pytest.importorskip("numpy")
    import cleanlab.dataset
    import cleanlab.filter
    import cleanlab.rank

    _fit_report(tmp_path)
    rows = _read(tmp_path / "label_issues.csv")
    labels = np.array([int(r["given_label"]) for r in rows])
    pred_probs = np.load(tmp_path / "pred_probs.npy")
    issues = cleanlab.filter.find_label_issues(labels, pred_probs)
    assert issues.shape == labels.shape and issues.dtype == bool
    # Our `label_score` is cleanlab's default label quality score (self-confidence), to float32 precision.
    scores = cleanlab.rank.get_label_quality_scores(labels, pred_probs, method="self_confidence")
    np.testing.assert_allclose(scores, [float(r["label_score"]) for r in rows], atol=1e-5)
    summary = cleanlab.dataset.health_summary(labels, pred_probs, verbose=False)
    assert 0.0 <= summary["overall_label_health_score"] <= 1.0
    assert 0.0 <= cleanlab.dataset.overall_label_health_score(labels, pred_probs, verbose=False) <= 1.0
