"""Label-noise injection: symmetric, asymmetric (class map) and pair-flip, seeded and reproducible."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from lightning_reg.core.validation import check_choice, check_float, check_int

__all__ = ["FASHION_MNIST_ASYMMETRIC_MAP", "NoisyLabels", "inject_label_noise"]

NoiseType = Literal["symmetric", "asymmetric", "pairflip"]

#: A Fashion-MNIST class map for asymmetric noise between visually similar classes:
#: T-shirt→Shirt, Pullover→Coat, Coat→Pullover, Shirt→T-shirt, Sandal→Sneaker, Sneaker→Sandal.
FASHION_MNIST_ASYMMETRIC_MAP: dict[int, int] = {0: 6, 2: 4, 4: 2, 6: 0, 5: 7, 7: 5}


@dataclass(frozen=True)
class NoisyLabels:
    """The result of :func:`inject_label_noise`.

    Attributes:
        labels: The noisy labels (what training sees).
        true_labels: The original labels.
        noise_mask: ``labels != true_labels``.
    """

    labels: Tensor
    true_labels: Tensor
    noise_mask: Tensor

    @property
    def noise_rate(self) -> float:
        """The realised fraction of flipped labels."""
        return float(self.noise_mask.float().mean())


def inject_label_noise(
    labels: Tensor,
    num_classes: int,
    noise_type: NoiseType = "symmetric",
    rate: float = 0.4,
    seed: int = 0,
    class_map: dict[int, int] | None = None,
) -> NoisyLabels:
    """Corrupt labels with a fixed fraction of noise, reproducibly.

    * ``symmetric``: a ``rate`` fraction of all samples, chosen uniformly, get a
      label drawn uniformly from the *other* classes (so the realised noise rate
      is exactly ``rate``, as in ELR's and Co-teaching's setups).
    * ``asymmetric``: in each source class of ``class_map``, a ``rate`` fraction
      of its samples is flipped to ``class_map[c]`` (ELR's CIFAR-10 protocol).
    * ``pairflip``: in every class ``c``, a ``rate`` fraction is flipped to ``(c + 1) % C``.

    Args:
        labels: ``(N,)`` integer labels.
        num_classes: ``C``.
        noise_type: ``"symmetric"``, ``"asymmetric"`` or ``"pairflip"``.
        rate: The fraction in ``[0, 1]``.
        seed: Seed of the private generator; the global RNG is untouched.
        class_map: Source → target classes for ``asymmetric`` (required there).

    Example:
        >>> noisy = inject_label_noise(torch.arange(10) % 2, 2, "symmetric", rate=0.2, seed=0)
        >>> int(noisy.noise_mask.sum())
        2
    """
    check_choice("noise_type", noise_type, ["symmetric", "asymmetric", "pairflip"])
    rate = check_float("rate", rate, 0.0, 1.0)
    check_int("num_classes", num_classes, low=2)
    labels = torch.as_tensor(labels).long().clone()
    if labels.dim() != 1:
        raise ValueError(f"Expected 1-d labels, but got shape {tuple(labels.shape)}.")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"Expected labels in [0, {num_classes}), but got values outside.")
    gen = torch.Generator().manual_seed(int(seed))
    noisy = labels.clone()
    n = labels.numel()
    if noise_type == "symmetric":
        k = round(rate * n)
        chosen = torch.randperm(n, generator=gen)[:k]
        offset = torch.randint(1, num_classes, (k,), generator=gen)
        noisy[chosen] = (labels[chosen] + offset) % num_classes
    else:
        if noise_type == "asymmetric":
            if not class_map:
                raise ValueError("Expected argument `class_map` for asymmetric noise, but got None.")
            mapping = {int(a): int(b) for a, b in class_map.items()}
        else:
            mapping = {c: (c + 1) % num_classes for c in range(num_classes)}
        for src, dst in sorted(mapping.items()):
            members = torch.nonzero(labels == src).flatten()
            k = round(rate * members.numel())
            chosen = members[torch.randperm(members.numel(), generator=gen)[:k]]
            noisy[chosen] = dst
    return NoisyLabels(labels=noisy, true_labels=labels, noise_mask=noisy != labels)
