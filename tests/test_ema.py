"""Focused tests of ``EMATeacher`` (issue 3's acceptance criteria)."""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins import MixedPrecision
from torch import Tensor

from lightning_reg.callbacks.ema import EMATeacher, export_ema_state_dict
from lightning_reg.core.protocol import TeacherProvider, find_teacher
from lightning_reg.functional.ema import clean_state_dict_key, ema_decay
from tests.helpers import TinyNet, fit, make_loader

X = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(3))


def _snapshot(module: torch.nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


class Recorder(L.Callback):
    """Listed after the EMATeacher: records the live weights at fit start and after every training batch."""

    def __init__(self, ema: EMATeacher | None = None) -> None:
        self.ema = ema
        self.init: dict[str, Tensor] = {}
        self.batches: list[tuple[int, dict[str, Tensor]]] = []  # (global_step, live state) after each batch
        self.batch_start: list[dict[str, Tensor]] = []
        self.ema_after: list[dict[str, Tensor]] = []

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.init = _snapshot(pl_module)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self.batch_start.append(_snapshot(pl_module))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self.batches.append((trainer.global_step, _snapshot(pl_module)))
        if self.ema is not None:
            self.ema_after.append({k: v.clone() for k, v in self.ema.state_dict()["ema"].items()})


def reference_ema(
    rec: Recorder,
    decay: float,
    warmup: str,
    update_every: int = 1,
    start_step: int = 0,
    skip: frozenset[int] = frozenset(),
) -> dict[str, Tensor]:
    """The EMA recurrence in float64 over the recorded live weights (``skip``: global steps AMP skipped)."""
    ema = {k: v.double() if v.is_floating_point() else v.clone() for k, v in rec.init.items()}
    last, steps, n = 0, 0, 0
    for gstep, live in rec.batches:
        if gstep == last:
            continue
        last = gstep
        if gstep in skip:
            continue
        steps += 1
        offset = steps - start_step
        if offset < 0 or (offset == 0 and start_step == 0) or (offset > 0 and offset % update_every):
            continue
        a = 0.0 if offset == 0 else ema_decay(n + 1, decay, warmup)
        n += offset > 0
        for k, v in live.items():
            ema[k] = a * ema[k] + (1 - a) * v.double() if v.is_floating_point() else v.clone()
    return ema


def assert_matches(ema: dict[str, Tensor], ref: dict[str, Tensor], atol: float = 1e-6) -> None:
    assert set(ema) == set(ref)
    for k in ref:
        if ref[k].is_floating_point():
            torch.testing.assert_close(ema[k].double(), ref[k], atol=atol, rtol=1e-6, msg=k)
        else:
            assert ema[k].dtype == ref[k].dtype and torch.equal(ema[k], ref[k]), k


# -- the update --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("warmup", "accumulate", "update_every", "start_step"),
    [("mean_teacher", 2, 1, 0), ("timm", 1, 2, 1), ("power", 1, 1, 3)],
)
def test_update_follows_the_recurrence(warmup: str, accumulate: int, update_every: int, start_step: int) -> None:
    ema = EMATeacher(decay=0.9, warmup=warmup, update_every=update_every, start_step=start_step)  # type: ignore[arg-type]
    rec = Recorder()
    trainer, _ = fit([ema, rec], TinyNet(batchnorm=True), max_epochs=2, accumulate_grad_batches=accumulate)
    assert trainer.global_step == 8 // accumulate
    ref = reference_ema(rec, 0.9, warmup, update_every, start_step)
    assert_matches(ema.state_dict()["ema"], ref)
    expected_updates = {(2, 1, 0): 4, (1, 2, 1): 3, (1, 1, 3): 5}[(accumulate, update_every, start_step)]
    assert ema.num_updates == expected_updates
    assert trainer.callback_metrics["ema/updates"].item() == expected_updates
    assert trainer.callback_metrics["ema/decay"].item() == pytest.approx(ema_decay(expected_updates, 0.9, warmup))


