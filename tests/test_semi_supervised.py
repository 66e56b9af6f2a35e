"""End to end: the semi-supervised recipe's pieces train together (datamodule, FixMatch, EMA, consistency, tables)."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor

from lightning_reg import ELR, PSKD, EMATeacher, NoisyLabelConsistency, PseudoLabel
from lightning_reg.augment import GaussianNoise, RandAugment, WeakAugment
from lightning_reg.cli import cli_main
from lightning_reg.data import SemiSupervisedDataModule, SyntheticSemiSupervisedDataModule
from lightning_reg.models import SmallCNN
from tests.helpers import ROOT, have_fashion_mnist, trainer_kwargs

RECIPE = ROOT / "configs" / "semi_supervised_fashion_mnist.yaml"
needs_data = pytest.mark.skipif(not have_fashion_mnist(), reason="Fashion-MNIST IDX files not installed")


class CountingCNN(SmallCNN):
    """The recipe's model, recording ``(rows, grad enabled)`` of every forward (the EMA teacher's included)."""

    calls: ClassVar[list[tuple[int, bool]]] = []

    def forward(self, x: Tensor) -> Tensor:
        CountingCNN.calls.append((int(x.shape[0]), torch.is_grad_enabled()))
        return super().forward(x)


def _synthetic(**kw: Any) -> SyntheticSemiSupervisedDataModule:
    args: dict[str, Any] = dict(num_train=120, num_test=32, labels_per_class=2, mu=2, batch_size=4)
    args.update(kw)
    return SyntheticSemiSupervisedDataModule(**args)


def _fit(callbacks: list[Any], dm: Any, model: L.LightningModule | None = None, **kw: Any) -> L.Trainer:
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(callbacks=callbacks, **trainer_kwargs(**kw))
    trainer.fit(model if model is not None else SmallCNN(channels=[4, 8]), datamodule=dm)
    return trainer


@needs_data
@pytest.mark.slow  # about 15 s on an idle core (the final tests and report), more on a busy machine
def test_recipe_fast_dev_run_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The acceptance command: ``lightning-reg fit --config configs/semi_supervised_fashion_mnist.yaml
    --trainer.fast_dev_run=2`` trains, tests the live and EMA weights and writes the report."""
    monkeypatch.chdir(tmp_path)
    cli = cli_main(["fit", "--config", str(RECIPE), "--trainer.fast_dev_run=2"])
    assert cli.trainer.state.finished and cli.trainer.global_step == 2
    assert isinstance(cli.datamodule, SemiSupervisedDataModule) and cli.datamodule.batch_size == 32
    fixmatch = next(cb for cb in cli.trainer.callbacks if isinstance(cb, PseudoLabel))
    assert isinstance(fixmatch.strong_augmentation, RandAugment)
    assert fixmatch.strong_augmentation.value_range == pytest.approx(cli.datamodule.value_range, abs=1e-4)
    report = next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "ResultsReport")
    # The training diagnostics are in the report's per-epoch history (results.json); the accuracy comes from
    # the datamodule's hidden labels.
    assert {"pseudo_label/mask_rate_epoch", "pseudo_label/accuracy_epoch"} <= set(report.history[-1])
    assert 0.0 <= report.results["test_acc"] <= 1.0 and 0.0 <= report.results["test_acc_ema"] <= 1.0
    assert (tmp_path / "results.json").is_file()


