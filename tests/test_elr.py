"""ELR: the functional core against hand-computed values, the callback against the reference loop, ELR+ options,
resume, compact storage and the diagnostics."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import CombinedLoader
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from lightning_reg.callbacks.elr import ELR
from lightning_reg.callbacks.mixup import Mixup
from lightning_reg.core.protocol import StepContext
from lightning_reg.data import EpochSeededSampler, IndexedDataset, ResumableDataLoader
from lightning_reg.functional.elr import (
    elr_clamped_probs,
    elr_mixed_targets,
    elr_regularizer,
    elr_update_targets_,
    elr_updated_targets,
)
from tests.helpers import (
    StepSeed,
    TinyNet,
    assert_state_equal,
    fit,
    make_dataset,
    make_loader,
    make_model,
    trainer_kwargs,
)

# -- functional core: hand-computed example -----------------------------------------------------------------


def test_target_update_hand_computed() -> None:
    # t_old = [0, 1], p = softmax([ln 3, 0]) = [0.75, 0.25], beta = 0.5  ->  t = 0.5 [0, 1] + 0.5 [0.75, 0.25]
    t_old = torch.tensor([[0.0, 1.0]])
    p = elr_clamped_probs(torch.tensor([[math.log(3.0), 0.0]]))
    new = elr_updated_targets(t_old, p, beta=0.5)
    torch.testing.assert_close(new, torch.tensor([[0.375, 0.625]]))
    # From the zero start, one visit gives (1 - beta) * p (the row sums to 1 - beta).
    torch.testing.assert_close(elr_updated_targets(torch.zeros(1, 2), p, 0.7), torch.tensor([[0.225, 0.075]]))
    # The update normalises p-hat: an unnormalised row counts as its distribution.
    torch.testing.assert_close(elr_updated_targets(torch.zeros(1, 2), 2 * p, 0.5), torch.tensor([[0.375, 0.125]]))


def test_regularizer_value_and_gradient_hand_computed() -> None:
    # Two samples. Sample 0: p = [0.75, 0.25], t = [0.375, 0.625]: <t,p> = 0.4375, term_0 = log(0.5625).
    # Sample 1: p = [0.5, 0.5], t = [0.15, 0.15]: <t,p> = 0.15, term_1 = log(0.85), zero gradient (t_j = <t,p>).
    z = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]], requires_grad=True)
    t = torch.tensor([[0.375, 0.625], [0.15, 0.15]])
    term = elr_regularizer(z, t, lam=3.0)
    expected = 3.0 * (math.log(0.5625) + math.log(0.85)) / 2
    assert term.item() == pytest.approx(expected, abs=1e-6)
    term.backward()
    # d/dz_j [lam/B * log(1 - <t,p>)] = lam/B * p_j (<t,p> - t_j) / (1 - <t,p>)
    g0 = 1.5 * torch.tensor([0.75 * (0.4375 - 0.375), 0.25 * (0.4375 - 0.625)]) / 0.5625
    assert z.grad is not None
    torch.testing.assert_close(z.grad, torch.stack([g0, torch.zeros(2)]), atol=1e-6, rtol=1e-5)
    assert g0[0].item() == pytest.approx(0.125, abs=1e-6) and g0[1].item() == pytest.approx(-0.125, abs=1e-6)


def test_gradient_flows_through_p_only() -> None:
    z = torch.randn(4, 5, generator=torch.Generator().manual_seed(0)).requires_grad_()
    # Targets computed from the same logits (as the callback does) carry no gradient...
    t = elr_updated_targets(torch.rand(4, 5) * 0.5, elr_clamped_probs(z), 0.7)
    assert not t.requires_grad
    elr_regularizer(z, t).backward()
    # ... so the gradient equals the closed form with t held constant.
    p = torch.softmax(z.detach(), -1)
    inner = (t * p).sum(-1, keepdim=True)
    expected = p * (inner - t) / (1 - inner) / 4
    assert z.grad is not None
    torch.testing.assert_close(z.grad, expected, atol=1e-6, rtol=1e-5)


def test_clamp_blocks_gradient_of_saturated_entries() -> None:
    z = torch.tensor([[30.0, 0.0, 0.0]], requires_grad=True)  # softmax ~ [1, 1e-13, 1e-13]: every entry is clamped
    p = elr_clamped_probs(z)
    torch.testing.assert_close(p, torch.tensor([[1 - 1e-4, 1e-4, 1e-4]]))
    term = elr_regularizer(z, torch.tensor([[1.0, 0.0, 0.0]]))
    assert torch.isfinite(term) and term.item() == pytest.approx(math.log(1e-4), rel=1e-3)
    term.backward()
    assert z.grad is not None and torch.count_nonzero(z.grad) == 0


def test_in_place_update_matches_reference_indexing() -> None:
    store = torch.rand(6, 3)
    ref = store.clone()
    idx = torch.tensor([4, 1])
    probs = torch.softmax(torch.randn(2, 3), -1)
    rows = elr_update_targets_(store, idx, probs, 0.9)
    ref[idx] = 0.9 * ref[idx] + 0.1 * probs / probs.sum(1, keepdim=True)
    torch.testing.assert_close(store, ref)
    torch.testing.assert_close(rows, ref[idx])


def test_mixed_targets() -> None:
    t = torch.tensor([[0.6, 0.4], [0.1, 0.9], [0.5, 0.5]])
    perm = torch.tensor([2, 0, 1])
    torch.testing.assert_close(elr_mixed_targets(t, perm, 0.8), 0.8 * t + 0.2 * t[perm])


# -- the callback against the reference training loop --------------------------------------------------------


def _reference_run(beta: float, lam: float, epochs: int) -> tuple[TinyNet, Tensor]:
    """shengliu66/ELR's ``elr_loss`` in a plain loop over the same batches, from the same initial weights."""
    L.seed_everything(0, verbose=False)
    net = TinyNet()
    opt = net.configure_optimizers()
    target = torch.zeros(64, 4)
    loader = make_loader()
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)  # type: ignore[union-attr]
        for x, y, index in loader:
            out = net(x)
            y_pred = torch.clamp(F.softmax(out, dim=1), 1e-4, 1.0 - 1e-4)
            y_pred_ = y_pred.data.detach()
            target[index] = beta * target[index] + (1 - beta) * (y_pred_ / y_pred_.sum(dim=1, keepdim=True))
            elr_reg = (1 - (target[index] * y_pred).sum(dim=1)).log().mean()
            loss = F.cross_entropy(out, y) + lam * elr_reg
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net, target


