"""The tensor contract: dense and sequence logits, ignore_index, unlabeled data, training-only state, misuse."""

from __future__ import annotations

from typing import Any, ClassVar

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import CombinedLoader
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_reg import ELR, LabelSmoothing, Mixup
from lightning_reg.core.protocol import (
    LossRegularizer,
    RegularizedModule,
    StepContext,
    unpack_semi_supervised_batch,
)
from tests.helpers import TinyNet, fit, make_dataset, make_loader, trainer_kwargs


class DenseNet(RegularizedModule, L.LightningModule):
    """A 1x1-conv "segmenter": (B, 1, H, W) -> (B, C, H, W)."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Tagger(RegularizedModule, L.LightningModule):
    """(B, T, 4) features -> (B, T, C) token logits."""

    logits_layout = "channels_last"

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.lin = nn.Linear(4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_dense_base_loss_is_cross_entropy_with_ignore_index() -> None:
    torch.manual_seed(0)
    net = DenseNet()
    logits = torch.randn(2, 3, 4, 5, requires_grad=True)
    y = torch.randint(0, 3, (2, 4, 5))
    y[0, :2] = -100
    loss = net.regularized_loss(logits, y, log=False)
    torch.testing.assert_close(loss, F.cross_entropy(logits, y, ignore_index=-100))


def test_an_all_ignored_image_gets_exactly_zero_gradient() -> None:
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    y = torch.randint(0, 3, (2, 4, 4))
    y[1] = -100
    loss = DenseNet().regularized_loss(logits, y, log=False)
    loss.backward()
    assert logits.grad is not None
    assert torch.count_nonzero(logits.grad[1]) == 0
    assert torch.count_nonzero(logits.grad[0]) > 0


def test_an_all_ignored_batch_gives_zero_not_nan() -> None:
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    loss = DenseNet().regularized_loss(logits, torch.full((2, 4, 4), -100), log=False)
    assert float(loss) == 0.0
    loss.backward()
    assert torch.count_nonzero(logits.grad) == 0  # type: ignore[arg-type]


def test_sequence_layout_matches_cross_entropy() -> None:
    logits = torch.randn(2, 5, 3, requires_grad=True)
    y = torch.randint(0, 3, (2, 5))
    y[:, 3:] = -100  # padding
    loss = Tagger().regularized_loss(logits, y, log=False)
    torch.testing.assert_close(loss, F.cross_entropy(logits.reshape(-1, 3), y.reshape(-1), ignore_index=-100))


def test_sequence_logits_without_the_layout_attribute_say_how_to_fix() -> None:
    with pytest.raises(ValueError, match="logits_layout = 'channels_last'"):
        DenseNet().regularized_loss(torch.randn(2, 5, 3), torch.randint(0, 3, (2, 5)), log=False)


def test_elements_view_is_the_same_for_every_layout() -> None:
    z = torch.randn(2, 3, 2, 2)
    y = torch.randint(0, 3, (2, 2, 2))
    y[0, 0, 0] = -100
    ctx = StepContext(module=DenseNet(), x=None, labels=y, given_labels=y, logits=z)
    view = ctx.elements()
    assert view.logits.shape == (8, 3) and view.labels.shape == (8,)
    torch.testing.assert_close(view.logits[5], z[1, :, 0, 1])
    assert view.sample.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert view.valid.tolist() == [False, *([True] * 7)]
    torch.testing.assert_close(ctx.from_elements(ctx.per_element(z)), z)
    hot = ctx.one_hot()
    assert hot.shape == z.shape and float(hot[0, :, 0, 0].sum()) == 0.0 and float(hot[1].sum()) == 4.0
    seq = StepContext(
        module=Tagger(),
        x=None,
        labels=y[:, 0],
        given_labels=y[:, 0],
        logits=z.movedim(1, -1)[:, 0],
        layout="channels_last",
    )
    assert seq.elements().logits.shape == (4, 3) and seq.num_classes == 3


def test_labels_out_of_range_but_not_ignore_index_are_a_clear_error() -> None:
    y = torch.tensor([[0, 5], [1, -100]])
    with pytest.raises(ValueError, match=r"Expected labels in \[0, 3\) for 3 classes \(or `ignore_index` = -100"):
        Tagger().regularized_loss(torch.randn(2, 2, 3), y, log=False)


def test_mixin_after_lightning_module_is_a_clear_error() -> None:
    with pytest.raises(TypeError, match=r"Put the mixin first: `class Wrong\(RegularizedModule, L.LightningModule\)`"):

        class Wrong(L.LightningModule, RegularizedModule):  # type: ignore[misc]
            pass


def test_unknown_layout_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"Expected `Bad.logits_layout` to be one of"):

        class Bad(RegularizedModule, L.LightningModule):
            logits_layout = "nhwc"  # type: ignore[assignment]


# -- semi-supervised batches ---------------------------------------------------------------------------------------
def test_unpack_semi_supervised_batch_dense_labels_and_missing_index() -> None:
    b = {
        "labeled": (torch.zeros(2, 1, 2, 2), torch.zeros(2, 2, 2, dtype=torch.long)),
        "unlabeled": torch.ones(3, 1, 2, 2),
    }
    x, y, index, n = unpack_semi_supervised_batch(b)
    assert x.shape == (5, 1, 2, 2) and y.shape == (5, 2, 2) and index is None and n == 2
    assert bool((y[2:] == -100).all())
    with pytest.raises(ValueError, match="only the labeled one does"):
        unpack_semi_supervised_batch(
            {
                "labeled": (torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), torch.arange(2)),
                "unlabeled": torch.ones(1, 3),
            }
        )


class CountingNet(TinyNet):
    forwards = 0
    batch_sizes: ClassVar[list[int]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            CountingNet.forwards += 1
            CountingNet.batch_sizes.append(int(x.shape[0]))
        return super().forward(x)


class LabelFree(LossRegularizer):
    """Records what a label-free loss term sees."""

    name = "probe"
    needs_labels = False
    seen: ClassVar[list[tuple[int, int, list[bool]]]] = []

    def loss_term(self, ctx: StepContext) -> torch.Tensor | None:
        LabelFree.seen.append((ctx.batch_size, int(ctx.num_labeled or -1), ctx.labeled.tolist()))
        return None


def _ssl_loaders(n_l: int = 16, n_u: int = 48) -> CombinedLoader:
    ds = make_dataset(n_l + n_u)
    x, y = ds.tensors
    lab = DataLoader(TensorDataset(x[:n_l], y[:n_l], torch.arange(n_l)), batch_size=4)
    unl = DataLoader(TensorDataset(x[n_l:], torch.arange(n_l, n_l + n_u)), batch_size=12)
    return CombinedLoader({"labeled": lab, "unlabeled": unl}, mode="max_size_cycle")


def test_one_forward_per_step_carries_both_parts_and_base_loss_sees_labeled_only() -> None:
    CountingNet.forwards, CountingNet.batch_sizes, LabelFree.seen = 0, [], []
    trainer, model = fit([LabelFree()], CountingNet(), _ssl_loaders(), max_epochs=1)
    assert trainer.global_step == 4
    assert CountingNet.forwards == 4 and CountingNet.batch_sizes == [16] * 4
    assert LabelFree.seen[0] == (16, 4, [True] * 4 + [False] * 12)
    # the base loss is CE over the labeled rows only
    batch, _, _ = next(iter(_ssl_loaders()))
    x, y, index, n = unpack_semi_supervised_batch(batch)
    logits = model(x)
    ref = F.cross_entropy(logits[:n], y[:n])
    torch.testing.assert_close(model.regularized_loss(logits, y, index, x=x, num_labeled=n, log=False), ref)


def test_unlabeled_samples_leave_label_dependent_tables_untouched() -> None:
    elr = ELR(beta=0.7, lam=3.0, num_samples=64)
    fit([elr], TinyNet(), _ssl_loaders(), max_epochs=1)
    seen = elr.seen
    assert bool(seen[:16].all()), "every labeled sample was visited"
    assert not bool(seen[16:].any()), "unlabeled samples must not be written to ELR's table"


# -- training only -------------------------------------------------------------------------------------------------
class ValLossNet(TinyNet):
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y, index = batch
        self.regularized_loss(self(x), y, index, x=x, log=False)


def test_training_flag_is_false_outside_training_steps() -> None:
    flags: list[tuple[bool, bool]] = []

    class Probe(LossRegularizer):
        name = "probe"

        def loss_term(self, ctx: StepContext) -> None:
            flags.append((ctx.training, ctx.module.trainer.sanity_checking))

    L.seed_everything(0)
    trainer = L.Trainer(callbacks=[Probe()], **trainer_kwargs(num_sanity_val_steps=1, max_epochs=1))
    trainer.fit(ValLossNet(), train_dataloaders=make_loader(), val_dataloaders=make_loader(16, batch_size=8))
    assert flags[0] == (False, True)  # the sanity check
    assert [f[0] for f in flags].count(True) == 4  # only the 4 training steps are training
    assert len(flags) == 1 + 4 + 2


# -- silent no-ops -------------------------------------------------------------------------------------------------
class OwnLossNet(TinyNet):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch[0], batch[1]
        return F.cross_entropy(self(x), y)


def test_a_loss_side_callback_the_step_never_reaches_raises() -> None:
    with pytest.raises(RuntimeError, match=r"`LabelSmoothing` is listed in the Trainer's callbacks but did nothing"):
        fit([LabelSmoothing(0.1)], OwnLossNet(), max_epochs=1)


class RegularizedLossOnlyNet(TinyNet):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y, index = batch
        return self.regularized_loss(self(x), y, index, x=x)


def test_mixup_with_regularized_loss_alone_raises() -> None:
    with pytest.raises(RuntimeError, match=r"`Mixup` transforms the input before the forward pass"):
        fit([Mixup(alpha=1.0)], RegularizedLossOnlyNet(), max_epochs=1)


def test_prepare_inputs_then_run_pipeline_is_accepted() -> None:
    class Manual(TinyNet):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y, index = batch
            ctx = self.prepare_inputs(x, y, index, batch_idx)
            ctx.logits = self(ctx.x)
            return self.run_pipeline(ctx)

    trainer, _ = fit([Mixup(alpha=1.0)], Manual(), max_epochs=1)
    assert trainer.global_step == 4


def test_input_checks_on_accelerators_run_only_on_the_first_and_logging_steps() -> None:
    """Off the CPU, ``check_inputs`` syncs with the host only on the first training step and on logging steps."""
    from types import SimpleNamespace

    net = TinyNet()
    connector = SimpleNamespace(should_update_logs=False)
    net._trainer = SimpleNamespace(_logger_connector=connector)  # type: ignore[assignment]
    logits = torch.empty(2, 3, device="meta")
    ctx = StepContext(module=net, x=None, labels=torch.zeros(2, dtype=torch.long), given_labels=None, logits=logits)  # type: ignore[arg-type]
    assert net._should_check(ctx)  # the first training step
    assert not net._should_check(ctx)  # a step that logs nothing: no host sync
    connector.should_update_logs = True
    assert net._should_check(ctx)  # a logging step
    ctx.training = False
    connector.should_update_logs = False
    assert net._should_check(ctx)  # validation / test / sanity steps always check
    ctx.training, ctx.logits = True, torch.zeros(2, 3)
    assert net._should_check(ctx)  # on the CPU a check costs no sync: every step


# -- logging on logging steps only -----------------------------------------------------------------------------
class StepProbe(LossRegularizer):
    """Reports the global step as a logged value."""

    name = "probe"

    def loss_term(self, ctx: StepContext) -> None:
        ctx.logs["probe/step"] = float(ctx.module.trainer.global_step)


def test_values_reach_lightning_on_logging_steps_with_exact_epoch_means(tmp_path: Any) -> None:
    import csv

    from lightning.pytorch.loggers import CSVLogger

    calls: list[str] = []

    class Counting(TinyNet):
        def log(self, name: str, *args: Any, **kwargs: Any) -> None:
            calls.append(name)
            super().log(name, *args, **kwargs)

    fit([StepProbe()], Counting(), max_epochs=2, log_every_n_steps=3, logger=CSVLogger(tmp_path, name="m"))
    # 4 batches per epoch: flushes on logging steps (global steps 2, 5) and each epoch's last batch (3, 7)
    assert calls.count("probe/step") == 4
    assert calls.count("train/loss") == 4
    with open(next(tmp_path.rglob("metrics.csv"))) as f:
        rows = list(csv.DictReader(f))
    epoch = [float(r["probe/step_epoch"]) for r in rows if r.get("probe/step_epoch")]
    assert epoch == [1.5, 5.5]  # exact means of steps 0..3 and 4..7
    steps = [(int(r["step"]), float(r["probe/step_step"])) for r in rows if r.get("probe/step_step")]
    # the logger writes step values on logging steps only: the window means of steps 0-2 and 3-5 (step 3 was
    # flushed at the end of epoch 0 into the epoch aggregate only)
    assert steps == [(2, 1.0), (5, 4.5)]


def test_num_samples_is_inferred_for_semi_supervised_loaders() -> None:
    """With a ``CombinedLoader`` the table covers every part: one index space, labeled samples first."""
    elr = ELR(beta=0.7, lam=3.0)  # no num_samples: inferred as 16 labeled + 48 unlabeled
    fit([elr], TinyNet(), _ssl_loaders(), max_epochs=1)
    assert elr.seen.shape == (64,)
    assert bool(elr.seen[:16].all()) and not bool(elr.seen[16:].any())
