"""PSKD: the soft target, its schedule, the table it keeps, composition, teachers and exact resume."""

from __future__ import annotations

import math
from collections.abc import Iterator
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
from torch.utils.data import DataLoader, Sampler, TensorDataset

from lightning_reg.callbacks.label_smoothing import LabelSmoothing
from lightning_reg.callbacks.pskd import PSKD
from lightning_reg.core.protocol import LossRegularizer, StepContext, soft_cross_entropy
from lightning_reg.data import EpochSeededSampler, IndexedDataset, ResumableDataLoader
from lightning_reg.functional.label_smoothing import label_smoothing_targets
from lightning_reg.functional.pskd import pskd_alpha, pskd_soft_targets, target_entropy
from tests.helpers import NUM_CLASSES, TinyNet, assert_state_equal, fit, make_dataset, make_loader, run_ddp_script

ROOT = Path(__file__).resolve().parents[1]


class Recorder(LossRegularizer):
    """A loss-stage probe: records every step's final target, hard labels, probabilities and index."""

    name = "recorder"
    stage = "loss"

    def __init__(self) -> None:
        super().__init__()
        self.steps: list[dict[str, Any]] = []

    def loss_term(self, ctx: StepContext) -> Tensor | None:
        trainer = ctx.module.trainer
        self.steps.append(
            {
                "epoch": trainer.current_epoch,
                "step": trainer.global_step,
                "index": ctx.index.clone(),  # type: ignore[union-attr]
                "labels": ctx.labels.clone(),
                "given": ctx.given_labels.clone(),
                "target": None if ctx.target is None else ctx.target.clone(),
                "probs": ctx.probs().clone(),
                "logs": {k: float(v) for k, v in ctx.logs.items()},
                "base": float(ctx.terms["base"].detach()),
                "logits": ctx.logits.detach().clone(),  # type: ignore[union-attr]
            }
        )
        return None


def _onehot(y: Tensor) -> Tensor:
    return F.one_hot(y, NUM_CLASSES).float()


def _last_predictions(steps: list[dict[str, Any]], upto_epoch: int) -> dict[int, Tensor]:
    """Sample index -> the probabilities of its last visit in epochs ``<= upto_epoch``."""
    last: dict[int, Tensor] = {}
    for s in steps:
        if s["epoch"] <= upto_epoch:
            for i, p in zip(s["index"].tolist(), s["probs"]):
                last[i] = p
    return last


# -- functional core ---------------------------------------------------------------------------------
def test_soft_target_and_gradient_hand_computed() -> None:
    # logits (0, ln 2, 0) -> p = (1/4, 1/2, 1/4); label 1, previous prediction (0.2, 0.5, 0.3), alpha 0.5.
    logits = torch.tensor([[0.0, math.log(2.0), 0.0]], requires_grad=True)
    q = pskd_soft_targets(F.one_hot(torch.tensor([1]), 3).float(), torch.tensor([[0.2, 0.5, 0.3]]), 0.5)
    torch.testing.assert_close(q, torch.tensor([[0.1, 0.75, 0.15]]))
    loss = soft_cross_entropy(logits, q)
    # -(0.1 ln 1/4 + 0.75 ln 1/2 + 0.15 ln 1/4) = 1.25 ln 2
    torch.testing.assert_close(loss, torch.tensor(1.25 * math.log(2.0)))
    loss.backward()
    # dL/dz = p - q = (0.25 - 0.1, 0.5 - 0.75, 0.25 - 0.15)
    torch.testing.assert_close(logits.grad, torch.tensor([[0.15, -0.25, 0.10]]))


def test_soft_target_edge_cases() -> None:
    y = F.one_hot(torch.tensor([0, 2]), 3).float()
    prev = torch.tensor([[0.1, 0.8, 0.1], [0.3, 0.3, 0.4]])
    torch.testing.assert_close(pskd_soft_targets(y, prev, 0.0), y)
    torch.testing.assert_close(pskd_soft_targets(y, prev, 1.0), prev)
    torch.testing.assert_close(pskd_soft_targets(y, prev, torch.tensor(0.25)), 0.75 * y + 0.25 * prev)
    out = pskd_soft_targets(y, prev, 0.5, seen=torch.tensor([False, True]))
    torch.testing.assert_close(out, torch.stack([y[0], 0.5 * y[1] + 0.5 * prev[1]]))
    torch.testing.assert_close(out.sum(1), torch.ones(2))
    with pytest.raises(ValueError, match="same shape"):
        pskd_soft_targets(y, prev[:, :2], 0.5)