def test_callback_matches_reference_loop() -> None:
    ref_net, ref_target = _reference_run(beta=0.7, lam=3.0, epochs=2)
    L.seed_everything(0, verbose=False)
    elr = ELR(beta=0.7, lam=3.0)
    trainer, model = fit([elr], TinyNet(), max_epochs=2)
    assert trainer.global_step == 8
    torch.testing.assert_close(elr.targets, ref_target, atol=1e-6, rtol=1e-5)
    for a, b in zip(model.parameters(), ref_net.parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    # Every sample was visited twice: the rows sum to 1 - beta^2 exactly.
    torch.testing.assert_close(elr.targets.sum(1), torch.full((64,), 1 - 0.7**2), atol=1e-6, rtol=0)
    m = trainer.callback_metrics
    assert float(m["train/loss_elr"]) < 0  # the term is negative ...
    assert float(m["train/loss"]) == pytest.approx(float(m["train/loss_base"]) + float(m["train/loss_elr"]), abs=1e-5)
    assert float(m["elr/lam"]) == 3.0
    assert 0.0 <= float(m["elr/disagreement"]) <= 1.0
    assert torch.equal(elr.visits, torch.full((64,), 2))
    # The stored labels are the given ones.
    assert torch.equal(elr.given_labels, make_dataset(64).tensors[1])


def test_num_samples_is_inferred_or_checked() -> None:
    elr = ELR()
    fit([elr], max_epochs=1)
    assert elr.table.num_samples == 64 and elr.table.num_columns == 4
    with pytest.raises(IndexError, match=r"Expected sample indices in \[0, 50\)"):
        fit([ELR(num_samples=50)], max_epochs=1)


# -- resume ----------------------------------------------------------------------------------------------------


class _Snapshot(L.Callback):
    def __init__(self, elr: ELR, step: int) -> None:
        self.elr, self.step = elr, step
        self.state: dict[str, Any] = {}

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            assert self.elr.table.values is not None
            self.state = {"values": self.elr.table.values.clone(), "seen": self.elr.table.seen.clone()}  # type: ignore[union-attr]


def test_mid_epoch_resume_restores_the_table(tmp_path: Path) -> None:
    elr_full = ELR(beta=0.7, lam=3.0)
    snap = _Snapshot(elr_full, 6)
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=6, save_top_k=-1, filename="{step}")
    fit([elr_full, snap, ckpt_cb], max_epochs=3, enable_checkpointing=True)
    ckpt = torch.load(tmp_path / "step=6.ckpt", weights_only=False)
    saved = next(v for k, v in ckpt["callbacks"].items() if k.startswith("ELR"))
    assert saved["version"] == 1
    # The checkpoint holds the table as it was after step 6 (mid-epoch 1) ...
    assert torch.equal(saved["targets"]["values"], snap.state["values"])
    assert torch.equal(saved["targets"]["seen"], snap.state["seen"])
    assert int(saved["targets"]["seen"].sum()) == 64  # epoch 0 visited every sample
    # ... a fresh callback loads it exactly ...
    fresh = ELR(beta=0.7, lam=3.0)
    fresh.load_state_dict(saved)
    assert fresh.table.values is not None and torch.equal(fresh.table.values, saved["targets"]["values"])
    # ... and the resumed run ends with the uninterrupted run's table.
    elr_resumed = ELR(beta=0.7, lam=3.0)
    fit([elr_resumed], ckpt_path=str(tmp_path / "step=6.ckpt"), max_epochs=3)
    assert_state_equal(elr_full.state_dict(), elr_resumed.state_dict())


