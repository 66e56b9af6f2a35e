"""EarlyDropout / LateDropout / DropoutSchedule: schedule values, drop-path rates, resume, restore, compile."""

from __future__ import annotations

import importlib.util
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
import torch._dynamo
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from lightning_reg.callbacks.dropout import DropoutSchedule, EarlyDropout, LateDropout
from lightning_reg.core.schedules import Cosine
from lightning_reg.functional.dropout import (
    drop_path_rates,
    drop_rate_at,
    drop_schedule,
    find_drop_targets,
    set_drop_rates_,
)
from lightning_reg.nn import DropPath, drop_path
from tests.helpers import TinyNet, fit, make_loader


# -- an independent re-statement of the reference `drop_scheduler` ------------------------------------
def reference_drop_scheduler(
    drop_rate: float, epochs: int, niter_per_ep: int, cutoff_epoch: int, mode: str, schedule: str
) -> np.ndarray:
    total = epochs * niter_per_ep
    if mode == "standard":
        return np.full(total, drop_rate)
    early = cutoff_epoch * niter_per_ep
    if mode == "early":
        head = np.full(early, drop_rate) if schedule == "constant" else np.linspace(drop_rate, 0, early)
        return np.concatenate([head, np.zeros(total - early)])
    return np.concatenate([np.zeros(early), np.full(total - early, drop_rate)])


@pytest.mark.parametrize(
    ("mode", "schedule"), [("early", "linear"), ("early", "constant"), ("late", "constant"), ("standard", "constant")]
)
@pytest.mark.parametrize(("epochs", "niter", "cutoff"), [(6, 5, 2), (4, 3, 1), (3, 7, 3), (5, 1, 0)])
def test_schedule_matches_reference(mode: str, schedule: str, epochs: int, niter: int, cutoff: int) -> None:
    ours = drop_schedule(0.1, epochs * niter, cutoff * niter, mode, schedule)  # type: ignore[arg-type]
    ref = reference_drop_scheduler(0.1, epochs, niter, cutoff, mode, schedule)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-15)


def test_late_linear_ramps_to_p_on_the_last_step_and_needs_total() -> None:
    rates = drop_schedule(0.4, 8, 3, "late", "linear")
    np.testing.assert_allclose(rates, [0, 0, 0, 0.0, 0.1, 0.2, 0.3, 0.4], atol=1e-15)
    assert drop_rate_at(100, 0.4, 3, "late", "linear", total=8) == pytest.approx(0.4)
    with pytest.raises(ValueError, match="needs `total`"):
        drop_rate_at(5, 0.4, 3, "late", "linear")


def test_shared_schedule_is_a_multiplier_over_the_phase() -> None:
    rates = drop_schedule(0.2, 6, 5, "early", Cosine(1.0, 0.0))
    expected = [0.2 * 0.5 * (1 + np.cos(np.pi * t / 4)) for t in range(5)] + [0.0]
    np.testing.assert_allclose(rates, expected, atol=1e-15)


# -- applied per optimizer step during training ----------------------------------------------------------
class Recorder(L.Callback):
    """Reads the rates the model actually has at each batch (after the schedule callback ran)."""

    def __init__(self, getter: Any) -> None:
        self.getter = getter
        self.trace: list[tuple[int, Any]] = []
        self.logged: list[float] = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self.trace.append((trainer.global_step, self.getter(pl_module)))

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if "dropout/rate" in trainer.callback_metrics:
            self.logged.append(float(trainer.callback_metrics["dropout/rate"]))


def _dropout_p(m: L.LightningModule) -> float:
    return float(m.net[3].p)


def test_training_applies_the_formula_every_step_and_logs_it() -> None:
    cb = EarlyDropout(p=0.3, schedule="linear", cutoff_epochs=2)
    rec = Recorder(_dropout_p)
    _, model = fit([cb, rec], TinyNet(dropout=0.1), max_epochs=3)
    assert cb.cutoff == 8 and cb.total_steps == 12  # 4 steps per epoch
    steps = [s for s, _ in rec.trace]
    assert steps == list(range(12))
    expected = reference_drop_scheduler(0.3, 3, 4, 2, "early", "linear")
    np.testing.assert_allclose([r for _, r in rec.trace], expected, atol=1e-15)
    np.testing.assert_allclose(rec.logged, expected, atol=1e-7)  # logged as float32
    assert model.net[3].p == 0.1  # restored after fit