class InfLossAt(TinyNet):
    """Returns an infinite loss at global step ``bad``, so AMP's GradScaler skips that optimizer step."""

    bad = 2

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = super().training_step(batch, batch_idx)
        return loss * float("inf") if self.trainer.global_step == self.bad else loss


def test_gradscaler_skipped_step_does_not_update() -> None:
    ema = EMATeacher(decay=0.8, warmup="mean_teacher")
    rec = Recorder()
    scaler = torch.amp.GradScaler("cpu")  # the real GradScaler, on CPU with fp16 autocast
    trainer, _ = fit([ema, rec], InfLossAt(), max_epochs=1, plugins=[MixedPrecision("16-mixed", "cpu", scaler)])
    assert trainer.global_step == 4  # Lightning counts the skipped step
    assert scaler.get_scale() == 2.0**15  # GradScaler did skip once: it halved its scale
    # The model did not move on the skipped step (batch index 2 ends at global step 3) ...
    before, after = rec.batches[1][1], rec.batches[2][1]
    assert all(torch.equal(before[k], after[k]) for k in before)
    # ... and neither did the EMA: 3 updates, not 4, and the warm-up counter did not advance.
    assert (ema.num_updates, ema.skipped_steps) == (3, 1)
    assert_matches(ema.state_dict()["ema"], reference_ema(rec, 0.8, "mean_teacher", skip=frozenset({3})), atol=1e-5)
    wrong = reference_ema(rec, 0.8, "mean_teacher")  # what counting global steps would give
    assert not torch.allclose(ema.state_dict()["ema"]["net.1.weight"].double(), wrong["net.1.weight"], atol=1e-5)