def test_storage_mode_mismatch_on_load_is_clear() -> None:
    elr = ELR()
    fit([elr], max_epochs=1)
    with pytest.raises(ValueError, match="topk"):
        ELR(topk=2).load_state_dict(elr.state_dict())
    with pytest.raises(ValueError, match="version"):
        ELR().load_state_dict({"version": 99})


# -- compact storage --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [{"table_dtype": "bfloat16"}, {"table_dtype": "float16"}, {"topk": 2}])
def test_compact_storage_trains_and_stays_close(kwargs: dict[str, Any]) -> None:
    dense = ELR()
    fit([dense], max_epochs=2)
    compact = ELR(**kwargs)
    trainer, _ = fit([compact], max_epochs=2)
    assert all(math.isfinite(float(v)) for v in trainer.callback_metrics.values())
    assert compact.table.values is not None
    if "table_dtype" in kwargs:
        assert (
            compact.table.values.dtype == {"bfloat16": torch.bfloat16, "float16": torch.float16}[kwargs["table_dtype"]]
        )
        torch.testing.assert_close(compact.targets, dense.targets, atol=0.02, rtol=0.05)
    else:
        assert compact.table.values.shape == (64, 2)
        assert (compact.targets.argmax(1) == dense.targets.argmax(1)).float().mean() > 0.9
    # The rebuilt targets sum to exactly 1 - beta^n (two visits each), whatever the storage rounding.
    assert torch.equal(compact.visits, torch.full((64,), 2))
    torch.testing.assert_close(compact.targets.sum(1), torch.full((64,), 1 - 0.7**2), atol=1e-6, rtol=0)


# -- ELR+ options -------------------------------------------------------------------------------------------------


def _ctx(logits: Tensor, labels: Tensor, index: Tensor, step: int = 0, epoch: int = 0, **extras: Any) -> StepContext:
    trainer = SimpleNamespace(strategy=None, global_step=step, current_epoch=epoch, max_epochs=10)
    module = SimpleNamespace(trainer=trainer)
    ctx = StepContext(module=module, x=None, labels=labels, given_labels=labels, index=index, logits=logits)  # type: ignore[arg-type]
    ctx.extras.update(extras)
    return ctx


def test_lam_sigmoid_rampup_schedule() -> None:
    elr = ELR(lam=3.0, lam_schedule="sigmoid_rampup", ramp_length=4, ramp_unit="step")
    elr._ramp_total = 4.0
    for step in range(6):
        trainer: Any = SimpleNamespace(global_step=step, current_epoch=0, max_epochs=1)
        expected = 3.0 * math.exp(-5.0 * (1.0 - min(step / 4, 1.0)) ** 2)
        assert elr.current_lam(trainer) == pytest.approx(expected)
    # In a fit, the logged weight follows the epoch ramp: epoch 1 of a 2-epoch ramp gives exp(-5/4).
    elr = ELR(lam=2.0, lam_schedule="sigmoid_rampup", ramp_length=2)
    trainer_, _ = fit([elr], max_epochs=2)
    assert float(trainer_.callback_metrics["elr/lam_step"]) == pytest.approx(2.0 * math.exp(-1.25), rel=1e-6)


