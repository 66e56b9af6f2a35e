"""NoisyLabelConsistency and LabelCorrection: the math by hand, the teacher modes, views, autocast, label
correction, resume and DDP."""

from __future__ import annotations

import copy
import math
import os
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from lightning_reg.augment import Augmentation, GaussianNoise, MultiScale, PatchMask
from lightning_reg.callbacks.consistency import LabelCorrection, NoisyLabelConsistency
from lightning_reg.core.protocol import LossRegularizer, StepContext
from lightning_reg.core.schedules import sigmoid_rampup
from lightning_reg.data import EpochSeededSampler, IndexedDataset, ResumableDataLoader
from lightning_reg.functional.consistency import (
    consistency_loss,
    early_learning_curve,
    early_learning_end_epoch,
    end_of_early_learning,
    fit_early_learning_curve,
    sharpen,
)
from tests.helpers import TinyNet, assert_state_equal, fit, make_dataset, run_ddp_script, trainer_kwargs

ROOT = Path(__file__).resolve().parents[1]


# -- helpers ------------------------------------------------------------------------------------------------------
class Shift(Augmentation):
    """A deterministic user augmentation: add a constant."""

    def __init__(self, delta: float = 0.5) -> None:
        self.delta = delta

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return x + self.delta


class StubTeacher(L.Callback):
    """A teacher provider: a frozen copy of the model taken at fit start (or a given module)."""

    def __init__(self, module: torch.nn.Module | None = None, has_updated: bool = True) -> None:
        self.module = module
        self.has_updated = has_updated
        self.calls = 0

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.module is None:
            self.module = copy.deepcopy(pl_module)

    def teacher_forward(self, x: Any) -> torch.Tensor:
        self.calls += 1
        assert self.module is not None
        with torch.no_grad():
            return self.module(x)


class CountingNet(TinyNet):
    """TinyNet that records each forward's input shape and whether autocast was on."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.calls: list[tuple[tuple[int, ...], bool, bool]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append((tuple(x.shape), torch.is_autocast_enabled("cpu"), torch.is_grad_enabled()))
        return super().forward(x)


def _fake_trainer(global_step: int = 0, epoch: int = 0, batches: int = 4, max_epochs: int = 10) -> Any:
    return SimpleNamespace(
        global_step=global_step,
        current_epoch=epoch,
        num_training_batches=batches,
        accumulate_grad_batches=1,
        max_epochs=max_epochs,
        strategy=SimpleNamespace(world_size=1),
        callbacks=[],
    )


def _attach(module: L.LightningModule, trainer: Any) -> L.LightningModule:
    module._trainer = trainer  # the module's `trainer` property returns it
    return module


def _ctx(module: L.LightningModule, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor | None = None) -> StepContext:
    ctx = StepContext(module=module, x=x, labels=y, given_labels=y, index=index)
    ctx.extras["clean_x"] = x
    ctx.logits = module(x)
    return ctx


def _kl(q: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(q || softmax(logits)) per row, written out from the definition."""
    p = torch.softmax(logits.float(), -1)
    terms = torch.where(q > 0, q * (torch.log(q) - torch.log(p)), torch.zeros_like(q))
    return terms.sum(-1)


