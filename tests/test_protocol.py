"""The regularization protocol: pipeline order, conflicts, the mixin requirement and the helper."""

from __future__ import annotations

from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from lightning_reg import LabelSmoothing
from lightning_reg.core.protocol import (
    LossRegularizer,
    StepContext,
    regularizers_of,
    soft_cross_entropy,
    unpack_batch,
)
from tests.helpers import TinyNet, fit, make_loader

CALLS: list[str] = []


class Tag(LossRegularizer):
    """Records the order in which the pipeline calls it."""

    name = "tag"

    def __init__(self, tag: str = "a", stage: str = "loss") -> None:
        super().__init__()
        self.tag = tag
        self._stage = stage

    @property
    def stage(self) -> str:  # type: ignore[override]
        return self._stage

    @property
    def state_key(self) -> str:
        return f"Tag[{self.tag}]"

    def transform_input(self, ctx: StepContext) -> None:
        CALLS.append(f"input:{self.tag}")

    def refine_labels(self, ctx: StepContext) -> None:
        CALLS.append(f"label:{self.tag}")

    def refine_target(self, ctx: StepContext) -> None:
        CALLS.append(f"target:{self.tag}")

    def loss_term(self, ctx: StepContext) -> torch.Tensor | None:
        CALLS.append(f"loss:{self.tag}")
        return None


def test_pipeline_runs_stages_in_order_then_callback_order() -> None:
    CALLS.clear()
    cbs = [Tag("l1", "loss"), Tag("t1", "target"), Tag("i1", "input"), Tag("b1", "label"), Tag("t2", "target")]
    fit(cbs, max_steps=1)
    # An input-stage regularizer's `refine_target` runs after the target stage (mixup mixes the refined target).
    assert CALLS == ["input:i1", "label:b1", "target:t1", "target:t2", "target:i1", "loss:l1"]


def test_loss_regularizer_without_mixin_fails_with_the_fix() -> None:
    class Plain(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(64, 4)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return F.cross_entropy(self.layer(batch[0].flatten(1)), batch[1])

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    with pytest.raises(TypeError, match=r"class MyModel\(RegularizedModule, L.LightningModule\)"):
        fit([LabelSmoothing()], Plain(), max_steps=1)


def test_conflicting_regularizers_raise_at_setup() -> None:
    with pytest.raises(ValueError, match="Conflicting regularizers `LabelSmoothing` and `LabelSmoothing`"):
        fit([LabelSmoothing(0.1), LabelSmoothing(0.2)], max_steps=1)


def test_label_smoothing_changes_the_base_loss_and_logs_terms() -> None:
    trainer, _ = fit([LabelSmoothing(0.2)], max_steps=1)
    m = trainer.callback_metrics
    assert float(m["label_smoothing/epsilon"]) == pytest.approx(0.2)
    assert float(m["train/loss"]) == pytest.approx(float(m["train/loss_base"]))


def test_regularized_loss_helper_matches_the_mixin_pipeline() -> None:
    model = TinyNet()
    x, y, index = next(iter(make_loader()))
    logits = model(x)
    plain = model.regularized_loss(logits, y, index, x=x, log=False)
    torch.testing.assert_close(plain, F.cross_entropy(logits, y))
    trainer = L.Trainer(callbacks=[LabelSmoothing(0.1)], logger=False)
    model.trainer = trainer
    assert regularizers_of(trainer)
    smoothed = model.regularized_loss(logits, y, index, x=x, log=False)
    torch.testing.assert_close(smoothed, F.cross_entropy(logits, y, label_smoothing=0.1))


def test_soft_cross_entropy_gradient_is_p_minus_q() -> None:
    logits = torch.tensor([[1.0, 2.0, 0.5]], requires_grad=True)
    q = torch.tensor([[0.2, 0.7, 0.1]])
    soft_cross_entropy(logits, q).backward()
    torch.testing.assert_close(logits.grad, torch.softmax(logits.detach(), 1) - q)


def test_unpack_batch_forms_and_errors() -> None:
    x, y = torch.zeros(2, 3), torch.tensor([0, 1])
    assert unpack_batch((x, y))[2] is None
    assert unpack_batch({"x": x, "y": y, "index": torch.tensor([4, 5])})[2].tolist() == [4, 5]
    with pytest.raises(ValueError, match="IndexedDataset"):
        unpack_batch([x])
    with pytest.raises(ValueError, match="keys `x` and `y`"):
        unpack_batch({"image": x})


def test_fit_start_summary_is_printed(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIGHTNING_REG_SUMMARY", "1")
    fit([LabelSmoothing(0.1)], max_steps=1)
    out = capsys.readouterr().out
    assert "active regularizers" in out and "LabelSmoothing" in out and "smoothing=0.1" in out