def test_mixup_consistent_targets_in_the_term() -> None:
    elr = ELR(beta=0.5, lam=1.0, num_samples=8)
    logits = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    labels, index = torch.tensor([0, 1, 2]), torch.tensor([5, 2, 7])
    perm, mix_lam = torch.tensor([1, 2, 0]), 0.7

    class _Teacher:
        has_updated = True

        def teacher_forward(self, x: Tensor) -> Tensor:
            return x  # the "clean input" below is the teacher's logits

    clean_logits = torch.randn(3, 4, generator=torch.Generator().manual_seed(2))
    elr._teacher = _Teacher()  # type: ignore[assignment]
    ctx = _ctx(logits, labels, index, mixup=(perm, mix_lam), clean_x=clean_logits)
    term = elr.loss_term(ctx)
    # The table row was updated from the teacher's clean predictions ...
    t_new = elr_updated_targets(torch.zeros(3, 4), elr_clamped_probs(clean_logits), 0.5)
    torch.testing.assert_close(elr.targets[index], t_new)
    # ... and the term used lam * t + (1 - lam) * t[perm] against the student's (mixed-input) logits.
    expected = elr_regularizer(logits, mix_lam * t_new + (1 - mix_lam) * t_new[perm])
    torch.testing.assert_close(term, expected)
    assert not torch.allclose(term, elr_regularizer(logits, t_new))


class StubTeacher(L.Callback):
    """A teacher that always predicts class 3, optionally 'not updated yet'."""

    def __init__(self, has_updated: bool = True) -> None:
        self.has_updated = has_updated
        self.calls = 0

    def teacher_forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        out = torch.zeros(x.shape[0], 4)
        out[:, 3] = 10.0
        return out


def test_teacher_targets() -> None:
    teacher = StubTeacher()
    elr = ELR(teacher="ema")
    fit([elr, teacher], max_epochs=1)
    assert teacher.calls == 4
    assert torch.equal(elr.targets.argmax(1), torch.full((64,), 3))  # every target came from the teacher
    # Before the teacher's first update, the student's own predictions are used (same table as teacher="none").
    idle = StubTeacher(has_updated=False)
    elr_idle, elr_plain = ELR(teacher="ema"), ELR()
    fit([elr_idle, idle], max_epochs=1)
    fit([elr_plain], max_epochs=1)
    assert idle.calls == 0
    torch.testing.assert_close(elr_idle.targets, elr_plain.targets)


def test_teacher_missing_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="no callback with `teacher_forward`"):
        fit([ELR(teacher="ema")], max_epochs=1)


def test_mixup_without_teacher_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="un-mixed inputs"):
        fit([Mixup(), ELR()], max_epochs=1)


def test_elr_plus_configuration_trains() -> None:
    from lightning_reg.callbacks.ema import EMATeacher

    elr = ELR(beta=0.7, lam=3.0, teacher="ema", lam_schedule="sigmoid_rampup", ramp_length=4, ramp_unit="step")
    trainer, _ = fit([Mixup(alpha=1.0, max_lam=True), EMATeacher(decay=0.997), elr], max_epochs=2)
    metrics = trainer.callback_metrics
    assert all(math.isfinite(float(v)) for v in metrics.values())
    assert float(metrics["mixup/lam_step"]) >= 0.5
    assert bool(elr.seen.all())
    torch.testing.assert_close(elr.targets.sum(1), torch.full((64,), 1 - 0.7**2), atol=1e-5, rtol=0)


# -- diagnostics ----------------------------------------------------------------------------------------------


def test_suspected_labels_csv_and_diagnostics(tmp_path: Path) -> None:
    elr = ELR(beta=0.7, lam=3.0)
    fit([elr], max_epochs=3)
    suspects = elr.suspected_labels()
    disagree = elr.targets.argmax(1) != elr.given_labels
    assert sorted(suspects.index.tolist()) == torch.nonzero(disagree).flatten().tolist()
    assert torch.all(suspects.confidence[:-1] >= suspects.confidence[1:])
    n = elr.write_suspected_csv(tmp_path / "out" / "suspects.csv")
    rows = list(csv.DictReader((tmp_path / "out" / "suspects.csv").open()))
    assert n == len(rows) == int(disagree.sum())
    assert list(rows[0]) == ["index", "given_label", "suggested_label", "confidence"]
    first = rows[0]
    i = int(first["index"])
    assert int(first["given_label"]) == int(elr.given_labels[i])
    assert int(first["suggested_label"]) == int(elr.targets[i].argmax())
    assert float(first["confidence"]) == pytest.approx(float(elr.targets[i].max() / elr.targets[i].sum()), abs=1e-6)
    # The dataset flips ~10% of labels (`make_dataset`): score the targets against that mask.
    g = torch.Generator().manual_seed(0)
    _ = torch.randn(64, 1, 8, 8, generator=g), torch.randn(64, 4, generator=g)
    mask = torch.rand(64, generator=g) < 0.1
    scores = elr.diagnostics(noise_mask=mask, predictions=elr.targets)
    assert set(scores) == {"disagreement", "noise_rate", "precision", "recall", "f1", "memorization"}
    assert scores["disagreement"] == pytest.approx(float(disagree.float().mean()))
    assert scores["noise_rate"] == pytest.approx(float(mask.float().mean()))
    # With the targets as "predictions", memorized noisy samples are exactly the undetected ones.
    assert scores["memorization"] == pytest.approx(1.0 - scores["recall"])


