"""Mixup: the mixed input and target, its place in the pipeline, and the ELR+ lambda option."""

from __future__ import annotations

import math
import statistics

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from lightning_reg.callbacks.label_smoothing import LabelSmoothing
from lightning_reg.callbacks.mixup import Mixup
from lightning_reg.core.protocol import LossRegularizer, StepContext
from lightning_reg.functional.mixup import mixup_lambda, mixup_tensors
from tests.helpers import TinyNet, fit


def _attached(*callbacks: L.Callback) -> TinyNet:
    """A TinyNet whose trainer lists ``callbacks`` (so its pipeline runs them) without fitting."""
    model = TinyNet()
    model.trainer = L.Trainer(callbacks=list(callbacks), logger=False, enable_progress_bar=False)
    return model


def test_lambda_distribution_and_max_option() -> None:
    g = torch.Generator().manual_seed(0)
    lams = [mixup_lambda(1.0, generator=g) for _ in range(4000)]
    assert all(0.0 <= v <= 1.0 for v in lams)
    # Beta(1, 1) is uniform: mean 1/2, variance 1/12.
    assert statistics.fmean(lams) == pytest.approx(0.5, abs=0.02)
    assert statistics.pvariance(lams) == pytest.approx(1 / 12, abs=0.006)
    # Beta(0.2, 0.2) piles up near 0 and 1.
    small = [mixup_lambda(0.2, generator=g) for _ in range(2000)]
    assert statistics.fmean([min(v, 1 - v) < 0.1 for v in small]) > 0.5
    # max_lam folds onto [0.5, 1]: E[max(U, 1-U)] = 3/4.
    folded = [mixup_lambda(1.0, max_lam=True, generator=g) for _ in range(4000)]
    assert min(folded) >= 0.5 and statistics.fmean(folded) == pytest.approx(0.75, abs=0.02)


def test_transform_and_target() -> None:
    model = _attached(Mixup(alpha=1.0))
    x = torch.randn(5, 1, 8, 8)
    y = torch.tensor([0, 1, 2, 3, 0])
    torch.manual_seed(3)
    ctx = model.prepare_inputs(x, y, torch.arange(5))
    perm, lam = ctx.extras["mixup"]
    assert sorted(perm.tolist()) == list(range(5)) and 0.0 <= lam <= 1.0
    torch.testing.assert_close(ctx.x, lam * x + (1 - lam) * x[perm])
    assert ctx.extras["clean_x"] is x
    assert ctx.logs["mixup/lam"] == lam
    ctx.logits = model(ctx.x)
    loss = model.run_pipeline(ctx, log=False)
    torch.testing.assert_close(ctx.target, lam * F.one_hot(y, 4).float() + (1 - lam) * F.one_hot(y[perm], 4).float())
    expected = lam * F.cross_entropy(ctx.logits, y) + (1 - lam) * F.cross_entropy(ctx.logits, y[perm])
    torch.testing.assert_close(loss, expected)


class _ShiftTarget(LossRegularizer):
    """A target refiner whose target is per-sample and not linear in the label: one_hot((y + 1) % C)."""

    name = "shift"
    stage = "target"

    def refine_target(self, ctx: StepContext) -> None:
        ctx.target = F.one_hot((ctx.labels + 1) % ctx.num_classes, ctx.num_classes).float()


@pytest.mark.parametrize("mixup_first", [True, False])
def test_mixup_mixes_the_final_target_whatever_the_order(mixup_first: bool) -> None:
    cbs = [Mixup(), _ShiftTarget()] if mixup_first else [_ShiftTarget(), Mixup()]
    model = _attached(*cbs)
    y = torch.tensor([0, 1, 2, 3])
    ctx = model.prepare_inputs(torch.randn(4, 1, 8, 8), y, torch.arange(4))
    ctx.logits = model(ctx.x)
    model.run_pipeline(ctx, log=False)
    perm, lam = ctx.extras["mixup"]
    shifted = F.one_hot((y + 1) % 4, 4).float()
    torch.testing.assert_close(ctx.target, mixup_tensors(shifted, perm, lam))


