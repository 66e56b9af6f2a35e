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
    adele_confidence,
    adele_multiscale_consistency,
    class_agreement_counts,
    class_iou,
    confidence_mask,
    consistency_divergence,
    consistency_loss,
    early_learning_axis,
    early_learning_curve,
    early_learning_end_epoch,
    end_of_early_learning,
    fit_early_learning_curve,
    sharpen,
)
from tests.conformance.cases.consistency import naive_dense_term  # the formula in float64 Python
from tests.helpers import (
    StepSeed,
    TinyNet,
    TinySegNet,
    assert_state_equal,
    fit,
    make_dataset,
    make_loader,
    run_ddp_script,
    trainer_kwargs,
)

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
        training=True,
        sanity_checking=False,
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
    x = early_learning_axis(10)
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


def _official_detector() -> Any:
    """ADELE's `label_update_epoch` / `if_update` (train.py, SegThor/brat/label_correction.py), transcribed in numpy.

    Returns ``if_update(iou, current_epoch, n_epoch, r, eval_interval, num_iter_per_epoch) -> (update, epoch)``.
    """
    np = pytest.importorskip("numpy")
    optimize = pytest.importorskip("scipy.optimize")

    def curve(x: Any, a: float, b: float, c: float) -> Any:
        return a * (1 - np.exp(-1 / c * x**b))

    def slope(x: Any, a: float, b: float, c: float) -> Any:
        x = x + 1e-6
        return a * b * 1 / c * np.exp(-1 / c * x**b) * (x ** (b - 1))

    def if_update(
        iou: Any, current_epoch: int, n_epoch: int, r: float = 0.9, eval_interval: float = 1, iters: float = 1
    ) -> tuple[bool, int]:
        x = np.linspace(0, len(iou) * eval_interval / iters, len(iou))
        popt, _ = optimize.curve_fit(
            curve, x, iou, p0=(1, 1, 1), method="trf", sigma=np.geomspace(1, 0.1, len(iou)), absolute_sigma=True,
            bounds=([0, 0, 0], [1, 1, np.inf]),
        )  # fmt: skip
        e = np.arange(1, n_epoch)
        rel = abs(abs(slope(e, *popt)) - abs(slope(1, *popt))) / abs(slope(1, *popt))
        rel[rel > 1] = 0
        update_epoch = int(np.sum(rel <= r) + 1)
        return bool(current_epoch >= update_epoch), update_epoch

    return if_update


def test_detector_matches_adele_reference_with_scipy() -> None:
    np = pytest.importorskip("numpy")
    if_update = _official_detector()
    rng = np.random.default_rng(0)
    for _ in range(8):
        t = int(rng.integers(5, 12))
        a, b, c = rng.uniform(0.4, 1.0), rng.uniform(0.3, 1.0), rng.uniform(0.5, 6.0)
        y = np.clip(a * (1 - np.exp(-(np.arange(t, dtype=float) ** b) / c)) + rng.normal(0, 0.01, t), 0, 1)
        reference, reference_epoch = if_update(y, t - 1, n_epoch=60)  # the epoch just finished, 0-based
        hist = torch.tensor(y)
        ours_epoch = early_learning_end_epoch(*fit_early_learning_curve(hist), r=0.9, horizon=60)
        assert int(ours_epoch) == reference_epoch
        assert bool(end_of_early_learning(hist.unsqueeze(1), horizon=60)[0]) == reference


def test_detector_fits_on_adeles_axis_not_one_to_t() -> None:
    """A synthetic agreement curve on which the axis matters: ADELE fits epoch k's point (0-based) at
    ``linspace(0, T, T)[k]``; fitting at ``x = 1..T`` (as before) gave a different update epoch."""
    np = pytest.importorskip("numpy")
    if_update = _official_detector()
    epochs = torch.arange(10, dtype=torch.float64)
    hist = early_learning_curve(epochs, 0.8, 1.0, 2.0) + 0.005 * torch.cos(3 * epochs)
    _, reference_epoch = if_update(hist.numpy(), len(hist) - 1, n_epoch=30)
    on_one_to_t = int(early_learning_end_epoch(*fit_early_learning_curve(hist, epochs + 1), horizon=30))
    assert (reference_epoch, on_one_to_t) == (7, 8)  # the example discriminates the two axes
    torch.testing.assert_close(early_learning_axis(10), torch.tensor(np.linspace(0, 10, 10)))
    assert int(early_learning_end_epoch(*fit_early_learning_curve(hist), horizon=30)) == reference_epoch
    # Every prefix decides as ADELE's `if_update(iou, epoch)` does, `epoch` being the 0-based epoch just finished.
    for t in range(3, len(hist) + 1):
        assert bool(end_of_early_learning(hist[:t, None], horizon=30)[0]) == if_update(hist[:t].numpy(), t - 1, 30)[0]
    # ADELE's segmentation setting: a point every 100 iterations of 10581 / 10 per epoch.
    curve = early_learning_curve(torch.arange(40, dtype=torch.float64) * 0.0945, 0.8, 0.6, 1.5)
    dense = (curve + 0.01 * torch.sin(torch.arange(40.0))).clamp(0, 1)
    update, reference_epoch = if_update(dense.numpy(), 3, n_epoch=16, eval_interval=100, iters=10581 / 10)
    x = early_learning_axis(40, interval=100 / (10581 / 10))
    assert int(early_learning_end_epoch(*fit_early_learning_curve(dense, x), horizon=16)) == reference_epoch
    got = end_of_early_learning(dense[:, None], horizon=16, interval=100 / (10581 / 10), current_epoch=3)
    assert bool(got[0]) == update