def test_alpha_schedule_and_entropy() -> None:
    assert [pskd_alpha(t, 4, 0.8) for t in (1, 2, 3, 4, 5)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 0.8])
    with pytest.raises(ValueError, match="max_epochs"):
        pskd_alpha(1, 0, 0.8)
    torch.testing.assert_close(target_entropy(torch.tensor([[1.0, 0.0], [0.5, 0.5]])), torch.tensor(math.log(2) / 2))


# -- the callback in training ------------------------------------------------------------------------
def test_first_epoch_is_plain_ce_and_later_targets_use_previous_predictions() -> None:
    rec = Recorder()
    cb = PSKD(alpha_T=0.8)
    fit([cb, rec], TinyNet(), max_epochs=3)
    torch.manual_seed(0)
    _, plain = fit([], TinyNet(), max_epochs=1)
    torch.manual_seed(0)
    _, pskd_one = fit([PSKD(alpha_T=0.8)], TinyNet(), max_epochs=1)
    # Epoch 0: every sample is unseen, so the target is the hard label and training equals plain CE.
    assert_state_equal(plain.state_dict(), pskd_one.state_dict(), "epoch-0 weights")
    for s in rec.steps:
        alpha = 0.8 * (s["epoch"] + 1) / 3
        assert s["logs"]["pskd/alpha"] == pytest.approx(alpha)
        if s["epoch"] == 0:
            torch.testing.assert_close(s["target"], _onehot(s["labels"]))
            assert s["logs"]["pskd/target_entropy"] == 0.0
            continue
        last = _last_predictions([t for t in rec.steps if t["step"] < s["step"]], s["epoch"])
        prev = torch.stack([last[i] for i in s["index"].tolist()])
        expected = (1 - alpha) * _onehot(s["labels"]) + alpha * prev
        torch.testing.assert_close(s["target"], expected)
        assert s["logs"]["pskd/target_entropy"] == pytest.approx(float(target_entropy(expected)), rel=1e-5)
        assert s["base"] == pytest.approx(float(soft_cross_entropy(s["logits"], expected)), rel=1e-5)
    # The table holds each sample's last train-mode prediction (softmax at temperature 1).
    final = _last_predictions(rec.steps, 2)
    table = cb.table.dense()
    assert cb.table.seen is not None and bool(cb.table.seen.all())
    torch.testing.assert_close(table, torch.stack([final[i] for i in range(64)]))


class _HalfFirstEpoch(Sampler[int]):
    """Epoch 0 visits samples 0..31 only; later epochs visit all 64."""

    def __init__(self) -> None:
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return 32 if self.epoch == 0 else 64

    def __iter__(self) -> Iterator[int]:
        return iter(range(32 if self.epoch == 0 else 64))


def test_never_seen_samples_get_the_hard_label() -> None:
    rec = Recorder()
    ds = IndexedDataset(make_dataset(64))
    loader = ResumableDataLoader(ds, batch_size=16, sampler=_HalfFirstEpoch())
    fit([PSKD(alpha_T=0.8), rec], TinyNet(), loader, max_epochs=2)
    later = [s for s in rec.steps if s["epoch"] == 1]
    assert later, "epoch 1 did not run"
    for s in later:
        unseen = s["index"] >= 32
        onehot = _onehot(s["labels"])
        torch.testing.assert_close(s["target"][unseen], onehot[unseen])
        assert not torch.allclose(s["target"][~unseen], onehot[~unseen]) or not bool((~unseen).any())


def test_step_schedule_and_logged_metrics() -> None:
    rec = Recorder()
    trainer, _ = fit([PSKD(alpha_T=0.6, schedule_unit="step"), rec], TinyNet(), max_epochs=2)
    total = 8
    assert [s["logs"]["pskd/alpha"] for s in rec.steps] == pytest.approx([0.6 * (k + 1) / total for k in range(8)])
    for key in ("pskd/alpha", "pskd/target_entropy", "train/loss_base", "train/loss"):
        assert key in trainer.callback_metrics


