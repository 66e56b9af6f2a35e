"""PseudoLabel (FixMatch): the functional core against the paper's formula, the callback's views and forwards."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import pytest
import torch
from lightning.pytorch.utilities import CombinedLoader
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from lightning_reg import EMATeacher
from lightning_reg.augment import Augmentation, GaussianNoise, PatchMask, RandAugment, WeakAugment
from lightning_reg.callbacks.pseudo_label import PseudoLabel
from lightning_reg.core.protocol import StepContext, unpack_semi_supervised_batch
from lightning_reg.functional.pseudo_label import (
    align_distribution,
    confidence_quality,
    pseudo_label_loss,
    pseudo_label_targets,
)
from tests.helpers import TinyNet, TinySegNet, TinyTagger, fit, make_dataset, make_layout_dataset, trainer_kwargs


class Shift(Augmentation):
    """A deterministic "view": ``x + delta`` (keeps every element in place)."""

    def __init__(self, delta: float = 0.5) -> None:
        self.delta = delta

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return x + self.delta


# -- the functional core against FixMatch's formula ------------------------------------------------------------------
def _naive_fixmatch(logits: Tensor, probs: Tensor, tau: float) -> float:
    """(1/μB) Σ_b 1[max q_b >= τ] CE(argmax q_b, z_b), one sample at a time in float64."""
    total = 0.0
    for z, q in zip(logits.double(), probs.double()):
        if float(q.max()) >= tau:
            c = int(q.argmax())
            total += -(z[c] - torch.logsumexp(z, 0)).item()
    return total / logits.shape[0]


def test_fixmatch_loss_matches_the_formula_masked_samples_count_in_the_denominator() -> None:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(64, 5, generator=g)
    q = torch.softmax(3 * torch.randn(64, 5, generator=g), -1)
    targets, mask = pseudo_label_targets(q, 0.8)
    assert 0 < int(mask.sum()) < 64  # some samples are masked and still count in the mean
    loss = pseudo_label_loss(z, targets, mask)
    assert math.isclose(loss.item(), _naive_fixmatch(z, q, 0.8), rel_tol=1e-5)
    # The mask uses >= (FixMatch's `max_probs.ge(threshold)`).
    _, m = pseudo_label_targets(torch.tensor([[0.5, 0.5]]), 0.5)
    assert m.tolist() == [True]
    # The gradient is m (softmax(z) - onehot) / μB.
    zz = z.clone().requires_grad_()
    pseudo_label_loss(zz, targets, mask).backward()
    expected = mask[:, None] * (torch.softmax(z, -1) - torch.nn.functional.one_hot(targets, 5)) / 64
    torch.testing.assert_close(zz.grad, expected)


def test_soft_targets_and_distribution_alignment_match_references() -> None:
    g = torch.Generator().manual_seed(1)
    z = torch.randn(16, 4, generator=g)
    logits_q = 2 * torch.randn(16, 4, generator=g)
    q = torch.softmax(logits_q, -1)
    soft, mask = pseudo_label_targets(q, 0.6, soft=True, temperature=0.5)
    torch.testing.assert_close(soft, torch.softmax(logits_q / 0.5, -1))  # q^(1/T) normalised = softmax(z/T)
    ref = sum(
        float(m) * -(s.double() * torch.log_softmax(zi.double(), 0)).sum().item() for zi, s, m in zip(z, soft, mask)
    )
    assert math.isclose(pseudo_label_loss(z, soft, mask).item(), ref / 16, rel_tol=1e-5)
    assert torch.equal(pseudo_label_targets(q, 0.6, soft=True)[0], q)  # T = 1: q itself, as USB's FixMatch
    # ReMixMatch / USB: q * (p_target + eps) / (p_model + eps), renormalised.
    p_target, p_model = torch.tensor([0.1, 0.2, 0.3, 0.4]), q.mean(0)
    ref_da = q.double() * (p_target.double() + 1e-6) / (p_model.double() + 1e-6)
    ref_da = ref_da / ref_da.sum(-1, keepdim=True)
    torch.testing.assert_close(align_distribution(q, p_target, p_model).double(), ref_da)
    dense_q = q.T.reshape(1, 4, 4, 4)  # classes along dim 1
    aligned = align_distribution(dense_q, p_target, p_model, dim=1)
    torch.testing.assert_close(aligned.sum(1), torch.ones(1, 4, 4))
    with pytest.raises(ValueError, match="Expected argument `temperature`"):
        pseudo_label_targets(q, 0.5, soft=True, temperature=0.0)


def _naive_dense(z: Tensor, q: Tensor, tau: float, valid: Tensor, quality: bool) -> tuple[float, list[float]]:
    """Per-pixel FixMatch (or MIC's quality-weighted CE), mean over the valid pixels, loops in float64."""
    b, _, h, w = z.shape
    weights = []
    for i in range(b):
        vals = [float(q[i, :, r, c].max() >= tau) for r in range(h) for c in range(w) if valid[i, r, c]]
        weights.append(sum(vals) / max(len(vals), 1))
    total, count = 0.0, 0
    for i in range(b):
        for r in range(h):
            for c in range(w):
                if not valid[i, r, c]:
                    continue
                qq, zz = q[i, :, r, c].double(), z[i, :, r, c].double()
                wgt = weights[i] if quality else float(qq.max() >= tau)
                total += wgt * -(zz[int(qq.argmax())] - torch.logsumexp(zz, 0)).item()
                count += 1
    return total / max(count, 1), weights


@pytest.mark.parametrize("quality", [False, True], ids=["mask", "quality_weight"])
def test_dense_pixel_pseudo_labels_match_naive_reference(quality: bool) -> None:
    g = torch.Generator().manual_seed(2)
    z = torch.randn(3, 4, 5, 6, generator=g)
    q = torch.softmax(2 * torch.randn(3, 4, 5, 6, generator=g), 1)
    valid = torch.ones(3, 5, 6, dtype=torch.bool)
    valid[1] = False  # a labeled image under on="unlabeled": none of its pixels count
    targets, mask = pseudo_label_targets(q, 0.7, dim=1)
    assert targets.shape == (3, 5, 6)
    ref, weights = _naive_dense(z, q, 0.7, valid, quality)
    quality_w = confidence_quality(mask, valid)
    torch.testing.assert_close(quality_w.double(), torch.tensor(weights, dtype=torch.float64))
    w = quality_w.view(3, 1, 1) if quality else mask
    got = pseudo_label_loss(z, targets, w, dim=1, valid=valid)
    assert math.isclose(got.item(), ref, rel_tol=1e-5)


# -- the callback, one step at a time ---------------------------------------------------------------------------------
def _ctx(model: Any, x: Tensor, y: Tensor, index: Tensor | None = None, num_labeled: int | None = None) -> StepContext:
    ctx = StepContext(
        module=model,
        x=x,
        labels=y,
        given_labels=y,
        index=index,
        logits=model(x),
        training=True,
        layout=model.logits_layout,
        num_labeled=num_labeled,
    )
    ctx.extras["clean_x"] = x
    return ctx


def _batch(n_l: int = 4, n_u: int = 12, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    x, y = make_dataset(n_l + n_u, seed=seed).tensors
    y = y.clone()
    y[n_l:] = -100
    return x, y, torch.arange(n_l + n_u)


@pytest.mark.parametrize("form", ["combined", "one_loader"])
def test_callback_term_equals_fixmatch_on_the_unlabeled_rows(form: str) -> None:
    torch.manual_seed(0)
    model = TinyNet()
    x, y, index = _batch()
    cb = PseudoLabel(threshold=0.3, weight=2.0, weak_augmentation=None, strong_augmentation=Shift(0.5))
    ctx = _ctx(model, x, y, index, num_labeled=4 if form == "combined" else None)
    term = cb.loss_term(ctx)
    with torch.no_grad():
        q = torch.softmax(model(x[4:]), -1)
        z = model(x[4:] + 0.5)
    ref = 2.0 * _naive_fixmatch(z, q, 0.3)
    assert term is not None and term.requires_grad
    assert math.isclose(term.item(), ref, rel_tol=1e-5)
    rate = float((q.max(-1).values >= 0.3).float().mean())
    assert math.isclose(float(ctx.logs["pseudo_label/mask_rate"]), rate, rel_tol=1e-6)
    assert ctx.logs["pseudo_label/weight"] == 2.0
    assert 0 < rate < 1


def test_on_all_uses_every_row_and_outside_training_is_a_no_op() -> None:
    torch.manual_seed(0)
    model = TinyNet()
    x, y, index = _batch()
    cb = PseudoLabel(threshold=0.3, on="all", weak_augmentation=None, strong_augmentation=None)
    term = cb.loss_term(_ctx(model, x, y, index, num_labeled=4))
    with torch.no_grad():
        z = model(x)
    assert term is not None and math.isclose(term.item(), _naive_fixmatch(z, torch.softmax(z, -1), 0.3), rel_tol=1e-5)
    # Outside training: no term, no state change (distribution alignment's window stays untouched).
    cb = PseudoLabel(threshold=0.3, weak_augmentation=None, strong_augmentation=None, distribution_alignment=True)
    ctx = _ctx(model, x, y, index, num_labeled=4)
    ctx.training = False
    before = cb.state_dict()
    assert cb.loss_term(ctx) is None
    assert cb.state_dict() == before and not ctx.logs


def test_accuracy_of_kept_pseudo_labels_with_hidden_labels(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TinyNet()
    x, y, index = _batch()
    with torch.no_grad():
        q = torch.softmax(model(x), -1)
    true = q.argmax(-1).clone()
    keep = q.max(-1).values >= 0.3
    kept_rows = [i for i in range(4, 16) if keep[i]]
    true[kept_rows[0]] = (true[kept_rows[0]] + 1) % 4  # one wrong pseudo-label among the kept
    true[3] = (true[3] + 1) % 4  # a labeled row: never counted
    cb = PseudoLabel(threshold=0.3, weak_augmentation=None, strong_augmentation=None)
    cb.set_true_labels(true)
    ctx = _ctx(model, x, y, index, num_labeled=4)
    cb.loss_term(ctx)
    acc = ctx.logs["pseudo_label/accuracy"]
    assert isinstance(acc, Tensor) and acc.device == x.device
    assert math.isclose(float(acc), 1 - 1 / len(kept_rows), rel_tol=1e-6)
    # A clear error without indices or with a wrong true-label shape.
    with pytest.raises(ValueError, match="needs each batch to carry the samples' indices"):
        cb.loss_term(_ctx(model, x, y, None, num_labeled=4))
    with pytest.raises(TypeError, match="Expected `true_labels` to be an integer tensor"):
        cb.set_true_labels(torch.zeros(3))
    cb.set_true_labels(torch.zeros(16, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="Expected the true labels to have one label per element"):
        cb.loss_term(_ctx(model, x, y, index, num_labeled=4))


def test_true_labels_from_a_file_in_training(tmp_path: Path) -> None:
    torch.save(make_dataset(64).tensors[1], tmp_path / "true.pt")
    cb = PseudoLabel(threshold=0.3, true_labels_path=str(tmp_path / "true.pt"))
    trainer, _ = fit([cb], TinyNet(), _ssl_loaders(), max_epochs=1)
    assert 0.0 <= float(trainer.callback_metrics["pseudo_label/accuracy"]) <= 1.0
    with pytest.raises(FileNotFoundError, match="found no file"):
        fit([PseudoLabel(true_labels_path=str(tmp_path / "missing.pt"))], TinyNet(), _ssl_loaders(), max_epochs=1)


@pytest.mark.parametrize("quality", [False, True], ids=["mask", "quality_weight"])
def test_dense_callback_term_matches_naive_reference(quality: bool) -> None:
    torch.manual_seed(0)
    model = TinySegNet()
    x, y = make_layout_dataset(6, "dense").tensors
    y = y.clone()
    y[1] = -100  # one loader: samples 0 (entirely ignored) and 1 are unlabeled
    cb = PseudoLabel(threshold=0.5, weak_augmentation=None, strong_augmentation=Shift(0.3), quality_weight=quality)
    ctx = _ctx(model, x, y, torch.arange(6))
    term = cb.loss_term(ctx)
    with torch.no_grad():
        q = torch.softmax(model(x), 1)
        z = model(x + 0.3)
    valid = torch.zeros(6, 8, 8, dtype=torch.bool)
    valid[:2] = True
    ref, _ = _naive_dense(z, q, 0.5, valid, quality)
    assert term is not None and math.isclose(term.item(), ref, rel_tol=1e-5)
    rate = float((q[:2].max(1).values >= 0.5).float().mean())
    assert math.isclose(float(ctx.logs["pseudo_label/mask_rate"]), rate, rel_tol=1e-6)


class _HiddenLabelsData(L.LightningDataModule):
    """A CombinedLoader datamodule that keeps the hidden labels of its unlabeled part as ``true_labels``."""

    def __init__(self, indexed: bool = True) -> None:
        super().__init__()
        self.indexed = indexed
        self.true_labels: Tensor | None = None

    def setup(self, stage: str) -> None:
        self.true_labels = make_dataset(64).tensors[1]

    def train_dataloader(self) -> CombinedLoader:
        if self.indexed:
            return _ssl_loaders()
        x, y = make_dataset(64).tensors
        lab = DataLoader(TensorDataset(x[:16], y[:16]), batch_size=4)
        unl = DataLoader(TensorDataset(x[16:]), batch_size=12)
        return CombinedLoader({"labeled": lab, "unlabeled": unl}, mode="max_size_cycle")


def test_true_labels_from_the_datamodule() -> None:
    cb = PseudoLabel(threshold=0.3, weak_augmentation=None)
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(callbacks=[cb], **trainer_kwargs(max_epochs=1))
    trainer.fit(TinyNet(), datamodule=_HiddenLabelsData())
    assert 0.0 <= float(trainer.callback_metrics["pseudo_label/accuracy"]) <= 1.0
    # Batches without indices train on; only the (automatic) accuracy is skipped.
    cb = PseudoLabel(threshold=0.3, weak_augmentation=None)
    trainer = L.Trainer(callbacks=[cb], **trainer_kwargs(max_epochs=1))
    trainer.fit(TinyNet(), datamodule=_HiddenLabelsData(indexed=False))
    assert "pseudo_label/accuracy" not in trainer.callback_metrics
    assert "pseudo_label/mask_rate" in trainer.callback_metrics


def test_dense_and_token_outputs_refuse_views_that_move_elements() -> None:
    x, y = make_layout_dataset(4, "dense").tensors
    with pytest.raises(ValueError, match=r"must keep every pixel in place.*`weak_augmentation` WeakAugment"):
        PseudoLabel().loss_term(_ctx(TinySegNet(), x, y, torch.arange(4)))
    with pytest.raises(ValueError, match=r"`strong_augmentation` RandAugment.*geometric ops"):
        PseudoLabel(weak_augmentation=None).loss_term(_ctx(TinySegNet(), x, y, torch.arange(4)))
    photometric = RandAugment(ops=["brightness", "contrast", "solarize"], cutout=0.3)
    assert (
        PseudoLabel(weak_augmentation=None, strong_augmentation=photometric).loss_term(
            _ctx(TinySegNet(), x, y, torch.arange(4))
        )
        is not None
    )
    xt, yt = make_layout_dataset(4, "tokens").tensors
    with pytest.raises(ValueError, match=r"token logits, but its `weak_augmentation` WeakAugment.*image augmentation"):
        PseudoLabel().loss_term(_ctx(TinyTagger(), xt, yt, torch.arange(4)))
    cb = PseudoLabel(on="all", weak_augmentation=None, strong_augmentation=GaussianNoise(0.1))
    assert cb.loss_term(_ctx(TinyTagger(), xt, yt, torch.arange(4))) is not None


def test_distribution_alignment_window_and_exact_state() -> None:
    torch.manual_seed(0)
    model = TinyNet()
    cb = PseudoLabel(
        threshold=0.0, weak_augmentation=None, strong_augmentation=None, distribution_alignment=True, da_length=2
    )
    means = []
    for seed in range(3):
        x, y, index = _batch(seed=seed)
        with torch.no_grad():
            means.append(torch.softmax(model(x[4:]), -1).sum(0))
        cb.loss_term(_ctx(model, x, y, index, num_labeled=4))
    # The window holds the last two steps: p_model is their pooled mean prediction on unlabeled rows.
    assert cb.p_model is not None
    torch.testing.assert_close(cb.p_model, (means[1] + means[2]) / 24)
    state = cb.state_dict()
    assert state["da_steps"] == 3 and state["da_queue"].shape == (2, 5)
    restored = PseudoLabel(
        threshold=0.0, weak_augmentation=None, strong_augmentation=None, distribution_alignment=True, da_length=2
    )
    restored.load_state_dict(state)
    torch.testing.assert_close(restored.p_model, cb.p_model)
    # The aligned pseudo-labels use q * p_target / p_model with the window including this step.
    x, y, index = _batch(seed=5)
    ctx_a = _ctx(model, x, y, index, num_labeled=4)
    cb.set_true_labels(torch.zeros(16, dtype=torch.long))
    cb.loss_term(ctx_a)
    with torch.no_grad():
        q = torch.softmax(model(x[4:]), -1)
    p_model = (means[2] + q.sum(0)) / 24
    aligned = align_distribution(q, torch.full((4,), 0.25), p_model)
    acc = float((aligned.argmax(-1) == 0).float().mean())
    assert math.isclose(float(ctx_a.logs["pseudo_label/accuracy"]), acc, rel_tol=1e-6)
    # "labeled": the target is the class frequency of the labeled elements in the window.
    lab = PseudoLabel(distribution_alignment=True, da_target="labeled", weak_augmentation=None)
    lab.loss_term(_ctx(model, x, y, index, num_labeled=4))
    assert lab.state_dict()["da_queue"][0, 5:9].sum() == 4 and lab.state_dict()["da_queue"][0, 9] == 4
    # A batch without unlabeled rows adds zero prediction statistics (its labels still count) and a zero term.
    before = lab.state_dict()["da_queue"].clone()
    term = lab.loss_term(_ctx(model, x[:4], y[:4], index[:4], num_labeled=4))
    assert term is not None and float(term) == 0.0
    assert torch.equal(lab.state_dict()["da_queue"][0], before[0]) and lab.state_dict()["da_steps"] == 2
    assert float(lab.state_dict()["da_queue"][1, :5].abs().sum()) == 0.0 and lab.state_dict()["da_queue"][1, 9] == 4
    with pytest.raises(ValueError, match="one probability per class"):
        PseudoLabel(distribution_alignment=True, da_target=[0.5, 0.5], weak_augmentation=None).loss_term(
            _ctx(model, x, y, index, num_labeled=4)
        )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"threshold": 1.5}, "Expected argument `threshold` to be a float in [0, 1]"),
        ({"weight": -1.0}, "Expected argument `weight` to be a float in [0, inf)"),
        ({"teacher": "swa"}, "Expected argument `teacher` to be one of"),
        ({"weak_augmentation": "nope"}, "Expected argument `weak_augmentation` to be one of"),
        ({"strong_augmentation": "multiscale"}, "Expected argument `strong_augmentation` to be a single-view"),
        ({"on": "labeled"}, "Expected argument `on` to be one of"),
        ({"temperature": 0.0}, "Expected argument `temperature` to be a float in (0, inf)"),
        ({"da_target": "model"}, "Expected argument `da_target` to be one of"),
        ({"da_target": [1.0]}, "Expected argument `da_target` to be 'uniform', 'labeled' or a list"),
        ({"da_length": 0}, "Expected argument `da_length` to be an int in [1, inf)"),
    ],
)
def test_bad_arguments(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError) as info:
        PseudoLabel(**kwargs)
    assert match in str(info.value)


