"""GradientClipping: every rule against a reference, AMP (unscaled), non-finite steps, sharding, telemetry, resume."""

from __future__ import annotations

import math
import os
import threading
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import Tensor, nn

from lightning_reg.callbacks.clipping import DEFAULT_AGC_EXCLUDE, GradientClipping
from lightning_reg.functional.clipping import TensorBuckets, clip_grad_norm_, scale_, tensor_norms
from tests.helpers import TinyNet, assert_state_equal, fit, free_port

# -- fixtures -------------------------------------------------------------------------------------


class Net(nn.Module):
    """A body (conv + linear) and a classifier head named ``head``."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Flatten(), nn.Linear(4 * 2 * 2, 6))
        self.head = nn.Linear(6, 3)


def _net_with_grads(seed: int = 0, scale: float = 1.0) -> tuple[Net, list[str]]:
    torch.manual_seed(seed)
    net = Net()
    for p in net.parameters():
        p.grad = torch.randn_like(p) * scale
    return net, [n for n, _ in net.named_parameters()]


def _grads(net: nn.Module) -> list[Tensor]:
    return [p.grad.clone() for p in net.parameters()]  # type: ignore[union-attr]


def _global_norm(ts: list[Tensor], p: float = 2.0) -> Tensor:
    return torch.linalg.vector_norm(torch.cat([t.flatten().float() for t in ts]), p)


def _flat(model: nn.Module) -> Tensor:
    return torch.cat([p.detach().flatten().clone() for p in model.parameters()])


class PlainSGD(TinyNet):
    """TinyNet with momentum-free SGD: one step moves the weights by exactly ``-lr * grad``."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class ManualSGD(PlainSGD):
    """The same model with manual optimization."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch[0], batch[1]
        opt = self.optimizers()
        opt.zero_grad()  # type: ignore[union-attr]
        loss = F.cross_entropy(self(x).float(), y)
        self.manual_backward(loss)
        opt.step()  # type: ignore[union-attr]
        return loss.detach()


def _model(cls: type[TinyNet] = TinyNet, **kwargs: Any) -> TinyNet:
    L.seed_everything(0, verbose=False)
    return cls(**kwargs)


class Snapshots(L.Callback):
    """The flat weights after every batch."""

    def __init__(self) -> None:
        self.weights: list[Tensor] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.weights.append(_flat(pl_module))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self.weights.append(_flat(pl_module))


class InjectGrad(L.Callback):
    """Writes ``value`` into the first gradient entry after backward at the given global steps."""

    def __init__(self, steps: set[int], value: float) -> None:
        self.steps, self.value = steps, value

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step in self.steps:
            next(pl_module.parameters()).grad[0, 0] = self.value  # type: ignore[index]


# -- every rule against a reference ---------------------------------------------------------------


def test_norm_rule_matches_torch_clip_grad_norm() -> None:
    for p in (2.0, 1.0, float("inf")):
        net, names = _net_with_grads()
        ref_params = [nn.Parameter(q.detach().clone()) for q in net.parameters()]
        for r, q in zip(ref_params, net.parameters()):
            r.grad = q.grad.clone()  # type: ignore[union-attr]
        ref_total = torch.nn.utils.clip_grad_norm_(ref_params, 0.7, norm_type=p, foreach=True)
        out = GradientClipping(max_norm=0.7, norm_type=p).clip_(list(net.parameters()), names)
        torch.testing.assert_close(out["norm_pre"], ref_total)
        for q, r in zip(net.parameters(), ref_params):
            torch.testing.assert_close(q.grad, r.grad)
        torch.testing.assert_close(out["norm_post"], _global_norm(_grads(net), p), rtol=1e-5, atol=0)
        torch.testing.assert_close(out["clip_coef"], out["norm_post"] / out["norm_pre"])
        assert bool(out["clipped"]) and float(out["clipped_frac"]) == 1.0


def test_value_rule_clamps_and_reports_norms() -> None:
    net, names = _net_with_grads()
    before = _grads(net)
    out = GradientClipping(max_norm=0.5, rule="value").clip_(list(net.parameters()), names)
    for g, b in zip(_grads(net), before):
        torch.testing.assert_close(g, b.clamp(-0.5, 0.5))
    torch.testing.assert_close(out["norm_pre"], _global_norm(before))
    torch.testing.assert_close(out["norm_post"], _global_norm(_grads(net)))
    # Nothing above the clip value: not clipped.
    out = GradientClipping(max_norm=10.0, rule="value").clip_(list(net.parameters()), names)
    assert not bool(out["clipped"])


def test_component_rule_clips_each_tensor_on_its_own() -> None:
    net, names = _net_with_grads()
    before = _grads(net)
    out = GradientClipping(max_norm=0.5, rule="component").clip_(list(net.parameters()), names)
    for g, b in zip(_grads(net), before):
        coef = min(1.0, 0.5 / (float(b.norm()) + 1e-6))
        torch.testing.assert_close(g, b * coef)
        assert float(g.norm()) <= 0.5 + 1e-5
    # No global clip: the total norm after clipping is above max_norm (6 tensors at ≈ 0.5 each).
    assert float(out["norm_post"]) > 0.5 * math.sqrt(5)


def test_agc_rule_is_unit_wise_and_skips_the_head() -> None:
    net, names = _net_with_grads(scale=0.2)
    before = _grads(net)
    cb = GradientClipping(rule="agc", clip_factor=0.05, eps=1e-3)
    assert cb.agc_exclude == DEFAULT_AGC_EXCLUDE
    out = cb.clip_(list(net.parameters()), names)
    for (name, w), g, b in zip(net.named_parameters(), _grads(net), before):
        if name.startswith("head"):
            torch.testing.assert_close(g, b)  # the classifier is not clipped
            continue
        rows = w.shape[0] if w.dim() > 1 else 1
        w2, b2, g2 = w.detach().reshape(rows, -1), b.reshape(rows, -1), g.reshape(rows, -1)
        for row_w, row_b, row_g in zip(w2, b2, g2):  # the NFNets formula, row by row
            limit = 0.05 * max(float(row_w.norm()), 1e-3)
            expected = row_b * (limit / float(row_b.norm())) if float(row_b.norm()) > limit else row_b
            torch.testing.assert_close(row_g, expected)
    assert bool(out["clipped"])
    torch.testing.assert_close(out["norm_pre"], _global_norm(before))
    torch.testing.assert_close(out["norm_post"], _global_norm(_grads(net)))


def test_auto_rule_clips_at_the_percentile_of_the_history() -> None:
    cb = GradientClipping(rule="auto", percentile=25.0, history_size=4)
    layer = nn.Linear(1, 1, bias=False)
    seen: list[float] = []
    for k, norm in enumerate([3.0, 1.0, 4.0, 1.5, 5.0, 9.0, 2.0]):
        layer.weight.grad = torch.tensor([[-norm]])
        out = cb.clip_([layer.weight], ["w"])
        seen.append(norm)
        window = torch.tensor(seen[-4:])
        expected_thr = float(torch.quantile(window, 0.25))
        assert float(out["threshold"]) == pytest.approx(expected_thr, rel=1e-6), k
        assert float(layer.weight.grad.abs()) == pytest.approx(min(norm, expected_thr), rel=1e-5)
    state = cb.state_dict()
    assert state["history_count"] == 7 and state["history"].numel() == 4


def test_thresholds_per_pattern_clip_each_group_by_its_own_norm() -> None:
    net, names = _net_with_grads()
    before = dict(zip(names, _grads(net)))
    cb = GradientClipping(max_norm=1.0, thresholds={"head": 0.1, "*.bias": 0.2})
    cb.clip_(list(net.parameters()), names)
    after = dict(zip(names, _grads(net)))
    groups = {
        "head": ["head.weight", "head.bias"],  # first matching pattern wins: head.bias is in "head"
        "bias": ["body.0.bias", "body.2.bias"],
        "rest": ["body.0.weight", "body.2.weight"],
    }
    for group, limit in (("head", 0.1), ("bias", 0.2), ("rest", 1.0)):
        ref = [before[n].clone() for n in groups[group]]
        clip_grad_norm_(ref, limit)
        for n, r in zip(groups[group], ref):
            torch.testing.assert_close(after[n], r)
        assert float(_global_norm([after[n] for n in groups[group]])) <= limit + 1e-5


def test_mixed_dtypes_and_missing_grads() -> None:
    a = nn.Parameter(torch.zeros(3))
    b = nn.Parameter(torch.zeros(2, dtype=torch.bfloat16))
    c = nn.Parameter(torch.zeros(2))  # frozen this step: no gradient
    a.grad, b.grad = torch.tensor([3.0, 0.0, 0.0]), torch.tensor([0.0, 4.0], dtype=torch.bfloat16)
    buckets = TensorBuckets([a.grad, b.grad, a.grad])
    assert buckets.groups == [[0, 2], [1]] and not buckets.in_order
    torch.testing.assert_close(tensor_norms([a.grad, b.grad, a.grad], buckets=buckets), torch.tensor([3.0, 4.0, 3.0]))
    out = GradientClipping(max_norm=1.0).clip_([a, b, c], ["a", "b", "c"], module_norms=True)
    assert float(out["norm_pre"]) == pytest.approx(5.0)
    torch.testing.assert_close(a.grad, torch.tensor([0.6, 0.0, 0.0]), rtol=1e-5, atol=1e-6)
    assert b.grad.dtype == torch.bfloat16 and float(b.grad[1]) == pytest.approx(0.8, rel=1e-2)
    assert c.grad is None
    ts = [torch.ones(2), torch.ones(1, dtype=torch.float64)]
    scale_(ts, torch.tensor([2.0, 3.0]))
    assert ts[0].tolist() == [2.0, 2.0] and ts[1].tolist() == [3.0]


# -- Lightning integration: AMP, manual optimization, conflicts -----------------------------------


def _fp32_first_norm() -> float:
    trainer, _ = fit([GradientClipping(max_norm=1e9)], _model(PlainSGD), max_steps=1)
    return float(trainer.callback_metrics["grad/norm_pre"])


@pytest.mark.parametrize("model_cls", [ManualSGD, PlainSGD], ids=["manual", "automatic"])
def test_amp_clips_unscaled_gradients_on_cpu(model_cls: type[TinyNet]) -> None:
    """A GradScaler (scale 4096) on CPU: the callback must see and clip the *unscaled* gradients."""
    ref_norm = _fp32_first_norm()
    c, lr = 0.05, 0.1
    scaler = torch.amp.GradScaler("cpu", init_scale=4096.0)
    model = _model(model_cls, lr=lr)
    w0 = _flat(model)
    trainer, _ = fit(
        [GradientClipping(max_norm=c)],
        model,
        max_steps=1,
        plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)],
    )
    assert scaler.get_scale() == 4096.0  # the step was taken with a real scale in play
    pre = float(trainer.callback_metrics["grad/norm_pre"])
    # An unscaled norm (fp16 autocast rounding aside); a scaled one would be 4096x larger.
    assert pre == pytest.approx(ref_norm, rel=2e-2)
    assert pre > 2 * c
    # The update is lr * (gradient clipped to norm c); clipping scaled gradients would give lr * c / 4096.
    step = float((_flat(model) - w0).norm())
    assert step == pytest.approx(lr * c, rel=1e-3)
    assert float(trainer.callback_metrics["grad/norm_post"]) == pytest.approx(c, rel=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="16-mixed needs a CUDA GPU")
@pytest.mark.parametrize("model_cls", [ManualSGD, PlainSGD], ids=["manual", "automatic"])
def test_amp_clips_unscaled_gradients_on_gpu(model_cls: type[TinyNet]) -> None:
    ref = fit([GradientClipping(max_norm=1e9)], _model(PlainSGD), max_steps=1, accelerator="gpu")[0]
    ref_norm = float(ref.callback_metrics["grad/norm_pre"])
    c, lr = 0.05, 0.1
    model = _model(model_cls, lr=lr)
    w0 = _flat(model)  # Lightning moves the module back to the CPU when fit ends
    trainer, _ = fit([GradientClipping(max_norm=c)], model, max_steps=1, accelerator="gpu", precision="16-mixed")
    scale = trainer.precision_plugin.scaler.get_scale()  # type: ignore[attr-defined]
    assert scale > 1.0
    assert float(trainer.callback_metrics["grad/norm_pre"]) == pytest.approx(ref_norm, rel=2e-2)
    assert float((_flat(model) - w0).norm()) == pytest.approx(lr * c, rel=1e-3)


def test_trainer_gradient_clip_val_conflict_raises() -> None:
    with pytest.raises(ValueError, match="clipped twice") as info:
        fit([GradientClipping(max_norm=1.0)], _model(), max_steps=1, gradient_clip_val=0.5)
    assert "Remove `gradient_clip_val`" in str(info.value)
    # gradient_clip_val=0 means "off" in Lightning and is accepted.
    fit([GradientClipping(max_norm=1.0)], _model(), max_steps=1, gradient_clip_val=0.0)


def test_fused_optimizer_under_a_scaler_raises() -> None:
    class Fused(PlainSGD):
        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1, fused=True)

    scaler = torch.amp.GradScaler("cpu")
    with pytest.raises(RuntimeError, match="fused"):
        fit([GradientClipping()], _model(Fused), max_steps=1, plugins=[MixedPrecision("16-mixed", "cpu", scaler)])


# -- non-finite gradients -------------------------------------------------------------------------


def test_nonfinite_skip_zeroes_the_step_and_counts_it() -> None:
    snaps, cb = Snapshots(), GradientClipping(max_norm=1.0, nonfinite="skip")
    trainer, _ = fit([InjectGrad({1}, math.nan), cb, snaps], _model(PlainSGD), max_steps=4)
    w = snaps.weights
    assert torch.equal(w[2], w[1])  # step 1 (NaN) did not move the weights
    assert all(not torch.equal(w[k + 1], w[k]) for k in (0, 2, 3))
    assert torch.isfinite(w[-1]).all()
    state = cb.state_dict()
    assert int(state["num_nonfinite"]) == 1 and int(state["num_steps"]) == 3
    assert float(trainer.callback_metrics["grad/nonfinite_steps"]) == 1.0


def _opt_state(optimizer: torch.optim.Optimizer) -> dict[str, Tensor]:
    """Every tensor of the optimizer's state (momentum buffers, Adam's moments and step counters), flattened."""
    out: dict[str, Tensor] = {}
    for pid, st in optimizer.state_dict()["state"].items():
        for k, v in st.items():
            out[f"{pid}.{k}"] = (v if isinstance(v, Tensor) else torch.tensor(v)).detach().clone()
    return out


class OptimizerSnapshots(Snapshots):
    """The flat weights and the optimizer state after every batch."""

    def __init__(self) -> None:
        super().__init__()
        self.states: list[dict[str, Tensor]] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        super().on_train_batch_end(trainer, pl_module, *args)
        self.states.append(_opt_state(trainer.optimizers[0]))


def _optimizers() -> list[Any]:
    cases: list[Any] = [
        ("sgd-momentum", lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9)),
        ("adamw", lambda ps: torch.optim.AdamW(ps, lr=1e-2)),
        ("adamw-foreach", lambda ps: torch.optim.AdamW(ps, lr=1e-2, foreach=True)),
        ("sgd-momentum-foreach", lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, foreach=True)),
    ]
    try:  # fused AdamW runs on CPU in recent torch
        torch.optim.AdamW([nn.Parameter(torch.zeros(1))], fused=True).step()
        cases.append(("adamw-fused", lambda ps: torch.optim.AdamW(ps, lr=1e-2, fused=True)))
    except (RuntimeError, ValueError):  # pragma: no cover - older torch
        pass
    return [pytest.param(make, id=name) for name, make in cases]


@pytest.mark.parametrize("make_optimizer", _optimizers())
@pytest.mark.parametrize("manual", [False, True], ids=["automatic", "manual"])
def test_nonfinite_skip_leaves_weights_and_optimizer_state_bitwise_unchanged(make_optimizer: Any, manual: bool) -> None:
    class Net(ManualSGD if manual else PlainSGD):  # type: ignore[misc, valid-type]
        def configure_optimizers(self) -> torch.optim.Optimizer:
            return make_optimizer(self.parameters())

    snaps, cb = OptimizerSnapshots(), GradientClipping(max_norm=1.0, nonfinite="skip")
    trainer, _ = fit([InjectGrad({1}, math.nan), cb, snaps], _model(Net), max_steps=4)
    w, st = snaps.weights, snaps.states  # w[k + 1], st[k]: after batch k
    assert torch.equal(w[2], w[1])  # the NaN step (batch 1) moved no weight ...
    assert set(st[1]) == set(st[0]) and st[0]
    for key in st[0]:  # ... and no optimizer state: momentum buffers, moments, step counters
        assert torch.equal(st[1][key], st[0][key]), key
    for k in (2, 3):  # training goes on normally afterwards
        assert not torch.equal(w[k + 1], w[k]) and torch.isfinite(w[k + 1]).all()
        assert any(not torch.equal(st[k][key], st[k - 1][key]) for key in st[k])
    state = cb.state_dict()
    assert int(state["num_nonfinite"]) == 1 and int(state["num_steps"]) == 3
    assert trainer.global_step == 4
    assert "step" not in trainer.optimizers[0].__dict__  # the wrapper is removed at the end of fit


def test_nonfinite_skip_is_a_skipped_step_for_the_ema_teacher() -> None:
    from lightning_reg.callbacks.ema import EMATeacher

    ema = EMATeacher(decay=0.9)
    fit([InjectGrad({1}, math.nan), GradientClipping(nonfinite="skip"), ema], _model(PlainSGD), max_steps=4)
    assert (ema.num_updates, ema.skipped_steps) == (3, 1)
    assert all(torch.isfinite(v).all() for v in ema.state_dict()["ema"].values())


class Scheduled(TinyNet):
    """AdamW with a per-step LR scheduler, which wraps `optimizer.step` before the callback does."""

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.parameters(), lr=1e-2)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def test_nonfinite_skip_without_a_nonfinite_step_changes_nothing() -> None:
    """The wrapped step is transparent: with finite gradients the run equals one without it, and it is removed."""
    import warnings

    ref = OptimizerSnapshots()
    fit([GradientClipping(max_norm=1e9, nonfinite="ignore"), ref], _model(Scheduled), max_steps=3)
    got = OptimizerSnapshots()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer, _ = fit([GradientClipping(max_norm=1e9, nonfinite="skip"), got], _model(Scheduled), max_steps=3)
    assert not [w for w in caught if "lr_scheduler" in str(w.message) or "overridden" in str(w.message)]
    for a, b in zip(ref.weights, got.weights):
        assert torch.equal(a, b)
    for a, b in zip(ref.states, got.states):
        assert all(torch.equal(a[k], b[k]) for k in a)
    opt = trainer.optimizers[0]
    assert getattr(opt.step, "_wrapped_by_lr_sched", False)  # the scheduler's own wrapper is back
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.5**3)


def test_nonfinite_raise_names_the_parameter() -> None:
    with pytest.raises(FloatingPointError, match=r"non-finite.*`net\.1\.weight`"):
        fit([InjectGrad({1}, math.inf), GradientClipping(nonfinite="raise")], _model(PlainSGD), max_steps=3)


def test_nonfinite_ignore_behaves_like_torch() -> None:
    snaps = Snapshots()
    fit([InjectGrad({1}, math.inf), GradientClipping(nonfinite="ignore"), snaps], _model(PlainSGD), max_steps=2)
    assert not torch.isfinite(snaps.weights[-1]).all()


def test_gradscaler_owns_nonfinite_steps_without_double_counting() -> None:
    """Under a GradScaler a non-finite step is skipped by the scaler; the callback neither zeroes nor counts it."""
    scaler = torch.amp.GradScaler("cpu", init_scale=4096.0)
    snaps, cb = Snapshots(), GradientClipping(max_norm=1.0, nonfinite="skip")
    fit(
        [InjectGrad({1}, math.inf), cb, snaps],
        _model(PlainSGD),
        max_steps=4,
        plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)],
    )
    state = cb.state_dict()
    assert int(state["num_nonfinite"]) == 0  # not double-counted
    assert int(state["num_steps"]) == 3  # the skipped step is not a step
    assert scaler.get_scale() == 2048.0  # the scaler saw it and backed off
    w = snaps.weights
    assert any(torch.equal(w[k + 1], w[k]) for k in range(len(w) - 1))  # one batch left the weights alone
    assert torch.isfinite(w[-1]).all()


# -- hot path: no host reads on accelerators ------------------------------------------------------


@pytest.mark.parametrize("rule", ["norm", "value", "component", "agc", "auto"])
def test_accelerator_path_never_reads_a_value_on_the_host(rule: str) -> None:
    """On the meta device any host read (``.item()``, ``bool()``) raises, so passing proves there is none."""
    net = Net().to("meta")
    for p in net.parameters():
        p.grad = torch.empty_like(p)
    names = [n for n, _ in net.named_parameters()]
    thresholds = None if rule == "auto" else {"head": 0.3}
    for nonfinite in ("skip", "ignore"):
        cb = GradientClipping(rule=rule, thresholds=thresholds, nonfinite=nonfinite)  # type: ignore[arg-type]
        out = cb.clip_(list(net.parameters()), names, telemetry=True, module_norms=True)
        assert out["norm_pre"].device.type == "meta" and "body.0" in out["module_norms"]
    with pytest.raises(RuntimeError, match="meta"):  # the control: "raise" must read a flag
        GradientClipping(rule=rule, nonfinite="raise").clip_(list(net.parameters()), names)  # type: ignore[arg-type]


# -- telemetry --------------------------------------------------------------------------------------


class SpyNet(TinyNet):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.logged: list[tuple[int, str]] = []

    def log(self, name: str, value: Any, *args: Any, **kwargs: Any) -> None:
        if name.startswith("grad/"):
            self.logged.append((self.trainer.global_step, name))
        super().log(name, value, *args, **kwargs)


def test_logs_at_most_every_log_every_n_steps_and_module_norms_every_n() -> None:
    model = _model(SpyNet)
    cb = GradientClipping(max_norm=0.5, log_module_norms_every_n_steps=2)
    trainer, _ = fit([cb], model, max_steps=7, log_every_n_steps=3)
    steps = lambda key: sorted(s for s, n in model.logged if n == key)  # noqa: E731
    for key in ("grad/norm_pre", "grad/norm_post", "grad/clip_coef", "grad/clipped_frac", "grad/nonfinite_steps"):
        assert steps(key) == [2, 5], key
    assert steps("grad/norm_pre/net.1") == steps("grad/norm_pre/net.4") == [1, 3, 5]
    assert float(trainer.callback_metrics["grad/clipped_frac"]) == 1.0
    m = trainer.callback_metrics
    module_total = math.hypot(float(m["grad/norm_pre/net.1"]), float(m["grad/norm_pre/net.4"]))
    assert module_total == pytest.approx(float(m["grad/norm_pre"]), rel=1e-5)  # same step (5): consistent


# -- resume -----------------------------------------------------------------------------------------


def test_auto_history_survives_resume(tmp_path: Path) -> None:
    def cbs() -> list[Any]:
        return [GradientClipping(rule="auto", percentile=30.0, history_size=5)]

    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=7, save_top_k=-1, filename="{step}")
    full = cbs()
    _, full_model = fit([*full, ckpt], _model(), max_epochs=3, enable_checkpointing=True)
    resumed = cbs()
    mid = GradientClipping(rule="auto", percentile=30.0, history_size=5)
    mid.load_state_dict(torch.load(tmp_path / "step=7.ckpt", weights_only=False)["callbacks"][mid.state_key])
    assert mid.state_dict()["history_count"] == 7 and torch.isfinite(mid.state_dict()["history"]).all()
    _, resumed_model = fit(resumed, _model(), max_epochs=3, ckpt_path=str(tmp_path / "step=7.ckpt"))
    state = full[0].state_dict()
    assert state["history_count"] == 12 and int(state["num_clipped"]) > 0
    assert_state_equal(state, resumed[0].state_dict(), "GradientClipping")
    assert_state_equal(full_model.state_dict(), resumed_model.state_dict(), "model")
    # The control: a resume that drops the history clips differently, so the history is what makes it exact.
    key = mid.state_key

    class Forgetful(GradientClipping):
        @property
        def state_key(self) -> str:
            return key

        def load_state_dict(self, state_dict: dict[str, Any]) -> None:
            super().load_state_dict({**state_dict, "history": torch.full((5,), math.nan), "history_count": 0})

    forgetful = Forgetful(rule="auto", percentile=30.0, history_size=5)
    _, other = fit([forgetful], _model(), max_epochs=3, ckpt_path=str(tmp_path / "step=7.ckpt"))
    assert forgetful.state_dict()["history_count"] == 5
    assert not torch.equal(_flat(other), _flat(full_model))


def test_load_state_dict_with_a_different_history_size_keeps_the_latest_norms() -> None:
    cb = GradientClipping(rule="auto", history_size=4)
    layer = nn.Linear(1, 1, bias=False)
    for norm in [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]:
        layer.weight.grad = torch.tensor([[norm]])
        cb.clip_([layer.weight])
    small = GradientClipping(rule="auto", history_size=2)
    small.load_state_dict(cb.state_dict())
    assert small.state_dict()["history"].tolist() == [5.0, 6.0]
    big = GradientClipping(rule="auto", history_size=8)
    big.load_state_dict(cb.state_dict())
    assert big.state_dict()["history"][:4].tolist() == [3.0, 4.0, 5.0, 6.0] and big.state_dict()["history_count"] == 4
    with pytest.raises(ValueError, match="version"):
        big.load_state_dict({**cb.state_dict(), "version": 99})


# -- sharded gradients (FSDP) -----------------------------------------------------------------------

_SHARD_CONFIGS: dict[str, dict[str, Any]] = {
    "norm": {"max_norm": 0.5},
    "norm_inf": {"max_norm": 0.2, "norm_type": float("inf")},
    "norm_groups": {"max_norm": 0.5, "thresholds": {"head": 0.1}},
    "component": {"max_norm": 0.3, "rule": "component", "thresholds": {"head": 0.1}},
    "value": {"max_norm": 0.05, "rule": "value"},
    "auto": {"rule": "auto", "percentile": 50.0},
}


def _shard_problem() -> tuple[list[Tensor], list[str]]:
    g = torch.Generator().manual_seed(3)
    shapes = {"body.0.weight": (4, 3), "body.0.bias": (4,), "head.weight": (2, 4), "head.bias": (2,), "scale": (1,)}
    return [torch.randn(s, generator=g) * 0.3 for s in shapes.values()], list(shapes)


def _shard(t: Tensor, rank: int) -> Tensor:
    flat = t.flatten()
    half = (flat.numel() + 1) // 2
    return (flat[:half] if rank == 0 else flat[half:]).clone()


def _shard_run(rank: int, all_reduce: Any) -> dict[str, Any]:
    """One rank: FSDP-style flat shards (rank 1 holds no piece of ``scale``, whose grad is then ``None``)."""
    results = {}
    for name, cfg in _SHARD_CONFIGS.items():
        grads, names = _shard_problem()
        params = []
        for g in grads:
            shard = _shard(g, rank)
            p = nn.Parameter(torch.zeros_like(shard))
            p.grad = shard if shard.numel() else None
            params.append(p)
        out = GradientClipping(**cfg).clip_(params, names, all_reduce=all_reduce, module_norms=True)
        results[name] = {
            "grads": [p.grad if p.grad is not None else torch.zeros(0) for p in params],
            "out": {k: v for k, v in out.items() if isinstance(v, Tensor)},
            "modules": out["module_norms"],
        }
    return results


def _check_shards(r0: dict[str, Any], r1: dict[str, Any]) -> None:
    for name, cfg in _SHARD_CONFIGS.items():
        grads, names = _shard_problem()
        params = [nn.Parameter(torch.zeros_like(g)) for g in grads]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        ref = GradientClipping(**cfg).clip_(params, names, module_norms=True)
        for p, a, b in zip(params, r0[name]["grads"], r1[name]["grads"]):
            torch.testing.assert_close(torch.cat([a, b]).view_as(p.grad), p.grad, msg=name)
        for key in ("norm_pre", "norm_post", "clipped", "finite", "clip_coef"):
            for r in (r0, r1):  # every rank derives the single-process value
                torch.testing.assert_close(r[name]["out"][key], ref[key], msg=f"{name}: {key}")
        for module, value in ref["module_norms"].items():
            for r in (r0, r1):
                torch.testing.assert_close(r[name]["modules"][module], value, msg=f"{name}: {module}")


def test_sharded_gradients_clip_like_the_full_gradients() -> None:
    """Two ranks as threads with an exact in-memory all-reduce (sum/max), so the test needs no process group."""
    barrier, slots = threading.Barrier(2, timeout=60), [torch.zeros(0), torch.zeros(0)]

    def reducer(rank: int) -> Any:
        def all_reduce(t: Tensor, op: str) -> Tensor:
            slots[rank] = t.clone()
            barrier.wait()
            stacked = torch.stack(slots)
            out = stacked.sum(0) if op == "sum" else stacked.amax(0)
            barrier.wait()
            return out

        return all_reduce

    results: list[dict[str, Any]] = [{}, {}]
    errors: list[BaseException] = []

    def work(rank: int) -> None:
        try:
            results[rank] = _shard_run(rank, reducer(rank))
        except BaseException as e:  # surface worker errors in the test
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=work, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    _check_shards(*results)


def _shard_worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)

    def all_reduce(t: Tensor, op: str) -> Tensor:
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
        return t

    torch.save(_shard_run(rank, all_reduce), Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
def test_sharded_gradients_with_a_gloo_process_group(tmp_path: Path) -> None:
    torch.multiprocessing.spawn(_shard_worker, args=(free_port(), str(tmp_path)), nprocs=2)
    _check_shards(*(torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)))


def test_strategy_checks() -> None:
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

    assert GradientClipping()._check_strategy(FSDPStrategy()) is True
    assert GradientClipping()._check_strategy(FSDPStrategy(sharding_strategy="NO_SHARD")) is False
    assert GradientClipping()._check_strategy(DDPStrategy()) is False
    with pytest.raises(ValueError, match="rule='agc'"):
        GradientClipping(rule="agc")._check_strategy(FSDPStrategy())
    with pytest.raises(ValueError, match="use_orig_params=True"):
        GradientClipping(rule="component")._check_strategy(FSDPStrategy(use_orig_params=False))
    hybrid = FSDPStrategy()
    hybrid.sharding_strategy = type(hybrid.sharding_strategy).HYBRID_SHARD
    with pytest.raises(RuntimeError, match="HYBRID_SHARD"):
        GradientClipping()._check_strategy(hybrid)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="FSDP needs a CUDA GPU")
def test_fsdp_on_gpu_clips_the_total_norm() -> None:
    from lightning.pytorch.strategies import FSDPStrategy

    ref, _ = fit([GradientClipping(max_norm=1e9)], _model(PlainSGD), max_steps=1, accelerator="gpu")
    c = 0.05
    trainer, _ = fit(
        [GradientClipping(max_norm=c)],
        _model(PlainSGD),
        max_steps=1,
        accelerator="gpu",
        devices=1,
        strategy=FSDPStrategy(),
        use_distributed_sampler=False,  # the same batch as the reference run (FSDP would swap in its own sampler)
    )
    pre = float(trainer.callback_metrics["grad/norm_pre"])
    assert pre == pytest.approx(float(ref.callback_metrics["grad/norm_pre"]), rel=1e-4)
    assert float(trainer.callback_metrics["grad/norm_post"]) == pytest.approx(c, rel=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("rule", ["norm", "value", "component", "agc", "auto"])
def test_no_host_sync_on_gpu(rule: str) -> None:
    net, names = _net_with_grads()
    net = net.cuda()
    for p in net.parameters():
        p.grad = torch.randn_like(p)
    cb = GradientClipping(rule=rule, agc_exclude=["head"])  # type: ignore[arg-type]
    cb.clip_(list(net.parameters()), names, module_norms=True)  # build and cache the plan first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        cb.clip_(list(net.parameters()), names, module_norms=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")


# -- GPU: a skipped step with CUDA optimizers, and under a CUDA GradScaler -----------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(
    "make_optimizer",
    [
        pytest.param(lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9), id="sgd-momentum"),
        pytest.param(lambda ps: torch.optim.AdamW(ps, lr=1e-2, foreach=True), id="adamw-foreach"),
        pytest.param(lambda ps: torch.optim.AdamW(ps, lr=1e-2, fused=True), id="adamw-fused"),
    ],
)
def test_nonfinite_skip_on_gpu_leaves_weights_and_optimizer_state_unchanged(make_optimizer: Any) -> None:
    class Net(PlainSGD):
        def configure_optimizers(self) -> torch.optim.Optimizer:
            return make_optimizer(self.parameters())

    snaps, cb = OptimizerSnapshots(), GradientClipping(max_norm=1.0, nonfinite="skip")
    fit([InjectGrad({1}, math.nan), cb, snaps], _model(Net), max_steps=4, accelerator="gpu")
    w, st = snaps.weights, snaps.states
    assert torch.equal(w[2], w[1]) and all(torch.equal(st[1][k], st[0][k]) for k in st[0])
    assert not torch.equal(w[3], w[2]) and torch.isfinite(w[-1]).all()
    assert int(cb.state_dict()["num_nonfinite"]) == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gradscaler_on_gpu_owns_nonfinite_steps() -> None:
    snaps, cb = Snapshots(), GradientClipping(max_norm=1.0, nonfinite="skip")
    trainer, _ = fit(
        [InjectGrad({1}, math.inf), cb, snaps], _model(PlainSGD), max_steps=4, accelerator="gpu", precision="16-mixed"
    )
    state = cb.state_dict()
    assert int(state["num_nonfinite"]) == 0 and int(state["num_steps"]) == 3
    assert trainer.precision_plugin.scaler.get_scale() < 2.0**16  # type: ignore[attr-defined]
    w = snaps.weights
    assert torch.equal(w[2], w[1]) and torch.isfinite(w[-1]).all()