# -- the functional core ------------------------------------------------------------------------------------------
def test_consistency_loss_by_hand_with_a_mask() -> None:
    # p = softmax(z): (0.7, 0.2, 0.1), (1/3, 1/3, 1/3), (0.5, 0.25, 0.25); q: one confident target per row.
    p = torch.tensor([[0.7, 0.2, 0.1], [1 / 3, 1 / 3, 1 / 3], [0.5, 0.25, 0.25]])
    z = torch.log(p) + 1.7  # logits up to a constant
    q = torch.tensor([[0.9, 0.05, 0.05], [0.2, 0.3, 0.5], [0.0, 1.0, 0.0]])
    mask = torch.tensor([1.0, 0.0, 1.0])
    kl0 = 0.9 * math.log(0.9 / 0.7) + 0.05 * math.log(0.05 / 0.2) + 0.05 * math.log(0.05 / 0.1)
    kl2 = 1.0 * math.log(1.0 / 0.25)
    # The mean is over all three samples, the masked one included.
    expected_kl = (kl0 + 0.0 + kl2) / 3
    torch.testing.assert_close(consistency_loss(z, q, mask, "kl"), torch.tensor(expected_kl), atol=1e-6, rtol=0)
    mse0 = ((0.9 - 0.7) ** 2 + (0.05 - 0.2) ** 2 + (0.05 - 0.1) ** 2) / 3
    mse2 = ((0.0 - 0.5) ** 2 + (1.0 - 0.25) ** 2 + (0.0 - 0.25) ** 2) / 3
    expected_mse = (mse0 + mse2) / 3
    torch.testing.assert_close(consistency_loss(z, q, mask, "mse"), torch.tensor(expected_mse), atol=1e-6, rtol=0)
    # No mask = all ones; the target gets no gradient.
    qq = q.clone().requires_grad_()
    zz = z.clone().requires_grad_()
    consistency_loss(zz, qq).backward()
    assert qq.grad is None and zz.grad is not None
    with pytest.raises(ValueError, match="Expected argument `divergence`"):
        consistency_loss(z, q, mask, "js")  # type: ignore[arg-type]


def test_sharpen_is_a_tempered_softmax() -> None:
    z = torch.tensor([[2.0, 0.5, -1.0], [0.0, 0.0, 3.0]])
    p = torch.softmax(z, -1)
    torch.testing.assert_close(sharpen(p, 0.4), torch.softmax(z / 0.4, -1))
    torch.testing.assert_close(sharpen(p, 1.0), p)
    assert torch.isfinite(sharpen(torch.tensor([[1.0, 0.0]]), 0.1)).all()
    with pytest.raises(ValueError, match="temperature"):
        sharpen(p, 0.0)


def test_curve_fit_recovers_parameters_and_batches() -> None:
    x = torch.arange(1, 11, dtype=torch.float64)
    params = [(0.9, 0.5, 2.0), (0.6, 0.8, 1.0), (0.8, 0.3, 5.0)]
    curves = torch.stack(
        [early_learning_curve(x, *(torch.tensor(v, dtype=torch.float64) for v in p)) for p in params], 1
    )
    a, b, c = fit_early_learning_curve(curves)
    for j, (pa, pb, pc) in enumerate(params):
        assert abs(float(a[j]) - pa) < 1e-3 and abs(float(b[j]) - pb) < 1e-3 and abs(float(c[j]) - pc) < 1e-2
        # Fitting all curves at once equals fitting each alone.
        single = fit_early_learning_curve(curves[:, j])
        torch.testing.assert_close(torch.stack(single), torch.stack([a[j], b[j], c[j]]), atol=1e-4, rtol=1e-4)


def test_end_epoch_matches_the_closed_form() -> None:
    # b = 1: slope ratio f'(e)/f'(1) = exp(-(e - 1)/c); the update epoch is the first e with ratio < 1 - r.
    for c in (0.5, 1.0, 3.0, 10.0):
        one = torch.ones((), dtype=torch.float64)
        e_star = early_learning_end_epoch(one, one, torch.tensor(c, dtype=torch.float64), r=0.9, horizon=500)
        expected = math.floor(1 + c * math.log(10)) + 1
        assert int(e_star) == expected, (c, int(e_star), expected)
    # The horizon caps it (ADELE's n_epoch): at most `horizon`.
    one = torch.ones((), dtype=torch.float64)
    assert int(early_learning_end_epoch(one, one, torch.tensor(100.0, dtype=torch.float64), horizon=5)) == 5