def test_diagnostics_before_training_is_a_clear_error() -> None:
    with pytest.raises(RuntimeError, match="no targets yet"):
        ELR().suspected_labels()


# -- training only (issue 15, defect 2) --------------------------------------------------------------------------


class _ValPipeline(TinyNet):
    """Runs the regularization pipeline in ``validation_step`` too, and records its loss next to the plain CE."""

    def __init__(self) -> None:
        super().__init__()
        self.val_records: list[tuple[float, float]] = []

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y, index = batch
        logits = self(x)
        loss = self.regularized_loss(logits, y, index, x=x, log=False)
        self.val_records.append((float(loss), float(F.cross_entropy(logits, y))))


def _fit_with_validation(callbacks: list[Any], n: int = 16, sanity: int = 2) -> _ValPipeline:
    L.seed_everything(0, verbose=False)
    model = _ValPipeline()
    trainer = L.Trainer(callbacks=[*callbacks, StepSeed()], **trainer_kwargs(max_epochs=1, num_sanity_val_steps=sanity))
    trainer.fit(
        model,
        train_dataloaders=make_loader(n, batch_size=8),
        val_dataloaders=make_loader(n, batch_size=8, shuffle=False),
    )
    return model


def test_validation_and_sanity_steps_leave_the_table_alone() -> None:
    """A 16-sample epoch with a 2-batch sanity check and validation through the pipeline: 16 visits, not 48."""
    elr = ELR(beta=0.7, lam=3.0, num_samples=16)
    model = _fit_with_validation([elr])
    assert len(model.val_records) == 4  # 2 sanity-check batches + 2 validation batches ran the pipeline
    assert int(elr.visits.sum()) == 16 and torch.equal(elr.visits, torch.ones(16, dtype=torch.long))
    # ... and the table equals a run without any validation.
    ref = ELR(beta=0.7, lam=3.0, num_samples=16)
    L.seed_everything(0, verbose=False)
    fit([ref], TinyNet(), make_loader(16, batch_size=8), max_epochs=1)
    assert_state_equal(elr.state_dict(), ref.state_dict())
    # Outside training ELR adds no term (validation indices are not training indices): the loss is the plain CE.
    for loss, ce in model.val_records:
        assert loss == pytest.approx(ce, abs=1e-6)


def test_sanity_check_without_num_samples_does_not_crash() -> None:
    elr = ELR()
    _fit_with_validation([elr])
    assert elr.table.num_samples == 16 and torch.equal(elr.visits, torch.ones(16, dtype=torch.long))


def test_outside_training_adds_no_term_and_reads_no_table() -> None:
    elr = ELR(num_samples=8)
    ctx = _ctx(torch.randn(2, 4), torch.tensor([0, 1]), torch.tensor([0, 1]))
    ctx.training = False
    assert elr.loss_term(ctx) is None
    assert not elr.table.is_allocated and ctx.logs == {}


# -- the shared teacher ---------------------------------------------------------------------------------------------


def test_teacher_runs_once_per_step_for_every_consumer() -> None:
    from lightning_reg.callbacks.pskd import PSKD

    teacher = StubTeacher()
    fit([PSKD(teacher="ema"), ELR(teacher="ema"), teacher], max_epochs=1)
    assert teacher.calls == 4  # one teacher forward per step, shared by PS-KD and ELR


# -- semi-supervised: unlabeled samples never touch label-dependent state -------------------------------------------


def _masked_loader() -> ResumableDataLoader:
    """``make_loader()`` with every fourth sample unlabeled (``ignore_index``)."""
    base = make_dataset(64)
    y = base.tensors[1].clone()
    y[::4] = -100
    ds = IndexedDataset(base, labels=y)
    return ResumableDataLoader(ds, batch_size=16, sampler=EpochSeededSampler(ds, seed=0, shuffle=True))