def test_custom_schedule_is_a_multiplier() -> None:
    rec = Recorder()
    fit([PSKD(alpha_T=0.5, schedule="constant"), rec], TinyNet(), max_epochs=2)
    assert {s["logs"]["pskd/alpha"] for s in rec.steps} == {0.5}


def test_epoch_schedule_needs_max_epochs() -> None:
    with pytest.raises(ValueError, match="schedule_unit='step'"):
        fit([PSKD()], TinyNet(), max_epochs=-1, max_steps=3)
    trainer, _ = fit([PSKD(schedule_unit="step")], TinyNet(), max_epochs=-1, max_steps=3)
    assert trainer.global_step == 3


@pytest.mark.parametrize(("dtype", "topk"), [("bfloat16", None), ("float16", 2), ("float32", 2)])
def test_compact_storage_modes(dtype: str, topk: int | None) -> None:
    rec = Recorder()
    cb = PSKD(table_dtype=dtype, topk=topk, table_device="cpu")  # type: ignore[arg-type]
    fit([cb, rec], TinyNet(), max_epochs=2)
    assert cb.table.values is not None and cb.table.values.dtype == getattr(torch, dtype)
    assert cb.table.values.shape == (64, topk or NUM_CLASSES)
    final = torch.stack([_last_predictions(rec.steps, 1)[i] for i in range(64)])
    dense = cb.table.dense()
    torch.testing.assert_close(dense.sum(1), torch.ones(64), atol=1e-2, rtol=0)
    if topk is None:
        torch.testing.assert_close(dense, final, atol=4e-3, rtol=0)
    else:  # the k largest entries are kept (up to the dtype), the rest share the remaining mass
        top, cols = final.topk(topk, dim=1)
        torch.testing.assert_close(dense.gather(1, cols), top, atol=1e-3, rtol=0)


def test_topk_must_be_below_num_classes() -> None:
    with pytest.raises(ValueError, match="`topk` to be smaller than the number of columns"):
        fit([PSKD(topk=NUM_CLASSES)], TinyNet(), max_epochs=1)


class _ValLoss(TinyNet):
    """Calls ``regularized_loss`` in ``validation_step`` too (a user pattern PS-KD must not react to)."""

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y, index = batch
        self.log("val/loss", self.regularized_loss(self(x), y, index, x=x, log=False), batch_size=len(y))


class _TableSnapshots(L.Callback):
    def __init__(self, cb: PSKD) -> None:
        self.cb, self.pairs, self._before = cb, [], None  # type: ignore[var-annotated]

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._before = self.cb.table.dense().clone() if self.cb.table.is_allocated else None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._before is not None:
            self.pairs.append((self._before, self.cb.table.dense().clone()))


def test_validation_does_not_touch_the_table() -> None:
    from tests.helpers import trainer_kwargs

    cb = PSKD()
    snaps = _TableSnapshots(cb)
    trainer = L.Trainer(callbacks=[cb, snaps], max_epochs=2, **trainer_kwargs())
    trainer.fit(_ValLoss(), train_dataloaders=make_loader(), val_dataloaders=make_loader(shuffle=False))
    assert len(snaps.pairs) == 2
    for before, after in snaps.pairs:
        assert torch.equal(before, after)


# -- composition ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("pskd_first", [True, False], ids=["pskd_then_ls", "ls_then_pskd"])
def test_composes_with_label_smoothing_in_both_orders(pskd_first: bool) -> None:
    rec = Recorder()
    ls, pskd = LabelSmoothing(0.1), PSKD(alpha_T=0.8)
    fit([pskd, ls, rec] if pskd_first else [ls, pskd, rec], TinyNet(), max_epochs=2)
    for s in rec.steps:
        y = _onehot(s["labels"])
        alpha = s["logs"]["pskd/alpha"]
        if s["epoch"] == 0:
            prev_part = y if pskd_first else label_smoothing_targets(y, 0.1)
        else:
            last = _last_predictions([t for t in rec.steps if t["step"] < s["step"]], 1)
            prev = torch.stack([last[i] for i in s["index"].tolist()])
            if pskd_first:
                prev_part = (1 - alpha) * y + alpha * prev
            else:
                prev_part = (1 - alpha) * label_smoothing_targets(y, 0.1) + alpha * prev
        expected = label_smoothing_targets(prev_part, 0.1) if pskd_first else prev_part
        torch.testing.assert_close(s["target"], expected)
        # Hard-label loss terms still see the given labels: PS-KD only changes the base loss's target.
        assert torch.equal(s["labels"], s["given"])