def test_detector_matches_adele_reference_with_scipy() -> None:
    np = pytest.importorskip("numpy")
    optimize = pytest.importorskip("scipy.optimize")

    def curve(x: Any, a: float, b: float, c: float) -> Any:
        return a * (1 - np.exp(-1 / c * x**b))

    def slope(x: Any, a: float, b: float, c: float) -> Any:
        x = x + 1e-6
        return a * b * 1 / c * np.exp(-1 / c * x**b) * (x ** (b - 1))

    rng = np.random.default_rng(0)
    for _ in range(8):
        t = int(rng.integers(5, 12))
        a, b, c = rng.uniform(0.4, 1.0), rng.uniform(0.3, 1.0), rng.uniform(0.5, 6.0)
        x = np.arange(1, t + 1, dtype=float)
        y = np.clip(curve(x, a, b, c) + rng.normal(0, 0.01, t), 0, 1)
        popt, _ = optimize.curve_fit(
            curve, x, y, p0=(1, 1, 1), method="trf", sigma=np.geomspace(1, 0.1, t), absolute_sigma=True,
            bounds=([0, 0, 0], [1, 1, np.inf]),
        )  # fmt: skip
        e = np.arange(1, 60)
        rel = abs(abs(slope(e, *popt)) - abs(slope(1, *popt))) / abs(slope(1, *popt))
        rel[rel > 1] = 0
        reference = int(np.sum(rel <= 0.9) + 1)
        ours = early_learning_end_epoch(*fit_early_learning_curve(torch.tensor(y)), r=0.9, horizon=60)
        assert int(ours) == reference


def test_end_of_early_learning_needs_min_epochs() -> None:
    x = torch.arange(1, 8, dtype=torch.float64)
    fast = early_learning_curve(x, torch.tensor(0.9), torch.tensor(1.0), torch.tensor(1.0))
    hist = torch.stack([fast, fast * 0.5], 1)
    assert end_of_early_learning(hist[:2], min_epochs=3).tolist() == [False, False]
    assert end_of_early_learning(hist, horizon=100).tolist() == [True, True]


# -- NoisyLabelConsistency: the term by hand ---------------------------------------------------------------------
def test_loss_term_by_hand_self_teacher_reuses_the_step_logits() -> None:
    torch.manual_seed(0)
    net = _attach(CountingNet(), _fake_trainer(global_step=2, batches=4))
    cons = NoisyLabelConsistency(
        augmentation=Shift(0.5), temperature=0.5, threshold=0.35, rampup="sigmoid_rampup", rampup_epochs=1.0, weight=2.0
    )
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 4, (6,))
    with torch.no_grad():
        q = torch.softmax(net(x), -1)
        z_view = net(x + 0.5)
    cons.threshold = float(q.max(-1).values.median())  # so that the mask keeps some samples and drops others
    ctx = _ctx(net, x, y)
    net.calls.clear()
    loss = cons.loss_term(ctx)
    assert len(net.calls) == 1  # only the perturbed view: the clean prediction is the step's own logits
    mask = (q.max(-1).values >= cons.threshold).float()
    assert 0 < float(mask.sum()) < 6  # the example masks some samples and keeps others
    target = q ** (1 / 0.5) / (q ** (1 / 0.5)).sum(-1, keepdim=True)
    w = 2.0 * math.exp(-5 * (1 - 0.5) ** 2)  # global step 2 of 4 per epoch = epoch 0.5 of a 1-epoch ramp
    expected = w * (mask * _kl(target, z_view)).sum() / 6
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-5)
    assert ctx.logs["consistency/weight"] == pytest.approx(w)
    torch.testing.assert_close(ctx.logs["consistency/mask_rate"], mask.mean())
    torch.testing.assert_close(ctx.logs["consistency/teacher_confidence"], q.max(-1).values.mean())
    # The gradient flows through the view's forward only.
    loss.backward()
    assert all(p.grad is not None for p in net.parameters())


def test_weight_ramp_follows_the_shared_schedule() -> None:
    cons = NoisyLabelConsistency(weight=3.0, rampup_epochs=2.0)
    for step in (0, 3, 4, 8, 20):
        got = cons.current_weight(_fake_trainer(global_step=step, batches=4))  # type: ignore[arg-type]
        assert got == pytest.approx(3.0 * sigmoid_rampup(step / 4, 2.0))
    assert NoisyLabelConsistency(rampup_epochs=0.0).current_weight(_fake_trainer()) == 1.0  # type: ignore[arg-type]
    assert NoisyLabelConsistency(rampup="constant", weight=0.5).current_weight(_fake_trainer()) == 0.5  # type: ignore[arg-type]