def test_unlabeled_samples_in_one_loader_match_the_reference_on_labeled_rows() -> None:
    beta, lam = 0.7, 3.0
    L.seed_everything(0, verbose=False)
    net = TinyNet()
    opt = net.configure_optimizers()
    target = torch.zeros(64, 4)
    loader = _masked_loader()
    for epoch in range(2):
        loader.sampler.set_epoch(epoch)  # type: ignore[union-attr]
        for x, y, index in loader:
            out = net(x)
            keep = y != -100
            y_pred = torch.clamp(F.softmax(out, dim=1), 1e-4, 1.0 - 1e-4)[keep]
            y_pred_ = y_pred.detach()
            idx = index[keep]
            target[idx] = beta * target[idx] + (1 - beta) * (y_pred_ / y_pred_.sum(dim=1, keepdim=True))
            elr_reg = (1 - (target[idx] * y_pred).sum(dim=1)).log().mean()
            loss = F.cross_entropy(out, y, ignore_index=-100) + lam * elr_reg
            opt.zero_grad()
            loss.backward()
            opt.step()
    L.seed_everything(0, verbose=False)
    elr = ELR(beta=beta, lam=lam)
    _, model = fit([elr], TinyNet(), _masked_loader(), max_epochs=2)
    labeled = torch.arange(64) % 4 != 0
    assert torch.equal(elr.seen, labeled)
    assert torch.equal(elr.visits, torch.where(labeled, 2, 0))
    assert torch.equal(elr.given_labels, torch.where(labeled, make_dataset(64).tensors[1], -1))
    torch.testing.assert_close(elr.targets, target, atol=1e-6, rtol=1e-5)
    for a, b in zip(model.parameters(), net.parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


class _TermProbe(L.Callback):
    """A loss-stage probe placed after ELR: records ELR's term and the step's logits."""

    def __init__(self) -> None:
        from lightning_reg.core.protocol import LossRegularizer

        class _Probe(LossRegularizer):
            name = "probe"

            def __init__(self, steps: list[dict[str, Any]]) -> None:
                super().__init__()
                self.steps = steps

            def loss_term(self, ctx: StepContext) -> None:
                self.steps.append(
                    {"term": ctx.terms["elr"].detach(), "logits": ctx.logits.detach().clone(), "n": ctx.num_labeled}  # type: ignore[union-attr]
                )

        self.steps: list[dict[str, Any]] = []
        self.probe = _Probe(self.steps)


def _ssl_loaders(n_l: int = 16, n_u: int = 48) -> CombinedLoader:
    ds = make_dataset(n_l + n_u)
    x, y = ds.tensors
    lab = DataLoader(TensorDataset(x[:n_l], y[:n_l], torch.arange(n_l)), batch_size=4)
    unl = DataLoader(TensorDataset(x[n_l:], torch.arange(n_l, n_l + n_u)), batch_size=12)
    return CombinedLoader({"labeled": lab, "unlabeled": unl}, mode="max_size_cycle")


def test_combined_loader_uses_the_labeled_part_only() -> None:
    # A table of the 16 labeled samples only: reading or writing an unlabeled index (16..63) would raise.
    elr, probe = ELR(beta=0.7, lam=3.0, num_samples=16), _TermProbe()
    fit([elr, probe.probe], TinyNet(), _ssl_loaders(), max_epochs=1)
    assert bool(elr.seen.all())
    assert torch.equal(elr.visits, torch.ones(16, dtype=torch.long))
    assert len(probe.steps) == 4
    for s in probe.steps:
        assert s["n"] == 4 and s["logits"].shape[0] == 16
        # First visit: t = (1 - beta) p_hat; the term is the mean over the 4 labeled rows only.
        p = elr_clamped_probs(s["logits"][:4])
        t = 0.3 * p / p.sum(1, keepdim=True)
        expected = 3.0 * torch.log1p(-(t * p).sum(1)).mean()
        torch.testing.assert_close(s["term"], expected)


# -- dense and token outputs ------------------------------------------------------------------------------------------


def test_dense_outputs_without_a_teacher_refuse_with_the_table_size() -> None:
    with pytest.raises(ValueError) as info:
        fit([ELR()], make_model("dense"), make_loader(layout="dense"), max_epochs=1)
    msg = str(info.value)
    assert "`ELR(teacher='none')` does not support dense outputs" in msg
    assert "N × prod(d) × C × bytes = 64 × 64 × 4 × 4 B = 64.0 KiB" in msg
    assert "ELR(teacher='ema')" in msg and "EMATeacher" in msg
    with pytest.raises(ValueError, match=r"64 × 8 × 4 × 2 B = 4.0 KiB"):
        fit([ELR(table_dtype="bfloat16")], make_model("tokens"), make_loader(layout="tokens"), max_epochs=1)


def test_per_element_table_formula_reads_like_the_docs() -> None:
    from lightning_reg.callbacks._per_element import per_element_table_size

    formula, nbytes = per_element_table_size(60000, (28, 28), 11, "float32")
    assert formula == "N × prod(d) × C × bytes = 60000 × 784 × 11 × 4 B = 1.9 GiB"
    assert nbytes == 60000 * 784 * 11 * 4
    formula, _ = per_element_table_size(None, (8,), 5, "bfloat16", topk=2)
    assert formula.startswith("N × prod(d) × k × (bytes + 2) = N × 8 × 2 × (2 + 2) B")


class _ConstTeacher:
    """A teacher whose logits are the clean input itself (so tests choose its prediction)."""

    def __init__(self, has_updated: bool = True) -> None:
        self.has_updated = has_updated
        self.calls = 0

    def teacher_forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        return x


def _naive_dense_term(logits: Tensor, teacher_logits: Tensor, labels: Tensor, lam: float) -> float:
    """λ · mean over valid (b, h, w) of log(1 − <t, p>), in float64 Python, from the formula."""
    z, zt = logits.double(), teacher_logits.double()
    total, count = 0.0, 0
    b, _, h, w = z.shape
    for i in range(b):
        for r in range(h):
            for s in range(w):
                if int(labels[i, r, s]) == -100:
                    continue
                p = [min(max(v, 1e-4), 1 - 1e-4) for v in torch.softmax(z[i, :, r, s], 0).tolist()]
                pt = [min(max(v, 1e-4), 1 - 1e-4) for v in torch.softmax(zt[i, :, r, s], 0).tolist()]
                t = [v / sum(pt) for v in pt]
                total += math.log(1 - sum(a * q for a, q in zip(t, p)))
                count += 1
    return lam * total / count


def test_dense_term_uses_the_teacher_without_a_table_and_ignores_unlabeled_pixels() -> None:
    g = torch.Generator().manual_seed(0)
    logits = (2 * torch.randn(2, 3, 3, 3, generator=g)).requires_grad_()
    teacher_logits = 2 * torch.randn(2, 3, 3, 3, generator=g)
    labels = torch.randint(0, 3, (2, 3, 3), generator=g)
    labels[0, 0, :2] = -100
    labels[1] = -100  # an image without any label
    elr, teacher = ELR(lam=3.0, teacher="ema"), _ConstTeacher()
    elr._teacher = teacher  # type: ignore[assignment]
    ctx = _ctx(logits, labels, torch.tensor([0, 1]), clean_x=teacher_logits)
    term = elr.loss_term(ctx)
    assert term is not None and teacher.calls == 1
    assert float(term) == pytest.approx(_naive_dense_term(logits.detach(), teacher_logits, labels, 3.0), abs=1e-6)
    assert not elr.table.is_allocated  # no per-pixel table
    term.backward()
    assert logits.grad is not None
    assert torch.count_nonzero(logits.grad[1]) == 0  # the all-ignored image gets exactly zero gradient
    assert torch.count_nonzero(logits.grad[0, :, 0, :2]) == 0 and torch.count_nonzero(logits.grad[0]) > 0
    # Token layout (B, T, C): the same term along the last dimension.
    tok = logits.detach().movedim(1, -1).reshape(2, 9, 3)
    tok_teacher = teacher_logits.movedim(1, -1).reshape(2, 9, 3)
    elr_tok = ELR(lam=3.0, teacher="ema")
    elr_tok._teacher = _ConstTeacher()  # type: ignore[assignment]
    ctx_tok = _ctx(tok, labels.reshape(2, 9), torch.tensor([0, 1]), clean_x=tok_teacher)
    ctx_tok.layout = "channels_last"
    torch.testing.assert_close(elr_tok.loss_term(ctx_tok), term.detach())
    with pytest.raises(RuntimeError, match="no per-sample targets for dense outputs"):
        elr.suspected_labels()


def test_dense_term_before_the_teacher_updates_uses_the_students_prediction() -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 2, 2, generator=g)
    labels = torch.randint(0, 3, (2, 2, 2), generator=g)
    elr, teacher = ELR(lam=1.0, teacher="ema"), _ConstTeacher(has_updated=False)
    elr._teacher = teacher  # type: ignore[assignment]
    ctx = _ctx(logits, labels, torch.tensor([0, 1]), clean_x=torch.zeros(2, 3, 2, 2))
    term = elr.loss_term(ctx)
    assert teacher.calls == 0
    assert float(term) == pytest.approx(_naive_dense_term(logits, logits, labels, 1.0), abs=1e-6)  # type: ignore[arg-type]