def test_composes_with_elr() -> None:
    elr_mod = pytest.importorskip("lightning_reg.callbacks.elr")
    rec, pskd, elr = Recorder(), PSKD(alpha_T=0.8), elr_mod.ELR(beta=0.7, lam=3.0)
    trainer, _ = fit([pskd, elr, rec], TinyNet(), max_epochs=2)
    assert "train/loss_elr" in trainer.callback_metrics
    for s in rec.steps:
        # The base loss is the soft CE on PS-KD's target; ELR's term and diagnostics see the given labels.
        assert s["base"] == pytest.approx(float(soft_cross_entropy(s["logits"], s["target"])), rel=1e-5)
        assert torch.equal(s["labels"], s["given"])
    assert elr.table.seen is not None and bool(elr.table.seen.all())
    seen = elr.given_labels >= 0
    assert torch.equal(elr.given_labels[seen], make_dataset(64).tensors[1][seen])


def test_two_pskd_conflict() -> None:
    reason = PSKD().conflicts_with(PSKD(alpha_T=0.5))
    assert reason is not None and "keep a single `PSKD`" in reason
    # In a Trainer, Lightning's own unique-state-key check already refuses the pair.
    with pytest.raises(RuntimeError, match="more than one stateful callback of type `PSKD`"):
        fit([PSKD(), PSKD(alpha_T=0.5)], TinyNet(), max_epochs=1)


class _Shift(LossRegularizer):
    """A toy input-stage regularizer (like mixup, it changes the input)."""

    name = "shift"
    stage = "input"

    def transform_input(self, ctx: StepContext) -> None:
        ctx.x = ctx.x + 0.5


class _StubTeacher(L.Callback):
    """A minimal ``teacher_forward`` provider: a fixed random linear map, 'updated' after ``updates_after`` steps."""

    def __init__(self, updates_after: int = 0) -> None:
        g = torch.Generator().manual_seed(7)
        self.weight = torch.randn(64, NUM_CLASSES, generator=g)
        self.updates_after = updates_after
        self.has_updated = updates_after == 0
        self.calls = 0

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self.has_updated = trainer.global_step >= self.updates_after

    def teacher_forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        return x.flatten(1) @ self.weight


def test_input_stage_conflicts_with_self_teacher_only() -> None:
    with pytest.raises(ValueError, match=r"teacher='ema'"):
        fit([PSKD(), _Shift()], TinyNet(), max_epochs=1)
    with pytest.raises(ValueError, match="input-stage regularizer `_Shift`"):
        fit([_Shift(), PSKD()], TinyNet(), max_epochs=1)
    # With a teacher the table stores the teacher's predictions on the clean input, which stay per-sample.
    teacher, cb = _StubTeacher(updates_after=100), PSKD(teacher="ema")
    fit([_Shift(), cb, teacher], TinyNet(), make_loader(shuffle=False), max_epochs=1)
    x = make_dataset(64).tensors[0]
    torch.testing.assert_close(cb.table.dense(), torch.softmax(teacher.teacher_forward(x), -1))


def test_composes_with_mixup_when_using_a_teacher() -> None:
    mixup_mod = pytest.importorskip("lightning_reg.callbacks.mixup")
    with pytest.raises(ValueError, match="Conflicting regularizers"):
        fit([PSKD(), mixup_mod.Mixup()], TinyNet(), max_epochs=1)
    trainer, _ = fit([PSKD(teacher="ema"), mixup_mod.Mixup(), _StubTeacher()], TinyNet(), max_epochs=2)
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))


def test_ema_teacher_option() -> None:
    with pytest.raises(ValueError, match="Add `EMATeacher"):
        fit([PSKD(teacher="ema")], TinyNet(), max_epochs=1)
    # Updated teacher: the table holds its predictions on the clean input, not the student's.
    x = make_dataset(64).tensors[0]
    teacher, cb = _StubTeacher(), PSKD(teacher="ema")
    fit([cb, teacher], TinyNet(), make_loader(shuffle=False), max_epochs=1)
    torch.testing.assert_close(cb.table.dense(), torch.softmax(teacher.teacher_forward(x), -1))
    # Before the teacher's first update, the student's own predictions are stored.
    rec, teacher, cb = Recorder(), _StubTeacher(updates_after=100), PSKD(teacher="ema")
    fit([cb, teacher, rec], TinyNet(), make_loader(shuffle=False), max_epochs=1)
    assert teacher.calls == 0
    torch.testing.assert_close(cb.table.dense(), torch.cat([s["probs"] for s in rec.steps]))