def test_ema_teacher_target_and_fallback_before_first_update() -> None:
    torch.manual_seed(0)
    net = _attach(CountingNet(), _fake_trainer(global_step=40))
    teacher_net = TinyNet()
    stub = StubTeacher(teacher_net)
    cons = NoisyLabelConsistency(teacher="ema", augmentation=Shift(0.25), temperature=1.0, threshold=0.0)
    cons._teacher = stub  # what `setup` finds with `find_teacher`
    x, y = torch.randn(5, 1, 8, 8), torch.randint(0, 4, (5,))
    ctx = _ctx(net, x, y)
    loss = cons.loss_term(ctx)
    assert stub.calls == 1
    with torch.no_grad():
        q = torch.softmax(teacher_net(x), -1)
        expected = _kl(q, net(x + 0.25)).mean() * cons.current_weight(net.trainer)
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-5)
    # Before the teacher's first update: the student's own prediction, and no teacher forward.
    stub.has_updated = False
    ctx = _ctx(net, x, y)
    loss = cons.loss_term(ctx)
    assert stub.calls == 1
    with torch.no_grad():
        q_self = torch.softmax(net(x), -1)
        expected = _kl(q_self, net(x + 0.25)).mean() * cons.current_weight(net.trainer)
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-5)


def test_with_the_real_ema_teacher_one_shared_teacher_forward_per_step() -> None:
    from lightning_reg.callbacks.ema import EMATeacher

    calls: list[bool] = []

    class CountingEMA(EMATeacher):
        def teacher_forward(self, x: Any) -> torch.Tensor:
            calls.append(self.has_updated)
            return super().teacher_forward(x)

    cbs = [
        LabelCorrection(source="teacher", start_epoch=0, threshold=0.3),
        NoisyLabelConsistency(teacher="ema", augmentation=GaussianNoise(0.1), threshold=0.0),
        CountingEMA(decay=0.9),
    ]
    trainer, _ = fit(cbs, TinyNet(), max_epochs=1)
    # Step 1 runs before the first EMA update: both fall back to the student. Steps 2-4 share one teacher forward.
    assert calls == [True, True, True]
    assert math.isfinite(float(trainer.callback_metrics["train/loss_consistency"]))


def test_ema_without_a_teacher_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"no callback with `teacher_forward`. Add `EMATeacher"):
        fit([NoisyLabelConsistency(teacher="ema")], TinyNet(), max_epochs=1)
    with pytest.raises(ValueError, match=r"LabelCorrection\(source='teacher'\)"):
        fit([LabelCorrection(source="teacher")], TinyNet(), max_epochs=1)


def test_multiscale_pulls_every_view_to_the_weighted_mean() -> None:
    torch.manual_seed(0)
    net = _attach(CountingNet(), _fake_trainer(global_step=100))
    ms = MultiScale(scales=[1.0, 0.5], weights=[1.0, 3.0], keep_size=True)  # TinyNet needs 8x8 inputs
    cons = NoisyLabelConsistency(augmentation=ms, temperature=1.0, threshold=0.0, rampup="constant")
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 4, (4,))
    ctx = _ctx(net, x, y)
    net.calls.clear()
    loss = cons.loss_term(ctx)
    assert len(net.calls) == 1  # the scale-1 view reuses the step's forward
    with torch.no_grad():
        z1, z2 = net(x), net(ms.views(x)[1])
        mean = 0.25 * torch.softmax(z1, -1) + 0.75 * torch.softmax(z2, -1)
        expected = 0.25 * _kl(mean, z1).mean() + 0.75 * _kl(mean, z2).mean()
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-5)


