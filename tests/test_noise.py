from __future__ import annotations

import pytest
import torch

from lightning_reg.data import FASHION_MNIST_ASYMMETRIC_MAP, inject_label_noise


def test_symmetric_exact_rate_and_never_the_true_label() -> None:
    y = torch.arange(1000) % 10
    noisy = inject_label_noise(y, 10, "symmetric", 0.4, seed=3)
    assert noisy.noise_mask.sum() == 400
    assert torch.equal(noisy.true_labels, y)
    assert torch.all(noisy.labels[noisy.noise_mask] != y[noisy.noise_mask])
    assert noisy.labels.unique().numel() == 10


def test_seeded_and_reproducible() -> None:
    y = torch.arange(500) % 5
    a = inject_label_noise(y, 5, "symmetric", 0.3, seed=1)
    b = inject_label_noise(y, 5, "symmetric", 0.3, seed=1)
    c = inject_label_noise(y, 5, "symmetric", 0.3, seed=2)
    assert torch.equal(a.labels, b.labels) and not torch.equal(a.labels, c.labels)


def test_asymmetric_follows_the_class_map() -> None:
    y = torch.arange(1000) % 10
    noisy = inject_label_noise(y, 10, "asymmetric", 0.4, seed=0, class_map=FASHION_MNIST_ASYMMETRIC_MAP)
    for src, dst in FASHION_MNIST_ASYMMETRIC_MAP.items():
        members = y == src
        flipped = noisy.noise_mask & members
        assert int(flipped.sum()) == 40
        assert torch.all(noisy.labels[flipped] == dst)
    untouched = ~torch.isin(y, torch.tensor(list(FASHION_MNIST_ASYMMETRIC_MAP)))
    assert not noisy.noise_mask[untouched].any()


def test_pairflip() -> None:
    y = torch.arange(100) % 4
    noisy = inject_label_noise(y, 4, "pairflip", 0.2, seed=0)
    assert torch.all(noisy.labels[noisy.noise_mask] == (y[noisy.noise_mask] + 1) % 4)
    assert noisy.noise_rate == pytest.approx(0.2)


def test_bad_input() -> None:
    y = torch.arange(10) % 2
    with pytest.raises(ValueError, match="Expected argument `rate` to be a float in \\[0, 1\\]"):
        inject_label_noise(y, 2, "symmetric", 1.5)
    with pytest.raises(ValueError, match="Expected argument `noise_type` to be one of"):
        inject_label_noise(y, 2, "gaussian")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="class_map"):
        inject_label_noise(y, 2, "asymmetric", 0.2)
    with pytest.raises(ValueError, match="Expected labels in \\[0, 2\\)"):
        inject_label_noise(y + 5, 2)
