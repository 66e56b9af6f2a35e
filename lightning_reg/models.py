"""Built-in classifiers that use the :class:`~lightning_reg.RegularizedModule` mixin.

Both log ``val/acc``, ``val/loss``, ``test/acc``, ``test/loss`` and
``test/ece`` (15-bin expected calibration error, torchmetrics'
``MulticlassCalibrationError``), so every technique can be compared on the
same footing.

Example:
    >>> import torch
    >>> model = SmallCNN(num_classes=10)
    >>> model(torch.zeros(2, 1, 28, 28)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy, MulticlassCalibrationError, MulticlassJaccardIndex

from lightning_reg.core.protocol import RegularizedModule, unpack_batch
from lightning_reg.core.validation import check_choice, check_float, check_int

__all__ = ["ClassifierModule", "MLPClassifier", "SmallCNN", "SmallUNet"]


class ClassifierModule(RegularizedModule, L.LightningModule):
    """Shared optimisation and evaluation for the built-in classifiers.

    Args:
        num_classes: Number of classes.
        lr: Learning rate.
        optimizer: ``"sgd"`` (momentum 0.9, Nesterov off) or ``"adamw"``.
        weight_decay: Weight decay.
        lr_schedule: ``"cosine"`` annealing over ``max_epochs`` or ``"constant"``.
    """

    def __init__(
        self,
        num_classes: int = 10,
        lr: float = 0.05,
        optimizer: Literal["sgd", "adamw"] = "sgd",
        weight_decay: float = 5e-4,
        lr_schedule: Literal["cosine", "constant"] = "cosine",
    ) -> None:
        super().__init__()
        self.num_classes = check_int("num_classes", num_classes, low=2)
        self.lr = check_float("lr", lr, 0.0, low_inclusive=False)
        self.optimizer_name = check_choice("optimizer", optimizer, ["sgd", "adamw"])
        self.weight_decay = check_float("weight_decay", weight_decay, 0.0)
        self.lr_schedule = check_choice("lr_schedule", lr_schedule, ["cosine", "constant"])
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_ece = MulticlassCalibrationError(num_classes, n_bins=15, norm="l1")

    def _eval_step(self, batch: Any, stage: str) -> Tensor:
        x, y, _ = unpack_batch(batch)
        logits = self(x)
        loss = F.cross_entropy(logits.float(), y)
        if stage == "val":
            self.val_acc(logits, y)
            self.log("val/acc", self.val_acc, prog_bar=True, batch_size=len(y))
        else:
            self.test_acc(logits, y)
            self.test_ece(logits.float().softmax(-1), y)
            self.log("test/acc", self.test_acc, batch_size=len(y))
            self.log("test/ece", self.test_ece, batch_size=len(y))
        self.log(f"{stage}/loss", loss, batch_size=len(y))
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._eval_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._eval_step(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, _, _ = unpack_batch(batch) if isinstance(batch, (list, tuple, dict)) else (batch, None, None)
        return self(x).softmax(-1)

    def configure_optimizers(self) -> Any:
        if self.optimizer_name == "sgd":
            opt: torch.optim.Optimizer = torch.optim.SGD(
                self.parameters(), lr=self.lr, momentum=0.9, weight_decay=self.weight_decay
            )
        else:
            opt = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        if self.lr_schedule == "constant":
            return opt
        total = max(int(self.trainer.max_epochs or 1), 1)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}


class MLPClassifier(ClassifierModule):
    """A multilayer perceptron: Flatten → [Linear → ReLU → Dropout] × len(hidden) → Linear.

    A narrow one (e.g. ``hidden=[32]``) underfits Fashion-MNIST, the setting
    where early dropout is claimed to help.

    Args:
        in_features: Input size after flattening (784 for 28×28 images).
        hidden: Hidden layer widths.
        dropout: Dropout rate after each hidden layer (the modules early dropout schedules).
        **kwargs: See :class:`ClassifierModule`.
    """

    def __init__(
        self, in_features: int = 784, hidden: list[int] | None = None, dropout: float = 0.0, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        hidden = [256] if hidden is None else list(hidden)
        self.dropout = check_float("dropout", dropout, 0.0, 1.0, high_inclusive=False)
        layers: list[nn.Module] = [nn.Flatten()]
        width = check_int("in_features", in_features, low=1)
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(dropout)]
            width = h
        layers.append(nn.Linear(width, self.num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class SmallCNN(ClassifierModule):
    """A small CNN for 28×28 grey images: two conv blocks with BatchNorm, then a dropout head.

    Args:
        channels: Channels of the two conv blocks.
        dropout: Dropout before the classifier.
        in_channels: Input channels.
        **kwargs: See :class:`ClassifierModule`.
    """

    def __init__(
        self, channels: list[int] | None = None, dropout: float = 0.0, in_channels: int = 1, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        c1, c2 = [32, 64] if channels is None else list(channels)
        self.dropout = check_float("dropout", dropout, 0.0, 1.0, high_inclusive=False)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 3, padding=1),
            nn.BatchNorm2d(c1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1),
            nn.BatchNorm2d(c2),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(c2 * 16, self.num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def _conv_block(c_in: int, c_out: int) -> nn.Sequential:
    """Two 3×3 convolutions with BatchNorm and ReLU (the U-Net block)."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class SmallUNet(ClassifierModule):
    """A small U-Net for semantic segmentation: per-pixel logits ``(B, num_classes, H, W)``.

    One resolution per entry of ``channels`` (``H``, ``H/2``, ``H/4``, …) with
    skip connections: an encoder of two-convolution blocks (3×3 conv,
    BatchNorm, ReLU, twice) and max-pooling, a bottleneck at the lowest
    resolution, a decoder of 2×2 transposed convolutions and blocks over the
    concatenated skip, and a 1×1 head. Any ``H``, ``W`` works (an upsampled map
    is resized to its skip's size when they differ). Optimisation is :class:`ClassifierModule`'s
    (``lr``, ``optimizer``, ``weight_decay``, ``lr_schedule``); ``training_step``
    is the :class:`~lightning_reg.RegularizedModule` pipeline.

    Args:
        num_classes: Number of classes, background included (11 for
            :class:`~lightning_reg.data.segmentation.SegmentationDataModule`).
        channels: Widths per resolution, finest first; the last is the bottleneck (at least two).
        in_channels: Input channels.
        dropout: ``nn.Dropout2d`` rate at the bottleneck (the module dropout schedules act on).
        ignore_index: Label of pixels left out of the validation/test loss and metrics.
        **kwargs: See :class:`ClassifierModule` (``lr``, ``optimizer``, ``weight_decay``, ``lr_schedule``).

    Logged metrics (pixels labelled ``ignore_index`` are left out):

    ====================  ======================================================================
    ``val/loss``           per-pixel cross-entropy
    ``val/mIoU``           mean IoU over the classes present (``MulticlassJaccardIndex``, macro)
    ``val/pixel_acc``      pixel accuracy
    ``test/loss``          as ``val/loss``, on the test set
    ``test/mIoU``          as ``val/mIoU``
    ``test/pixel_acc``     as ``val/pixel_acc``
    ``test/ece``           15-bin expected calibration error over pixels
    ====================  ======================================================================

    Example:
        >>> model = SmallUNet(num_classes=11, channels=[8, 16, 32])
        >>> model(torch.zeros(2, 1, 48, 48)).shape
        torch.Size([2, 11, 48, 48])

    YAML::

        model:
          class_path: lightning_reg.models.SmallUNet
          init_args: {num_classes: 11, channels: [16, 32, 64], lr: 0.003, optimizer: adamw, weight_decay: 0.0001}
    """

    def __init__(
        self,
        num_classes: int = 11,
        channels: list[int] | None = None,
        in_channels: int = 1,
        dropout: float = 0.0,
        ignore_index: int = -100,
        **kwargs: Any,
    ) -> None:
        super().__init__(num_classes=num_classes, **kwargs)
        widths = [16, 32, 64] if channels is None else [check_int("channels", c, low=1) for c in channels]
        if len(widths) < 2:
            raise ValueError(f"Expected argument `channels` to be a list of at least 2 widths, but got {channels!r}.")
        self.channels = widths
        self.in_channels = check_int("in_channels", in_channels, low=1)
        self.dropout = check_float("dropout", dropout, 0.0, 1.0, high_inclusive=False)
        self.ignore_index = check_int("ignore_index", ignore_index)
        if 0 <= self.ignore_index < self.num_classes:
            raise ValueError(
                f"Expected argument `ignore_index` to be outside the labels [0, {self.num_classes}), but got"
                f" {ignore_index}."
            )
        ins = [self.in_channels, *widths[:-2]]
        self.encoders = nn.ModuleList(_conv_block(c_in, c) for c_in, c in zip(ins, widths[:-1]))
        self.bottleneck = nn.Sequential(_conv_block(widths[-2], widths[-1]), nn.Dropout2d(dropout))
        self.ups = nn.ModuleList(
            nn.ConvTranspose2d(c_deep, c, 2, stride=2) for c_deep, c in zip(widths[:0:-1], widths[-2::-1])
        )
        self.decoders = nn.ModuleList(_conv_block(2 * c, c) for c in widths[-2::-1])
        self.head = nn.Conv2d(widths[0], self.num_classes, 1)
        # Dense metrics in place of ClassifierModule's per-sample ones.
        ignore = self.ignore_index
        self.val_acc = MulticlassAccuracy(self.num_classes, average="micro", ignore_index=ignore)
        self.test_acc = MulticlassAccuracy(self.num_classes, average="micro", ignore_index=ignore)
        self.val_iou = MulticlassJaccardIndex(self.num_classes, average="macro", ignore_index=ignore)
        self.test_iou = MulticlassJaccardIndex(self.num_classes, average="macro", ignore_index=ignore)
        self.test_ece = MulticlassCalibrationError(self.num_classes, n_bins=15, norm="l1", ignore_index=ignore)

    def forward(self, x: Tensor) -> Tensor:
        skips = []
        for enc in self.encoders:
            x = enc(x)
            skips.append(x)
            x = F.max_pool2d(x, 2)
        x = self.bottleneck(x)
        for up, dec, skip in zip(self.ups, self.decoders, reversed(skips)):
            x = up(x)
            if x.shape[-2:] != skip.shape[-2:]:  # odd sizes: match the skip's size
                x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = dec(torch.cat([x, skip], dim=1))
        return self.head(x)

    def _eval_step(self, batch: Any, stage: str) -> Tensor:
        x, y, _ = unpack_batch(batch)
        logits = self(x)
        loss = F.cross_entropy(logits.float(), y, ignore_index=self.ignore_index)
        bs = len(y)
        if stage == "val":
            self.val_iou(logits, y)
            self.val_acc(logits, y)
            self.log("val/mIoU", self.val_iou, prog_bar=True, batch_size=bs)
            self.log("val/pixel_acc", self.val_acc, batch_size=bs)
        else:
            self.test_iou(logits, y)
            self.test_acc(logits, y)
            self.test_ece(logits.float().softmax(1), y)
            self.log("test/mIoU", self.test_iou, batch_size=bs)
            self.log("test/pixel_acc", self.test_acc, batch_size=bs)
            self.log("test/ece", self.test_ece, batch_size=bs)
        self.log(f"{stage}/loss", loss, batch_size=bs)
        return loss

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, _, _ = unpack_batch(batch) if isinstance(batch, (list, tuple, dict)) else (batch, None, None)
        return self(x).softmax(1)