def test_detector_counts_undefined_relative_changes_as_adele_does() -> None:
    # A flat zero curve fits a = 0: every relative change is 0/0 = NaN, which numpy's `rel <= r` does not count,
    # so ADELE's update epoch is 1 (the class is corrected at once), not the horizon.
    zero = torch.zeros((), dtype=torch.float64)
    one = torch.ones((), dtype=torch.float64)
    assert int(early_learning_end_epoch(zero, one, one, horizon=50)) == 1


def test_end_of_early_learning_needs_min_epochs() -> None:
    x = torch.arange(1, 8, dtype=torch.float64)
    fast = early_learning_curve(x, torch.tensor(0.9), torch.tensor(1.0), torch.tensor(1.0))
    hist = torch.stack([fast, fast * 0.5], 1)
    assert end_of_early_learning(hist[:2], min_epochs=3).tolist() == [False, False]
    assert end_of_early_learning(hist, horizon=100).tolist() == [True, True]


def _official_adele_consistency(
    logits: list[torch.Tensor], threshold: float, weights: list[float] | None = None, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """ADELE's `calc_jsd_multiscale` consistency (lib/utils/JSD_loss.py), transcribed with naive ops.

    ``weights`` plays `softmax(weight)` (uniform from ADELE's all-ones init); ``valid`` plays `labels < 255`.
    """
    probs = [torch.exp(z) / torch.exp(z).sum(dim=1, keepdim=True) for z in logits]
    w = weights if weights is not None else [1.0 / len(logits)] * len(logits)
    mixture = sum(wi * p for wi, p in zip(w, probs))
    mixture = torch.clamp(mixture, 1e-3, 1 - 1e-3)  # type: ignore[call-overload]
    keep = torch.ones_like(mixture[:, 0]) if valid is None else valid.to(mixture.dtype)
    max_probs = torch.amax(mixture * keep.unsqueeze(1), dim=tuple(range(1, mixture.dim())), keepdim=True)
    mask = (max_probs >= threshold).to(mixture.dtype)
    # F.kl_div(log(mixture), p, reduction="none") = p * (log p - log mixture); summed over classes, then scales.
    kl = [torch.sum(p * (torch.log(p) - torch.log(mixture)) * mask, dim=1) for p in probs]
    return torch.mean(sum(kl))  # type: ignore[arg-type]


@pytest.mark.parametrize("dense", [False, True], ids=["classification", "segmentation"])
def test_adele_consistency_matches_the_official_formula_and_gradients(dense: bool) -> None:
    g = torch.Generator().manual_seed(0)
    shape = (6, 4, 3, 5) if dense else (6, 4)
    logits = [(3 * torch.randn(shape, generator=g, dtype=torch.float64)).requires_grad_() for _ in range(3)]
    valid = None
    if dense:
        valid = torch.rand(6, 3, 5, generator=g) > 0.3
        valid[0] = False  # a sample without any labelled pixel: its max is 0, so it is masked
    for weights in (None, [0.2, 0.5, 0.3]):
        mixture = sum(
            w * torch.softmax(z.detach(), 1) for w, z in zip(weights or [1 / 3] * 3, logits)
        )  # so that the threshold keeps some samples and masks others
        conf = mixture.amax(dim=tuple(range(1, mixture.dim())))  # type: ignore[union-attr]
        threshold = float(conf.sort().values[2:4].mean())  # between two samples' confidences
        ours = adele_multiscale_consistency(logits, weights=weights, threshold=threshold, valid=valid)
        ref = _official_adele_consistency(logits, threshold, weights, valid)
        assert ours.dtype == torch.float64
        torch.testing.assert_close(ours, ref, atol=1e-12, rtol=1e-10)
        got = torch.autograd.grad(ours, logits)
        want = torch.autograd.grad(ref, logits)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)
        # The gradient flows through the mean prediction: with a stop-gradient mean it differs for unequal
        # weights. (For equal weights the path through p̄ contributes nothing where the clip is inactive:
        # d/dp̄ Σ_s Σ_c p_sc (-log p̄_c) = -S, constant over the classes, so it vanishes on the simplex.)
        probs = [torch.softmax(z, 1) for z in logits]
        sg_mean = torch.clamp(sum(w * p for w, p in zip(weights or [1 / 3] * 3, probs)).detach(), 1e-3, 1 - 1e-3)  # type: ignore[union-attr]
        mask = (conf >= threshold).double().view(-1, *([1] * (len(shape) - 2)))
        sg = sum(((p * (p.log() - sg_mean.log())).sum(1) * mask).mean() for p in probs)
        same = torch.allclose(torch.autograd.grad(sg, logits)[0], got[0], atol=1e-9, rtol=0)  # type: ignore[arg-type]
        assert same == (weights is None and bool(sg_mean.gt(1e-3).all() and sg_mean.lt(1 - 1e-3).all()))
    # fp32 for lower-precision inputs, and the mask is all-or-nothing per sample at the extremes.
    low = [z.detach().to(torch.bfloat16) for z in logits]
    assert adele_multiscale_consistency(low).dtype == torch.float32
    assert float(adele_multiscale_consistency(logits, threshold=1.0)) == 0.0  # the clamp keeps p̄ <= 0.999
    with pytest.raises(ValueError, match="Expected argument `view_logits`"):
        adele_multiscale_consistency([logits[0]])
    with pytest.raises(ValueError, match="Expected argument `weights`"):
        adele_multiscale_consistency(logits, weights=[1.0, 0.0])