def test_dense_training_with_an_ema_teacher() -> None:
    from lightning_reg import EMATeacher

    elr = ELR(teacher="ema")
    trainer, _ = fit([EMATeacher(decay=0.9), elr], make_model("dense"), make_loader(layout="dense"), max_epochs=1)
    assert float(trainer.callback_metrics["train/loss_elr"]) < 0
    assert not elr.table.is_allocated and not elr.meta.is_allocated


# -- CutMix: the term's target is mixed (classification) or pasted (dense) like the input ---------------------------


def test_cutmix_without_teacher_is_a_clear_error() -> None:
    from lightning_reg import CutMix

    with pytest.raises(ValueError, match=r"`ELR` with `CutMix` needs predictions on the un-mixed inputs"):
        fit([CutMix(), ELR()], max_epochs=1)


def test_cutmix_targets_in_the_term() -> None:
    from lightning_reg.callbacks.cutmix import CutMixRecord
    from lightning_reg.functional.cutmix import paste_box

    g = torch.Generator().manual_seed(4)
    perm, box = torch.tensor([1, 2, 0]), torch.tensor([[0, 2, 1, 3]])
    # Classification: lam' t_i + (1 - lam') t_perm(i), with the table updated from the teacher's clean predictions.
    elr = ELR(beta=0.5, lam=1.0, num_samples=8, teacher="ema")
    elr._teacher = _ConstTeacher()  # type: ignore[assignment]
    logits, clean = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    ctx = _ctx(logits, torch.tensor([0, 1, 2]), torch.tensor([5, 2, 7]), cutmix=CutMixRecord(perm, box, 0.75))
    ctx.extras["clean_x"] = clean
    term = elr.loss_term(ctx)
    t_new = elr_updated_targets(torch.zeros(3, 4), elr_clamped_probs(clean), 0.5)
    torch.testing.assert_close(elr.targets[torch.tensor([5, 2, 7])], t_new)
    torch.testing.assert_close(term, elr_regularizer(logits, 0.75 * t_new + 0.25 * t_new[perm]))
    # Dense: the teacher's per-pixel target on the clean input is pasted with the same box.
    elr_d = ELR(lam=1.0, teacher="ema")
    elr_d._teacher = _ConstTeacher()  # type: ignore[assignment]
    logits_d, clean_d = torch.randn(3, 4, 3, 3, generator=g), torch.randn(3, 4, 3, 3, generator=g)
    labels = torch.randint(0, 4, (3, 3, 3), generator=g)
    labels[0, 2] = -100
    ctx_d = _ctx(logits_d, labels, torch.arange(3), cutmix=CutMixRecord(perm, box, 0.5))
    ctx_d.extras["clean_x"] = clean_d
    target = paste_box(torch.softmax(clean_d, 1).clamp(1e-4, 1 - 1e-4), perm, box)
    target = target / target.sum(1, keepdim=True)
    expected = elr_regularizer(logits_d, target, lam=1.0, dim=1, valid=labels != -100)
    torch.testing.assert_close(elr_d.loss_term(ctx_d), expected)