def test_ema_teacher_when_present() -> None:
    ema = pytest.importorskip("lightning_reg.callbacks.ema")
    cb = PSKD(teacher="ema")
    trainer, _ = fit([ema.EMATeacher(), cb], TinyNet(), max_epochs=2)
    assert cb.table.seen is not None and bool(cb.table.seen.all())
    assert math.isfinite(float(trainer.callback_metrics["pskd/target_entropy"]))


# -- checkpoints -----------------------------------------------------------------------------------------
def test_mid_epoch_resume_restores_alpha_and_table(tmp_path: Path) -> None:
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=6, save_top_k=-1, filename="{step}")
    full_rec, full = Recorder(), PSKD(alpha_T=0.8, table_dtype="bfloat16")
    fit([full, full_rec, ckpt_cb], TinyNet(), max_epochs=3, enable_checkpointing=True)
    state = torch.load(tmp_path / "step=6.ckpt", weights_only=False)
    saved = next(v for k, v in state["callbacks"].items() if k.startswith("PSKD"))
    assert saved["version"] == 1 and saved["table"]["values"].dtype == torch.bfloat16
    assert int(saved["table"]["seen"].sum()) == 64  # step 6 is mid epoch 1: every sample was seen in epoch 0
    res_rec, resumed = Recorder(), PSKD(alpha_T=0.8, table_dtype="bfloat16")
    fit([resumed, res_rec], TinyNet(), ckpt_path=str(tmp_path / "step=6.ckpt"), max_epochs=3)
    assert [s["step"] for s in res_rec.steps] == list(range(6, 12))
    after = [s for s in full_rec.steps if s["step"] >= 6]
    assert [s["logs"]["pskd/alpha"] for s in res_rec.steps] == [s["logs"]["pskd/alpha"] for s in after]
    for a, b in zip(after, res_rec.steps):
        torch.testing.assert_close(a["target"], b["target"], atol=0, rtol=0)
    assert torch.equal(full.table.values, resumed.table.values)  # type: ignore[arg-type]
    assert torch.equal(full.table.seen, resumed.table.seen)  # type: ignore[arg-type]


def test_state_dict_round_trip_and_version() -> None:
    cb = PSKD(topk=2)
    fit([cb], TinyNet(), max_epochs=1)
    other = PSKD(topk=2)
    other.load_state_dict(cb.state_dict())
    assert_state_equal(cb.state_dict(), other.state_dict())
    with pytest.raises(ValueError, match="version"):
        other.load_state_dict({**cb.state_dict(), "version": 99})
    with pytest.raises(ValueError, match="topk"):
        PSKD(topk=3).load_state_dict(cb.state_dict())


# -- DDP ---------------------------------------------------------------------------------------------------
@pytest.mark.slow  # ~60 s on a loaded 2-core box; the conformance suite's `test_ddp_two_process_cpu[pskd]` runs it
def test_ddp_table_equals_single_process_with_padding(tmp_path: Path) -> None:
    """2-rank DDP on 61 samples (DistributedSampler pads index 0 twice) gives the single-process table."""
    from tests.conformance.ddp_worker import run as run_worker

    run_ddp_script("tests.conformance.ddp_worker", "pskd", str(tmp_path), "ddp", timeout=300)
    tables = [torch.load(tmp_path / f"ddp_rank{r}.pt", weights_only=False)["callbacks"][0]["table"] for r in (0, 1)]
    single = run_worker("pskd", str(tmp_path), "single")["callbacks"][0]["table"]
    assert tables[0]["num_samples"] == 61 and bool(tables[0]["seen"].all())
    assert torch.equal(tables[0]["values"], tables[1]["values"])
    torch.testing.assert_close(tables[0]["values"], single["values"], atol=1e-6, rtol=1e-5)
    assert torch.equal(tables[0]["seen"], single["seen"])