# -- the functional core on dense elements ----------------------------------------------------------------------
@pytest.mark.parametrize("div", ["kl", "mse"])
def test_dense_consistency_loss_is_a_mean_over_counted_elements(div: str) -> None:
    g = torch.Generator().manual_seed(0)
    z = (2 * torch.randn(3, 4, 2, 3, generator=g, dtype=torch.float64)).requires_grad_()
    q = torch.softmax(2 * torch.randn(3, 4, 2, 3, generator=g, dtype=torch.float64), 1)
    counted = torch.rand(3, 2, 3, generator=g) > 0.3
    counted[2] = False  # an image that does not count at all
    mask = confidence_mask(q, 0.5, dim=1)
    assert mask.shape == (3, 2, 3) and 0 < float(mask.sum()) < 18
    got = consistency_loss(z, q, mask, div, dim=1, valid=counted)  # type: ignore[arg-type]
    torch.testing.assert_close(
        got.double(),
        torch.tensor(naive_dense_term(z.detach(), q, mask, counted, div), dtype=torch.float64),
        atol=1e-6,
        rtol=1e-6,
    )
    (grad,) = torch.autograd.grad(got, z)
    assert torch.count_nonzero(grad[2]) == 0 and torch.count_nonzero(grad.movedim(1, -1)[~counted]) == 0
    # The token layout (B, T, C) along the last dim gives the same term; no element counted gives 0, not NaN.
    tok = consistency_loss(z.detach().movedim(1, -1), q.movedim(1, -1), mask, div, valid=counted)  # type: ignore[arg-type]
    torch.testing.assert_close(tok, got.detach())
    assert float(consistency_loss(z, q, mask, div, dim=1, valid=torch.zeros_like(counted))) == 0.0  # type: ignore[arg-type]
    # Classification is the special case without elements: valid=None is the mean over all samples.
    flat_z, flat_q = z.detach().movedim(1, -1).reshape(-1, 4), q.movedim(1, -1).reshape(-1, 4)
    torch.testing.assert_close(
        consistency_loss(flat_z, flat_q, divergence=div),
        consistency_divergence(flat_z, flat_q, div).mean(),  # type: ignore[arg-type]
    )
    # sharpen along the class dim equals the tempered softmax there.
    torch.testing.assert_close(sharpen(q, 0.4, dim=1), torch.softmax(torch.log(q) / 0.4, 1).float())


