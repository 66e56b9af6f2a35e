"""Resumable data loading: exact mid-epoch resume with Lightning.

Lightning resumes a mid-epoch checkpoint exactly only when the train
dataloader is stateful (has ``state_dict``/``load_state_dict``). Otherwise it
restarts the epoch from its first batch. :class:`ResumableDataLoader` records
how many batches of the current epoch it has yielded and, on resume, skips
them; :class:`EpochSeededSampler` shuffles with a permutation that depends
only on ``(seed, epoch)``, so the skipped batches are the same ones.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler

__all__ = ["EpochSeededSampler", "ResumableDataLoader"]


class EpochSeededSampler(Sampler[int]):
    """Shuffle with ``randperm(n, seed + epoch)``; Lightning calls :meth:`set_epoch` every epoch.

    Args:
        data_source: The dataset (only its length is used).
        seed: The base seed.
        shuffle: ``False`` yields ``0..n-1``.

    Example:
        >>> s = EpochSeededSampler(range(4), seed=1)
        >>> s.set_epoch(0); a = list(s); s.set_epoch(0); a == list(s)
        True
    """

    def __init__(self, data_source: Any, seed: int = 0, shuffle: bool = True) -> None:
        self.num_samples = len(data_source)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the permutation of ``epoch``."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.num_samples))
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.num_samples, generator=gen).tolist())


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` whose position within the epoch is saved in Lightning checkpoints.

    On resume it skips the batches the interrupted epoch already consumed, so
    training continues with exactly the batches an uninterrupted run would see
    (given a deterministic sampler such as :class:`EpochSeededSampler` or
    ``DistributedSampler``). Skipped batches are still loaded once; for very
    large epochs prefer a sampler-level skip.

    Lightning's training loop only fetches ahead for loaders *without* a
    length; this one has a length, so the number of batches it yielded is the
    number trained on when a checkpoint is written.

    Example:
        >>> loader = ResumableDataLoader(list(range(6)), batch_size=2)
        >>> it = iter(loader); _ = next(it); _ = next(it); loader.state_dict()
        {'batches_consumed': 2}
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._batches_yielded = 0
        self._skip = 0

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        skip, self._skip = self._skip, 0
        return self._iterate(super().__iter__(), skip)

    def _iterate(self, it: Iterator[Any], skip: int) -> Iterator[Any]:
        self._batches_yielded = 0
        for _ in range(skip):
            next(it)
            self._batches_yielded += 1
        for batch in it:
            self._batches_yielded += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        """``{"batches_consumed": k}``: batches of the current epoch already trained on."""
        return {"batches_consumed": self._batches_yielded}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Skip the consumed batches at the start of the next iteration (none at an epoch end)."""
        k = int(state.get("batches_consumed", 0))
        self._skip = 0 if k >= len(self) else k
