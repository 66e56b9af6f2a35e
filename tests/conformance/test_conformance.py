"""The conformance suite: every registered regularizer passes the same checks (DESIGN.md, "Tests")."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from torch.utils.data import DataLoader

from lightning_reg.core.protocol import LossRegularizer, MissingIndexError
from lightning_reg.data import IndexedDataset
from tests.conformance.ddp_worker import run as run_worker
from tests.conformance.registry import Case, load_all
from tests.helpers import TinyNet, assert_state_equal, fit, make_dataset, make_loader, run_ddp_script

CASES = load_all()
IDS = sorted(CASES)
ROOT = Path(__file__).resolve().parents[2]


def _case(name: str) -> Case:
    return CASES[name]


def _callbacks(case: Case) -> list[Any]:
    return [case.factory(), *case.extra_callbacks()]


# 1. Math ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("name", IDS)
def test_math(name: str, dtype: torch.dtype) -> None:
    case = _case(name)
    assert case.math is not None, f"{name} registers no math check"
    case.math(dtype)


# 2. Training --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", IDS)
def test_trains_and_logs_finite(name: str) -> None:
    case = _case(name)
    trainer, _ = fit(_callbacks(case), TinyNet(**case.model_kwargs), max_epochs=2, **case.trainer_overrides)
    assert trainer.global_step == 8
    metrics = trainer.callback_metrics
    assert "train/loss" in metrics
    for key, value in metrics.items():
        assert math.isfinite(float(value)), f"{key} is not finite"


# 3. Resume ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["mid_epoch", "epoch_boundary"])
@pytest.mark.parametrize("name", IDS)
def test_resume_is_exact(name: str, where: str, tmp_path: Path) -> None:
    case = _case(name)
    if where == "mid_epoch":
        ckpt_cb = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=6, save_top_k=-1, filename="{step}")
        ckpt = tmp_path / "step=6.ckpt"
    else:
        ckpt_cb = ModelCheckpoint(
            dirpath=tmp_path, every_n_epochs=1, save_top_k=-1, filename="{epoch}", save_on_train_epoch_end=True
        )
        ckpt = tmp_path / "epoch=0.ckpt"
    full_cbs = _callbacks(case)
    _, full_model = fit(
        [*full_cbs, ckpt_cb],
        TinyNet(**case.model_kwargs),
        max_epochs=3,
        enable_checkpointing=True,
        **case.trainer_overrides,
    )
    assert ckpt.exists()
    resumed_cbs = _callbacks(case)
    _, resumed_model = fit(
        resumed_cbs, TinyNet(**case.model_kwargs), ckpt_path=str(ckpt), max_epochs=3, **case.trainer_overrides
    )
    assert_state_equal(full_model.state_dict(), resumed_model.state_dict(), "model")
    for a, b in zip(full_cbs, resumed_cbs):
        assert_state_equal(a.state_dict(), b.state_dict(), type(a).__name__)


# 4. DDP -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", IDS)
def test_ddp_two_process_cpu(name: str, tmp_path: Path) -> None:
    case = _case(name)
    run_ddp_script("tests.conformance.ddp_worker", name, str(tmp_path), "ddp", timeout=300)
    r0 = torch.load(tmp_path / "ddp_rank0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "ddp_rank1.pt", weights_only=False)
    assert_state_equal(r0["model"], r1["model"], "model(rank0 vs rank1)")
    assert_state_equal(r0["callbacks"], r1["callbacks"], "callbacks(rank0 vs rank1)", atol=1e-6)
    if case.ddp_matches_single:
        single = run_worker(name, str(tmp_path), "single")
        assert single["global_step"] == r0["global_step"]
        assert_state_equal(r0["model"], single["model"], "model(ddp vs single)", atol=1e-5, rtol=1e-4)
        assert_state_equal(r0["callbacks"], single["callbacks"], "callbacks(ddp vs single)", atol=1e-5, rtol=1e-4)


# 5. Precision -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", IDS)
def test_bf16_mixed_matches_fp32(name: str) -> None:
    case = _case(name)
    # Both models must start from the same weights, whatever RNG state earlier tests left behind.
    L.seed_everything(0, verbose=False)
    _, m32 = fit(_callbacks(case), TinyNet(**case.model_kwargs), max_epochs=2, **case.trainer_overrides)
    L.seed_everything(0, verbose=False)
    t16, m16 = fit(
        _callbacks(case), TinyNet(**case.model_kwargs), max_epochs=2, precision="bf16-mixed", **case.trainer_overrides
    )
    for key, value in t16.callback_metrics.items():
        assert math.isfinite(float(value)), f"{key} is not finite under bf16-mixed"
    a = torch.cat([p.detach().flatten() for p in m32.parameters()])
    b = torch.cat([p.detach().flatten() for p in m16.parameters()])
    rel = float((a - b).norm() / a.norm())
    assert rel <= case.bf16_rtol, f"bf16-mixed weights differ from fp32 by {rel:.3g} > {case.bf16_rtol}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="16-mixed needs a CUDA GPU")
@pytest.mark.parametrize("name", IDS)
def test_16_mixed_on_gpu(name: str) -> None:
    case = _case(name)
    trainer, _ = fit(
        _callbacks(case),
        TinyNet(**case.model_kwargs),
        max_epochs=2,
        accelerator="gpu",
        precision="16-mixed",
        **case.trainer_overrides,
    )
    for key, value in trainer.callback_metrics.items():
        assert math.isfinite(float(value)), f"{key} is not finite under 16-mixed"


# 6. CLI / YAML ------------------------------------------------------------------------------------
def _cli(callbacks: list[dict[str, Any]]) -> LightningCLI:
    config = {"trainer": {"callbacks": callbacks, "logger": False, "accelerator": "cpu"}, "model": {}}
    return LightningCLI(TinyNet, run=False, args=config, save_config_kwargs={"overwrite": True})


@pytest.mark.parametrize("name", IDS)
def test_yaml_class_path_alone(name: str) -> None:
    case = _case(name)
    cli = _cli([{"class_path": case.class_path}])
    cls_name = case.class_path.rsplit(".", 1)[1]
    assert any(type(cb).__name__ == cls_name for cb in cli.trainer.callbacks)


@pytest.mark.parametrize("name", IDS)
def test_yaml_every_documented_argument(name: str) -> None:
    case = _case(name)
    cli = _cli([{"class_path": case.class_path, "init_args": case.full_init_args}])
    cls_name = case.class_path.rsplit(".", 1)[1]
    cb = next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == cls_name)
    for key, value in case.full_init_args.items():
        got = getattr(cb, key)
        if isinstance(value, (bool, int, float, str)) and isinstance(got, (bool, int, float, str)):
            assert got == value, f"{key}: {got!r} != {value!r}"
        else:
            assert got is not None


# 7. Composition -----------------------------------------------------------------------------------
def _composed() -> list[Any]:
    cbs: list[Any] = []
    seen: set[str] = set()
    for name in IDS:
        case = CASES[name]
        if not case.composable:
            continue
        for cb in _callbacks(case):
            if type(cb).__name__ not in seen:
                seen.add(type(cb).__name__)
                cbs.append(cb)
    return cbs


def _composed_model_kwargs() -> dict[str, Any]:
    kw: dict[str, Any] = {}
    for case in CASES.values():
        if case.composable:
            kw.update(case.model_kwargs)
    return kw


def test_all_regularizers_compose_train_and_resume(tmp_path: Path) -> None:
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=6, save_top_k=-1, filename="{step}")
    full = _composed()
    _, full_model = fit([*full, ckpt_cb], TinyNet(**_composed_model_kwargs()), max_epochs=3, enable_checkpointing=True)
    resumed = _composed()
    _, resumed_model = fit(
        resumed, TinyNet(**_composed_model_kwargs()), ckpt_path=str(tmp_path / "step=6.ckpt"), max_epochs=3
    )
    assert_state_equal(full_model.state_dict(), resumed_model.state_dict(), "model")
    for a, b in zip(full, resumed):
        assert_state_equal(a.state_dict(), b.state_dict(), type(a).__name__)


# 8. Bad input -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", IDS)
def test_bad_arguments_raise_clearly(name: str) -> None:
    case = _case(name)
    assert case.bad_args, f"{name} registers no bad-argument examples"
    cls = type(case.factory())
    for kwargs, exc, match in case.bad_args:
        with pytest.raises(exc) as info:
            cls(**kwargs)
        assert match in str(info.value), f"{kwargs}: {info.value}"


@pytest.mark.parametrize("name", IDS)
def test_missing_index_is_a_clear_error(name: str) -> None:
    case = _case(name)
    if not case.requires_index:
        pytest.skip("keeps no per-sample state")
    with pytest.raises(MissingIndexError, match="IndexedDataset"):
        fit(
            _callbacks(case),
            TinyNet(**case.model_kwargs),
            make_loader(indexed=False),
            max_epochs=1,
            **case.trainer_overrides,
        )


class _NaNAfter(TinyNet):
    """Produces NaN logits from global step 2 on."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        if self.trainer.global_step >= 2:
            out = out * float("nan")
        return out


@pytest.mark.parametrize("name", IDS)
def test_nan_logits_raise_without_corrupting_state(name: str) -> None:
    case = _case(name)
    cbs = _callbacks(case)
    model = _NaNAfter(**case.model_kwargs)
    before: dict[str, Any] = {}

    class Snapshot(L.Callback):
        def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
            if trainer.global_step == 2:
                before.update({type(cb).__name__: cb.state_dict() for cb in cbs})

    with pytest.raises(FloatingPointError, match="non-finite logits"):
        fit([*cbs, Snapshot()], model, max_epochs=2, **case.trainer_overrides)
    for cb in cbs:
        if isinstance(cb, LossRegularizer):
            assert_state_equal(before[type(cb).__name__], cb.state_dict(), type(cb).__name__)


@pytest.mark.parametrize("name", IDS)
def test_wrong_label_range_is_a_clear_error(name: str) -> None:
    case = _case(name)
    base = make_dataset(64)
    bad = DataLoader(IndexedDataset(base, labels=base.tensors[1] + 10), batch_size=16)
    with pytest.raises(ValueError, match=r"Expected labels in \[0, 4\)"):
        fit(_callbacks(case), TinyNet(**case.model_kwargs), bad, max_epochs=1, **case.trainer_overrides)