def test_adele_term_on_tokens_and_its_counted_elements() -> None:
    g = torch.Generator().manual_seed(1)
    views = [torch.randn(3, 5, 4, generator=g, dtype=torch.float64) for _ in range(2)]  # (B, T, C)
    valid = torch.rand(3, 5, generator=g) > 0.3
    channels_first = [v.movedim(-1, 1) for v in views]
    # dim=-1 on (B, T, C) equals dim=1 on (B, C, T).
    a = adele_multiscale_consistency(views, threshold=0.4, valid=valid, dim=-1)
    b = adele_multiscale_consistency(channels_first, threshold=0.4, valid=valid)
    torch.testing.assert_close(a, b)
    # counted: the mean runs over the counted elements only (the official mean over all is counted=None).
    probs = [torch.softmax(v, -1) for v in views]
    mixture = ((probs[0] + probs[1]) / 2).clamp(1e-3, 1 - 1e-3)
    keep = ((mixture * valid.unsqueeze(-1)).flatten(1).amax(1) >= 0.4).double()
    kl = sum((p * (p.log() - mixture.log())).sum(-1) for p in probs) * keep[:, None]
    got = adele_multiscale_consistency(views, threshold=0.4, valid=valid, counted=valid, dim=-1)
    torch.testing.assert_close(got, kl[valid].sum() / valid.sum(), atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(adele_multiscale_consistency(views, threshold=0.4, valid=valid, dim=-1), kl.mean())
    conf = adele_confidence(views, valid=valid, dim=-1)
    mixture = (torch.softmax(views[0], -1) + torch.softmax(views[1], -1)) / 2
    expected = (mixture.clamp(1e-3, 1 - 1e-3) * valid.unsqueeze(-1)).flatten(1).amax(1)
    torch.testing.assert_close(conf, expected)


def test_class_agreement_counts_skip_ignored_elements() -> None:
    pred = torch.tensor([[0, 1], [1, 2]])
    labels = torch.tensor([[0, -100], [1, 0]])
    counts = class_agreement_counts(pred, labels, 3, valid=labels != -100)
    # Valid pixels: (0, 0), (1, 1), (2, 0): TP (1, 1, 0), predicted (1, 1, 1), given (2, 1, 0).
    assert counts.tolist() == [[1, 1, 0], [1, 1, 1], [2, 1, 0]]
    # The index may be any ignore value (e.g. 255) when `valid` says which elements count.
    assert (
        class_agreement_counts(pred, torch.tensor([[0, 255], [1, 0]]), 3, valid=labels != -100).tolist()
        == counts.tolist()
    )


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


def test_adele_form_is_the_official_term_over_the_views() -> None:
    torch.manual_seed(0)
    net = _attach(CountingNet(), _fake_trainer(global_step=100))
    ms = MultiScale(scales=[1.0, 0.5, 0.75], keep_size=True)  # TinyNet needs 8x8 inputs
    cons = NoisyLabelConsistency(form="adele", augmentation=ms, threshold=0.3, rampup="constant", weight=2.0)
    assert cons.temperature is None and cons.form == "adele"
    x, y = torch.randn(5, 1, 8, 8), torch.randint(0, 4, (5,))
    ctx = _ctx(net, x, y)
    net.calls.clear()
    loss = cons.loss_term(ctx)
    assert len(net.calls) == 2  # the scale-1 view reuses the step's forward
    views = ms.views(x)
    z = [net(v) for v in views]
    expected = 2.0 * _official_adele_consistency([t.double() for t in z], 0.3)
    torch.testing.assert_close(loss.double(), expected, atol=1e-6, rtol=1e-5)
    mixture = sum(torch.softmax(t.detach(), -1) for t in z) / 3
    conf = mixture.clamp(1e-3, 1 - 1e-3).amax(-1)  # type: ignore[union-attr]
    torch.testing.assert_close(ctx.logs["consistency/mask_rate"], (conf >= 0.3).float().mean())
    torch.testing.assert_close(ctx.logs["consistency/teacher_confidence"], conf.mean())
    # Gradients flow through every view, the step's own forward included (p̄ is not detached).
    grads = torch.autograd.grad(loss, [ctx.logits], retain_graph=True)
    assert grads[0].abs().sum() > 0
    # A single-view augmentation compares the clean input with its view, each weighing 1/2 in p̄.
    cons = NoisyLabelConsistency(form="adele", augmentation=Shift(0.5), threshold=0.0, rampup="constant")
    ctx = _ctx(net, x, y)
    loss = cons.loss_term(ctx)
    expected = _official_adele_consistency([net(x).double(), net(x + 0.5).double()], 0.0)
    torch.testing.assert_close(loss.double(), expected, atol=1e-6, rtol=1e-5)


def test_adele_form_rejects_options_it_does_not_use() -> None:
    for kwargs, arg in [
        ({"teacher": "ema"}, "teacher"),
        ({"weak_augmentation": "flip"}, "weak_augmentation"),
        ({"temperature": 0.5}, "temperature"),
        ({"divergence": "mse"}, "divergence"),
    ]:
        with pytest.raises(ValueError, match=f"`NoisyLabelConsistency\\(form='adele'\\)` does not use `{arg}`"):
            NoisyLabelConsistency(form="adele", **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="Expected argument `form` to be one of"):
        NoisyLabelConsistency(form="jsd")  # type: ignore[arg-type]
    # The target form keeps UDA's default temperature.
    assert NoisyLabelConsistency().temperature is None
    assert NoisyLabelConsistency(form="adele", temperature=1.0).temperature == 1.0


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
    # 4 steps x one forward carrying the batch and its view (16 + 16 rows), as FixMatch forwards its views.
    assert [shape[0] for shape, _, _ in train_calls] == [32] * 4
    assert all(autocast for _, autocast, _ in train_calls)


# -- LabelCorrection ----------------------------------------------------------------------------------------------
def _lc_step(
    lc: LabelCorrection, logits: torch.Tensor, given: torch.Tensor, index: torch.Tensor, trainer: Any | None
) -> StepContext:
    """One label-stage call; a training step unless ``trainer`` is ``None`` (then a step outside training)."""
    module = SimpleNamespace(trainer=trainer)
    ctx = StepContext(
        module=module,  # type: ignore[arg-type]
        x=None,
        labels=given.clone(),
        given_labels=given,
        index=index,
        logits=logits,
        training=trainer is not None,
    )
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


# -- outside training: validation and the sanity check ------------------------------------------------------------
class ValidatingNet(TinyNet):
    """Calls `regularized_loss` in `validation_step`, as a user who reports the regularized loss would."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.val_losses: list[tuple[torch.Tensor, torch.Tensor]] = []

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y, index = batch
        logits = self(x)
        loss = self.regularized_loss(logits, y, index, x=x, log=False)
        self.val_losses.append((loss.detach(), F.cross_entropy(logits.detach(), y)))


def _fit_with_validation(callbacks: list[Any], validate: bool, max_epochs: int = 4) -> L.LightningModule:
    L.seed_everything(0, verbose=False)
    model = ValidatingNet()
    kw = trainer_kwargs(max_epochs=max_epochs, num_sanity_val_steps=2 if validate else 0)
    if not validate:
        kw["limit_val_batches"] = 0
    trainer = L.Trainer(callbacks=[*callbacks, StepSeed()], **kw)
    # Validation indices 0..31 overlap the training indices: a write would corrupt training rows.
    val = make_loader(32, seed=1, shuffle=False) if validate else None
    trainer.fit(model, train_dataloaders=_noisy_loader(), val_dataloaders=val)
    return model


def test_label_correction_is_a_no_op_outside_training() -> None:
    # No `num_samples`: the sanity check runs before the train dataloader exists and must not need it.
    def make() -> LabelCorrection:
        return LabelCorrection(threshold=0.3, min_epochs=2, horizon=2)

    plain, validated = make(), make()
    _fit_with_validation([plain], validate=False)
    model = _fit_with_validation([validated], validate=True)
    assert isinstance(model, ValidatingNet) and len(model.val_losses) == 2 + 4 * 2  # sanity + 4 epochs of 2 batches
    assert plain.num_corrected > 0, "the run should correct labels, or the comparison is vacuous"
    # Same counts, curves, detections and corrections as a run without validation.
    assert_state_equal(plain.state_dict(), validated.state_dict(), "LabelCorrection")
    # Validation labels were never relabelled: the validation loss is plain CE on the given labels.
    for loss, ce in model.val_losses:
        torch.testing.assert_close(loss, ce)
    # A validation step on its own (outside any trainer's training) changes nothing either.
    before = copy.deepcopy(validated.state_dict())
    ctx = _lc_step(validated, torch.tensor([[0.0, 9.0, 0.0, 0.0]]), torch.tensor([0]), torch.tensor([5]), None)
    assert ctx.labels.tolist() == [0]
    assert_state_equal(before, validated.state_dict(), "LabelCorrection")


def test_consistency_is_a_pure_function_outside_training() -> None:
    def make() -> list[Any]:
        return [NoisyLabelConsistency(augmentation=GaussianNoise(0.1), threshold=0.0, rampup="constant")]

    plain, validated = make(), make()
    model_plain = _fit_with_validation(plain, validate=False, max_epochs=2)
    model = _fit_with_validation(validated, validate=True, max_epochs=2)
    assert isinstance(model, ValidatingNet) and len(model.val_losses) == 2 + 2 * 2
    assert_state_equal(model_plain.state_dict(), model.state_dict(), "model")
    state = plain[0].state_dict()
    assert state == validated[0].state_dict() and state["version"] == NoisyLabelConsistency.version
    assert state["optimizer_steps"] == model.trainer.global_step  # validation steps are not optimizer steps
    # In validation the term is computed (the regularized loss exceeds CE), and it is finite.
    assert all(math.isfinite(float(loss)) and float(loss) > float(ce) for loss, ce in model.val_losses)


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
    trainer = L.Trainer(callbacks=cbs, max_epochs=4, **kw)  # detected after epoch 2 (0-based), corrected in 3
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


# -- one teacher forward per step, one student forward per step (issue 16) -----------------------------------------
def test_one_teacher_forward_per_step_for_every_consumer() -> None:
    from lightning_reg import ELR, PSKD, EMATeacher

    class CountingEMA(EMATeacher):
        calls = 0

        def teacher_forward(self, x: Any) -> torch.Tensor:
            CountingEMA.calls += 1
            return super().teacher_forward(x)

    per_step: list[int] = []

    class PerStep(L.Callback):
        def on_train_batch_start(self, *args: Any) -> None:
            self.before = CountingEMA.calls

        def on_train_batch_end(self, *args: Any) -> None:
            per_step.append(CountingEMA.calls - self.before)

    cbs = [
        CountingEMA(decay=0.9),
        PSKD(teacher="ema"),
        ELR(teacher="ema"),
        NoisyLabelConsistency(teacher="ema", augmentation=GaussianNoise(0.1), threshold=0.0),
        LabelCorrection(source="teacher", start_epoch=0, threshold=0.3),
        PerStep(),
    ]
    fit(cbs, TinyNet(), max_epochs=2)
    assert len(per_step) == 8
    # Before the EMA's first update the consumers fall back to the student; afterwards the teacher runs exactly
    # once per step, whatever the number of consumers (five read it here).
    assert per_step[0] <= 1 and per_step[1:] == [1] * 7, per_step


class RegularizedLossOnlyNet(CountingNet):
    """A custom training_step that forwards the batch itself and only calls `regularized_loss`."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y, index = batch
        return self.regularized_loss(self(x), y, index, x=x)


def test_views_join_the_steps_single_forward_and_custom_steps_forward_them_apart() -> None:
    def cons() -> NoisyLabelConsistency:
        return NoisyLabelConsistency(augmentation=GaussianNoise(0.1), threshold=0.0)

    net = CountingNet()
    fit([cons()], net, max_epochs=1)
    assert [shape[0] for shape, _, grad in net.calls if grad] == [32] * 4  # the batch and its view, one forward
    own = RegularizedLossOnlyNet()
    fit([cons()], own, max_epochs=1)
    assert [shape[0] for shape, _, grad in own.calls if grad] == [16] * 8  # the batch, then the view apart
    # Same term either way (TinyNet has no BatchNorm, so the joint forward gives the same logits).
    net = _attach(TinyNet(), _fake_trainer(global_step=100))
    c = cons()
    net.trainer.callbacks = [c]
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 4, (6,))
    torch.manual_seed(5)
    ctx = net.prepare_inputs(x, y)
    assert list(ctx.views) == ["consistency/view0"]
    ctx.logits = net.forward_views(ctx)
    joint = c.loss_term(ctx)
    torch.manual_seed(5)
    apart = c.loss_term(_ctx(net, x, y))
    torch.testing.assert_close(joint, apart, atol=1e-6, rtol=1e-5)


