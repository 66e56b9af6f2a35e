"""The conformance suite on dense and sequence outputs, and the "no state change outside training" check.

Every registered case lists the layouts it supports in ``Case.layouts`` (``"dense"``: ``(B, C, H, W)`` logits
with ignored pixels and one all-ignored image; ``"tokens"``: ``(B, T, C)`` logits with padding). Each gets the
dense math, training, exact mid-epoch resume, 2-process DDP and bf16-mixed checks on that layout. A loss-side
case that does not support a layout must say so with a clear error (``Case.refuses``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from tests.conformance.ddp_worker import run as run_worker
from tests.conformance.registry import Case, load_all
from tests.helpers import (
    StepSeed,
    assert_state_equal,
    fit,
    make_loader,
    make_model,
    run_ddp_script,
    trainer_kwargs,
)

CASES = load_all()
DENSE = ("dense", "tokens")
PAIRS = sorted((name, layout) for name, case in CASES.items() for layout in case.layouts)
PAIR_IDS = [f"{n}-{layout}" for n, layout in PAIRS]
REFUSALS = sorted(
    (name, layout) for name, case in CASES.items() if case.loss_side for layout in DENSE if layout not in case.layouts
)


def _cbs(case: Case) -> list[Any]:
    return [case.factory(), *case.extra_callbacks()]


def _fit(case: Case, layout: str, **kw: Any) -> tuple[L.Trainer, L.LightningModule]:
    loader = kw.pop("loader", None) or make_loader(layout=layout)
    cbs = kw.pop("callbacks", None) or _cbs(case)
    return fit(cbs, make_model(layout, **case.model_kwargs), loader, **case.trainer_overrides, **kw)


def test_every_case_declares_valid_layouts() -> None:
    for name, case in CASES.items():
        assert set(case.layouts) <= set(DENSE), f"{name}: unknown layouts {case.layouts}"
        if "dense" in case.layouts and case.loss_side:
            assert case.dense_math is not None, f"{name} supports dense outputs but registers no dense math check"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", sorted(n for n, c in CASES.items() if c.dense_math is not None))
def test_dense_math(name: str, dtype: torch.dtype) -> None:
    CASES[name].dense_math(dtype)  # type: ignore[misc]


@pytest.mark.parametrize(("name", "layout"), PAIRS, ids=PAIR_IDS)
def test_trains_on_layout(name: str, layout: str) -> None:
    trainer, _ = _fit(CASES[name], layout, max_epochs=2)
    assert trainer.global_step == 8
    assert "train/loss" in trainer.callback_metrics
    for key, value in trainer.callback_metrics.items():
        assert math.isfinite(float(value)), f"{key} is not finite"


@pytest.mark.parametrize(("name", "layout"), PAIRS, ids=PAIR_IDS)
def test_resume_mid_epoch_is_exact_on_layout(name: str, layout: str, tmp_path: Path) -> None:
    case = CASES[name]
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=6, save_top_k=-1, filename="{step}")
    full = _cbs(case)
    _, full_model = _fit(case, layout, callbacks=[*full, ckpt_cb], max_epochs=3, enable_checkpointing=True)
    resumed = _cbs(case)
    _, resumed_model = _fit(case, layout, callbacks=resumed, ckpt_path=str(tmp_path / "step=6.ckpt"), max_epochs=3)
    assert_state_equal(full_model.state_dict(), resumed_model.state_dict(), "model")
    for a, b in zip(full, resumed):
        assert_state_equal(a.state_dict(), b.state_dict(), type(a).__name__)


@pytest.mark.parametrize(("name", "layout"), PAIRS, ids=PAIR_IDS)
def test_ddp_two_process_cpu_on_layout(name: str, layout: str, tmp_path: Path) -> None:
    case = CASES[name]
    run_ddp_script("tests.conformance.ddp_worker", name, str(tmp_path), "ddp", layout, timeout=300)
    r0 = torch.load(tmp_path / "ddp_rank0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "ddp_rank1.pt", weights_only=False)
    assert_state_equal(r0["model"], r1["model"], "model(rank0 vs rank1)")
    assert_state_equal(r0["callbacks"], r1["callbacks"], "callbacks(rank0 vs rank1)", atol=1e-6)
    # The base loss is each rank's mean over its valid elements, as `F.cross_entropy` under DDP: ranks with
    # different numbers of valid pixels/tokens weigh them differently from one process on the joint batch,
    # so on these layouts DDP is checked for agreement between ranks, and against a single process only where
    # the case says its state does not depend on that weighting.
    if case.ddp_matches_single and layout in case.ddp_matches_single_layouts:
        single = run_worker(name, str(tmp_path), "single", layout)
        assert_state_equal(r0["model"], single["model"], "model(ddp vs single)", atol=1e-5, rtol=1e-4)
        assert_state_equal(r0["callbacks"], single["callbacks"], "callbacks(ddp vs single)", atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(("name", "layout"), PAIRS, ids=PAIR_IDS)
def test_bf16_mixed_on_layout(name: str, layout: str) -> None:
    case = CASES[name]
    L.seed_everything(0, verbose=False)
    _, m32 = _fit(case, layout, max_epochs=2)
    L.seed_everything(0, verbose=False)
    t16, m16 = _fit(case, layout, max_epochs=2, precision="bf16-mixed")
    for key, value in t16.callback_metrics.items():
        assert math.isfinite(float(value)), f"{key} is not finite under bf16-mixed"
    a = torch.cat([p.detach().flatten() for p in m32.parameters()])
    b = torch.cat([p.detach().flatten() for p in m16.parameters()])
    rel = float((a - b).norm() / a.norm())
    assert rel <= case.bf16_rtol, f"bf16-mixed weights differ from fp32 by {rel:.3g} > {case.bf16_rtol}"


@pytest.mark.parametrize(("name", "layout"), REFUSALS, ids=[f"{n}-{layout}" for n, layout in REFUSALS])
def test_unsupported_layout_is_a_clear_error(name: str, layout: str) -> None:
    case = CASES[name]
    assert layout in case.refuses, f"{name} neither supports nor refuses {layout!r} outputs (set Case.refuses)"
    with pytest.raises((ValueError, TypeError)) as info:
        _fit(case, layout, max_epochs=1)
    assert case.refuses[layout] in str(info.value), str(info.value)


# -- no state change outside training ---------------------------------------------------------------------------
def _with_validation_loss(layout: str, **model_kwargs: Any) -> L.LightningModule:
    """The layout's tiny model, whose validation_step runs the regularization pipeline too."""
    base = type(make_model(layout, **model_kwargs))

    class ValidatesWithPipeline(base):  # type: ignore[valid-type, misc]
        def validation_step(self, batch: Any, batch_idx: int) -> None:
            x, y, index = batch
            loss = self.regularized_loss(self(x), y, index, x=x, log=False)
            self.log("val/loss", loss, batch_size=len(y))

    return ValidatesWithPipeline(**model_kwargs)


@pytest.mark.parametrize("name", sorted(n for n, c in CASES.items() if c.loss_side))
def test_no_state_change_outside_training(name: str) -> None:
    """Sanity-check and validation steps that run the pipeline leave every callback's state as without them."""
    case = CASES[name]
    states = []
    for with_val in (False, True):
        L.seed_everything(0, verbose=False)
        cbs = _cbs(case)
        model = _with_validation_loss("classification", **case.model_kwargs)
        kw = trainer_kwargs(max_epochs=2, **case.trainer_overrides)
        if with_val:
            kw.update(num_sanity_val_steps=2)
        trainer = L.Trainer(callbacks=[*cbs, StepSeed()], **kw)
        val = make_loader(32, batch_size=8, seed=1, shuffle=False) if with_val else None
        trainer.fit(model, train_dataloaders=make_loader(), val_dataloaders=val)
        states.append([cb.state_dict() for cb in cbs])
    assert_state_equal(states[0], states[1], f"{name}: state with validation vs without")