def test_defaults_are_fixmatchs() -> None:
    cb = PseudoLabel()
    assert (cb.threshold, cb.weight, cb.teacher, cb.on, cb.soft) == (0.95, 1.0, "self", "unlabeled", False)
    assert cb.weak_augmentation == WeakAugment() and cb.strong_augmentation == RandAugment()
    assert PseudoLabel(da_target=[1, 3]).da_target == [0.25, 0.75]


# -- training: forwards, gradients, loaders ---------------------------------------------------------------------------
class CountingNet(TinyNet):
    calls: ClassVar[list[tuple[int, bool]]] = []

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            CountingNet.calls.append((int(x.shape[0]), torch.is_grad_enabled()))
        return super().forward(x)


def _ssl_loaders(n_l: int = 16, n_u: int = 48) -> CombinedLoader:
    x, y = make_dataset(n_l + n_u).tensors
    lab = DataLoader(TensorDataset(x[:n_l], y[:n_l], torch.arange(n_l)), batch_size=4)
    unl = DataLoader(TensorDataset(x[n_l:], torch.arange(n_l, n_l + n_u)), batch_size=12)
    return CombinedLoader({"labeled": lab, "unlabeled": unl}, mode="max_size_cycle")


def test_one_forward_per_step_carries_labeled_weak_and_strong_rows() -> None:
    """FixMatch's reference forward: ``model(cat(x_l, weak(u), strong(u)))`` once per step, with gradients."""
    CountingNet.calls = []
    cb = PseudoLabel(threshold=0.3)
    trainer, _ = fit([cb], CountingNet(), _ssl_loaders(), max_epochs=1)
    assert trainer.global_step == 4
    # 4 labeled + 12 weakly augmented unlabeled rows + their 12 strong views: one forward, no second student pass
    assert CountingNet.calls == [(28, True)] * 4
    assert "pseudo_label/mask_rate" in trainer.callback_metrics
    assert math.isfinite(float(trainer.callback_metrics["train/loss_pseudo_label"]))
    # Without a weak view the batch's own unlabeled rows give the pseudo-labels: still one forward.
    CountingNet.calls = []
    fit([PseudoLabel(threshold=0.3, weak_augmentation=None)], CountingNet(), _ssl_loaders(), max_epochs=1)
    assert CountingNet.calls == [(28, True)] * 4