# -- dense outputs -------------------------------------------------------------------------------------------------
def _dense_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(4, 1, 8, 8) images with 4-class masks: some void pixels, and image 3 without any label."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 1, 8, 8, generator=g)
    y = torch.randint(0, 4, (4, 8, 8), generator=g)
    y[torch.rand(4, 8, 8, generator=g) < 0.2] = -100
    y[3] = -100
    return x, y


def _seg_ctx(module: Any, x: torch.Tensor, y: torch.Tensor, layout: str = "channels_first") -> StepContext:
    ctx = StepContext(module=module, x=x, labels=y, given_labels=y, layout=layout)
    ctx.extras["clean_x"] = x
    ctx.logits = module(x)
    return ctx


@pytest.mark.parametrize("quality", [False, True], ids=["mask", "quality_weight"])
def test_dense_target_term_by_hand_with_a_flip_undone_on_the_output(quality: bool) -> None:
    from lightning_reg.augment import RandomFlip

    torch.manual_seed(0)
    net = _attach(TinySegNet(), _fake_trainer(global_step=100))
    x, y = _dense_batch()
    flip = RandomFlip(p=0.5, dims=[-1])
    cons = NoisyLabelConsistency(
        augmentation=flip, temperature=1.0, threshold=0.4, rampup="constant", quality_weight=quality
    )
    torch.manual_seed(1)
    loss = cons.loss_term(_seg_ctx(net, x, y))
    torch.manual_seed(1)
    (view,), (params,) = flip.views_and_params(x)
    with torch.no_grad():
        q = torch.softmax(net(x), 1)
        z = net(view)
        flipped = params[0][0].view(-1, 1, 1, 1)
        z = torch.where(flipped, z.flip(-1), z)  # the prediction on the flipped image, flipped back
    assert bool(flipped.any()) and not bool(flipped.all())
    counted = y != -100
    counted[3] = True  # every pixel of the unlabeled image counts; void pixels of labelled images do not
    confident = q.amax(1) >= 0.4
    assert 0 < int(confident.sum()) < confident.numel()
    if quality:  # MIC: each image's share of confident counted pixels weighs all its pixels
        share = (confident & counted).flatten(1).sum(1) / counted.flatten(1).sum(1)
        weight = share.view(-1, 1, 1).expand(4, 8, 8)
    else:
        weight = confident.float()
    expected = naive_dense_term(z, q, weight, counted, "kl")
    torch.testing.assert_close(loss.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-6, rtol=1e-5)
    # ignore_void=False: void pixels of labelled images take part too.
    cons_all = NoisyLabelConsistency(
        augmentation=flip, temperature=1.0, threshold=0.4, rampup="constant", quality_weight=quality, ignore_void=False
    )
    torch.manual_seed(1)
    loss_all = cons_all.loss_term(_seg_ctx(net, x, y))
    everything = torch.ones_like(counted)
    if quality:
        weight = confident.float().flatten(1).mean(1).view(-1, 1, 1).expand(4, 8, 8)
    expected_all = naive_dense_term(z, q, weight, everything, "kl")
    torch.testing.assert_close(loss_all.double(), torch.tensor(expected_all, dtype=torch.float64), atol=1e-6, rtol=1e-5)


