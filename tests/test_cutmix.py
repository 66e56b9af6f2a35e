"""CutMix and BCP-style copy-paste: boxes, pasted inputs, targets and label maps, pseudo-labels, misuse."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import CombinedLoader
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from lightning_reg.callbacks.cutmix import CutMix
from lightning_reg.callbacks.ema import EMATeacher
from lightning_reg.callbacks.label_smoothing import LabelSmoothing
from lightning_reg.functional.cutmix import (
    copy_paste_partners,
    cutmix_area_lambda,
    cutmix_box,
    cutmix_mask,
    paste_box,
)
from lightning_reg.functional.label_smoothing import label_smoothing_targets
from tests.helpers import TinyNet, TinySegNet, TinyTagger, fit, make_layout_dataset, make_loader


def _naive_paste(x: Tensor, perm: Tensor, box: Tensor) -> Tensor:
    """Slice by slice, sample by sample, straight from x~_i = M * x_i + (1 - M) * x_perm(i)."""
    out = x.clone()
    for i in range(x.shape[0]):
        y0, y1, x0, x1 = box[i if box.shape[0] > 1 else 0].tolist()
        out[i, ..., y0:y1, x0:x1] = x[int(perm[i]), ..., y0:y1, x0:x1]
    return out


def _attached(model: L.LightningModule, *callbacks: L.Callback) -> L.LightningModule:
    """``model`` with a trainer listing ``callbacks`` (so its pipeline runs them), without fitting."""
    model.trainer = L.Trainer(callbacks=list(callbacks), logger=False, enable_progress_bar=False)
    for cb in callbacks:
        if isinstance(cb, CutMix):
            cb.setup(model.trainer, model, "fit")
    return model


def _seed_with_a_proper_box(size: tuple[int, int] = (8, 8)) -> None:
    """Seed torch so that the next CutMix step draws a box that is neither empty nor the whole image."""
    for seed in range(100):
        torch.manual_seed(seed)
        from lightning_reg.functional.mixup import mixup_lambda

        lam = cutmix_area_lambda(cutmix_box(mixup_lambda(1.0), size), size)
        if 0.2 < float(lam[0]) < 0.9:
            torch.manual_seed(seed)
            return
    raise AssertionError("no seed found")


# -- functional core -----------------------------------------------------------------------------------------------
def test_box_follows_the_official_rand_bbox() -> None:
    for seed in range(50):
        g = torch.Generator().manual_seed(seed)
        lam = float(torch.rand((), generator=g))
        h, w = 7, 10
        box = cutmix_box(lam, (h, w), generator=g)
        g2 = torch.Generator().manual_seed(seed)
        torch.rand((), generator=g2)
        cy, cx = int(torch.randint(h, (1,), generator=g2)), int(torch.randint(w, (1,), generator=g2))
        cut_h, cut_w = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
        ref = [
            min(max(cy - cut_h // 2, 0), h),
            min(max(cy + cut_h // 2, 0), h),
            min(max(cx - cut_w // 2, 0), w),
            min(max(cx + cut_w // 2, 0), w),
        ]
        assert box.tolist() == [ref]
        kept = 1 - (ref[1] - ref[0]) * (ref[3] - ref[2]) / (h * w)
        assert float(cutmix_area_lambda(box, (h, w))[0]) == pytest.approx(kept)
        assert kept >= lam - 1e-12  # clipping and flooring only shrink the box


def test_box_area_is_about_one_minus_lambda_on_average() -> None:
    g = torch.Generator().manual_seed(0)
    box = cutmix_box(0.5, (64, 64), num_boxes=4000, generator=g)
    kept = cutmix_area_lambda(box, (64, 64))
    assert box.shape == (4000, 4)
    # unclipped boxes (centred far from the edges) have area (1 - lam) HW up to flooring
    inside = (box[:, 0] > 0) & (box[:, 1] < 64) & (box[:, 2] > 0) & (box[:, 3] < 64)
    assert float((1 - kept[inside]).mean()) == pytest.approx(0.5, abs=0.03)


def test_mask_and_paste_match_a_naive_loop() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 3, 6, 7, generator=g)
    perm = torch.randperm(5, generator=g)
    one = torch.tensor([[1, 4, 2, 7]])
    per_sample = torch.tensor([[0, 6, 0, 7], [0, 0, 0, 0], [2, 3, 3, 5], [5, 6, 0, 1], [1, 2, 1, 2]])
    for box in (one, per_sample):
        torch.testing.assert_close(paste_box(x, perm, box), _naive_paste(x, perm, box), rtol=0, atol=0)
    mask = cutmix_mask(one, (6, 7))
    assert mask.shape == (1, 6, 7) and int(mask.sum()) == 3 * 5
    labels = torch.randint(0, 3, (5, 6, 7), generator=g)
    labels[0, :3] = -100
    assert torch.equal(paste_box(labels, perm, one), _naive_paste(labels, perm, one))
    with pytest.raises(ValueError, match=r"Expected a tensor of shape \(batch, ..., height, width\)"):
        paste_box(torch.zeros(4, 3), perm[:4], one)


def test_copy_paste_partners_cross_the_split() -> None:
    torch.manual_seed(0)
    for n_l, b in ((4, 10), (6, 8), (3, 6)):
        p = copy_paste_partners(n_l, b)
        assert bool((p[:n_l] >= n_l).all()) and bool((p[n_l:] < n_l).all())
        if b - n_l >= n_l:
            assert len(set(p[:n_l].tolist())) == n_l  # without replacement while there are enough
    assert sorted(copy_paste_partners(0, 5).tolist()) == list(range(5))
    assert sorted(copy_paste_partners(5, 5).tolist()) == list(range(5))


# -- classification ------------------------------------------------------------------------------------------------
def test_classification_pastes_the_input_and_mixes_the_target_by_area() -> None:
    model = _attached(TinyNet(), CutMix())
    x = torch.randn(6, 1, 8, 8)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    _seed_with_a_proper_box()
    ctx = model.prepare_inputs(x, y, torch.arange(6))
    perm, box, lam = ctx.extras["cutmix"]
    assert sorted(perm.tolist()) == list(range(6)) and box.shape == (1, 4)
    assert lam == pytest.approx(float(cutmix_area_lambda(box, (8, 8))[0]))
    assert 0.2 < lam < 0.9
    torch.testing.assert_close(ctx.x, _naive_paste(x, perm, box), rtol=0, atol=0)
    assert ctx.extras["clean_x"] is x and ctx.logs["cutmix/lam"] == lam
    ctx.logits = model(ctx.x)
    loss = model.run_pipeline(ctx, log=False)
    hot = F.one_hot(y, 4).float()
    torch.testing.assert_close(ctx.target, lam * hot + (1 - lam) * hot[perm])
    expected = lam * F.cross_entropy(ctx.logits, y) + (1 - lam) * F.cross_entropy(ctx.logits, y[perm])
    torch.testing.assert_close(loss, expected)
    assert torch.equal(ctx.labels, y) and ctx.given_labels is y


def test_classification_with_unlabeled_rows_mixes_within_the_labeled_ones() -> None:
    model = _attached(TinyNet(), CutMix())
    y = torch.tensor([0, -100, 2, 3, -100, 1])
    ctx = model.prepare_inputs(torch.randn(6, 1, 8, 8), y, torch.arange(6))
    perm = ctx.extras["cutmix"].perm
    assert perm[[1, 4]].tolist() == [1, 4] and sorted(perm[[0, 2, 3, 5]].tolist()) == [0, 2, 3, 5]
    ctx.logits = model(ctx.x)
    model.run_pipeline(ctx, log=False)
    assert ctx.target is not None
    torch.testing.assert_close(ctx.target[[0, 2, 3, 5]].sum(1), torch.ones(4))
    assert float(ctx.target[[1, 4]].abs().sum()) == 0.0


# -- dense -----------------------------------------------------------------------------------------------------
def _dense_batch(b: int = 6) -> tuple[Tensor, Tensor]:
    x, y = make_layout_dataset(b, "dense").tensors
    return x, y


def test_dense_pastes_the_label_map_with_the_same_box_and_ignored_pixels_stay_ignored() -> None:
    model = _attached(TinySegNet(), CutMix())
    x, y = _dense_batch()
    assert bool((y == -100).any())
    _seed_with_a_proper_box()
    ctx = model.prepare_inputs(x, y, torch.arange(6))
    perm, box, _ = ctx.extras["cutmix"]
    torch.testing.assert_close(ctx.x, _naive_paste(x, perm, box), rtol=0, atol=0)
    ctx.logits = model(ctx.x)
    loss = model.run_pipeline(ctx, log=False)
    pasted = _naive_paste(y, perm, box)
    assert torch.equal(ctx.labels, pasted) and ctx.target is None
    assert torch.equal(ctx.given_labels, y)  # the batch's labels, aligned with the clean input
    torch.testing.assert_close(loss, F.cross_entropy(ctx.logits, pasted, ignore_index=-100))


def test_dense_pastes_a_refined_target_the_same_way() -> None:
    model = _attached(TinySegNet(), LabelSmoothing(0.1), CutMix())
    x, y = _dense_batch()
    _seed_with_a_proper_box()
    ctx = model.prepare_inputs(x, y, torch.arange(6))
    ctx.logits = model(ctx.x)
    loss = model.run_pipeline(ctx, log=False)
    perm, box, _ = ctx.extras["cutmix"]
    valid = y != -100
    smooth = label_smoothing_targets(ctx.one_hot(y), 0.1, dim=1) * valid.unsqueeze(1)
    torch.testing.assert_close(ctx.target, _naive_paste(smooth, perm, box))
    pasted = _naive_paste(y, perm, box)
    assert torch.equal(ctx.labels, pasted)
    ref = F.cross_entropy(ctx.logits, pasted, ignore_index=-100, label_smoothing=0.1)
    torch.testing.assert_close(loss, ref)


def test_token_outputs_are_refused_clearly() -> None:
    model = _attached(TinyTagger(), CutMix())
    x, y = make_layout_dataset(4, "tokens").tensors
    with pytest.raises(ValueError, match="does not support channels_last"):
        model.prepare_inputs(x, y)


def test_label_map_of_another_size_and_flat_inputs_are_clear_errors() -> None:
    model = _attached(TinySegNet(), CutMix())
    with pytest.raises(ValueError, match=r"spatial size \(8, 8\)"):
        model.prepare_inputs(torch.randn(2, 1, 8, 8), torch.zeros(2, 4, 4, dtype=torch.long))
    flat = _attached(TinyNet(), CutMix())
    with pytest.raises(ValueError, match=r"\(batch, \.\.\., height, width\)"):
        flat.prepare_inputs(torch.randn(2, 64), torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="floating-point tensor"):
        flat.prepare_inputs(torch.zeros(2, 1, 8, 8, dtype=torch.long), torch.tensor([0, 1]))


# -- BCP-style pseudo-labels -------------------------------------------------------------------------------------
class FixedTeacher(L.Callback):
    """A teacher that predicts class 3 everywhere and records what it was shown."""

    def __init__(self, dense: bool = True) -> None:
        self.dense = dense
        self.inputs: list[Tensor] = []

    def teacher_forward(self, x: Any) -> Tensor:
        self.inputs.append(x)
        logits = torch.zeros(x.shape[0], 4, *(x.shape[2:] if self.dense else ()))
        logits[:, 3] = 5.0
        return logits


def test_teacher_labels_the_unlabeled_images_before_pasting() -> None:
    teacher = FixedTeacher()
    model = _attached(TinySegNet(), CutMix(pseudo_labels="teacher"), teacher)
    x, y = _dense_batch(6)
    y = y.clamp_max(2)  # ground truth uses classes 0-2 (and -100), the teacher says 3
    y[4:] = -100  # two unlabeled images, last
    _seed_with_a_proper_box()
    ctx = model.prepare_inputs(x, y, torch.arange(6), num_labeled=4)
    perm, box, _ = ctx.extras["cutmix"]
    assert bool((perm[:4] >= 4).all()) and bool((perm[4:] < 4).all())  # BCP: labeled <-> unlabeled
    ctx.logits = model(ctx.x)
    model.run_pipeline(ctx, log=False)
    assert len(teacher.inputs) == 1 and teacher.inputs[0] is x  # one teacher forward, on the clean input
    full = torch.where(torch.arange(6).view(-1, 1, 1) < 4, y, torch.full_like(y, 3))
    assert torch.equal(ctx.labels, _naive_paste(full, perm, box))
    inside = cutmix_mask(box, (8, 8))[0]
    # labeled images: ground truth outside the box (void stays void), the teacher's label inside
    assert torch.equal(ctx.labels[:4][:, ~inside], y[:4][:, ~inside])
    assert bool((ctx.labels[:4][:, inside] == 3).all())
    # unlabeled images: the teacher outside the box, the labeled partner's ground truth inside
    assert bool((ctx.labels[4:][:, ~inside] == 3).all())
    assert torch.equal(ctx.labels[4:][:, inside], y[perm[4:]][:, inside])
    assert torch.equal(ctx.given_labels, y)


def test_teacher_pseudo_labels_in_the_one_loader_form_and_for_classification() -> None:
    teacher = FixedTeacher(dense=False)
    model = _attached(TinyNet(), CutMix(pseudo_labels="teacher"), teacher)
    y = torch.tensor([0, -100, 2, 1])
    ctx = model.prepare_inputs(torch.randn(4, 1, 8, 8), y, torch.arange(4))
    ctx.logits = model(ctx.x)
    model.run_pipeline(ctx, log=False)
    perm, _, lam = ctx.extras["cutmix"]
    full = F.one_hot(torch.tensor([0, 3, 2, 1]), 4).float()
    assert ctx.labels.tolist() == [0, 3, 2, 1]
    torch.testing.assert_close(ctx.target, lam * full + (1 - lam) * full[perm])
    # a fully labeled batch needs no teacher forward
    teacher.inputs.clear()
    ctx = model.prepare_inputs(torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3]))
    ctx.logits = model(ctx.x)
    model.run_pipeline(ctx, log=False)
    assert teacher.inputs == []


def test_teacher_mode_without_a_teacher_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"Add `EMATeacher\(decay=0.999\)`"):
        fit([CutMix(pseudo_labels="teacher")], TinySegNet(), make_loader(layout="dense"), max_epochs=1)


def _dense_ssl_loaders(n_l: int = 16, n_u: int = 48) -> CombinedLoader:
    x, y = make_layout_dataset(n_l + n_u, "dense").tensors
    lab = DataLoader(TensorDataset(x[:n_l], y[:n_l], torch.arange(n_l)), batch_size=4)
    unl = DataLoader(TensorDataset(x[n_l:], torch.arange(n_l, n_l + n_u)), batch_size=12)
    return CombinedLoader({"labeled": lab, "unlabeled": unl}, mode="max_size_cycle")


def test_bcp_trains_on_a_semi_supervised_segmentation_batch_and_is_reproducible() -> None:
    runs = []
    for _ in range(2):
        L.seed_everything(0, verbose=False)
        trainer, model = fit(
            [EMATeacher(decay=0.9), CutMix(pseudo_labels="teacher")], TinySegNet(), _dense_ssl_loaders(), max_epochs=1
        )
        assert trainer.global_step == 4
        assert math.isfinite(float(trainer.callback_metrics["train/loss"]))
        assert 0.0 <= float(trainer.callback_metrics["cutmix/lam_step"]) <= 1.0
        runs.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(runs[0], runs[1])


# -- misuse ---------------------------------------------------------------------------------------------------
class RegularizedLossOnlySegNet(TinySegNet):
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y, index = batch
        return self.regularized_loss(self(x), y, index, x=x)


def test_cutmix_with_regularized_loss_alone_raises() -> None:
    with pytest.raises(RuntimeError, match=r"`CutMix` transforms the input before the forward pass"):
        fit([CutMix()], RegularizedLossOnlySegNet(), make_loader(layout="dense"), max_epochs=1)


def test_regularized_loss_outside_the_input_stage_leaves_labels_alone() -> None:
    model = _attached(TinySegNet(), CutMix())
    x, y = _dense_batch(2)
    logits = model(x)
    loss = model.regularized_loss(logits, y, log=False)
    torch.testing.assert_close(loss, F.cross_entropy(logits, y, ignore_index=-100))


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match=r"Expected argument `alpha` to be a float in \(0, inf\), but got 0.0."):
        CutMix(alpha=0.0)
    with pytest.raises(ValueError, match=r"Expected argument `pseudo_labels` to be one of \['none', 'teacher'\]"):
        CutMix(pseudo_labels="ema")  # type: ignore[arg-type]
