"""The conformance checks as plain functions: each runs one check on one case and raises ``AssertionError``.

:func:`~lightning_reg.testing.conformance_tests` wraps them into parametrized pytest tests; call them
directly to use them from another test runner or to check one thing while developing::

    from lightning_reg.testing import checks
    checks.check_resume(case, tmp_dir, where="mid_epoch")

They need no pytest. Every run is seeded (:func:`~lightning_reg.testing.fit`), on CPU, with the tiny models
and data of :mod:`lightning_reg.testing.models` and :mod:`lightning_reg.testing.data`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from lightning_reg.testing.data import make_dataset, make_loader
from lightning_reg.testing.models import NUM_CLASSES, TinyNet, make_model
from lightning_reg.testing.registry import Case
from lightning_reg.testing.training import StepSeed, assert_state_equal, fit, run_ddp_script, trainer_kwargs

__all__ = [
    "DENSE_LAYOUTS",
    "check_16_mixed_on_gpu",
    "check_bad_arguments",
    "check_bf16_mixed",
    "check_composition",
    "check_ddp",
    "check_dense_math",
    "check_layout_declarations",
    "check_math",
    "check_missing_index",
    "check_nan_logits",
    "check_no_state_change_outside_training",
    "check_refuses_layout",
    "check_resume",
    "check_trains",
    "check_wrong_label_range",
    "check_yaml_class_path_alone",
    "check_yaml_every_documented_argument",
    "composed_callbacks",
    "fit_case",
]

#: The layouts a case may list in ``Case.layouts`` (classification always runs).
DENSE_LAYOUTS = ("dense", "tokens")


@contextmanager
def _raises(exc: type[BaseException] | tuple[type[BaseException], ...], match: str | None = None) -> Iterator[None]:
    """``pytest.raises`` without pytest: the block must raise ``exc`` whose message matches ``match`` (a regex)."""
    try:
        yield
    except exc as err:
        if match is not None and not re.search(match, str(err)):
            raise AssertionError(f"the error does not match {match!r}: {err}") from err
        return
    names = exc.__name__ if isinstance(exc, type) else " or ".join(e.__name__ for e in exc)
    raise AssertionError(f"expected {names} to be raised")


def fit_case(
    case: Case,
    layout: str = "classification",
    *,
    callbacks: Sequence[Callback] | None = None,
    loader: DataLoader | None = None,
    model: L.LightningModule | None = None,
    **trainer_overrides: Any,
) -> tuple[L.Trainer, L.LightningModule]:
    """A seeded fit of the case's callbacks on the layout's tiny model and data.

    Args:
        case: The case.
        layout: ``"classification"``, ``"dense"`` or ``"tokens"``.
        callbacks: The callbacks (default: fresh ones from the case).
        loader: The training loader (default: :func:`~lightning_reg.testing.make_loader` for the layout).
        model: The module (default: the layout's tiny model with ``case.model_kwargs``).
        **trainer_overrides: ``Trainer`` arguments besides ``case.trainer_overrides``.
    """
    loader = loader if loader is not None else make_loader(layout=layout)
    cbs = list(callbacks) if callbacks is not None else case.callbacks()
    model = model if model is not None else make_model(layout, **case.model_kwargs)
    return fit(cbs, model, loader, **case.trainer_overrides, **trainer_overrides)


def _assert_finite_metrics(trainer: L.Trainer, what: str = "") -> None:
    for key, value in trainer.callback_metrics.items():
        assert math.isfinite(float(value)), f"{key} is not finite{what}"


def _relative_weight_distance(a: torch.nn.Module, b: torch.nn.Module) -> float:
    va = torch.cat([p.detach().flatten() for p in a.parameters()])
    vb = torch.cat([p.detach().flatten() for p in b.parameters()])
    return float((va - vb).norm() / va.norm())


# 1. Math --------------------------------------------------------------------------------------------------------
def check_math(case: Case, dtype: torch.dtype) -> None:
    """The case's functional core matches its reference in ``dtype`` (``Case.math``, required)."""
    assert case.math is not None, f"{case.name} registers no math check"
    case.math(dtype)


def check_dense_math(case: Case, dtype: torch.dtype) -> None:
    """The case's functional core matches its reference on dense elements (``Case.dense_math``)."""
    assert case.dense_math is not None, f"{case.name} registers no dense math check"
    case.dense_math(dtype)


# 2. Training ----------------------------------------------------------------------------------------------------
def check_trains(case: Case, layout: str = "classification") -> None:
    """Two epochs (8 steps) train, ``train/loss`` is logged and every logged metric is finite."""
    trainer, _ = fit_case(case, layout, max_epochs=2)
    assert trainer.global_step == 8, f"trained {trainer.global_step} steps instead of 8"
    assert "train/loss" in trainer.callback_metrics, "train/loss is not logged"
    _assert_finite_metrics(trainer)


# 3. Resume ------------------------------------------------------------------------------------------------------
def check_resume(case: Case, tmp_path: str | Path, where: str = "mid_epoch", layout: str = "classification") -> None:
    """Resuming from a checkpoint gives exactly the weights and callback states of an uninterrupted run.

    Args:
        case: The case.
        tmp_path: A directory for the checkpoints.
        where: ``"mid_epoch"`` (after step 6 of 12, inside epoch 2) or ``"epoch_boundary"`` (after epoch 1).
        layout: The output layout.
    """
    tmp_path = Path(tmp_path)
    if where == "mid_epoch":
        ckpt_cb = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=6, save_top_k=-1, filename="{step}")
        ckpt = tmp_path / "step=6.ckpt"
    elif where == "epoch_boundary":
        ckpt_cb = ModelCheckpoint(
            dirpath=tmp_path, every_n_epochs=1, save_top_k=-1, filename="{epoch}", save_on_train_epoch_end=True
        )
        ckpt = tmp_path / "epoch=0.ckpt"
    else:
        raise ValueError(f"Expected argument `where` to be one of ['mid_epoch', 'epoch_boundary'], but got {where!r}.")
    full = case.callbacks()
    _, full_model = fit_case(case, layout, callbacks=[*full, ckpt_cb], max_epochs=3, enable_checkpointing=True)
    assert ckpt.exists(), f"no checkpoint {ckpt.name} was written"
    resumed = case.callbacks()
    _, resumed_model = fit_case(case, layout, callbacks=resumed, ckpt_path=str(ckpt), max_epochs=3)
    assert_state_equal(full_model.state_dict(), resumed_model.state_dict(), "model")
    for a, b in zip(full, resumed):
        assert_state_equal(a.state_dict(), b.state_dict(), type(a).__name__)