@contextlib.contextmanager
def forbid_host_sync() -> Iterator[None]:
    names = ["item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__"]
    saved = {n: Tensor.__dict__[n] for n in names if n in Tensor.__dict__}

    def boom(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("host synchronisation in the EMA hot path")

    try:
        for n in names:
            setattr(Tensor, n, boom)
        yield
    finally:
        for n in names:
            if n in saved:
                setattr(Tensor, n, saved[n])
            else:
                delattr(Tensor, n)


class NoSyncEMA(EMATeacher):
    calls = 0

    def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
        with forbid_host_sync():
            super().on_train_batch_end(*args, **kwargs)
        NoSyncEMA.calls += 1


def test_hot_path_has_no_host_sync() -> None:
    """The accelerator path (forced here on CPU, where a host read is free and used) never reads a value."""
    for nonfinite in ("skip", "ignore"):
        NoSyncEMA.calls = 0
        ema = NoSyncEMA(decay=0.9, nonfinite=nonfinite)  # type: ignore[arg-type]
        ema._sync_free = True
        fit([ema], TinyNet(batchnorm=True), max_steps=3)
        assert NoSyncEMA.calls == 3 and ema.num_updates == 3
    with pytest.raises(AssertionError, match="host synchronisation"), forbid_host_sync():
        bool(torch.ones(()))  # the guard itself works


# -- non-finite live weights (issue 15, defect 4) -----------------------------------------------------
class Poison(L.Callback):
    """Listed before the EMATeacher: puts a NaN into the live weights after the optimizer step of ``steps``
    (global steps after the step), and takes it out again before the next batch."""

    def __init__(self, steps: set[int]) -> None:
        self.steps = steps
        self.saved: Tensor | None = None

    def _param(self, pl_module: L.LightningModule) -> Tensor:
        return pl_module.net[1].weight  # type: ignore[index, return-value]

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if trainer.global_step in self.steps:
            with torch.no_grad():
                self.saved = self._param(pl_module).detach().clone()
                self._param(pl_module)[0, 0] = float("nan")

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self.saved is not None:
            with torch.no_grad():
                self._param(pl_module).copy_(self.saved)
            self.saved = None


@pytest.mark.parametrize("sync_free", [False, True], ids=["host-check", "sync-free"])
def test_nonfinite_live_weights_do_not_poison_the_ema(sync_free: bool) -> None:
    ema = EMATeacher(decay=0.5, warmup="none")
    ema._sync_free = sync_free
    rec = Recorder(ema)
    with pytest.warns(UserWarning, match="non-finite") as caught:
        trainer, _ = fit([Poison({2, 3}), ema, rec], TinyNet(batchnorm=True), max_steps=5)
    assert sum("non-finite" in str(w.message) for w in caught) == 1  # warned once
    after = rec.ema_after  # the EMA after each batch
    assert _equal(after[1], after[0]) and _equal(after[2], after[0])  # the two poisoned updates were skipped
    assert all(torch.isfinite(v).all() for v in after[-1].values() if v.is_floating_point())
    ref = reference_ema(rec, 0.5, "none", skip=frozenset({2, 3}))
    assert_matches(after[-1], ref)
    assert ema.skipped_nonfinite == 2
    assert trainer.callback_metrics["ema/skipped_nonfinite"].item() == 2
    assert ema.state_dict()["skipped_nonfinite"] == 2
    # The host check knows at once and does not count a skipped update; the sync-free path counts attempts.
    assert ema.num_updates == (5 if sync_free else 3)


def test_both_update_paths_give_bitwise_equal_emas() -> None:
    runs = []
    for sync_free in (False, True):
        ema = EMATeacher(decay=0.9, warmup="mean_teacher", buffers="average")
        ema._sync_free = sync_free
        L.seed_everything(0, verbose=False)
        fit([ema], TinyNet(batchnorm=True), max_steps=4)
        runs.append(ema.state_dict()["ema"])
    assert _equal(runs[0], runs[1]) and set(runs[0]) == set(runs[1])


def test_nonfinite_raise_names_the_tensor() -> None:
    with pytest.raises(FloatingPointError, match=r"non-finite.*`net\.1\.weight`.*step 2"):
        fit([Poison({2}), EMATeacher(nonfinite="raise")], TinyNet(), max_steps=4)
    with pytest.raises(ValueError, match="Expected argument `nonfinite` to be one of"):
        EMATeacher(nonfinite="zero")  # type: ignore[arg-type]


# -- resuming with other hyperparameters (issue 15, defect 6) -----------------------------------------
class EMAAtTrainStart(L.Callback):
    def __init__(self, ema: EMATeacher) -> None:
        self.ema = ema
        self.state: dict[str, Tensor] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.state = {k: v.clone() for k, v in self.ema.state_dict()["ema"].items()}


def _first_run(tmp_path: Path) -> tuple[EMATeacher, Path]:
    ema = EMATeacher(decay=0.9)
    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="last", save_on_train_epoch_end=True)
    fit([ema, ckpt], TinyNet(), max_epochs=1, enable_checkpointing=True)
    return ema, tmp_path / "last.ckpt"


def test_changed_hyperparameters_restore_the_ema_and_warn(tmp_path: Path) -> None:
    first, path = _first_run(tmp_path)
    resumed = EMATeacher(decay=0.99, warmup="timm")
    assert resumed.state_key == first.state_key == "EMATeacher"  # hyperparameters are not part of the key
    probe = EMAAtTrainStart(resumed)
    with pytest.warns(UserWarning, match=r"decay: 0\.9 -> 0\.99.*warmup: 'mean_teacher' -> 'timm'"):
        fit([resumed, probe], TinyNet(), ckpt_path=str(path), max_epochs=2)
    assert _equal(probe.state, torch.load(path, weights_only=False)["callbacks"]["EMATeacher"]["ema"])
    assert resumed.num_updates == first.num_updates + 4