# -- training only -------------------------------------------------------------------------------------------
def _ctx(logits: Tensor, labels: Tensor, index: Tensor | None, epoch: int = 1, **extras: Any) -> StepContext:
    trainer = SimpleNamespace(strategy=None, global_step=0, current_epoch=epoch, max_epochs=4)
    ctx = StepContext(
        module=SimpleNamespace(trainer=trainer),  # type: ignore[arg-type]
        x=None,
        labels=labels,
        given_labels=labels,
        index=index,
        logits=logits,
    )
    ctx.extras.update(extras)
    return ctx


def test_outside_training_the_target_and_table_are_left_alone() -> None:
    cb = PSKD(num_samples=8)
    ctx = _ctx(torch.randn(2, 4), torch.tensor([0, 1]), torch.tensor([0, 1]))
    ctx.training = False
    cb.refine_target(ctx)
    assert ctx.target is None and not cb.table.is_allocated and ctx.logs == {}


def test_sanity_check_without_num_samples_and_validation_leave_the_table_alone() -> None:
    from tests.helpers import StepSeed, trainer_kwargs

    cb, ref = PSKD(), PSKD()
    L.seed_everything(0, verbose=False)
    model = _ValLoss()
    trainer = L.Trainer(callbacks=[cb, StepSeed()], **trainer_kwargs(max_epochs=2, num_sanity_val_steps=2))
    trainer.fit(model, train_dataloaders=make_loader(), val_dataloaders=make_loader(32, batch_size=8, seed=1))
    L.seed_everything(0, verbose=False)
    fit([ref], TinyNet(), max_epochs=2)
    assert_state_equal(cb.state_dict(), ref.state_dict())


# -- semi-supervised: unlabeled samples never touch the table or their target ----------------------------------
def _masked_loader() -> ResumableDataLoader:
    """``make_loader()`` with every fourth sample unlabeled (``ignore_index``)."""
    base = make_dataset(64)
    y = base.tensors[1].clone()
    y[::4] = -100
    ds = IndexedDataset(base, labels=y)
    return ResumableDataLoader(ds, batch_size=16, sampler=EpochSeededSampler(ds, seed=0, shuffle=True))


def _labeled_onehot(y: Tensor) -> Tensor:
    return F.one_hot(y.clamp_min(0), NUM_CLASSES).float() * (y != -100).unsqueeze(1)


def test_unlabeled_samples_in_one_loader_leave_the_table_and_their_target_untouched() -> None:
    rec, cb = Recorder(), PSKD(alpha_T=0.8)
    fit([cb, rec], TinyNet(), _masked_loader(), max_epochs=2)
    labeled = torch.arange(64) % 4 != 0
    assert cb.table.seen is not None and torch.equal(cb.table.seen, labeled)
    assert torch.count_nonzero(cb.table.dense()[~labeled]) == 0
    for s in rec.steps:
        keep = s["labels"] != -100
        alpha = s["logs"]["pskd/alpha"]
        # Unlabeled rows keep the current target (the zero row of an ignored label): the base loss skips them.
        assert torch.count_nonzero(s["target"][~keep]) == 0
        if s["epoch"] == 1:
            last = _last_predictions([t for t in rec.steps if t["step"] < s["step"]], 1)
            prev = torch.stack([last[i] for i in s["index"][keep].tolist()])
            expected = (1 - alpha) * _labeled_onehot(s["labels"][keep]) + alpha * prev
            torch.testing.assert_close(s["target"][keep], expected)
            ref = soft_cross_entropy(s["logits"], s["target"], valid=keep)
            assert s["base"] == pytest.approx(float(ref), rel=1e-5)
            h = torch.special.entr(expected).sum(1).mean()
            assert s["logs"]["pskd/target_entropy"] == pytest.approx(float(h), rel=1e-5)


def _ssl_loaders(n_l: int = 16, n_u: int = 48) -> CombinedLoader:
    ds = make_dataset(n_l + n_u)
    x, y = ds.tensors
    lab = DataLoader(TensorDataset(x[:n_l], y[:n_l], torch.arange(n_l)), batch_size=4)
    unl = DataLoader(TensorDataset(x[n_l:], torch.arange(n_l, n_l + n_u)), batch_size=12)
    return CombinedLoader({"labeled": lab, "unlabeled": unl}, mode="max_size_cycle")