def test_weak_view_and_input_stage_cost_one_no_grad_forward_each() -> None:
    torch.manual_seed(0)
    net = _attach(CountingNet(), _fake_trainer(global_step=100))
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 4, (4,))
    cons = NoisyLabelConsistency(augmentation=Shift(0.5), weak_augmentation=Shift(-0.1), temperature=1.0, threshold=0.0)
    ctx = _ctx(net, x, y)
    net.calls.clear()
    loss = cons.loss_term(ctx)
    assert [grad for _, _, grad in net.calls] == [True, False]  # the view with gradients, the weak view without
    with torch.no_grad():
        expected = _kl(torch.softmax(net(x - 0.1), -1), net(x + 0.5)).mean() * cons.current_weight(net.trainer)
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-5)
    # An input-stage regularizer changed the input (e.g. mixup): views start from the clean input, and the
    # target needs one no-grad forward on it.
    cons = NoisyLabelConsistency(augmentation=Shift(0.5), temperature=1.0, threshold=0.0)
    ctx = StepContext(module=net, x=x * 0.3, labels=y, given_labels=y)
    ctx.extras["clean_x"] = x
    ctx.logits = net(ctx.x)
    net.calls.clear()
    loss = cons.loss_term(ctx)
    assert [grad for _, _, grad in net.calls] == [True, False]
    with torch.no_grad():
        expected = _kl(torch.softmax(net(x), -1), net(x + 0.5)).mean() * cons.current_weight(net.trainer)
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-5)
    # Without the input (a custom training_step that did not pass x=...) the error says how to fix it.
    ctx = StepContext(module=net, x=None, labels=y, given_labels=y)
    ctx.logits = net(x)
    with pytest.raises(ValueError, match=r"regularized_loss\(logits, y, index, x=x\)"):
        cons.loss_term(ctx)


def test_training_logs_and_runs_the_views_under_autocast() -> None:
    net = CountingNet()
    trainer, _ = fit(
        [NoisyLabelConsistency(augmentation=PatchMask(patch_size=2), threshold=0.3)],
        net,
        max_epochs=1,
        precision="bf16-mixed",
    )
    for key in (
        "train/loss_consistency",
        "consistency/weight",
        "consistency/mask_rate",
        "consistency/teacher_confidence",
    ):
        assert key in trainer.callback_metrics
        assert math.isfinite(float(trainer.callback_metrics[key]))
    train_calls = [c for c in net.calls if c[2]]
    assert len(train_calls) == 8  # 4 steps x (main forward + one view)
    assert all(autocast for _, autocast, _ in train_calls)


# -- LabelCorrection ----------------------------------------------------------------------------------------------
def _lc_step(
    lc: LabelCorrection, logits: torch.Tensor, given: torch.Tensor, index: torch.Tensor, trainer: Any
) -> StepContext:
    module = SimpleNamespace(trainer=trainer)
    ctx = StepContext(module=module, x=None, labels=given.clone(), given_labels=given, index=index, logits=logits)  # type: ignore[arg-type]
    lc.refine_labels(ctx)
    return ctx


def test_label_correction_rules() -> None:
    lc = LabelCorrection(threshold=0.8, num_samples=10)
    trainer = _fake_trainer(epoch=0)
    big = 10.0  # confidence ~ 1
    # Nothing is corrected before early learning ends.
    logits = torch.tensor([[0.0, big, 0.0]] * 2)
    ctx = _lc_step(lc, logits, torch.tensor([0, 0]), torch.tensor([0, 1]), trainer)
    assert ctx.labels.tolist() == [0, 0] and lc.num_corrected == 0
    # Early learning has ended for classes 0 and 1 (not 2).
    assert lc._detected_epoch is not None
    lc._detected_epoch = torch.tensor([0, 0, -1])
    trainer.current_epoch = 1
    logits = torch.tensor(
        [
            [0.0, big, 0.0],  # given 0, confidently 1 -> corrected to 1
            [0.0, 0.0, big],  # given 0, confidently 2, but class 2 is not being corrected -> kept
            [big, 0.0, 0.0],  # given 2 (not corrected) -> kept
            [0.9, 0.0, 0.0],  # given 1, predicted 0 with confidence 0.55 < 0.8 -> kept
            [0.0, big, 0.0],  # given 1, predicted 1 -> no correction
        ]
    )
    given = torch.tensor([0, 0, 2, 1, 1])
    ctx = _lc_step(lc, logits, given, torch.tensor([2, 3, 4, 5, 6]), trainer)
    assert ctx.labels.tolist() == [1, 0, 2, 1, 1]
    assert lc.corrections().tolist() == [-1, -1, 1, -1, -1, -1, -1, -1, -1, -1]
    # Later visits: the correction is kept and feeds the label until a confident prediction of the given
    # label reverts it.
    ctx = _lc_step(lc, torch.tensor([[0.3, 0.0, 0.0]]), torch.tensor([0]), torch.tensor([2]), trainer)
    assert ctx.labels.tolist() == [1] and lc.num_corrected == 1
    ctx = _lc_step(lc, torch.tensor([[big, 0.0, 0.0]]), torch.tensor([0]), torch.tensor([2]), trainer)
    assert ctx.labels.tolist() == [0] and lc.num_corrected == 0