def test_accumulation_counts_optimizer_steps() -> None:
    cb = DropoutSchedule(p=0.2, mode="early", schedule="constant", cutoff_epochs=1)
    rec = Recorder(_dropout_p)
    fit([cb, rec], TinyNet(dropout=0.0), max_epochs=2, accumulate_grad_batches=3)
    # 4 batches, accumulation 3 -> ceil(4/3) = 2 optimizer steps per epoch; micro-batches share the step's rate.
    assert cb.cutoff == 2
    assert rec.trace == [(0, 0.2), (0, 0.2), (0, 0.2), (1, 0.2), (2, 0.0), (2, 0.0), (2, 0.0), (3, 0.0)]


def test_cutoff_steps_takes_precedence_and_late_mode() -> None:
    cb = LateDropout(p=0.25, cutoff_epochs=50, cutoff_steps=3)
    rec = Recorder(_dropout_p)
    fit([cb, rec], TinyNet(), max_epochs=2)
    assert [r for _, r in rec.trace] == [0.0, 0.0, 0.0] + [0.25] * 5


def test_resume_continues_the_exact_schedule(tmp_path: Path) -> None:
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=6, save_top_k=-1, filename="{step}")
    full = Recorder(_dropout_p)
    _, m_full = fit(
        [EarlyDropout(p=0.3, cutoff_epochs=2.5), full, ckpt_cb],
        TinyNet(dropout=0.1),
        max_epochs=3,
        enable_checkpointing=True,
    )
    resumed = Recorder(_dropout_p)
    _, m_res = fit(
        [EarlyDropout(p=0.3, cutoff_epochs=2.5), resumed],
        TinyNet(dropout=0.1),
        ckpt_path=str(tmp_path / "step=6.ckpt"),
        max_epochs=3,
    )
    assert resumed.trace == full.trace[6:]
    assert resumed.trace[0][0] == 6 and 0.0 < resumed.trace[0][1] < 0.3
    for a, b in zip(m_full.state_dict().values(), m_res.state_dict().values()):
        assert torch.equal(a, b)