def test_combined_loader_uses_the_labeled_part_only() -> None:
    # A table of the 16 labeled samples only: reading or writing an unlabeled index (16..63) would raise.
    rec, cb = Recorder(), PSKD(alpha_T=0.8, num_samples=16)
    fit([cb, rec], TinyNet(), _ssl_loaders(), max_epochs=2)
    assert cb.table.seen is not None and bool(cb.table.seen.all())
    assert len(rec.steps) == 8
    for s in rec.steps:
        assert s["target"].shape == (16, NUM_CLASSES)
        assert torch.count_nonzero(s["target"][4:]) == 0  # the unlabeled rows' target is untouched
        if s["epoch"] == 1:
            last = _last_predictions([t for t in rec.steps if t["step"] < s["step"]], 1)
            prev = torch.stack([last[i] for i in s["index"][:4].tolist()])
            alpha = s["logs"]["pskd/alpha"]
            torch.testing.assert_close(s["target"][:4], (1 - alpha) * _onehot(s["labels"][:4]) + alpha * prev)


# -- dense and token outputs ------------------------------------------------------------------------------------
def test_dense_outputs_with_the_self_teacher_refuse_with_the_table_size() -> None:
    from tests.helpers import make_model

    with pytest.raises(ValueError) as info:
        fit([PSKD()], make_model("dense"), make_loader(layout="dense"), max_epochs=1)
    msg = str(info.value)
    assert "`PSKD(teacher='self')` does not support dense outputs" in msg
    assert "N × prod(d) × C × bytes = 64 × 64 × 4 × 4 B = 64.0 KiB" in msg
    assert "PSKD(teacher='ema')" in msg and "EMATeacher" in msg
    with pytest.raises(ValueError, match=r"N × prod\(d\) × k × \(bytes \+ 2\) = 64 × 8 × 2 × \(4 \+ 2\) B = 6.0 KiB"):
        fit([PSKD(topk=2)], make_model("tokens"), make_loader(layout="tokens"), max_epochs=1)


class _LogitsTeacher:
    """A teacher whose logits are the clean input itself."""

    def __init__(self, has_updated: bool = True) -> None:
        self.has_updated = has_updated
        self.calls = 0

    def teacher_forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        return x


def _naive_dense_target(teacher_logits: Tensor, labels: Tensor, alpha: float) -> Tensor:
    """q = (1 - α) one_hot(y) + α softmax(teacher) per labelled pixel; ignored pixels keep the zero row (float64)."""
    b, c, h, w = teacher_logits.shape
    out = torch.zeros(b, c, h, w, dtype=torch.float64)
    for i in range(b):
        for r in range(h):
            for s in range(w):
                y = int(labels[i, r, s])
                if y == -100:
                    continue
                e = [math.exp(v) for v in teacher_logits[i, :, r, s].double().tolist()]
                for k in range(c):
                    out[i, k, r, s] = (1 - alpha) * (k == y) + alpha * e[k] / sum(e)
    return out


def test_dense_target_uses_the_ema_teacher_without_a_table() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 3, 3, generator=g)
    teacher_logits = 2 * torch.randn(2, 3, 3, 3, generator=g)
    labels = torch.randint(0, 3, (2, 3, 3), generator=g)
    labels[0, 1, :2] = -100
    labels[1] = -100
    cb, teacher = PSKD(alpha_T=0.8, teacher="ema"), _LogitsTeacher()
    cb._teacher = teacher  # type: ignore[assignment]
    ctx = _ctx(logits, labels, None, epoch=1, clean_x=teacher_logits)  # no index needed: no table
    cb.refine_target(ctx)
    alpha = 0.8 * 2 / 4
    assert ctx.logs["pskd/alpha"] == pytest.approx(alpha) and teacher.calls == 1
    assert ctx.target is not None
    torch.testing.assert_close(ctx.target.double(), _naive_dense_target(teacher_logits, labels, alpha))
    assert not cb.table.is_allocated
    # Token layout (B, T, C): the same target along the last dimension.
    cb_tok = PSKD(alpha_T=0.8, teacher="ema")
    cb_tok._teacher = _LogitsTeacher()  # type: ignore[assignment]
    tok = _ctx(
        logits.movedim(1, -1).reshape(2, 9, 3),
        labels.reshape(2, 9),
        None,
        epoch=1,
        clean_x=teacher_logits.movedim(1, -1).reshape(2, 9, 3),
    )
    tok.layout = "channels_last"
    cb_tok.refine_target(tok)
    torch.testing.assert_close(tok.target, ctx.target.movedim(1, -1).reshape(2, 9, 3))  # type: ignore[union-attr]
    # Before the teacher's first update the target stays the hard label (as an unseen sample's).
    idle_cb, idle = PSKD(teacher="ema"), _LogitsTeacher(has_updated=False)
    idle_cb._teacher = idle  # type: ignore[assignment]
    ctx_idle = _ctx(logits, labels, None, clean_x=teacher_logits)
    ctx_idle.x = teacher_logits  # no input-stage change
    idle_cb.refine_target(ctx_idle)
    assert idle.calls == 0 and (ctx_idle.target is None or torch.equal(ctx_idle.target, ctx_idle.one_hot()))