# 4. DDP ---------------------------------------------------------------------------------------------------------
def check_ddp(
    case: Case, cases_ref: str, tmp_path: str | Path, layout: str = "classification", timeout: float = 300
) -> None:
    """A 2-process DDP run (gloo on CPU) leaves both ranks in the same state, equal to one process's.

    One process trains on the same global batches (:func:`~lightning_reg.testing.interleaved_rank_batches`).
    It must match DDP where ``case.ddp_matches_single`` (and, on dense layouts, the layout is in
    ``case.ddp_matches_single_layouts``): there the base loss is each rank's mean over its valid elements, as
    ``F.cross_entropy`` under DDP, so ranks holding different numbers of valid pixels/tokens weigh them
    differently from one process on the joint batch.

    Args:
        case: The case.
        cases_ref: The import path ``"module:attribute"`` of the case list; the DDP worker process imports it.
        tmp_path: A directory for the ranks' states.
        layout: The output layout.
        timeout: Seconds before the DDP run is killed.
    """
    from lightning_reg.testing.ddp_worker import run_case

    tmp_path = Path(tmp_path)
    run_ddp_script(
        "lightning_reg.testing.ddp_worker", cases_ref, case.name, str(tmp_path), "ddp", layout, timeout=timeout
    )
    r0 = torch.load(tmp_path / "ddp_rank0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "ddp_rank1.pt", weights_only=False)
    assert_state_equal(r0["model"], r1["model"], "model(rank0 vs rank1)")
    assert_state_equal(r0["callbacks"], r1["callbacks"], "callbacks(rank0 vs rank1)", atol=1e-6)
    matches = layout == "classification" or layout in case.ddp_matches_single_layouts
    if case.ddp_matches_single and matches:
        single = run_case(case, str(tmp_path), "single", layout)
        assert single["global_step"] == r0["global_step"], f"{single['global_step']} vs {r0['global_step']} steps"
        assert_state_equal(r0["model"], single["model"], "model(ddp vs single)", atol=1e-5, rtol=1e-4)
        assert_state_equal(r0["callbacks"], single["callbacks"], "callbacks(ddp vs single)", atol=1e-5, rtol=1e-4)


# 5. Precision ---------------------------------------------------------------------------------------------------
def check_bf16_mixed(case: Case, layout: str = "classification") -> None:
    """``bf16-mixed`` trains with finite metrics and weights within ``case.bf16_rtol`` of fp32's."""
    # Both models must start from the same weights, whatever RNG state earlier runs left behind.
    L.seed_everything(0, verbose=False)
    _, m32 = fit_case(case, layout, max_epochs=2)
    L.seed_everything(0, verbose=False)
    t16, m16 = fit_case(case, layout, max_epochs=2, precision="bf16-mixed")
    _assert_finite_metrics(t16, " under bf16-mixed")
    rel = _relative_weight_distance(m32, m16)
    assert rel <= case.bf16_rtol, f"bf16-mixed weights differ from fp32 by {rel:.3g} > {case.bf16_rtol}"


def check_16_mixed_on_gpu(case: Case) -> None:
    """``16-mixed`` on a CUDA GPU trains with finite metrics."""
    trainer, _ = fit_case(case, max_epochs=2, accelerator="gpu", precision="16-mixed")
    _assert_finite_metrics(trainer, " under 16-mixed")


# 6. CLI / YAML --------------------------------------------------------------------------------------------------
def _cli_callbacks(callbacks: list[dict[str, Any]]) -> list[Callback]:
    from lightning.pytorch.cli import LightningCLI

    config = {"trainer": {"callbacks": callbacks, "logger": False, "accelerator": "cpu"}, "model": {}}
    cli = LightningCLI(TinyNet, run=False, args=config, save_config_kwargs={"overwrite": True})
    return list(cli.trainer.callbacks)  # type: ignore[attr-defined]


def check_yaml_class_path_alone(case: Case) -> None:
    """``LightningCLI`` instantiates the callback from ``{class_path: ...}`` alone (every argument defaulted)."""
    cls_name = case.class_path.rsplit(".", 1)[-1]
    got = _cli_callbacks([{"class_path": case.class_path}])
    assert any(type(cb).__name__ == cls_name for cb in got), f"no {cls_name} among {got}"


def check_yaml_every_documented_argument(case: Case) -> None:
    """``LightningCLI`` instantiates the callback with ``case.full_init_args`` and keeps each as an attribute."""
    cls_name = case.class_path.rsplit(".", 1)[-1]
    got = _cli_callbacks([{"class_path": case.class_path, "init_args": case.full_init_args}])
    cb = next((cb for cb in got if type(cb).__name__ == cls_name), None)
    assert cb is not None, f"no {cls_name} among {got}"
    for key, value in case.full_init_args.items():
        attr = getattr(cb, key)
        if isinstance(value, (bool, int, float, str)) and isinstance(attr, (bool, int, float, str)):
            assert attr == value, f"{key}: {attr!r} != {value!r}"
        else:
            assert attr is not None, f"{key} is None"


# 7. Composition -------------------------------------------------------------------------------------------------
def composed_callbacks(
    cases: Mapping[str, Case], companions: Callable[[], Sequence[Callback]] | None = None
) -> list[Callback]:
    """Fresh callbacks of every composable case (in name order), then the companions; one per class."""
    cbs: list[Callback] = []
    seen: set[str] = set()
    candidates: list[Callback] = []
    for name in sorted(cases):
        if cases[name].composable:
            candidates.extend(cases[name].callbacks())
    candidates.extend(companions() if companions is not None else ())
    for cb in candidates:
        if type(cb).__name__ not in seen:
            seen.add(type(cb).__name__)
            cbs.append(cb)
    return cbs


def check_composition(
    cases: Mapping[str, Case], tmp_path: str | Path, companions: Callable[[], Sequence[Callback]] | None = None
) -> None:
    """All composable cases together (with the companions) train and resume mid-epoch exactly.

    Args:
        cases: The cases.
        tmp_path: A directory for the checkpoint.
        companions: Builds further callbacks to compose with (e.g.
            :func:`~lightning_reg.testing.default_companions`); one of each class is kept, cases first.
    """
    tmp_path = Path(tmp_path)
    model_kwargs: dict[str, Any] = {}
    for case in cases.values():
        if case.composable:
            model_kwargs.update(case.model_kwargs)
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=6, save_top_k=-1, filename="{step}")
    full = composed_callbacks(cases, companions)
    _, full_model = fit([*full, ckpt_cb], TinyNet(**model_kwargs), max_epochs=3, enable_checkpointing=True)
    resumed = composed_callbacks(cases, companions)
    _, resumed_model = fit(resumed, TinyNet(**model_kwargs), ckpt_path=str(tmp_path / "step=6.ckpt"), max_epochs=3)
    assert_state_equal(full_model.state_dict(), resumed_model.state_dict(), "model")
    for a, b in zip(full, resumed):
        assert_state_equal(a.state_dict(), b.state_dict(), type(a).__name__)