def test_dense_adele_form_resizes_scales_back_as_the_official_code() -> None:
    torch.manual_seed(0)
    net = _attach(TinySegNet(), _fake_trainer(global_step=100))
    x, y = _dense_batch(1)
    ms = MultiScale(scales=[0.75, 1.0, 1.5])
    cons = NoisyLabelConsistency(form="adele", augmentation=ms, threshold=0.3, rampup="constant", ignore_void=False)
    ctx = _seg_ctx(net, x, y)
    loss = cons.loss_term(ctx)
    with torch.no_grad():
        z = [net(v) for v in ms.views(x)]
    assert [tuple(t.shape[-2:]) for t in z] == [(6, 6), (8, 8), (12, 12)]
    back = [F.interpolate(t, size=(8, 8), mode="bilinear", align_corners=False) for t in z]
    labelled = (y != -100).clone()
    labelled[3] = True  # the per-image maximum runs over labelled pixels (all pixels of an unlabeled image)
    expected = _official_adele_consistency([t.double() for t in back], 0.3, valid=labelled)
    torch.testing.assert_close(loss.double(), expected, atol=1e-6, rtol=1e-5)
    # ignore_void=True (the default): the mean runs over the counted pixels only.
    cons = NoisyLabelConsistency(form="adele", augmentation=ms, threshold=0.3, rampup="constant")
    loss_counted = cons.loss_term(_seg_ctx(net, x, y))
    ref = adele_multiscale_consistency(back, threshold=0.3, valid=labelled, counted=labelled)
    torch.testing.assert_close(loss_counted, ref, atol=1e-6, rtol=1e-5)


def test_dense_views_that_cannot_be_compared_are_refused() -> None:
    from lightning_reg.augment import RandomFlip, RandomResizedCrop
    from tests.helpers import TinyTagger

    x, y = _dense_batch()
    seg = _attach(TinySegNet(), _fake_trainer())
    with pytest.raises(ValueError, match=r"moves pixels in a way that cannot be undone. Use `RandomFlip`"):
        NoisyLabelConsistency(augmentation=RandomResizedCrop()).loss_term(_seg_ctx(seg, x, y))
    with pytest.raises(ValueError, match=r"`weak_augmentation` WeakAugment\(.*\) must keep every pixel in place"):
        NoisyLabelConsistency(augmentation="patch_mask", weak_augmentation="weak").loss_term(_seg_ctx(seg, x, y))
    tagger = _attach(TinyTagger(), _fake_trainer())
    tokens, labels = torch.randn(4, 1, 8, 8), torch.randint(0, 4, (4, 8))
    with pytest.raises(ValueError, match=r"got \(B, T, C\) token logits, but its `augmentation` RandomFlip"):
        NoisyLabelConsistency(augmentation=RandomFlip()).loss_term(_seg_ctx(tagger, tokens, labels, "channels_last"))
    # Token views that keep the positions work, padding of labelled sequences excluded.
    labels[:, 6:] = -100
    cons = NoisyLabelConsistency(augmentation=GaussianNoise(0.0), temperature=1.0, threshold=0.0, rampup="constant")
    ctx = _seg_ctx(tagger, tokens, labels, "channels_last")
    assert float(cons.loss_term(ctx).detach()) == pytest.approx(0.0, abs=1e-6)  # a zero-noise view agrees with itself
    torch.testing.assert_close(ctx.logs["consistency/teacher_confidence"], _masked_probs_max(ctx, labels != -100))