def test_custom_training_step_forwards_the_views_itself() -> None:
    """With ``regularized_loss`` alone (no ``prepare_inputs``) the strong view gets its own forward, with gradients."""

    class OwnStep(CountingNet):
        def training_step(self, batch: Any, batch_idx: int) -> Tensor:
            x, y, index, n = unpack_semi_supervised_batch(batch)
            return self.regularized_loss(self(x), y, index, x=x, num_labeled=n)

    CountingNet.calls = []
    fit([PseudoLabel(threshold=0.3, weak_augmentation=None)], OwnStep(), _ssl_loaders(), max_epochs=1)
    assert CountingNet.calls == [(16, True), (12, True)] * 4
    CountingNet.calls = []
    fit([PseudoLabel(threshold=0.3)], OwnStep(), _ssl_loaders(), max_epochs=1)
    assert CountingNet.calls == [(16, True), (12, False), (12, True)] * 4


def test_ema_teacher_predicts_the_shared_weak_view_of_the_whole_batch() -> None:
    class CountingEMA(EMATeacher):
        views: ClassVar[list[int]] = []

        def teacher_forward(self, x: Any) -> Tensor:
            CountingEMA.views.append(int(x.shape[0]))
            return super().teacher_forward(x)

    CountingEMA.views = []
    cb = PseudoLabel(threshold=0.3, teacher="ema")
    fit([cb, CountingEMA(decay=0.9)], TinyNet(), _ssl_loaders(), max_epochs=1)
    assert CountingEMA.views == [16] * 3  # step 1 falls back to "self" (no EMA update yet), then once per step
    with pytest.raises(ValueError, match="Add `EMATeacher"):
        fit([PseudoLabel(teacher="ema")], TinyNet(), _ssl_loaders(), max_epochs=1)


