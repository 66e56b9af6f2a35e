from __future__ import annotations

import torch

from lightning_reg.data import EpochSeededSampler, IndexedDataset, ResumableDataLoader


def test_epoch_seeded_sampler_depends_only_on_seed_and_epoch() -> None:
    s = EpochSeededSampler(range(20), seed=3)
    s.set_epoch(1)
    a = list(s)
    s.set_epoch(2)
    b = list(s)
    s.set_epoch(1)
    assert list(s) == a and a != b and sorted(a) == list(range(20))
    assert list(EpochSeededSampler(range(5), shuffle=False)) == [0, 1, 2, 3, 4]


def test_resumable_loader_skips_consumed_batches() -> None:
    data = list(range(10))
    loader = ResumableDataLoader(data, batch_size=2)
    it = iter(loader)
    next(it), next(it)
    state = loader.state_dict()
    assert state == {"batches_consumed": 2}
    fresh = ResumableDataLoader(data, batch_size=2)
    fresh.load_state_dict(state)
    assert [b.tolist() for b in fresh] == [[4, 5], [6, 7], [8, 9]]
    assert len(list(fresh)) == 5  # the skip applies once
    fresh.load_state_dict({"batches_consumed": 5})  # a finished epoch restarts from the top
    assert len(list(fresh)) == 5


def test_indexed_dataset() -> None:
    base = torch.utils.data.TensorDataset(torch.zeros(3, 2), torch.tensor([0, 1, 2]))
    ds = IndexedDataset(base, labels=torch.tensor([2, 2, 2]))
    assert ds[1][1:] == (torch.tensor(2), 1) and len(ds) == 3
