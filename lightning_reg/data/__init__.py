"""Datasets, label-noise injection and resumable loading."""

from lightning_reg.data.indexed import IndexedDataset
from lightning_reg.data.loader import EpochSeededSampler, ResumableDataLoader
from lightning_reg.data.noise import FASHION_MNIST_ASYMMETRIC_MAP, NoisyLabels, inject_label_noise
from lightning_reg.data.segmentation import FashionMNISTScenes, SegmentationDataModule
from lightning_reg.data.semi_supervised import (
    IGNORE_INDEX,
    SemiSupervisedDataModule,
    SyntheticSemiSupervisedDataModule,
    split_labeled_unlabeled,
)

__all__ = [
    "FASHION_MNIST_ASYMMETRIC_MAP",
    "IGNORE_INDEX",
    "EpochSeededSampler",
    "FashionMNISTScenes",
    "IndexedDataset",
    "NoisyLabels",
    "ResumableDataLoader",
    "SegmentationDataModule",
    "SemiSupervisedDataModule",
    "SyntheticSemiSupervisedDataModule",
    "inject_label_noise",
    "split_labeled_unlabeled",
]