def test_checkpoint_with_the_old_state_key_still_resumes(tmp_path: Path) -> None:
    first, path = _first_run(tmp_path)
    ckpt = torch.load(path, weights_only=False)
    state = ckpt["callbacks"].pop("EMATeacher")
    state.pop("hparams")  # as written before the key became stable
    old_key = "EMATeacher{'decay': 0.9, 'warmup': 'mean_teacher', 'include': None, 'exclude': None}"
    ckpt["callbacks"][old_key] = state
    old = tmp_path / "old.ckpt"
    torch.save(ckpt, old)
    resumed = EMATeacher(decay=0.999)
    probe = EMAAtTrainStart(resumed)
    with pytest.warns(UserWarning, match=r"decay: 0\.9 -> 0\.999"):
        fit([resumed, probe], TinyNet(), ckpt_path=str(old), max_epochs=2)
    assert _equal(probe.state, state["ema"]) and resumed.num_updates == first.num_updates + 4


def test_several_ema_teachers_need_distinct_keys() -> None:
    fast, slow = EMATeacher(decay=0.9, key="fast"), EMATeacher(decay=0.99, key="slow")
    assert fast.state_key != slow.state_key
    fit([fast, slow], TinyNet(), max_steps=2)
    assert fast.num_updates == slow.num_updates == 2
    with pytest.raises(RuntimeError, match="state_key"):
        fit([EMATeacher(decay=0.9), EMATeacher(decay=0.99)], TinyNet(), max_steps=1)
    with pytest.raises(TypeError, match="Expected argument `key` to be a str"):
        EMATeacher(key=3)  # type: ignore[arg-type]


# -- evaluation with the EMA weights ---------------------------------------------------------------
class ValNet(TinyNet):
    """Records the weights it validates with; optionally raises in the middle of one validation run."""

    def __init__(self, raise_at_val: int | None = None) -> None:
        super().__init__(batchnorm=True)
        self.raise_at_val = raise_at_val
        self.seen: list[dict[str, Tensor]] = []

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        if batch_idx == 0:
            self.seen.append(_snapshot(self))
        if self.raise_at_val is not None and len(self.seen) == self.raise_at_val and batch_idx == 1:
            raise RuntimeError("validation failed")
        super().validation_step(batch, batch_idx)


