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


# -- issue 15: misuse and output defects found by the new-user trial -------------------------------------------
import warnings  # noqa: E402
from typing import Any  # noqa: E402

import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from lightning_reg.data import IndexedDataset  # noqa: E402
from tests.helpers import TinyNet, make_dataset, make_loader  # noqa: E402


class _Loaders(L.LightningDataModule):
    """A user datamodule with train/test loaders and nothing else (no `given_labels`, no noise mask)."""

    def __init__(self, train: Any, test: Any) -> None:
        super().__init__()
        self._train, self._test = train, test

    def train_dataloader(self) -> Any:
        return self._train

    def test_dataloader(self) -> Any:
        return self._test


class _OwnNames(TinyNet):
    """A user model whose `test_step` logs its own names, one of them already prefixed `test_`."""

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch[0], batch[1]
        logits = self(x)
        self.log("test_acc", (logits.argmax(-1) == y).float().mean(), batch_size=len(y))
        self.log("my_score", logits.float().softmax(-1).max(-1).values.mean(), batch_size=len(y))


def _table_text(results: dict[str, Any]) -> str:
    console = Console(record=True, width=100)
    console.print(ResultsReport.results_table(results))
    return console.export_text()


def test_user_metric_names_are_kept_and_shown_live_and_ema(tmp_path: Path) -> None:
    model = _OwnNames()
    dm = _Loaders(make_loader(), DataLoader(make_dataset(32, seed=1), batch_size=16))
    ema = EMATeacher(decay=0.9)
    report = ResultsReport(output_dir=str(tmp_path), print_table=False, plot=False)
    trainer = _fit([ema, report], dm, model)  # type: ignore[arg-type]
    results = report.finalize(trainer, model, dm)
    assert not any(k.startswith("test_test_") for k in results), sorted(results)
    x, y = make_dataset(32, seed=1).tensors
    model.eval()
    assert results["test_acc"] == pytest.approx(_accuracy(model, x, y))
    assert results["test_acc_ema"] == pytest.approx(_accuracy(ema.teacher_forward, x, y))
    assert {"my_score", "my_score_ema"} <= set(results)
    text = _table_text(results)
    row = next(line for line in text.splitlines() if "my_score" in line)
    assert f"{results['my_score']:.4f}" in row and f"{results['my_score_ema']:.4f}" in row, text
    row = next(line for line in text.splitlines() if "test accuracy" in line)
    assert "—" not in row and f"{100 * results['test_acc_ema']:.2f} %" in row, text
    assert "ECE" not in text  # nothing logged it: no empty row