@needs_data
def test_recipe_datamodule_fixmatch_and_ema_train_three_steps(tmp_path: Path) -> None:
    """The recipe's datamodule (a tiny unlabeled subset), PseudoLabel and EMATeacher: 3 steps, logged to CSV."""
    dm = SemiSupervisedDataModule(labels_per_class=1, num_unlabeled=48, mu=2, batch_size=8, test_subset=64)
    fixmatch = PseudoLabel(
        threshold=0.0,  # keep every pseudo-label, so the accuracy is measured from the first step
        weak_augmentation=WeakAugment(),
        strong_augmentation=RandAugment(num_ops=2, cutout=0.5, value_range=dm.value_range),
    )
    ema = EMATeacher(decay=0.9, eval_with_ema=False)
    logger = CSVLogger(str(tmp_path), name="ssl")
    CountingCNN.calls = []
    trainer = _fit([fixmatch, ema], dm, CountingCNN(channels=[4, 8]), max_steps=3, logger=logger)
    assert trainer.global_step == 3 and ema.has_updated
    assert CountingCNN.calls == [(8 + 16 + 16, True)] * 3  # cat(x_l, weak(u), strong(u)), once per step
    metrics = trainer.callback_metrics
    for key in ("train/loss_pseudo_label", "pseudo_label/mask_rate", "pseudo_label/accuracy"):
        assert math.isfinite(float(metrics[key])), key
    assert float(metrics["pseudo_label/mask_rate"]) == 1.0
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        header = next(csv.reader(f))
    assert {"pseudo_label/mask_rate_step", "pseudo_label/accuracy_step", "train/loss_pseudo_label_step"} <= set(header)


@pytest.mark.parametrize("technique", ["ELR", "PSKD"])
@pytest.mark.parametrize("combined", [True, False], ids=["combined_loader", "one_loader"])
def test_unlabeled_samples_never_touch_label_dependent_tables(technique: str, combined: bool) -> None:
    """Per-sample tables keyed by the training index: rows ``>= n_l`` (the unlabeled samples) are never written."""
    dm = _synthetic(combined=combined)
    cb = ELR(beta=0.7, lam=3.0) if technique == "ELR" else PSKD(alpha_T=0.8, schedule_unit="step")
    trainer = _fit([cb, PseudoLabel(threshold=0.5)], dm, max_epochs=2)
    assert trainer.global_step > 0
    n_l = dm.num_labeled_samples
    seen, values = cb.table.seen, cb.table.dense()
    assert seen is not None and values.shape[0] == dm.num_train_samples
    assert bool(seen[:n_l].all()), "every labeled row was visited"
    assert not bool(seen[n_l:].any()), "an unlabeled row was written"
    assert torch.count_nonzero(values[n_l:]) == 0
    if technique == "ELR":
        assert bool((cb.given_labels[:n_l] == dm.true_labels[:n_l]).all())
        assert bool((cb.visits[n_l:] == 0).all())


def test_one_forward_per_step_with_fixmatch_and_the_ema_teacher() -> None:
    """One student forward per step carries x_l, weak(u) and strong(u); the EMA teacher adds one no-grad forward."""
    CountingCNN.calls = []
    _fit([PseudoLabel(threshold=0.5), EMATeacher(decay=0.9)], _synthetic(), CountingCNN(channels=[4, 8]), max_steps=3)
    assert CountingCNN.calls == [(4 + 8 + 8, True)] * 3
    CountingCNN.calls = []
    cb = PseudoLabel(threshold=0.5, teacher="ema")
    _fit([cb, EMATeacher(decay=0.9)], _synthetic(), CountingCNN(channels=[4, 8]), max_steps=3)
    student = [c for c in CountingCNN.calls if c[1]]
    no_grad = [c for c in CountingCNN.calls if not c[1]]
    assert student == [(4 + 8 + 8, True)] * 3  # x_l, u and strong(u) in one forward
    # Step 1: the EMA has not updated yet, so the model itself labels the weak view of the 8 unlabeled rows;
    # then the EMA's weak view of the whole batch, once per step.
    assert no_grad == [(8, False), (4 + 8, False), (4 + 8, False)]


def test_consistency_covers_the_unlabeled_rows_of_a_semi_supervised_batch() -> None:
    """NoisyLabelConsistency is label-free: its perturbed view holds every row, labeled and unlabeled."""
    CountingCNN.calls = []
    cons = NoisyLabelConsistency(augmentation=GaussianNoise(std=0.1), threshold=0.0, rampup="constant")
    trainer = _fit([cons], _synthetic(), CountingCNN(channels=[4, 8]), max_steps=2)
    rows_with_grad = [rows for rows, grad in CountingCNN.calls if grad]
    assert sum(rows_with_grad) == 2 * 2 * (4 + 8)  # per step: the batch and its view, all 12 rows each
    assert float(trainer.callback_metrics["consistency/mask_rate"]) == 1.0