def test_dense_with_cutmix_and_an_ema_teacher_trains() -> None:
    from lightning_reg import CutMix, EMATeacher

    trainer, _ = fit(
        [CutMix(), EMATeacher(decay=0.9), ELR(teacher="ema")],
        make_model("dense"),
        make_loader(layout="dense"),
        max_epochs=1,
    )
    assert math.isfinite(float(trainer.callback_metrics["train/loss_elr"]))


def test_both_tables_share_one_gather_padded_to_the_batch_size(monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 16: targets and meta travel in ONE all-gather per step, padded to the loader's batch size."""
    from lightning_reg.core.table import PerSampleTable

    calls: list[tuple[int | None, int]] = []
    gather = PerSampleTable.gather

    def recorded(strategy: Any, index: Tensor, *values: Tensor, pad_to: int | None = None) -> Any:
        calls.append((pad_to, len(values)))
        return gather(strategy, index, *values, pad_to=pad_to)

    def no_write(*a: Any, **k: Any) -> None:
        raise AssertionError("ELR writes through `gather` + `write_gathered`")

    monkeypatch.setattr(PerSampleTable, "gather", staticmethod(recorded))
    monkeypatch.setattr(PerSampleTable, "write", no_write)
    trainer, _ = fit([ELR(num_samples=64)], loader=make_loader(n=64, batch_size=16), max_epochs=1)
    assert calls == [(16, 2)] * trainer.global_step