class _TinySegNoTest(L.LightningModule):
    """A dense model: logits (B, C, H, W), labels (B, H, W) with `ignore_index=-100`, and no `test_step`."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.net = nn.Conv2d(1, num_classes, 3, padding=1)
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return F.cross_entropy(self(batch[0]), batch[1], ignore_index=-100)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _TinySeg(_TinySegNoTest):
    def __init__(self, num_classes: int = 3) -> None:
        super().__init__(num_classes)
        from torchmetrics.classification import MulticlassJaccardIndex

        self.miou = MulticlassJaccardIndex(num_classes, ignore_index=-100)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.miou(self(batch[0]), batch[1])
        self.log("test/mIoU", self.miou, batch_size=len(batch[0]))


def _seg_data(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = (x[:, 0] > 0.5).long() + (x[:, 0] > -0.5).long()
    y[:, 0, :] = -100  # unlabeled pixels
    return TensorDataset(x, y)


class _SegData(_Loaders):
    """Dense data that also records per-pixel "noise" as a NoisyDataModule does: the report must not crash."""

    def __init__(self) -> None:
        train = _seg_data(32, 0)
        super().__init__(None, DataLoader(_seg_data(16, 1), batch_size=8))
        self.train_dataset = IndexedDataset(train)
        self.given_labels = self.true_labels = train.tensors[1]
        self.noise_mask = torch.zeros(32, dtype=torch.bool)
        self.noise_mask[:4] = True

    def train_dataloader(self) -> Any:
        return DataLoader(self.train_dataset, batch_size=8)


@pytest.mark.parametrize("with_test_step", [True, False])
def test_dense_outputs_show_logged_metrics_and_skip_classification_ones(tmp_path: Path, with_test_step: bool) -> None:
    model = _TinySeg() if with_test_step else _TinySegNoTest()
    dm, ema = _SegData(), EMATeacher(decay=0.9)
    report = ResultsReport(output_dir=str(tmp_path), print_table=False)
    trainer = _fit([ema, report], dm, model)  # type: ignore[arg-type]
    results = report.finalize(trainer, model, dm)
    assert "test_acc" not in results and "memorization" not in results
    assert all("test_acc" not in row for row in report.history)
    if with_test_step:
        assert 0.0 <= results["test_mIoU"] <= 1.0 and 0.0 <= results["test_mIoU_ema"] <= 1.0
        text = _table_text(results)
        row = next(line for line in text.splitlines() if "test/mIoU" in line)
        assert f"{results['test_mIoU']:.4f}" in row and f"{results['test_mIoU_ema']:.4f}" in row, text
        assert "test accuracy" not in text
    assert (tmp_path / "results.json").exists()


def test_epoch_curve_says_which_test_images_it_uses(tmp_path: Path) -> None:
    dm, model = _dm(num_test=64), _model()
    report = ResultsReport(output_dir=str(tmp_path), print_table=False, epoch_eval_samples=32)
    trainer = _fit([report], dm, model)
    results = report.finalize(trainer, model, dm)
    fig = report.figure(results)
    assert fig is not None
    assert "first 32 of 64 test images" in fig.axes[0].get_title()
    assert results["epoch_eval_test_samples"] == 32 and results["test_samples"] == 64
    # The final accuracy on the whole test set is marked on the curve.
    labels = [line.get_label() for line in fig.axes[0].get_lines()]
    assert any("all 64" in label for label in labels), labels
    everything = ResultsReport(output_dir=str(tmp_path), print_table=False, epoch_eval_samples=None)
    trainer = _fit([everything], dm, _model())
    results = everything.finalize(trainer, trainer.lightning_module, dm)
    title = everything.figure(results).axes[0].get_title()  # type: ignore[union-attr]
    assert "all 64 test images" in title and "first" not in title


def test_csv_from_elr_when_the_datamodule_has_no_given_labels(tmp_path: Path) -> None:
    dm = _Loaders(make_loader(), DataLoader(make_dataset(32, seed=1), batch_size=16))
    elr = ELR()
    report = ResultsReport(output_dir=str(tmp_path), print_table=False, plot=False)
    model = TinyNet()
    trainer = _fit([elr, report], dm, model)  # type: ignore[arg-type]
    results = report.finalize(trainer, model, dm)
    assert results["detection_source"] == "ELR targets"
    with open(tmp_path / "suspected_labels.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == results["suspected_labels"] == len(elr.suspected_labels().index)


def test_no_csv_source_warns_with_the_fix(tmp_path: Path) -> None:
    dm = _Loaders(make_loader(), DataLoader(make_dataset(32, seed=1), batch_size=16))
    report = ResultsReport(output_dir=str(tmp_path), print_table=False, plot=False)
    model = TinyNet()
    trainer = _fit([report], dm, model)  # type: ignore[arg-type]
    fix = r"wrote no `suspected_labels.csv`.*`ELR\(\)`.*`given_labels`.*write_csv=False"
    with pytest.warns(UserWarning, match=fix):
        report.finalize(trainer, model, dm)
    assert not (tmp_path / "suspected_labels.csv").exists()
    quiet = ResultsReport(output_dir=str(tmp_path), print_table=False, plot=False, write_csv=False)
    trainer = _fit([quiet], dm, model)  # type: ignore[arg-type]
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*suspected_labels.*")
        quiet.finalize(trainer, model, dm)