def _masked_probs_max(ctx: StepContext, keep: torch.Tensor) -> torch.Tensor:
    conf = ctx.probs().amax(ctx.class_dim)
    return conf[keep].mean()


# -- unlabeled data (issue 14) -------------------------------------------------------------------------------------
def _ssl_loaders(n_l: int = 16, n_u: int = 48) -> Any:
    from lightning.pytorch.utilities import CombinedLoader

    ds = make_dataset(n_l + n_u)
    x, y = ds.tensors
    lab = DataLoader(TensorDataset(x[:n_l], y[:n_l], torch.arange(n_l)), batch_size=4)
    unl = DataLoader(TensorDataset(x[n_l:], torch.arange(n_l, n_l + n_u)), batch_size=12)
    return CombinedLoader({"labeled": lab, "unlabeled": unl}, mode="max_size_cycle")


@pytest.mark.parametrize("on", ["all", "unlabeled"])
def test_consistency_on_semi_supervised_batches_one_forward(on: str) -> None:
    net = CountingNet()
    cons = NoisyLabelConsistency(on=on, augmentation=GaussianNoise(0.1), threshold=0.0)  # type: ignore[arg-type]
    lc = LabelCorrection(start_epoch=0, threshold=0.0, num_samples=64)
    fit([cons, lc], net, _ssl_loaders(), max_epochs=1)
    rows = 16 + (16 if on == "all" else 12)  # labeled + unlabeled rows, then the views of the rows the term uses
    assert [shape[0] for shape, _, grad in net.calls if grad] == [rows] * 4
    # Label correction never touches the unlabeled samples: no table row, no count.
    assert bool(lc.table.seen[:16].all()) and not bool(lc.table.seen[16:].any())
    # The term by hand on a batch: the unlabeled rows only (on="unlabeled") or every row.
    batch, _, _ = next(iter(_ssl_loaders()))
    from lightning_reg.core.protocol import unpack_semi_supervised_batch

    x, y, index, n = unpack_semi_supervised_batch(batch)
    module = _attach(TinyNet(), _fake_trainer(global_step=100))
    term = NoisyLabelConsistency(on=on, augmentation=Shift(0.5), temperature=1.0, threshold=0.0, rampup="constant")  # type: ignore[arg-type]
    ctx = _ctx(module, x, y, index)
    ctx.num_labeled = n
    got = term.loss_term(ctx)
    rows_ = slice(None) if on == "all" else slice(n, None)
    with torch.no_grad():
        expected = _kl(torch.softmax(module(x[rows_]), -1), module(x[rows_] + 0.5)).mean()
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    # A single loader whose unlabeled samples carry ignore_index: the same rows count.
    y_one = torch.where(torch.arange(len(y)) < n, y, torch.full_like(y, -100))
    ctx = _ctx(module, x, y_one, index)
    torch.testing.assert_close(term.loss_term(ctx), expected, atol=1e-6, rtol=1e-5)


def test_consistency_and_label_correction_resume_mid_epoch_with_a_combined_loader(tmp_path: Path) -> None:
    from lightning_reg import EMATeacher
    from lightning_reg.data.semi_supervised import SyntheticSemiSupervisedDataModule

    def callbacks() -> list[Any]:
        return [
            EMATeacher(decay=0.9),
            NoisyLabelConsistency(teacher="ema", on="unlabeled", augmentation=PatchMask(2), threshold=0.3),
            LabelCorrection(source="teacher", start_epoch=1, threshold=0.3),
        ]

    def dm() -> SyntheticSemiSupervisedDataModule:
        return SyntheticSemiSupervisedDataModule(
            num_train=96, num_test=16, num_classes=4, shape=[1, 8, 8], labels_per_class=4, mu=2, batch_size=8
        )

    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1, filename="{step}")
    full = callbacks()
    L.seed_everything(0, verbose=False)
    kw = trainer_kwargs(max_epochs=3, enable_checkpointing=True)
    trainer = L.Trainer(callbacks=[*full, ckpt, StepSeed()], **kw)
    full_model = TinyNet()
    trainer.fit(full_model, datamodule=dm())
    steps_per_epoch = trainer.num_training_batches
    assert 3 % steps_per_epoch != 0, "the checkpoint should fall mid-epoch"
    resumed = callbacks()
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(callbacks=[*resumed, StepSeed()], **trainer_kwargs(max_epochs=3))
    resumed_model = TinyNet()
    trainer.fit(resumed_model, datamodule=dm(), ckpt_path=str(tmp_path / "step=3.ckpt"))
    assert_state_equal(full_model.state_dict(), resumed_model.state_dict(), "model")
    for a, b in zip(full, resumed):
        assert_state_equal(a.state_dict(), b.state_dict(), type(a).__name__)