def test_label_correction_start_epoch_and_precision(tmp_path: Path) -> None:
    true = torch.tensor([1, 1, 0, 0])
    path = tmp_path / "true.pt"
    torch.save(true, path)
    lc = LabelCorrection(threshold=0.5, start_epoch=2, num_samples=4, true_labels_path=str(path))
    lc.setup(SimpleNamespace(callbacks=[lc]), TinyNet(), "fit")  # type: ignore[arg-type]
    logits = torch.tensor([[0.0, 9.0], [0.0, 9.0], [0.0, 9.0], [9.0, 0.0]])
    given = torch.tensor([0, 1, 0, 1])
    ctx = _lc_step(lc, logits, given, torch.arange(4), _fake_trainer(epoch=1))
    assert ctx.labels.tolist() == given.tolist()  # before start_epoch
    ctx = _lc_step(lc, logits, given, torch.arange(4), _fake_trainer(epoch=2))
    assert ctx.labels.tolist() == [1, 1, 1, 0]
    assert lc.corrections().tolist() == [1, -1, 1, 0]
    assert lc.precision() == pytest.approx(2 / 3)  # sample 2's true label is 0
    with pytest.raises(TypeError, match="1-D integer tensor"):
        lc.set_true_labels(torch.zeros(4))


def test_epoch_end_detects_and_logs() -> None:
    lc = LabelCorrection(threshold=0.5, num_samples=8, min_epochs=3, horizon=50)
    logged: dict[str, float] = {}
    pl_module = SimpleNamespace(log=lambda k, v, **kw: logged.__setitem__(k, v))
    # Class 0 is learned at once (flat curve: early learning over); class 1 rises steadily.
    agreement = [(0.80, 0.10), (0.81, 0.20), (0.81, 0.30), (0.81, 0.40)]
    for epoch, (a0, a1) in enumerate(agreement):
        trainer = _fake_trainer(epoch=epoch, max_epochs=50)
        n = 1000
        # Build counts directly: TP = IoU * n with predicted = given = n gives IoU = TP / (2n - TP).
        tp = [round(2 * n * a / (1 + a)) for a in (a0, a1)]
        lc._ensure(trainer, torch.zeros(1, 2))
        assert lc._counts is not None
        lc._counts.copy_(torch.tensor([tp, [n, n], [n, n]]))
        lc.on_train_epoch_end(trainer, pl_module)  # type: ignore[arg-type]
    hist = lc.agreement_history
    assert hist.shape == (4, 2)
    torch.testing.assert_close(hist, torch.tensor(agreement), atol=1e-3, rtol=0)
    expected = end_of_early_learning(hist[:3], horizon=50)
    assert expected.tolist() == [True, False]
    assert lc.detected_epochs is not None and lc.detected_epochs.tolist() == [2, -1]
    assert logged["label_correction/active_classes"] == 1.0
    assert logged["label_correction/num_corrected"] == 0.0
    assert logged["label_correction/agreement"] == pytest.approx((0.81 + 0.40) / 2, abs=1e-3)
    assert "label_correction/precision" not in logged  # no true labels given


def _noisy_loader(n: int = 64, noise: float = 0.3) -> ResumableDataLoader:
    base = make_dataset(n, seed=0, noise=noise)
    ds = IndexedDataset(base)
    return ResumableDataLoader(ds, batch_size=16, sampler=EpochSeededSampler(ds, seed=0, shuffle=True))


