"""Tiny models for the conformance checks, one per output layout.

Each is a :class:`~lightning_reg.RegularizedModule`, so every ``lightning_reg`` callback (and yours) runs on it,
and small enough that a two-epoch fit takes about a second on a CPU.

Example:
    >>> import torch
    >>> make_model("classification")(torch.zeros(2, 1, 8, 8)).shape
    torch.Size([2, 4])
    >>> make_model("dense")(torch.zeros(2, 1, 8, 8)).shape
    torch.Size([2, 4, 8, 8])
    >>> make_model("tokens")(torch.zeros(2, 1, 8, 8)).shape
    torch.Size([2, 8, 4])
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import nn

from lightning_reg.core.protocol import RegularizedModule

__all__ = ["IMAGE_SHAPE", "LAYOUTS", "NUM_CLASSES", "TinyNet", "TinySegNet", "TinyTagger", "make_model"]

#: Number of classes of every tiny task.
NUM_CLASSES = 4
#: Shape of one input sample: a 1×8×8 "image" (for tokens: 8 tokens of 8 features).
IMAGE_SHAPE = (1, 8, 8)
#: The output layouts: ``(B, C)`` logits, ``(B, C, H, W)`` logits, ``(B, T, C)`` logits.
LAYOUTS = ("classification", "dense", "tokens")


class TinyNet(RegularizedModule, L.LightningModule):
    """An MLP over 1×8×8 "images": Flatten → Linear → (BatchNorm) → ReLU → Dropout → Linear, ``(B, C)`` logits.

    Args:
        hidden: Width of the hidden layer.
        num_classes: Number of classes ``C``.
        dropout: Dropout probability after the hidden layer (for dropout-scheduling callbacks).
        batchnorm: Whether to add a ``BatchNorm1d`` (for callbacks that handle buffers).
        lr: SGD learning rate (momentum 0.9).
    """

    def __init__(
        self,
        hidden: int = 32,
        num_classes: int = NUM_CLASSES,
        dropout: float = 0.0,
        batchnorm: bool = False,
        lr: float = 0.1,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        layers: list[nn.Module] = [nn.Flatten(), nn.Linear(64, hidden)]
        if batchnorm:
            layers.append(nn.BatchNorm1d(hidden))
        layers += [nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, num_classes)]
        self.net = nn.Sequential(*layers)
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch[0], batch[1]
        acc = (self(x).argmax(-1) == y).float().mean()
        self.log("val/acc", acc, batch_size=len(y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


class TinySegNet(RegularizedModule, L.LightningModule):
    """A tiny fully-convolutional segmenter: ``(B, 1, 8, 8)`` -> ``(B, C, 8, 8)`` logits.

    Args:
        hidden: Number of hidden channels.
        num_classes: Number of classes ``C``.
        dropout: Dropout probability after the hidden layer.
        batchnorm: Whether to add a ``BatchNorm2d``.
        lr: SGD learning rate (momentum 0.9).
    """

    def __init__(
        self,
        hidden: int = 8,
        num_classes: int = NUM_CLASSES,
        dropout: float = 0.0,
        batchnorm: bool = False,
        lr: float = 0.1,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        layers: list[nn.Module] = [nn.Conv2d(1, hidden, 3, padding=1)]
        if batchnorm:
            layers.append(nn.BatchNorm2d(hidden))
        layers += [nn.ReLU(), nn.Dropout(dropout), nn.Conv2d(hidden, num_classes, 1)]
        self.net = nn.Sequential(*layers)
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


class TinyTagger(RegularizedModule, L.LightningModule):
    """A tiny token classifier: ``(B, 8, 8)`` (8 tokens of 8 features) -> ``(B, 8, C)`` logits (``channels_last``).

    Args:
        hidden: Width of the hidden layer.
        num_classes: Number of classes ``C``.
        dropout: Dropout probability after the hidden layer.
        batchnorm: Accepted for a uniform signature; unused.
        lr: SGD learning rate (momentum 0.9).
    """

    logits_layout = "channels_last"

    def __init__(
        self,
        hidden: int = 16,
        num_classes: int = NUM_CLASSES,
        dropout: float = 0.0,
        batchnorm: bool = False,
        lr: float = 0.1,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(8, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, num_classes))
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.reshape(x.shape[0], 8, 8))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def make_model(layout: str = "classification", **kwargs: Any) -> L.LightningModule:
    """The tiny model for a layout: :class:`TinyNet`, :class:`TinySegNet` or :class:`TinyTagger`.

    Args:
        layout: One of :data:`LAYOUTS`.
        **kwargs: Constructor arguments (``Case.model_kwargs``).
    """
    models: dict[str, type[L.LightningModule]] = {"classification": TinyNet, "dense": TinySegNet, "tokens": TinyTagger}
    if layout not in models:
        raise ValueError(f"Expected argument `layout` to be one of {list(models)}, but got {layout!r}.")
    return models[layout](**kwargs)