def test_an_all_ignored_image_gets_zero_gradient_from_elr_and_pskd() -> None:
    """Label-dependent terms: PS-KD's target q = (1 - α) one_hot(y) + α p_teacher (through the base soft CE).

    ELR's dense term with a teacher does not read the labels' values, but it is a mean over the labelled
    elements only, so an image without labels gets exactly zero gradient from it too.
    """
    from lightning_reg.callbacks.elr import ELR

    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 3, 4, 4, generator=g).requires_grad_()
    teacher_logits = torch.randn(2, 3, 4, 4, generator=g)
    labels = torch.randint(0, 3, (2, 4, 4), generator=g)
    labels[1] = -100
    pskd, elr = PSKD(alpha_T=0.8, teacher="ema"), ELR(lam=3.0, teacher="ema")
    pskd._teacher = elr._teacher = _LogitsTeacher()  # type: ignore[assignment]
    ctx = _ctx(logits, labels, torch.tensor([0, 1]), epoch=3, clean_x=teacher_logits)
    pskd.refine_target(ctx)
    assert ctx.target is not None
    base = soft_cross_entropy(logits, ctx.target, dim=1, valid=ctx.valid)
    for term in (base, elr.loss_term(ctx)):
        assert term is not None
        (grad,) = torch.autograd.grad(term, logits)
        assert torch.count_nonzero(grad[1]) == 0
        assert torch.count_nonzero(grad[0]) > 0


def test_dense_training_with_an_ema_teacher() -> None:
    from lightning_reg import EMATeacher
    from tests.helpers import make_model

    for layout in ("dense", "tokens"):
        cb = PSKD(teacher="ema")
        trainer, _ = fit([EMATeacher(decay=0.9), cb], make_model(layout), make_loader(layout=layout), max_epochs=2)
        assert math.isfinite(float(trainer.callback_metrics["pskd/target_entropy"]))
        assert float(trainer.callback_metrics["pskd/target_entropy"]) > 0
        assert not cb.table.is_allocated


def test_dense_with_cutmix_and_an_ema_teacher_trains() -> None:
    """CutMix pastes PS-KD's per-pixel target (built from the teacher on the clean input) with its box."""
    from lightning_reg import CutMix, EMATeacher
    from tests.helpers import make_model

    with pytest.raises(ValueError, match="Conflicting regularizers"):
        fit([CutMix(), PSKD()], make_model("dense"), make_loader(layout="dense"), max_epochs=1)
    trainer, _ = fit(
        [CutMix(), EMATeacher(decay=0.9), PSKD(teacher="ema")],
        make_model("dense"),
        make_loader(layout="dense"),
        max_epochs=2,
    )
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))


def test_table_writes_are_padded_to_the_loader_batch_size(monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 16: under DDP the rows are padded to the loader's batch size, so the gather needs no size exchange."""
    from lightning_reg.core.table import PerSampleTable

    pads: list[int | None] = []
    write = PerSampleTable.write

    def recorded(self: PerSampleTable, index: Tensor, values: Tensor, strategy: Any = None, pad_to: Any = None) -> None:
        pads.append(pad_to)
        write(self, index, values, strategy=strategy, pad_to=pad_to)

    monkeypatch.setattr(PerSampleTable, "write", recorded)
    trainer, _ = fit([PSKD()], loader=make_loader(n=64, batch_size=16), max_epochs=1)
    assert pads == [16] * trainer.global_step
