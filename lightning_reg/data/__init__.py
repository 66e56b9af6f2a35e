"""Datasets, label-noise injection and resumable loading."""

from lightning_reg.data.indexed import IndexedDataset
from lightning_reg.data.loader import EpochSeededSampler, ResumableDataLoader
from lightning_reg.data.noise import FASHION_MNIST_ASYMMETRIC_MAP, NoisyLabels, inject_label_noise

__all__ = [
    "FASHION_MNIST_ASYMMETRIC_MAP",
    "EpochSeededSampler",
    "IndexedDataset",
    "NoisyLabels",
    "ResumableDataLoader",
    "inject_label_noise",
]