def test_one_loader_form_with_ignore_index_labels_trains() -> None:
    x, y = make_dataset(64).tensors
    y = y.clone()
    y[16:] = -100
    loader = DataLoader(TensorDataset(x, y, torch.arange(64)), batch_size=16, shuffle=False)
    cb = PseudoLabel(threshold=0.3, distribution_alignment=True, soft=True, temperature=0.5)
    cb.set_true_labels(make_dataset(64).tensors[1])
    trainer, _ = fit([cb], TinyNet(), loader, max_epochs=2)
    metrics = trainer.callback_metrics
    for key in ("pseudo_label/mask_rate", "pseudo_label/accuracy", "train/loss_pseudo_label"):
        assert math.isfinite(float(metrics[key])), key
    # The first batch holds every labeled sample: nothing else is pseudo-labelled there, the rest are all unlabeled.
    assert cb.state_dict()["da_queue"][:, 4].tolist()[:8] == [0.0, 16.0, 16.0, 16.0, 0.0, 16.0, 16.0, 16.0]


def test_dense_segmentation_trains_with_mic_views() -> None:
    x, y = make_layout_dataset(32, "dense").tensors
    y = y.clone()
    y[16:] = -100
    loader = DataLoader(TensorDataset(x, y, torch.arange(32)), batch_size=8)
    cb = PseudoLabel(
        threshold=0.5,
        teacher="ema",
        weak_augmentation=None,
        strong_augmentation=PatchMask(patch_size=2, mask_ratio=0.5),
        quality_weight=True,
    )
    trainer, _ = fit([cb, EMATeacher(decay=0.9)], TinySegNet(), loader, max_epochs=1)
    assert math.isfinite(float(trainer.callback_metrics["train/loss_pseudo_label"]))
    L.seed_everything(0, verbose=False)