# -- targets ------------------------------------------------------------------------------------------
class AttnWithFloatRate(nn.Module):
    """An attention-like module that passes a float rate to ``F.dropout`` at every call (as HF layers do)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.attention_dropout = 0.05
        self.drop_rate = 0  # an int: not taken
        self.attn_drop = nn.Dropout(0.02)  # a submodule: taken once, as a Dropout module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn_drop(nn.functional.dropout(self.proj(x), self.attention_dropout, self.training))


class Block(nn.Module):
    def __init__(self, two_paths: bool = False) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.drop_path1 = DropPath(0.0)
        self.drop_path2 = DropPath(0.0) if two_paths else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.fc(x))
        return x + self.drop_path2(self.fc(x)) if self.drop_path2 is not None else x


class ZooNet(L.LightningModule):
    """A plain LightningModule (no RegularizedModule mixin) with every kind of target."""

    def __init__(self, blocks: int = 4) -> None:
        super().__init__()
        self.inp = nn.Linear(64, 8)
        self.drops = nn.ModuleList(
            [nn.Dropout(0.1), nn.Dropout1d(0.1), nn.Dropout2d(0.1), nn.Dropout3d(0.1), nn.AlphaDropout(0.1)]
        )
        self.fad = nn.FeatureAlphaDropout(0.1)
        self.mha = nn.MultiheadAttention(8, 2, dropout=0.1, batch_first=True)
        self.attn = AttnWithFloatRate()
        self.blocks = nn.ModuleList([Block(two_paths=(i == 1)) for i in range(blocks)])
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drops[0](self.inp(x.flatten(1)))
        h = self.attn(h)
        a, _ = self.mha(h[:, None], h[:, None], h[:, None])
        h = a[:, 0]
        for b in self.blocks:
            h = b(h)
        return self.head(h)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch[0], batch[1]
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _paths(found: list[Any]) -> list[str]:
    return [t.path for t in found]


def test_finds_every_dropout_kind_and_float_attribute_once() -> None:
    paths = _paths(find_drop_targets(ZooNet(), "dropout"))
    assert paths == [
        "drops.0.p",
        "drops.1.p",
        "drops.2.p",
        "drops.3.p",
        "drops.4.p",
        "fad.p",
        "mha.dropout",
        "attn.attention_dropout",
        "attn.attn_drop.p",
    ]


def test_drop_path_blocks_get_linspace_rates_and_share_a_parent() -> None:
    net = ZooNet(blocks=4)
    found = find_drop_targets(net, "drop_path")
    assert _paths(found) == [
        "blocks.0.drop_path1.drop_prob",
        "blocks.1.drop_path1.drop_prob",
        "blocks.1.drop_path2.drop_prob",
        "blocks.2.drop_path1.drop_prob",
        "blocks.3.drop_path1.drop_prob",
    ]
    set_drop_rates_(found, 0.3)
    got = [b.drop_path1.drop_prob for b in net.blocks]
    np.testing.assert_allclose(got, torch.linspace(0, 0.3, 4).tolist(), atol=1e-7)  # the reference's linspace
    assert net.blocks[1].drop_path2.drop_prob == net.blocks[1].drop_path1.drop_prob  # same block, same rate
    assert net.drops[0].p == 0.1  # dropout untouched under targets="drop_path"
    found_u = find_drop_targets(net, "drop_path", drop_path_scaling="uniform")
    set_drop_rates_(found_u, 0.3)
    assert [b.drop_path1.drop_prob for b in net.blocks] == [0.3] * 4


def test_drop_path_rates_match_timm() -> None:
    spec = importlib.util.find_spec("timm")
    path = None if spec is None or spec.origin is None else Path(spec.origin).parent / "layers" / "drop.py"
    if path is None or not path.exists():
        pytest.skip("timm is not installed")
    mod_spec = importlib.util.spec_from_file_location("timm_drop", path)
    assert mod_spec is not None and mod_spec.loader is not None
    timm_drop = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(timm_drop)
    for depth in (2, 5, 12):
        np.testing.assert_allclose(
            drop_path_rates(0.4, depth), timm_drop.calculate_drop_path_rates(0.4, depth), atol=1e-7
        )
    # timm's own DropPath module is recognised by its `drop_prob`.
    net = nn.Sequential(*[nn.Sequential(nn.Linear(4, 4), timm_drop.DropPath(0.1)) for _ in range(3)])
    found = find_drop_targets(net, "drop_path")
    set_drop_rates_(found, 0.5)
    assert [net[i][1].drop_prob for i in range(3)] == [0.0, 0.25, 0.5]


def test_include_exclude_filters() -> None:
    net = ZooNet()
    assert _paths(find_drop_targets(net, "dropout", include=["drops.*"], exclude=["drops.4", "*.1"])) == [
        "drops.0.p",
        "drops.2.p",
        "drops.3.p",
    ]
    assert _paths(find_drop_targets(net, "both", include=["*.attention_dropout", "blocks.0.*"])) == [
        "attn.attention_dropout",
        "blocks.0.drop_path1.drop_prob",
    ]
    assert _paths(find_drop_targets(net, "dropout", attributes=[]))[-2:] == ["mha.dropout", "attn.attn_drop.p"]


def test_plain_lightning_module_both_targets_restore_and_logs() -> None:
    net = ZooNet()
    before = {t.path: t.original for t in find_drop_targets(net, "both")}
    seen: list[dict[str, float]] = []

    class Snap(L.Callback):
        def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
            seen.append({t.path: float(getattr(t.module, t.attr)) for t in find_drop_targets(pl_module, "both")})

    cb = DropoutSchedule(p=0.4, mode="standard", schedule="constant", targets="both")
    trainer, _ = fit([cb, Snap()], net, max_epochs=1)
    assert seen[0]["mha.dropout"] == 0.4 and seen[0]["attn.attention_dropout"] == 0.4 and seen[0]["fad.p"] == 0.4
    assert seen[0]["blocks.3.drop_path1.drop_prob"] == 0.4 and seen[0]["blocks.0.drop_path1.drop_prob"] == 0.0
    assert float(trainer.callback_metrics["dropout/rate"]) == pytest.approx(0.4)
    assert float(trainer.callback_metrics["dropout/drop_path_rate"]) == pytest.approx(0.4)
    after = {t.path: float(getattr(t.module, t.attr)) for t in find_drop_targets(net, "both")}
    assert after == before


def test_restores_original_rates_on_exception() -> None:
    class Boom(L.Callback):
        def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
            if trainer.global_step == 2:
                assert pl_module.net[3].p == 0.5
                raise RuntimeError("boom")

    model = TinyNet(dropout=0.1)
    with pytest.raises(RuntimeError, match="boom"):
        fit([DropoutSchedule(p=0.5, mode="standard", schedule="constant"), Boom()], model, max_epochs=1)
    assert model.net[3].p == 0.1


def test_nothing_found_raises_listing_what_was_searched() -> None:
    class NoDropout(TinyNet):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 4))

    with pytest.raises(ValueError, match=r"found nothing to schedule.*nn.Dropout.*drop-path modules"):
        fit([EarlyDropout(cutoff_epochs=1, targets="both")], NoDropout(), max_epochs=1)
    with pytest.raises(ValueError, match=r"include=\['nope\*'\]"):
        fit([EarlyDropout(cutoff_epochs=1, include=["nope*"])], TinyNet(), max_epochs=1)


def test_two_schedules_on_the_same_modules_conflict() -> None:
    with pytest.raises(ValueError, match=r"Conflicting regularizers.*net\.3\.p"):
        fit([EarlyDropout(cutoff_epochs=1), LateDropout(cutoff_epochs=1)], TinyNet(), max_epochs=1)
    # Disjoint targets compose: early dropout plus late stochastic depth.
    net = ZooNet()
    cbs = [EarlyDropout(p=0.2, cutoff_steps=2), LateDropout(p=0.3, cutoff_steps=2, targets="drop_path")]
    trainer, _ = fit(cbs, net, max_epochs=1)
    assert float(trainer.callback_metrics["dropout/rate"]) == 0.0
    assert float(trainer.callback_metrics["dropout/drop_path_rate"]) == pytest.approx(0.3)


def test_single_drop_path_block_and_late_cutoff_warn() -> None:
    class One(TinyNet):
        def __init__(self) -> None:
            super().__init__()
            self.dp = DropPath(0.1)

    with pytest.warns(UserWarning, match="single drop-path block"):
        fit([EarlyDropout(cutoff_epochs=1, targets="drop_path")], One(), max_epochs=1)
    with pytest.warns(UserWarning, match="never leaves its first phase"):
        fit([EarlyDropout(cutoff_epochs=5)], TinyNet(), max_epochs=1)


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"p": 1.0}, ValueError, "Expected argument `p` to be a float in [0, 1)"),
        ({"mode": "middle"}, ValueError, "Expected argument `mode` to be one of"),
        ({"schedule": "zigzag"}, ValueError, "Expected argument `schedule` to be one of"),
        ({"schedule": 3}, TypeError, "Expected argument `schedule`"),
        ({"mode": "standard", "schedule": "linear"}, ValueError, "to be 'constant' with mode='standard'"),
        ({"cutoff_epochs": None}, ValueError, "needs a cutoff"),
        ({"cutoff_steps": -1}, ValueError, "Expected argument `cutoff_steps` to be an int in [0, inf)"),
        ({"targets": "weights"}, ValueError, "Expected argument `targets` to be one of"),
        ({"include": "drops.*"}, TypeError, "Expected argument `include` to be a list of str"),
        ({"drop_path_scaling": "cosine"}, ValueError, "Expected argument `drop_path_scaling`"),
    ],
)
def test_bad_arguments(kwargs: dict[str, Any], exc: type[Exception], match: str) -> None:
    with pytest.raises(exc) as info:
        DropoutSchedule(**kwargs)
    assert match in str(info.value)


def test_aliases_and_state_key() -> None:
    assert EarlyDropout().mode == "early" and EarlyDropout().schedule == "linear"
    assert LateDropout().mode == "late" and LateDropout().schedule == "constant"
    assert EarlyDropout().state_key != EarlyDropout(targets="drop_path").state_key
    assert EarlyDropout().state_dict()["version"] == 1


# -- DropPath -----------------------------------------------------------------------------------------
def test_drop_path_drops_whole_samples_and_keeps_the_expectation() -> None:
    torch.manual_seed(0)
    x = torch.ones(4000, 3, 2)
    y = drop_path(x, 0.25, training=True)
    per_sample = y.flatten(1)
    assert torch.all((per_sample == 0).all(1) | (per_sample == 1 / 0.75).all(1))
    assert abs(float((per_sample[:, 0] == 0).float().mean()) - 0.25) < 0.03
    assert abs(float(y.mean()) - 1.0) < 0.05
    assert torch.equal(DropPath(0.9).eval()(x), x)
    assert torch.equal(drop_path(x, 1.0, training=True), torch.zeros_like(x))
    with pytest.raises(ValueError, match="Expected argument `drop_prob` to be a float in \\[0, 1\\]"):
        DropPath(1.5)


# -- torch.compile -------------------------------------------------------------------------------------
def _zero_fraction_under_compile(backend: str, rates: list[float]) -> tuple[list[float], int]:
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend(backend)
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.0))
    compiled = torch.compile(model[1], backend=counter)
    x = torch.ones(20_000)
    out = []
    for r in rates:
        set_drop_rates_(find_drop_targets(model), r)
        out.append(float((compiled(x) == 0).float().mean()))
    return out, counter.frame_count


def test_compile_guards_on_the_rate_and_recompiles() -> None:
    # TorchDynamo specializes `Dropout.p` as a constant and guards on it: a new rate recompiles and takes effect.
    fractions, frames = _zero_fraction_under_compile("eager", [0.0, 0.5, 0.2, 0.5])
    np.testing.assert_allclose(fractions, [0.0, 0.5, 0.2, 0.5], atol=0.02)
    assert frames == 3  # 0.0, 0.5, 0.2 compiled once each; 0.5 again hits the cache


@pytest.mark.slow
def test_compile_inductor_rate_changes_take_effect() -> None:
    t0 = time.perf_counter()
    fractions, frames = _zero_fraction_under_compile("inductor", [0.0, 0.5, 0.2])
    np.testing.assert_allclose(fractions, [0.0, 0.5, 0.2], atol=0.02)
    assert frames >= 3, f"inductor: {frames} frames in {time.perf_counter() - t0:.1f}s"  # one recompile per rate


def test_compiled_submodule_warns_and_keeps_rates_exact() -> None:
    # `trainer.fit(torch.compile(lightning_module))` also compiles `training_step`, which fails inside `self.log`
    # with this torch/lightning pair; compiling the network inside the module is the supported pattern.
    torch._dynamo.reset()
    model = TinyNet(dropout=0.1)
    model.net = torch.compile(model.net, backend="eager")  # type: ignore[assignment]
    rec = Recorder(lambda m: float(m.net._orig_mod[3].p))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit([EarlyDropout(p=0.3, cutoff_epochs=2.5), rec], model, make_loader(), max_epochs=3)
    assert any("torch.compile" in str(w.message) and "recompile" in str(w.message) for w in caught)
    np.testing.assert_allclose([r for _, r in rec.trace], drop_schedule(0.3, 12, 10, "early", "linear"), atol=1e-15)
    assert model.net._orig_mod[3].p == 0.1


def test_logs_the_rate_only_on_logging_steps_and_the_last_batch() -> None:
    """Issue 16: per-step scalars reach `self.log` only when Lightning hands them to the logger."""
    logged: list[int] = []

    class Spy(TinyNet):
        def log(self, name: str, value: Any, *args: Any, **kwargs: Any) -> None:
            if name.endswith("/rate"):
                logged.append(self.trainer.global_step)
            super().log(name, value, *args, **kwargs)

    dropout = EarlyDropout(p=0.5, schedule="linear", cutoff_steps=8)
    loader = make_loader(n=64, batch_size=4)
    trainer, _ = fit([dropout], Spy(dropout=0.5), loader=loader, max_epochs=1, log_every_n_steps=5)
    assert logged == [4, 9, 14, 15]  # before steps 5, 10, 15 (logging steps) and the epoch's last batch
    assert trainer.callback_metrics[f"{dropout.name}/rate"].item() == dropout.rate_at(15)
