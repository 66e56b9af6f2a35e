"""``IndexedDataset``: make any map-style dataset yield ``(x, y, index)``."""

from __future__ import annotations

from typing import Any

from torch.utils.data import Dataset

__all__ = ["IndexedDataset"]


class IndexedDataset(Dataset):
    """Wrap a map-style dataset so each item is ``(x, y, index)``.

    Per-sample techniques (PS-KD, ELR, label correction, diagnostics) key
    their state by ``index``, the item's position in *this* dataset. Wrap the
    training set itself (not a loader), so that the index stays the same in
    every epoch and on every DDP rank.

    Args:
        dataset: A dataset whose items are ``(x, y)`` (extra fields are dropped).
        labels: Optional labels that replace the dataset's own, e.g. noisy labels
            from :func:`~lightning_reg.data.inject_label_noise`.

    Example:
        >>> import torch
        >>> from torch.utils.data import TensorDataset
        >>> ds = IndexedDataset(TensorDataset(torch.zeros(3, 2), torch.tensor([0, 1, 0])))
        >>> ds[2][1:]
        (tensor(0), 2)
    """

    def __init__(self, dataset: Any, labels: Any = None) -> None:
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise TypeError(
                f"Expected argument `dataset` to be a map-style dataset with `__getitem__` and `__len__`, but got"
                f" {type(dataset).__name__}."
            )
        if labels is not None and len(labels) != len(dataset):
            raise ValueError(f"Expected {len(dataset)} labels, one per sample, but got {len(labels)}.")
        self.dataset = dataset
        self.labels = labels

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Any, Any, int]:
        item = self.dataset[index]
        x, y = item[0], item[1]
        if self.labels is not None:
            y = self.labels[index]
        return x, y, index
