"""``ResultsReport``: per-epoch curves, the final live/EMA test, noise diagnostics, the table and the files."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from rich.console import Console

from lightning_reg.callbacks.elr import ELR
from lightning_reg.callbacks.ema import EMATeacher
from lightning_reg.callbacks.report import ResultsReport
from lightning_reg.data.datamodules import SyntheticDataModule
from lightning_reg.models import MLPClassifier
from tests.helpers import trainer_kwargs


def _dm(**kw: object) -> SyntheticDataModule:
    args = dict(num_train=96, num_test=64, num_classes=4, shape=[1, 8, 8], noise_rate=0.25, batch_size=16, signal=1.0)
    args.update(kw)
    return SyntheticDataModule(**args)  # type: ignore[arg-type]


def _model() -> MLPClassifier:
    return MLPClassifier(in_features=64, hidden=[32], num_classes=4, lr=0.1)


def _fit(callbacks: list, dm: SyntheticDataModule, model: MLPClassifier, **kw: object) -> L.Trainer:
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(callbacks=callbacks, **trainer_kwargs(max_epochs=2, **kw))
    trainer.fit(model, datamodule=dm)
    return trainer


@torch.no_grad()
def _accuracy(fn: object, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((fn(x).argmax(-1) == y).float().mean())  # type: ignore[operator]


def test_final_report_live_ema_noise_and_files(tmp_path: Path) -> None:
    dm, model = _dm(), _model()
    ema, elr = EMATeacher(decay=0.9), ELR()
    report = ResultsReport(output_dir=str(tmp_path), print_table=False)
    trainer = _fit([ema, elr, report], dm, model)
    results = report.finalize(trainer, model, dm)

    # Live and EMA test accuracy equal independent evaluations of the two sets of weights.
    model.eval()
    x, y = dm.test_dataset.tensors  # type: ignore[union-attr]
    assert results["test_acc"] == pytest.approx(_accuracy(model, x, y))
    assert results["test_acc_ema"] == pytest.approx(_accuracy(ema.teacher_forward, x, y))
    assert results["test_acc"] != results["test_acc_ema"] or results["test_ece"] != results["test_ece_ema"]
    assert "test_ece" in results and "test_ece_ema" in results

    # Memorization: the live model's train predictions equal the wrong given label, over the noisy samples.
    tx = dm.train_dataset.dataset.tensors[0]  # type: ignore[union-attr]
    pred = model(tx).argmax(-1)
    noisy = dm.noise_mask
    assert results["memorization"] == pytest.approx(float((pred[noisy] == dm.given_labels[noisy]).float().mean()))
    assert results["noise_rate"] == pytest.approx(0.25)
    # Detection comes from ELR's targets and matches its own diagnostics.
    assert results["detection_source"] == "ELR targets"
    assert results["detection_f1"] == pytest.approx(elr.diagnostics(noise_mask=dm.noise_mask)["f1"])

    # Files: JSON, PNG and the suspects CSV (ELR's suspects, with class names).
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["results"]["test_acc"] == pytest.approx(results["test_acc"])
    assert len(saved["history"]) == 2
    assert (tmp_path / "test_accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(tmp_path / "suspected_labels.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["index", "given_label", "suggested_label", "confidence", "given_name", "suggested_name"]
    assert len(rows) == results["suspected_labels"] == len(elr.suspected_labels().index)


def test_history_has_per_epoch_curves_and_survives_finalize(tmp_path: Path) -> None:
    dm, model = _dm(val_split=0.25), _model()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/acc", mode="max")
    report = ResultsReport(output_dir=str(tmp_path), ckpt="best", print_table=False, plot=False)
    trainer = _fit([EMATeacher(decay=0.9), ELR(), report, ckpt], dm, model, enable_checkpointing=True)
    assert [r["epoch"] for r in report.history] == [0, 1]
    for row in report.history:
        assert {"test_acc", "test_acc_ema", "memorization", "detection_f1", "val/acc"} <= set(row)
    before = [dict(r) for r in report.history]
    results = report.finalize(trainer, model, dm)
    assert results["weights"] == "best" and results["checkpoint"] == ckpt.best_model_path
    # trainer.test(ckpt_path=best) restores callback states; the history must not be rolled back.
    assert report.history == before


def test_state_dict_round_trip_and_bad_arguments() -> None:
    report = ResultsReport()
    report.history = [{"epoch": 0, "test_acc": 0.5}]
    other = ResultsReport()
    other.load_state_dict(report.state_dict())
    assert other.history == report.history
    with pytest.raises(ValueError, match="Expected a `ResultsReport` state of version 1"):
        other.load_state_dict({"version": 99})
    with pytest.raises(ValueError, match="Expected argument `ckpt` to be one of"):
        ResultsReport(ckpt="first")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="Expected argument `epoch_eval_samples`"):
        ResultsReport(epoch_eval_samples=0)
    with pytest.raises(ValueError, match="Expected argument `min_confidence`"):
        ResultsReport(min_confidence=1.5)


def test_results_table_renders() -> None:
    results = {
        "weights": "last",
        "test_acc": 0.8512,
        "test_acc_ema": 0.8601,
        "test_ece": 0.031,
        "test_ece_ema": 0.025,
        "noise_rate": 0.4,
        "memorization": 0.07,
        "detection_f1": 0.83,
        "detection_precision": 0.8,
        "detection_recall": 0.86,
        "detection_source": "ELR targets",
    }
    console = Console(record=True, width=80)
    console.print(ResultsReport.results_table(results))
    text = console.export_text()
    for needle in ("test accuracy", "85.12 %", "86.01 %", "memorization rate", "7.00 %", "detection F1", "83.00 %"):
        assert needle in text, text


def test_no_noise_and_no_ema(tmp_path: Path) -> None:
    dm, model = _dm(noise_rate=0.0), _model()
    report = ResultsReport(output_dir=str(tmp_path), print_table=False)
    trainer = _fit([report], dm, model)
    results = report.finalize(trainer, model, dm)
    assert "test_acc_ema" not in results and "memorization" not in results
    assert results["detection_source"] == "model predictions"
    assert all("test_acc" in r and "memorization" not in r for r in report.history)