# 8. Bad input ---------------------------------------------------------------------------------------------------
def check_bad_arguments(case: Case) -> None:
    """Each of ``case.bad_args`` raises its exception type with its message substring in ``__init__``."""
    assert case.bad_args, f"{case.name} registers no bad-argument examples"
    cls = type(case.factory())
    for kwargs, exc, match in case.bad_args:
        try:
            cls(**kwargs)
        except exc as err:
            assert match in str(err), f"{kwargs}: {err}"
        else:
            raise AssertionError(f"{cls.__name__}(**{kwargs!r}) did not raise {exc.__name__}")


def check_missing_index(case: Case) -> None:
    """A loader without sample indices fails with a ``MissingIndexError`` naming ``IndexedDataset``."""
    from lightning_reg.core.protocol import MissingIndexError

    with _raises(MissingIndexError, match="IndexedDataset"):
        fit_case(case, loader=make_loader(indexed=False), max_epochs=1)


class _NaNAfter(TinyNet):
    """Produces NaN logits from global step 2 on."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        if self.trainer.global_step >= 2:
            out = out * float("nan")
        return out


def check_nan_logits(case: Case) -> None:
    """NaN logits raise ``FloatingPointError("... non-finite logits ...")`` and leave loss-side state untouched."""
    from lightning_reg.core.protocol import LossRegularizer

    cbs = case.callbacks()
    before: dict[str, Any] = {}

    class Snapshot(L.Callback):
        def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
            if trainer.global_step == 2:
                before.update({type(cb).__name__: cb.state_dict() for cb in cbs})

    with _raises(FloatingPointError, match="non-finite logits"):
        fit_case(case, callbacks=[*cbs, Snapshot()], model=_NaNAfter(**case.model_kwargs), max_epochs=2)
    for cb in cbs:
        if isinstance(cb, LossRegularizer):
            assert_state_equal(before[type(cb).__name__], cb.state_dict(), type(cb).__name__)


def check_wrong_label_range(case: Case) -> None:
    """Labels outside ``[0, C)`` fail with ``ValueError("Expected labels in [0, C) ...")``."""
    from lightning_reg.data import IndexedDataset

    base = make_dataset(64)
    bad = DataLoader(IndexedDataset(base, labels=base.tensors[1] + 10), batch_size=16)
    with _raises(ValueError, match=rf"Expected labels in \[0, {NUM_CLASSES}\)"):
        fit_case(case, loader=bad, max_epochs=1)


# Layouts --------------------------------------------------------------------------------------------------------
def check_layout_declarations(cases: Mapping[str, Case]) -> None:
    """Every case lists known layouts, and a loss-side case with ``"dense"`` registers ``dense_math``."""
    for name, case in cases.items():
        assert set(case.layouts) <= set(DENSE_LAYOUTS), f"{name}: unknown layouts {case.layouts}"
        if "dense" in case.layouts and case.loss_side:
            assert case.dense_math is not None, f"{name} supports dense outputs but registers no dense math check"


def check_refuses_layout(case: Case, layout: str) -> None:
    """A loss-side case that does not support ``layout`` says so clearly (``case.refuses[layout]``)."""
    assert layout in case.refuses, f"{case.name} neither supports nor refuses {layout!r} outputs (set Case.refuses)"
    try:
        fit_case(case, layout, max_epochs=1)
    except (ValueError, TypeError) as err:
        assert case.refuses[layout] in str(err), str(err)
    else:
        raise AssertionError(f"{case.name} trained on {layout!r} outputs instead of refusing them")


def _with_validation_loss(layout: str, **model_kwargs: Any) -> L.LightningModule:
    """The layout's tiny model, whose validation_step runs the regularization pipeline too."""
    base = type(make_model(layout, **model_kwargs))

    class ValidatesWithPipeline(base):  # type: ignore[valid-type, misc]
        def validation_step(self, batch: Any, batch_idx: int) -> None:
            x, y, index = batch
            loss = self.regularized_loss(self(x), y, index, x=x, log=False)
            self.log("val/loss", loss, batch_size=len(y))

    return ValidatesWithPipeline(**model_kwargs)


def check_no_state_change_outside_training(case: Case) -> None:
    """Sanity-check and validation steps that run the pipeline leave every callback's state as without them."""
    states = []
    for with_val in (False, True):
        L.seed_everything(0, verbose=False)
        cbs = case.callbacks()
        model = _with_validation_loss("classification", **case.model_kwargs)
        kw = trainer_kwargs(max_epochs=2, **case.trainer_overrides)
        if with_val:
            kw.update(num_sanity_val_steps=2)
        trainer = L.Trainer(callbacks=[*cbs, StepSeed()], **kw)
        val = make_loader(32, batch_size=8, seed=1, shuffle=False) if with_val else None
        trainer.fit(model, train_dataloaders=make_loader(), val_dataloaders=val)
        states.append([cb.state_dict() for cb in cbs])
    assert_state_equal(states[0], states[1], f"{case.name}: state with validation vs without")