def test_mixup_composes_with_label_smoothing() -> None:
    model = _attached(Mixup(), LabelSmoothing(0.1))
    y = torch.tensor([0, 1, 2, 3])
    ctx = model.prepare_inputs(torch.randn(4, 1, 8, 8), y, torch.arange(4))
    ctx.logits = model(ctx.x)
    model.run_pipeline(ctx, log=False)
    perm, lam = ctx.extras["mixup"]
    smooth = F.one_hot(y, 4).float() * 0.9 + 0.025
    torch.testing.assert_close(ctx.target, lam * smooth + (1 - lam) * smooth[perm])
    assert ctx.target is not None and torch.allclose(ctx.target.sum(1), torch.ones(4))


def test_regularized_loss_without_input_stage_is_plain_ce() -> None:
    model = _attached(Mixup())
    logits, y = torch.randn(4, 4), torch.tensor([0, 1, 2, 3])
    loss = model.regularized_loss(logits, y, log=False)
    torch.testing.assert_close(loss, F.cross_entropy(logits, y))


def test_non_float_input_is_a_clear_error() -> None:
    model = _attached(Mixup())
    with pytest.raises(TypeError, match="floating-point tensor"):
        model.prepare_inputs(torch.zeros(4, 3, dtype=torch.long), torch.tensor([0, 1, 2, 3]))


def test_trains_and_is_reproducible_under_a_step_seed() -> None:
    runs = []
    for _ in range(2):
        L.seed_everything(0, verbose=False)
        trainer, model = fit([Mixup(alpha=0.4, max_lam=True)], TinyNet(), max_epochs=2)
        assert math.isfinite(float(trainer.callback_metrics["train/loss"]))
        assert 0.5 <= float(trainer.callback_metrics["mixup/lam_step"]) <= 1.0
        runs.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(runs[0], runs[1])


# -- dense outputs and unlabeled rows (issues 13 and 14) ------------------------------------------------------
def test_dense_outputs_are_refused_with_cutmix_as_the_fix() -> None:
    from tests.helpers import TinySegNet, make_layout_dataset

    model = TinySegNet()
    model.trainer = L.Trainer(callbacks=[Mixup()], logger=False, enable_progress_bar=False)
    x, y = make_layout_dataset(4, "dense").tensors
    with pytest.raises(ValueError, match=r"`Mixup` does not support dense outputs.*use `CutMix`"):
        model.prepare_inputs(x, y)


def test_semi_supervised_batch_mixes_within_the_labeled_rows() -> None:
    model = _attached(Mixup())
    x = torch.randn(6, 1, 8, 8)
    y = torch.tensor([0, 1, 2, 3, -100, -100])
    ctx = model.prepare_inputs(x, y, torch.arange(6), num_labeled=4)
    perm, lam = ctx.extras["mixup"]
    assert sorted(perm[:4].tolist()) == [0, 1, 2, 3] and perm[4:].tolist() == [4, 5]
    torch.testing.assert_close(ctx.x[4:], x[4:])  # unlabeled rows are their own partners
    ctx.logits = model(ctx.x)
    loss = model.run_pipeline(ctx, log=False)
    assert ctx.target is not None
    torch.testing.assert_close(ctx.target[:4].sum(1), torch.ones(4))  # never a share of a row without a label
    assert float(ctx.target[4:].abs().sum()) == 0.0
    hot = F.one_hot(y[:4], 4).float()
    expected = lam * F.cross_entropy(ctx.logits[:4], y[:4]) + (1 - lam) * F.cross_entropy(
        ctx.logits[:4], y[:4][perm[:4]]
    )
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(ctx.target[:4], lam * hot + (1 - lam) * hot[perm[:4]])


def test_one_loader_batch_with_ignored_labels_mixes_within_the_labeled_rows() -> None:
    model = _attached(Mixup())
    y = torch.tensor([-100, 1, 2, -100, 0])
    for seed in range(5):
        torch.manual_seed(seed)
        ctx = model.prepare_inputs(torch.randn(5, 1, 8, 8), y, torch.arange(5))
        perm = ctx.extras["mixup"][0]
        assert perm[[0, 3]].tolist() == [0, 3] and sorted(perm[[1, 2, 4]].tolist()) == [1, 2, 4]
