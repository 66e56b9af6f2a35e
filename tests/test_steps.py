"""The shared count of real optimizer steps (issue 16): skipped steps do not advance schedules; resume keeps it."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_reg.callbacks.clipping import GradientClipping
from lightning_reg.callbacks.consistency import NoisyLabelConsistency
from lightning_reg.callbacks.dropout import EarlyDropout
from lightning_reg.callbacks.elr import ELR
from lightning_reg.callbacks.pskd import PSKD
from lightning_reg.core.steps import attach, optimizer_steps
from tests.helpers import TinyNet, fit, make_loader


class InjectGrad(L.Callback):
    """Writes NaN into the first gradient entry after backward at the given global steps."""

    def __init__(self, steps: set[int]) -> None:
        self.steps = steps

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step in self.steps:
            next(pl_module.parameters()).grad[0, 0] = math.nan  # type: ignore[index]


class Probe(L.Callback):
    """Records, at each batch start, global_step, the real optimizer steps and the callbacks' schedule values."""

    def __init__(self, dropout: EarlyDropout | None = None, elr: ELR | None = None) -> None:
        self.dropout, self.elr = dropout, elr
        self.rows: list[tuple[int, int, float, float]] = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, i: int) -> None:
        rate = pl_module.net[3].p if self.dropout is not None else -1.0  # type: ignore[index]
        lam = self.elr.current_lam(trainer) if self.elr is not None else -1.0
        self.rows.append((trainer.global_step, optimizer_steps(trainer), rate, lam))


def test_grad_scaler_skip_is_not_counted() -> None:
    p = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([p], lr=0.1)
    trainer = SimpleNamespace(optimizers=[opt], global_step=0)
    attach(trainer)
    scaler = torch.amp.GradScaler("cpu")
    for value in (1.0, math.inf, 1.0):
        opt.zero_grad()
        scaler.scale((p * value).sum()).backward()
        scaler.step(opt)
        scaler.update()
    assert optimizer_steps(trainer) == 2


def test_without_a_consumer_it_is_the_global_step() -> None:
    assert optimizer_steps(SimpleNamespace(global_step=7)) == 7


def test_attach_is_idempotent_and_takes_a_restored_count_before_the_first_step() -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)
    trainer = SimpleNamespace(optimizers=[opt], global_step=10)
    first = attach(trainer)
    assert attach(trainer, restored=8) is first and optimizer_steps(trainer) == 8
    opt.step()
    attach(trainer, restored=3)  # too late: a step already ran
    assert optimizer_steps(trainer) == 9


def test_nonfinite_skip_does_not_advance_dropout_or_elr_ramp() -> None:
    dropout = EarlyDropout(p=0.5, schedule="linear", cutoff_steps=4)
    elr = ELR(num_samples=64, ramp_unit="step", ramp_length=5, lam_schedule="linear")
    probe = Probe(dropout, elr)
    cbs = [InjectGrad({1}), GradientClipping(nonfinite="skip"), dropout, elr, probe]
    trainer, _ = fit(cbs, TinyNet(dropout=0.5), loader=make_loader(n=64, batch_size=16), max_steps=4)
    assert [r[0] for r in probe.rows] == [0, 1, 2, 3]
    assert [r[1] for r in probe.rows] == [0, 1, 1, 2]  # the step at global_step 1 was skipped
    rates = [r[2] for r in probe.rows]
    assert rates[2] == rates[1] and rates == [dropout.rate_at(s) for s in (0, 1, 1, 2)]
    lams = [r[3] for r in probe.rows]
    assert lams[2] == lams[1] and lams[3] > lams[2]
    assert optimizer_steps(trainer) == 3 and trainer.global_step == 4


def test_resume_keeps_the_count_exactly(tmp_path: Path) -> None:
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_top_k=-1, filename="{step}")

    def callbacks() -> list[Any]:
        return [InjectGrad({1}), GradientClipping(nonfinite="skip"), EarlyDropout(p=0.5, cutoff_steps=4)]

    full, _ = fit([*callbacks(), ckpt], TinyNet(dropout=0.5), max_steps=5, enable_checkpointing=True)
    assert optimizer_steps(full) == 4
    probe = Probe()
    resumed, _ = fit([*callbacks(), probe], TinyNet(dropout=0.5), ckpt_path=str(tmp_path / "step=3.ckpt"), max_steps=5)
    assert [r[:2] for r in probe.rows] == [(3, 2), (4, 3)]  # continues from the checkpoint's 2 real steps
    assert optimizer_steps(resumed) == optimizer_steps(full) == 4


class ScheduleProbe(L.Callback):
    """Records, at each batch start, the consistency weight and PS-KD's α_t."""

    def __init__(self, cons: NoisyLabelConsistency, pskd: PSKD) -> None:
        self.cons, self.pskd = cons, pskd
        self.rows: list[tuple[int, float, float]] = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, i: int) -> None:
        self.rows.append(
            (optimizer_steps(trainer), self.cons.current_weight(trainer), self.pskd.current_alpha(trainer))
        )


def test_nonfinite_skip_does_not_advance_consistency_ramp_or_pskd_step_schedule() -> None:
    cons = NoisyLabelConsistency(rampup="linear", rampup_epochs=1.0)
    pskd = PSKD(schedule_unit="step", num_samples=64)
    probe = ScheduleProbe(cons, pskd)
    cbs = [InjectGrad({1}), GradientClipping(nonfinite="skip"), cons, pskd, probe]
    trainer, _ = fit(cbs, TinyNet(), loader=make_loader(n=64, batch_size=16), max_steps=4)
    weights, alphas = [r[1] for r in probe.rows], [r[2] for r in probe.rows]
    assert [r[0] for r in probe.rows] == [0, 1, 1, 2]  # the step at global_step 1 was skipped
    assert weights[2] == weights[1] and weights[3] > weights[2]
    assert weights == [cons.weight * cons.rampup(s / 4, 1.0) for s in (0, 1, 1, 2)]  # 4 steps per epoch
    assert alphas[2] == alphas[1] and alphas[3] > alphas[2]
    assert trainer.global_step == 4