# -- LabelCorrection on dense outputs and the per-epoch all-reduce ------------------------------------------------
@pytest.mark.parametrize("layout", ["channels_first", "channels_last"], ids=["segmentation", "tokens"])
def test_dense_label_correction_counts_pixels_and_relabels_without_a_table(layout: str) -> None:
    lc = LabelCorrection(threshold=0.8)
    trainer = _fake_trainer(epoch=0)
    big = 10.0
    # 2 images of 1x3 pixels, 3 classes; pixel values are logits (classes along dim 1).
    logits = torch.tensor(
        [
            [[[big, 0.0, 0.0]], [[0.0, big, 0.5]], [[0.0, 0.0, 0.0]]],  # predicts 0, 1, 1 (the last at 0.45)
            [[[0.0, big, 0.0]], [[big, 0.0, 0.0]], [[0.0, 0.0, big]]],  # predicts 1, 0, 2
        ]
    )
    given = torch.tensor([[[0, 0, 2]], [[-100, 1, 1]]])
    if layout == "channels_last":  # (B, T, C) tokens
        logits, given = logits.squeeze(2).movedim(1, -1), given.squeeze(1)

    def step(epoch: int) -> StepContext:
        trainer.current_epoch = epoch
        module = SimpleNamespace(trainer=trainer)
        ctx = StepContext(
            module=module,  # type: ignore[arg-type]
            x=None,
            labels=given.clone(),
            given_labels=given,
            index=None,  # dense outputs keep no per-sample table, so they need no index
            logits=logits,
            layout=layout,
        )
        lc.refine_labels(ctx)
        return ctx

    ctx = step(0)
    assert torch.equal(ctx.labels, given)  # no class is being corrected yet
    # Counts over the 5 labelled pixels (the void one is skipped): pred/given (0,0) (1,0) (1,2) (0,1) (2,1).
    assert lc._counts is not None and lc._counts.tolist() == [[1, 0, 0], [2, 2, 1], [2, 2, 1]]
    lc._detected_epoch = torch.tensor([-1, 0, -1])  # class 1's early learning has ended
    ctx = step(1)
    # ADELE's rule: a confident prediction (> 0.8) of a marked class that differs from the label relabels it;
    # pixel (0, 2) predicts 1 with 0.45 only, (1, 1) predicts class 0 (not marked), void stays void.
    expected = given.clone()
    expected.view(2, 3)[0, 1] = 1
    assert torch.equal(ctx.labels, expected)
    assert not lc.table.is_allocated and lc.num_corrected == 0
    with pytest.raises(RuntimeError, match="Dense outputs keep none"):
        lc.corrections()
    assert lc._relabeled is not None and lc._relabeled.tolist() == [1, 10]  # 1 relabelled of 5 + 5 labelled


class _FakeDDP:
    """A 2-rank strategy stand-in: `reduce` doubles (as if the other rank held the same counts) and counts calls."""

    world_size = 2

    def __init__(self) -> None:
        self.reduces = 0

    def reduce(self, t: torch.Tensor, reduce_op: str = "sum") -> torch.Tensor:
        assert reduce_op == "sum"
        self.reduces += 1
        return t * 2


def test_label_correction_reduces_its_counts_once_per_epoch_and_checkpoints_their_sum() -> None:
    lc = LabelCorrection(threshold=0.8)
    trainer = _fake_trainer(epoch=0)
    trainer.strategy = _FakeDDP()
    _, y = _dense_batch()
    logits = torch.randn(4, 4, 8, 8)
    for _ in range(3):
        module = SimpleNamespace(trainer=trainer)
        lc.refine_labels(StepContext(module=module, x=None, labels=y, given_labels=y, logits=logits))  # type: ignore[arg-type]
    assert trainer.strategy.reduces == 0  # no collective in the steps
    local = lc._counts.clone()  # type: ignore[union-attr]
    # A mid-epoch checkpoint stores the sum over ranks; rank 0 resumes from it, the other ranks from zero.
    state = lc.state_dict()
    ckpt = {"callbacks": {lc.state_key: state}}
    lc.on_save_checkpoint(trainer, None, ckpt)  # type: ignore[arg-type]
    assert trainer.strategy.reduces == 1 and state["counts_global"] is True
    assert torch.equal(state["counts"], 2 * local.cpu())
    for rank, expected in ((0, 2 * local), (1, torch.zeros_like(local))):
        other = LabelCorrection(threshold=0.8)
        other.load_state_dict(state)
        other._ensure(SimpleNamespace(global_rank=rank), logits, class_dim=1, table=False)  # type: ignore[arg-type]
        assert torch.equal(other._counts, expected)  # type: ignore[arg-type]
    # The epoch's end: one all-reduce, and the curve point is the IoU of the summed counts.
    logged: dict[str, float] = {}
    lc.on_train_epoch_end(trainer, SimpleNamespace(log=lambda k, v, **kw: logged.__setitem__(k, v)))  # type: ignore[arg-type]
    assert trainer.strategy.reduces == 2
    torch.testing.assert_close(lc.agreement_history[0], class_iou(2 * local))
    assert lc._counts is not None and int(lc._counts.sum()) == 0
    assert "label_correction/num_corrected" not in logged and logged["label_correction/relabeled_fraction"] == 0.0


def test_two_loss_terms_named_consistency_conflict() -> None:
    reason = NoisyLabelConsistency().conflicts_with(NoisyLabelConsistency(teacher="ema"))
    assert reason is not None and "state key" in reason
    assert LabelCorrection().conflicts_with(NoisyLabelConsistency()) is None
    assert isinstance(LabelCorrection(), LossRegularizer) and LabelCorrection.stage == "label"


if __name__ == "__main__":
    _ddp_worker(sys.argv[1])