def test_resume_restores_label_corrections(tmp_path: Path) -> None:
    def callbacks() -> list[Any]:
        return [
            LabelCorrection(threshold=0.5, min_epochs=2, horizon=3),
            NoisyLabelConsistency(augmentation=GaussianNoise(0.1), threshold=0.5, rampup_epochs=1.0),
        ]

    ckpt_cb = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=14, save_top_k=-1, filename="{step}")
    full = callbacks()
    _, full_model = fit([*full, ckpt_cb], TinyNet(), _noisy_loader(), max_epochs=5, enable_checkpointing=True)
    lc = full[0]
    assert lc.detected_epochs is not None and bool((lc.detected_epochs >= 0).all())
    assert lc.num_corrected > 0, "the run should have corrected labels, or the resume check is vacuous"
    resumed = callbacks()
    _, resumed_model = fit(resumed, TinyNet(), _noisy_loader(), ckpt_path=str(tmp_path / "step=14.ckpt"), max_epochs=5)
    assert_state_equal(full_model.state_dict(), resumed_model.state_dict(), "model")
    for a, b in zip(full, resumed):
        assert_state_equal(a.state_dict(), b.state_dict(), type(a).__name__)
    assert torch.equal(full[0].corrections(), resumed[0].corrections())


def test_label_correction_feeds_the_base_loss() -> None:
    # The base loss is CE on the corrected labels: compare with a model trained on those labels directly.
    lc = LabelCorrection(threshold=0.0, start_epoch=0, num_samples=4)
    net = TinyNet()
    logits = torch.tensor([[0.0, 5.0, 0.0, 0.0], [5.0, 0.0, 0.0, 0.0]])
    trainer = _fake_trainer()
    trainer.callbacks = [lc]
    net._trainer = trainer
    loss = net.regularized_loss(logits, torch.tensor([0, 0]), torch.tensor([0, 1]), log=False)
    torch.testing.assert_close(loss, F.cross_entropy(logits, torch.tensor([1, 0])))


# -- DDP with the extra forward passes ---------------------------------------------------------------------------
N_DDP = 40


def _ddp_worker(out_dir: str) -> None:
    L.seed_everything(0, verbose=False)
    model = TinyNet()
    lc = LabelCorrection(threshold=0.4, min_epochs=2, horizon=2)
    cbs: list[Any] = [
        NoisyLabelConsistency(teacher="ema", augmentation=MultiScale(keep_size=True), threshold=0.0),
        lc,
        StubTeacher(),
    ]
    base = make_dataset(N_DDP, noise=0.3)
    ds = IndexedDataset(TensorDataset(*base.tensors))
    sampler = DistributedSampler(ds, num_replicas=2, rank=int(os.environ.get("LOCAL_RANK", 0)), shuffle=False)
    loader = DataLoader(ds, batch_size=8, sampler=sampler)
    kw = trainer_kwargs(devices=2, strategy="ddp", use_distributed_sampler=False)
    trainer = L.Trainer(callbacks=cbs, max_epochs=3, **kw)
    trainer.fit(model, train_dataloaders=loader)
    state = {
        "model": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "lc": lc.state_dict(),
        "num_corrected": lc.num_corrected,
        "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
    }
    torch.save(state, Path(out_dir) / f"rank{trainer.global_rank}.pt")


@pytest.mark.slow
def test_ddp_two_processes_with_extra_forwards_and_corrections(tmp_path: Path) -> None:
    """`strategy="ddp"` (find_unused_parameters=False) with the EMA-teacher target, three multi-scale views and
    label correction: it must run (no unused-parameter or reducer errors), and the ranks must agree."""
    run_ddp_script("tests.test_consistency", str(tmp_path), timeout=600)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    assert_state_equal(r0["model"], r1["model"], "model")
    assert_state_equal(r0["lc"], r1["lc"], "LabelCorrection")
    assert r0["num_corrected"] == r1["num_corrected"] > 0
    assert math.isfinite(r0["metrics"]["train/loss_consistency"])


def test_two_loss_terms_named_consistency_conflict() -> None:
    reason = NoisyLabelConsistency().conflicts_with(NoisyLabelConsistency(teacher="ema"))
    assert reason is not None and "state key" in reason
    assert LabelCorrection().conflicts_with(NoisyLabelConsistency()) is None
    assert isinstance(LabelCorrection(), LossRegularizer) and LabelCorrection.stage == "label"


if __name__ == "__main__":
    _ddp_worker(sys.argv[1])