class SaveDuringValidation(L.Callback):
    def __init__(self, path: Path, at_val: int) -> None:
        self.path, self.at_val, self.count = path, at_val, 0

    def on_validation_batch_end(
        self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if batch_idx == 0 and not trainer.sanity_checking:
            self.count += 1
            if self.count == self.at_val:
                trainer.save_checkpoint(self.path)


def _equal(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    return all(torch.equal(a[k], b[k]) for k in b)


def test_validation_uses_live_weights_before_first_update_then_ema_without_leaking(tmp_path: Path) -> None:
    ema = EMATeacher(decay=0.5, warmup="none", start_step=2)  # no update in steps 1-2 (reset at 2), then 3, 4, ...
    rec = Recorder(ema)
    model = ValNet()
    ckpt = tmp_path / "in_val.ckpt"
    trainer = L.Trainer(
        callbacks=[ema, rec, SaveDuringValidation(ckpt, at_val=4)],
        max_steps=4,
        val_check_interval=1,
        limit_val_batches=2,
        num_sanity_val_steps=1,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    L.seed_everything(0, verbose=False)
    trainer.fit(model, make_loader(), make_loader(indexed=False, shuffle=False))
    assert len(model.seen) == 5  # sanity check + after each of the 4 steps
    # Before the first update, validation sees the live weights (not the stale fit-start EMA).
    assert _equal(model.seen[0], rec.init)
    assert _equal(model.seen[1], rec.batches[0][1]) and _equal(model.seen[2], rec.batches[1][1])
    assert not _equal(model.seen[2], rec.init)
    # After it, validation sees the EMA weights, which differ from the live ones.
    for i in (3, 4):
        assert _equal(model.seen[i], rec.ema_after[i - 1])
        assert not _equal(model.seen[i], rec.batches[i - 1][1])
    # Nothing leaks into training: each batch starts from the previous batch's live weights, and so does the end.
    for prev, start in zip(rec.batches, rec.batch_start[1:]):
        assert _equal(start, prev[1])
    assert _equal(_snapshot(model), rec.batches[-1][1]) and not ema.is_swapped
    # A checkpoint saved while swapped holds the live weights as "state_dict" and the EMA in the callback state.
    saved = torch.load(ckpt, weights_only=False)
    assert _equal(saved["state_dict"], rec.batches[3][1])
    assert _equal(saved["callbacks"][ema.state_key]["ema"], rec.ema_after[3])


def test_swap_is_reverted_when_validation_raises_mid_epoch() -> None:
    ema = EMATeacher(decay=0.5, warmup="none")
    rec = Recorder(ema)
    model = ValNet(raise_at_val=1)  # validation after step 2 (mid-epoch) raises on its second batch
    trainer = L.Trainer(
        callbacks=[ema, rec],
        max_epochs=1,
        val_check_interval=2,
        limit_val_batches=2,
        num_sanity_val_steps=0,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    L.seed_everything(0, verbose=False)
    with pytest.raises(RuntimeError, match="validation failed"):
        trainer.fit(model, make_loader(), make_loader(indexed=False, shuffle=False))
    assert trainer.global_step == 2
    assert _equal(model.seen[0], rec.ema_after[1])  # validation did run with the EMA weights
    assert not ema.is_swapped
    assert _equal(_snapshot(model), rec.batches[1][1])  # the live weights are back


# -- checkpoints and export ----------------------------------------------------------------------------
def test_checkpoint_holds_live_weights_and_ema_and_export_round_trips(tmp_path: Path) -> None:
    ema = EMATeacher(decay=0.9)
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path, filename="last", save_on_train_epoch_end=True)
    _, model = fit([ema, ckpt_cb], TinyNet(batchnorm=True), max_epochs=1, enable_checkpointing=True)
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert _equal(ckpt["state_dict"], _snapshot(model))
    state = ckpt["callbacks"][ema.state_key]
    assert state["num_updates"] == 4 and _equal(state["ema"], ema.state_dict()["ema"])

    exported = export_ema_state_dict(ema)
    assert _equal(export_ema_state_dict(tmp_path / "last.ckpt"), exported)
    fresh = TinyNet(batchnorm=True)
    fresh.load_state_dict(exported, strict=True)
    assert _equal(_snapshot(fresh), ema.state_dict()["ema"])
    assert not _equal(_snapshot(fresh), _snapshot(model))
    torch.testing.assert_close(fresh.eval()(X), ema.teacher_forward(X), atol=0, rtol=0)


class CompiledNet(TinyNet):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.compile(self.net, backend="eager")  # state-dict keys get an `_orig_mod.` component


def test_export_strips_compile_and_ddp_prefixes() -> None:
    ema = EMATeacher(decay=0.9)
    _, model = fit([ema], CompiledNet(), max_steps=3)
    assert any("_orig_mod." in k for k in model.state_dict())
    exported = export_ema_state_dict(ema)
    fresh = TinyNet()
    fresh.load_state_dict(exported, strict=True)
    torch.testing.assert_close(fresh.eval()(X), ema.teacher_forward(X))
    # A checkpoint written through a DDP wrapper (`module.` prefix) exports to the same plain keys.
    ckpt = {
        "state_dict": {"module." + k: v for k, v in model.state_dict().items()},
        "callbacks": {ema.state_key: ema.state_dict()},
    }
    assert _equal(export_ema_state_dict(ckpt), exported)
    assert clean_state_dict_key("module.module._orig_mod.a.module.b") == "a.module.b"


def test_export_needs_an_unambiguous_state() -> None:
    with pytest.raises(KeyError, match="no `EMATeacher` state"):
        export_ema_state_dict({"state_dict": {}, "callbacks": {}})
    two = {"callbacks": {"EMATeacher{'decay': 0.9}": {"ema": {}}, "EMATeacher{'decay': 0.99}": {"ema": {}}}}
    with pytest.raises(KeyError, match="several"):
        export_ema_state_dict(two)
    assert export_ema_state_dict(two, state_key="EMATeacher{'decay': 0.9}") == {}


def test_load_rejects_other_versions_and_other_models() -> None:
    with pytest.raises(ValueError, match="version 1"):
        EMATeacher().load_state_dict({"version": 99})
    ema = EMATeacher(decay=0.9)
    fit([ema], TinyNet(), max_steps=1)
    bad = {**ema.state_dict(), "ema": {"other.weight": torch.zeros(3)}}
    with pytest.raises(ValueError, match="matches none"):
        ema.load_state_dict(bad)


# -- buffers, patterns, teacher -------------------------------------------------------------------------
def test_buffers_average_copy_keep_and_integer_buffers_are_copied() -> None:
    runs = {}
    for mode in ("average", "copy", "keep"):
        ema = EMATeacher(decay=0.9, warmup="none", buffers=mode, teacher_mode="train")  # type: ignore[arg-type]
        _, model = fit([ema], TinyNet(batchnorm=True), max_steps=4)
        runs[mode] = (ema.state_dict()["ema"], _snapshot(model))
    for ema_state, live in runs.values():
        assert ema_state["net.2.num_batches_tracked"].dtype == torch.long
        assert torch.equal(ema_state["net.2.num_batches_tracked"], live["net.2.num_batches_tracked"])  # copied: 4
    avg, live = runs["average"]
    assert not torch.allclose(avg["net.2.running_mean"], live["net.2.running_mean"])
    assert torch.equal(runs["copy"][0]["net.2.running_mean"], runs["copy"][1]["net.2.running_mean"])
    assert torch.equal(runs["keep"][0]["net.2.running_mean"], torch.zeros(32))  # untouched without teacher passes


def test_keep_buffers_in_eval_mode_warns() -> None:
    with pytest.warns(UserWarning, match="known failure mode"):
        fit([EMATeacher(buffers="keep", teacher_mode="eval")], TinyNet(batchnorm=True), max_steps=1)


def test_include_exclude_patterns() -> None:
    ema = EMATeacher(decay=0.9, exclude=["net.5.*", "*.num_batches_tracked"])
    _, model = fit([ema], TinyNet(batchnorm=True), max_steps=3)
    state = ema.state_dict()["ema"]
    assert "net.5.weight" not in state and "net.2.num_batches_tracked" not in state and "net.1.weight" in state
    exported = export_ema_state_dict(ema)
    assert torch.equal(exported["net.5.weight"], model.net[5].weight)  # untracked: the live value
    assert not torch.equal(exported["net.1.weight"], model.net[1].weight)

    only = EMATeacher(include=["net.1.*"])
    fit([only], TinyNet(), max_steps=1)
    assert sorted(only.state_dict()["ema"]) == ["net.1.bias", "net.1.weight"]
    with pytest.raises(ValueError, match="matched no parameter"):
        fit([EMATeacher(include=["encoder.*"])], TinyNet(), max_steps=1)


def test_teacher_forward_uses_ema_without_touching_the_live_model() -> None:
    with pytest.raises(RuntimeError, match=r"once `trainer\.fit` has started"):
        EMATeacher().teacher_forward(X)
    ema = EMATeacher(decay=0.9, buffers="keep", teacher_mode="train")
    trainer, model = fit([ema], TinyNet(batchnorm=True, dropout=0.5), max_steps=3)
    assert find_teacher(trainer) is ema and isinstance(ema, TeacherProvider) and ema.has_updated
    live = _snapshot(model)
    model.train()
    model.net[2].eval()  # a user-frozen BatchNorm: its mode must survive a teacher call
    before = ema.state_dict()["ema"]["net.2.running_mean"].clone()
    out = ema.teacher_forward(X)
    assert not out.requires_grad
    assert model.training and not model.net[2].training and model.net[3].training
    assert _equal(_snapshot(model), live)
    # train mode + buffers="keep": the teacher's own pass moved its BatchNorm statistics (Mean Teacher), not live ones
    assert not torch.equal(ema.state_dict()["ema"]["net.2.running_mean"], before)

    ema.teacher_mode = "eval"
    fresh = TinyNet(batchnorm=True, dropout=0.5)
    fresh.load_state_dict(export_ema_state_dict(ema))
    torch.testing.assert_close(ema.teacher_forward(X), fresh.eval()(X), atol=0, rtol=0)
    assert model.training


# -- strategies ----------------------------------------------------------------------------------------
def test_unsupported_strategies_raise_in_setup() -> None:
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

    ema = EMATeacher()
    for strategy, match in [
        (object.__new__(DeepSpeedStrategy), "does not support DeepSpeed"),
        (object.__new__(ModelParallelStrategy), "does not support the `ModelParallelStrategy`"),
        (FSDPStrategy(state_dict_type="sharded"), "state_dict_type='full'"),
        (FSDPStrategy(use_orig_params=False), "use_orig_params=True"),
    ]:
        with pytest.raises(RuntimeError, match=match):
            ema.setup(types.SimpleNamespace(strategy=strategy), TinyNet(), "fit")  # type: ignore[arg-type]


class CaptureAtTrainEnd(L.Callback):
    """Listed after the EMATeacher: takes its state inside the run (under FSDP ``state_dict()`` is a collective)."""

    def __init__(self, ema: EMATeacher) -> None:
        self.ema = ema
        self.state: dict[str, Tensor] = {}

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.state = {k: v.detach().cpu().clone() for k, v in self.ema.state_dict()["ema"].items()}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="FSDP needs a CUDA GPU")
def test_fsdp_keeps_shard_ema_and_resumes(tmp_path: Path) -> None:
    # One GPU in-process (several would re-launch pytest per rank): FSDP's code paths, sharding trivially.
    kw: dict[str, Any] = dict(accelerator="gpu", devices=1, strategy="fsdp", max_epochs=2)
    ema = EMATeacher(decay=0.9, warmup="mean_teacher")
    rec, cap = Recorder(), CaptureAtTrainEnd(ema)
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1, filename="{step}")
    fit([ema, rec, cap, ckpt_cb], TinyNet(), enable_checkpointing=True, **kw)
    ref = reference_ema(rec, 0.9, "mean_teacher")
    assert_matches(cap.state, {k: v.cpu() for k, v in ref.items()}, atol=1e-5)
    saved = torch.load(tmp_path / "step=3.ckpt", weights_only=False)
    assert set(saved["callbacks"][ema.state_key]["ema"]) == set(ref)  # the gathered, full EMA
    resumed = EMATeacher(decay=0.9, warmup="mean_teacher")
    cap2 = CaptureAtTrainEnd(resumed)
    fit([resumed, cap2], TinyNet(), ckpt_path=str(tmp_path / "step=3.ckpt"), **kw)
    assert resumed.num_updates == ema.num_updates
    assert set(cap2.state) == set(cap.state)
    for k in cap.state:
        torch.testing.assert_close(cap2.state[k], cap.state[k], atol=1e-6, rtol=1e-5)


def test_benchmark_parameter_sets_have_the_advertised_sizes() -> None:
    from benchmarks.ema import resnet50_shapes, transformer_shapes

    rn, tf = resnet50_shapes(), transformer_shapes()
    assert (len(rn), sum(torch.Size(s).numel() for s in rn)) == (161, 25_557_032)  # torchvision's resnet50()
    assert len(tf) == 304 and 9.5e6 < sum(torch.Size(s).numel() for s in tf) < 10.5e6


# -- GPU: GradScaler skips, the sync-free non-finite path, overlap ---------------------------------------
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _cpu(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().cpu() for k, v in state.items()}


@pytest.mark.gpu
@needs_cuda
def test_gradscaler_skipped_step_does_not_update_on_gpu() -> None:
    ema = EMATeacher(decay=0.8, warmup="mean_teacher")
    rec = Recorder()
    trainer, _ = fit([ema, rec], InfLossAt(), max_epochs=1, accelerator="gpu", precision="16-mixed")
    scaler = trainer.precision_plugin.scaler  # type: ignore[attr-defined]
    assert trainer.global_step == 4 and scaler.get_scale() < 2.0**16  # the scaler skipped and backed off
    before, after = rec.batches[1][1], rec.batches[2][1]
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert (ema.num_updates, ema.skipped_steps) == (3, 1)
    ref = _cpu(reference_ema(rec, 0.8, "mean_teacher", skip=frozenset({3})))
    assert_matches(_cpu(ema.state_dict()["ema"]), ref, atol=1e-5)


class SyncCheckedEMA(EMATeacher):
    """Raises on any host synchronisation inside the update (CUDA's sync debug mode)."""

    def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
        torch.cuda.set_sync_debug_mode("error")
        try:
            super().on_train_batch_end(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
@needs_cuda
def test_nonfinite_weights_on_gpu_are_skipped_without_a_host_sync() -> None:
    ema = SyncCheckedEMA(decay=0.5, warmup="none")
    rec = Recorder(ema)
    with pytest.warns(UserWarning, match="non-finite"):
        fit([Poison({2, 3}), ema, rec], TinyNet(batchnorm=True), max_steps=5, accelerator="gpu")
    after = [_cpu(a) for a in rec.ema_after]
    assert _equal(after[1], after[0]) and _equal(after[2], after[0])
    assert ema.skipped_nonfinite == 2 and ema.num_updates == 5  # attempts: the host never read the flag
    assert_matches(after[-1], _cpu(reference_ema(rec, 0.5, "none", skip=frozenset({2, 3}))), atol=1e-6)


@pytest.mark.gpu
@needs_cuda
def test_overlap_on_a_side_stream_matches_the_default_stream() -> None:
    runs = []
    for overlap in (False, True):
        ema = EMATeacher(decay=0.9, warmup="mean_teacher", overlap=overlap, teacher_mode="eval")
        cap = CaptureAtTrainEnd(ema)
        L.seed_everything(0, verbose=False)
        fit([ema, cap], TinyNet(batchnorm=True), max_steps=6, accelerator="gpu")
        assert (ema._stream is not None) == overlap
        runs.append((cap.state, ema.teacher_forward(X.cuda()).cpu()))
    (a, ya), (b, yb) = runs
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5, msg=k)
    torch.testing.assert_close(ya, yb, atol=1e-5, rtol=1e-5)


def test_logs_only_on_logging_steps_and_the_last_batch() -> None:
    """Issue 16: per-step scalars reach `self.log` only when Lightning hands them to the logger."""
    logged: list[tuple[int, str]] = []

    class Spy(TinyNet):
        def log(self, name: str, value: Any, *args: Any, **kwargs: Any) -> None:
            if name.startswith("ema/"):
                logged.append((self.trainer.global_step, name))
            super().log(name, value, *args, **kwargs)

    ema = EMATeacher(decay=0.9)
    trainer, _ = fit([ema], Spy(), loader=make_loader(n=64, batch_size=4), max_epochs=1, log_every_n_steps=5)
    steps = sorted({s for s, _ in logged})
    assert steps == [5, 10, 15, 16]  # logging steps 5, 10, 15 and the epoch's last batch (global_step after the step)
    assert {n for s, n in logged if s == 16} == {"ema/decay", "ema/updates", "ema/skipped_nonfinite"}
    assert trainer.callback_metrics["ema/updates"].item() == ema.num_updates == 16  # the final value is exact
