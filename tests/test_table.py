"""Direct tests of the per-sample table."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_reg.core.table import PerSampleTable, dedupe_last
from tests.helpers import assert_state_equal, run_ddp_script
from tests.table_ddp_worker import C, N, rows_for, run, single_batches

ROOT = Path(__file__).resolve().parents[1]


def test_read_write_and_seen() -> None:
    t = PerSampleTable(num_samples=5, num_columns=3).allocate()
    t.write(torch.tensor([4, 1]), torch.tensor([[0.1, 0.2, 0.7], [1.0, 0.0, 0.0]]))
    rows, seen = t.read(torch.tensor([1, 2, 4]))
    assert seen.tolist() == [True, False, True]
    assert torch.equal(rows, torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.1, 0.2, 0.7]]))


def test_scalar_rows() -> None:
    t = PerSampleTable(num_samples=4, fill=-1.0).allocate()
    t.write(torch.tensor([2]), torch.tensor([3.0]))
    rows, _ = t.read(torch.tensor([0, 2]))
    assert rows.tolist() == [-1.0, 3.0]


def test_duplicates_in_one_write_keep_the_last() -> None:
    t = PerSampleTable(num_samples=3, num_columns=1).allocate()
    t.write(torch.tensor([1, 1, 1]), torch.tensor([[1.0], [2.0], [3.0]]))
    assert t.read(torch.tensor([1]))[0].item() == 3.0
    i, v = dedupe_last(torch.tensor([2, 0, 2, 0]), torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert i.tolist() == [0, 2] and v.tolist() == [4.0, 3.0]


def test_non_finite_rows_are_not_written() -> None:
    t = PerSampleTable(num_samples=3, num_columns=2).allocate()
    t.write(torch.tensor([0, 1]), torch.tensor([[0.5, 0.5], [0.2, 0.8]]))
    t.write(torch.tensor([0, 1, 2]), torch.tensor([[float("nan"), 0.5], [0.9, 0.1], [float("inf"), 0.0]]))
    rows, seen = t.read(torch.tensor([0, 1, 2]))
    assert rows[0].tolist() == [0.5, 0.5]  # kept
    assert rows[1].tolist() == pytest.approx([0.9, 0.1])
    assert seen.tolist() == [True, True, False]


def test_index_out_of_range_is_a_clear_error() -> None:
    t = PerSampleTable(num_samples=3, num_columns=2).allocate()
    with pytest.raises(IndexError, match=r"Expected sample indices in \[0, 3\)"):
        t.read(torch.tensor([3]))
    with pytest.raises(IndexError, match="position in the training set"):
        t.write(torch.tensor([-1]), torch.zeros(1, 2))


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="Expected argument `dtype`"):
        PerSampleTable(dtype="int8")
    with pytest.raises(ValueError, match="Expected argument `topk` to be smaller"):
        PerSampleTable(num_columns=3, topk=3)
    with pytest.raises(TypeError, match="Expected argument `num_samples`"):
        PerSampleTable(num_samples=2.5)  # type: ignore[arg-type]


def test_state_dict_round_trip_and_lazy_load() -> None:
    t = PerSampleTable(num_samples=6, num_columns=4, dtype="bfloat16", topk=2).allocate()
    t.write(torch.tensor([0, 5]), torch.softmax(torch.randn(2, 4, generator=torch.Generator().manual_seed(0)), 1))
    state = t.state_dict()
    assert state["version"] == 1
    fresh = PerSampleTable(dtype="bfloat16", topk=2)
    fresh.load_state_dict(state)
    fresh.allocate(6, 4)
    assert_state_equal(t.state_dict(), fresh.state_dict())
    assert torch.equal(t.dense(), fresh.dense())
    with pytest.raises(ValueError, match="topk=2"):
        PerSampleTable(topk=None).load_state_dict(state)
    wrong = PerSampleTable()
    wrong.load_state_dict(PerSampleTable(num_samples=6, num_columns=4).allocate().state_dict())
    with pytest.raises(ValueError, match="has 6 rows"):
        wrong.allocate(7, 4)


def test_bf16_storage_error_bound() -> None:
    """bf16 storage: every entry within a relative 2^-8 of the fp32 value (round-to-nearest gives 2^-9)."""
    g = torch.Generator().manual_seed(0)
    values = torch.softmax(torch.randn(200, 10, generator=g) * 3, dim=1)
    idx = torch.arange(200)
    exact = PerSampleTable(num_samples=200, num_columns=10).allocate()
    compact = PerSampleTable(num_samples=200, num_columns=10, dtype="bf16").allocate()
    exact.write(idx, values)
    compact.write(idx, values)
    a, b = exact.read(idx)[0], compact.read(idx)[0]
    assert torch.all((a - b).abs() <= a.abs() * 2**-8)
    assert compact.nbytes < exact.nbytes * 0.55


def test_topk_keeps_largest_and_spreads_the_rest() -> None:
    t = PerSampleTable(num_samples=1, num_columns=5, topk=2).allocate()
    t.write(torch.tensor([0]), torch.tensor([[0.1, 0.5, 0.05, 0.3, 0.05]]))
    row = t.read(torch.tensor([0]))[0][0]
    expected = torch.tensor([0.2 / 3, 0.5, 0.2 / 3, 0.3, 0.2 / 3])
    torch.testing.assert_close(row, expected)
    assert float(row.sum()) == pytest.approx(1.0)


def test_estimate_matches_allocation() -> None:
    for kw in ({}, {"dtype": "bf16"}, {"topk": 3}):
        t = PerSampleTable(num_samples=10, num_columns=7, **kw).allocate()  # type: ignore[arg-type]
        assert t.nbytes == PerSampleTable.estimate_nbytes(10, 7, **kw)  # type: ignore[arg-type]


def test_single_process_equivalent_by_hand(tmp_path: Path) -> None:
    """The single-process writer equals applying the same batches by hand (last write wins)."""
    table = run(str(tmp_path), "single")
    expected = torch.zeros(N, C)
    for step, batch in enumerate(single_batches()):
        for i in batch:
            expected[i] = rows_for(torch.tensor([i]), step)[0]
    torch.testing.assert_close(table.dense(), expected)


def test_two_process_ddp_equals_single_process(tmp_path: Path) -> None:
    run_ddp_script("tests.table_ddp_worker", str(tmp_path), "ddp", timeout=300)
    r0 = torch.load(tmp_path / "ddp_rank0.pt")
    r1 = torch.load(tmp_path / "ddp_rank1.pt")
    single = run(str(tmp_path), "single").state_dict()
    assert_state_equal(r0, r1, "rank0 vs rank1")
    assert_state_equal(r0, single, "ddp vs single")
    assert bool(r0["seen"].all())  # every sample, including the padded duplicate, was written


# -- host storage under an accelerator (issue 15, defect 1) -----------------------------------------
def test_device_to_host_copies_block_and_host_to_device_copies_do_not() -> None:
    """A non-blocking device→host copy is read before it lands; only host→device copies may be non-blocking."""
    from lightning_reg.core.table import _copy_is_async

    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert not _copy_is_async(cuda, cpu)  # the host uses the result at once: it must wait for it
    assert _copy_is_async(cpu, cuda)  # the source is a fresh tensor nobody writes again
    assert not _copy_is_async(cpu, cpu)


def test_many_random_reads_and_writes_match_a_reference() -> None:
    g = torch.Generator().manual_seed(0)
    n, c = 97, 6
    table = PerSampleTable(num_samples=n, num_columns=c).allocate()
    ref, seen = torch.zeros(n, c), torch.zeros(n, dtype=torch.bool)
    for step in range(40):
        idx = torch.randint(0, n, (13,), generator=g)
        rows = torch.randn(13, c, generator=g) * 1e4 + step
        table.write(idx, rows)
        i, v = dedupe_last(idx, rows)
        ref[i], seen[i] = v, True
        probe = torch.randint(0, n, (21,), generator=g)
        got, got_seen = table.read(probe)
        assert torch.equal(got, ref[probe]) and torch.equal(got_seen, seen[probe])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("topk", [None, 8])
def test_cpu_table_with_cuda_batches_never_reads_a_copy_in_flight(topk: int | None) -> None:
    """Rows computed by a slow GPU kernel, written to and read back from a host table, many times."""
    torch.manual_seed(0)
    n, c, b = 4096, 64, 1024
    dev = torch.device("cuda")
    table = PerSampleTable(num_samples=n, num_columns=c, device="cpu", topk=topk).allocate(device=dev)
    ref = torch.zeros(n, c)
    heavy = torch.randn(2048, 2048, device=dev)
    for step in range(30):
        busy = heavy
        for _ in range(8):  # keep the stream busy so any copy that does not wait is read early
            busy = busy @ heavy / 2048**0.5
        idx = torch.randperm(n, device=dev)[:b]
        rows = torch.softmax(torch.randn(b, c, device=dev) * 4 + step + busy[:b, :c] * 0, dim=1) * 1e3
        table.write(idx, rows)
        if topk is None:
            ref[idx.cpu()] = rows.cpu()
            got, seen = table.read(idx)
            assert got.device.type == "cuda" and bool(seen.all())
            torch.testing.assert_close(got, rows, atol=0, rtol=0)
        else:
            got, _ = table.read(idx)
            top = rows.topk(topk, dim=1)
            torch.testing.assert_close(got.gather(1, top.indices), top.values, atol=0, rtol=0)
    if topk is None:
        torch.testing.assert_close(table.dense(), ref, atol=0, rtol=0)


# -- resuming on another training set (issue 15, defect 6) -------------------------------------------
def _checkpointed(rows: int, columns: int | None = 3) -> dict:
    t = PerSampleTable(num_samples=rows, num_columns=columns).allocate()
    t.write(torch.tensor([0]), torch.ones(1, columns or 1))
    return t.state_dict()


@pytest.mark.parametrize("current", [4, 8])
def test_checkpoint_of_another_training_set_size_is_a_clear_error(current: int) -> None:
    """Smaller and larger: both fail at `allocate`, naming both sizes and the fix."""
    state = _checkpointed(6)
    # How the callbacks allocate: declared size, else the table's, else the one inferred from the dataloader.
    fresh = PerSampleTable()
    fresh.load_state_dict(state)
    n = fresh.num_samples or current
    with pytest.raises(ValueError, match=r"checkpoint.* 6 rows.* current training set has " + str(current)) as err:
        fresh.allocate(n, 3)
    assert "same training set" in str(err.value) and "without `ckpt_path`" in str(err.value)
    declared = PerSampleTable(num_samples=current, num_columns=3)
    declared.load_state_dict(state)
    with pytest.raises(ValueError, match=r"6 rows.* has " + str(current) + " samples"):
        declared.allocate(declared.num_samples, 3)


def test_checkpoint_of_the_same_size_resumes_and_other_columns_are_a_clear_error() -> None:
    state = _checkpointed(6)
    fresh = PerSampleTable()
    fresh.load_state_dict(state)
    assert fresh.is_allocated and fresh.checkpoint_rows == 6
    fresh.allocate(fresh.num_samples or 6, 3)
    assert torch.equal(fresh.read(torch.tensor([0]))[0], torch.ones(1, 3))
    lazy = PerSampleTable()
    lazy.load_state_dict(state)
    lazy.allocate()  # no size given: the checkpoint's shape is adopted
    assert (lazy.num_samples, lazy.num_columns) == (6, 3)
    other = PerSampleTable()
    other.load_state_dict(state)
    with pytest.raises(ValueError, match=r"checkpoint.* 3 columns.* 5"):
        other.allocate(6, 5)


def _elr_fit(n: int, tmp_path: Path, ckpt_path: str | None = None) -> None:
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_reg.callbacks.elr import ELR
    from tests.helpers import fit, make_loader

    cbs: list[L.Callback] = [ELR()]
    if ckpt_path is None:
        cbs.append(ModelCheckpoint(dirpath=tmp_path, filename="last", save_on_train_epoch_end=True))
    saving = ckpt_path is None
    loader = make_loader(n=n, batch_size=8)
    fit(cbs, loader=loader, ckpt_path=ckpt_path, max_epochs=1 if saving else 2, enable_checkpointing=saving)


@pytest.mark.parametrize("resume_n", [8, 24])
def test_elr_resumed_on_a_training_set_of_another_size_fails_clearly(tmp_path: Path, resume_n: int) -> None:
    _elr_fit(16, tmp_path)
    with pytest.raises(ValueError, match=rf"16 rows.* has {resume_n} samples.*same training set"):
        _elr_fit(resume_n, tmp_path, ckpt_path=str(tmp_path / "last.ckpt"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_table_reads_writes_and_checkpoints(dtype: str) -> None:
    dev = torch.device("cuda")
    table = PerSampleTable(num_samples=300, num_columns=7, dtype=dtype, device="auto").allocate(device=dev)
    assert table.device.type == "cuda"
    idx = torch.randperm(300, device=dev)[:50]
    rows = torch.softmax(torch.randn(50, 7, device=dev), dim=1)
    table.write(idx, rows)
    got, seen = table.read(idx)
    assert got.device.type == "cuda" and bool(seen.all())
    torch.testing.assert_close(
        got, rows, atol=0 if dtype == "float32" else 1e-2, rtol=0 if dtype == "float32" else 1e-2
    )
    with pytest.raises(IndexError, match=r"Expected sample indices in \[0, 300\)"):
        PerSampleTable(num_samples=300, num_columns=7, device="auto").allocate(device=dev).read(idx + 300)
    fresh = PerSampleTable(dtype=dtype, device="auto")
    fresh.load_state_dict(table.state_dict())
    fresh.allocate(300, 7, device=dev)
    assert fresh.device.type == "cuda" and torch.equal(fresh.dense(), table.dense())


# -- one sync-free all-gather per step for several tables (issue 16) ---------------------------------
class _TwoRanks:
    """A stand-in for a 2-rank strategy: rank 0 here, rank 1's gathered buffer given (or echoed to record it)."""

    world_size = 2

    def __init__(self, peer: torch.Tensor | None = None) -> None:
        self.peer, self.sent, self.calls = peer, None, 0

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.sent = t
        return torch.stack([t, t if self.peer is None else self.peer])


def _two_rank_gather(idx0, vals0, idx1, vals1, pad_to):  # type: ignore[no-untyped-def]
    rank1 = _TwoRanks()
    PerSampleTable.gather(rank1, idx1, *vals1, pad_to=pad_to)
    rank0 = _TwoRanks(peer=rank1.sent)
    index, values = PerSampleTable.gather(rank0, idx0, *vals0, pad_to=pad_to)
    return rank0, index, values


def test_gather_is_one_collective_for_all_tables_and_needs_no_host_sync(monkeypatch: pytest.MonkeyPatch) -> None:
    syncs: list[str] = []
    for name in ("cpu", "item", "tolist", "__bool__", "__int__", "__float__"):
        orig = getattr(torch.Tensor, name)

        def counted(self, *a, _orig=orig, _name=name, **k):  # type: ignore[no-untyped-def]
            syncs.append(_name)
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    targets = torch.softmax(torch.randn(3, 4), dim=1)
    meta = torch.tensor([[1.0, 2.0], [0.0, 1.0], [3.0, 1.0]])
    strategy, index, (t, m) = _two_rank_gather(
        torch.tensor([2, 0, 5]), (targets, meta), torch.tensor([1]), (targets[:1] * 2, meta[:1] + 1), pad_to=4
    )
    assert strategy.calls == 1 and syncs == []
    monkeypatch.undo()
    assert index.tolist() == [2, 0, 5, -1, 1, -1, -1, -1]  # padded rows are marked -1
    torch.testing.assert_close(t[:3], targets)
    torch.testing.assert_close(m[4], meta[0] + 1)
    a = PerSampleTable(num_samples=6, num_columns=4).allocate()
    b = PerSampleTable(num_samples=6, num_columns=2).allocate()
    a.write_gathered(index, t)
    b.write_gathered(index, m)
    assert a.seen.tolist() == [True, True, True, False, False, True]  # type: ignore[union-attr]
    torch.testing.assert_close(a.read(torch.tensor([1]))[0][0], targets[0] * 2)
    torch.testing.assert_close(b.read(torch.tensor([5]))[0][0], meta[2])


def test_large_indices_survive_the_float_buffer() -> None:
    big = torch.tensor([2**24 + 1, 2**30 + 3, 7])
    _, index, _ = _two_rank_gather(big, (torch.zeros(3, 1),), big[:1], (torch.zeros(1, 1),), pad_to=3)
    assert index.tolist() == [2**24 + 1, 2**30 + 3, 7, 2**24 + 1, -1, -1]


def test_padded_rows_never_win_over_a_real_write_of_the_same_index() -> None:
    t = PerSampleTable(num_samples=3, num_columns=2).allocate()
    t.write(torch.tensor([0, 1]), torch.tensor([[0.5, 0.5], [0.2, 0.8]]))
    # A padded row (-1) before and after real writes of index 0: the real rows win, the last real one last.
    index = torch.tensor([-1, 0, -1, 0, -1])
    rows = torch.tensor([[9.0, 9.0], [0.1, 0.9], [9.0, 9.0], [0.3, 0.7], [9.0, 9.0]])
    t.write_gathered(index, rows)
    got, seen = t.read(torch.tensor([0, 1, 2]))
    torch.testing.assert_close(got, torch.tensor([[0.3, 0.7], [0.2, 0.8], [0.0, 0.0]]))
    assert seen.tolist() == [True, True, False]  # padded rows mark nothing as seen


def test_gather_refuses_a_batch_above_pad_to() -> None:
    with pytest.raises(ValueError, match="Expected a batch of at most 2 rows"):
        PerSampleTable.gather(_TwoRanks(), torch.arange(3), torch.zeros(3, 2), pad_to=2)


def test_gather_single_process_is_the_identity() -> None:
    index, (v,) = PerSampleTable.gather(None, torch.tensor([1, 0]), torch.ones(2, 3), pad_to=8)
    assert index.tolist() == [1, 0] and v.shape == (2, 3)


def test_two_process_ddp_padded_gather_equals_single_process(tmp_path: Path) -> None:
    """Two tables written from ONE all-gather per step, padded to the batch size: same tables as one process."""
    run_ddp_script("tests.table_ddp_worker", str(tmp_path), "ddp", "padded", timeout=300)
    r0 = torch.load(tmp_path / "ddp_rank0.pt")
    r1 = torch.load(tmp_path / "ddp_rank1.pt")
    single = run(str(tmp_path), "single").state_dict()
    assert_state_equal(r0, r1, "rank0 vs rank1")
    assert_state_equal(r0, single, "ddp vs single")
    extra0 = torch.load(tmp_path / "ddp_rank0_extra.pt")
    assert extra0["gathers"] == extra0["steps"]  # one collective per step for both tables
    torch.testing.assert_close(extra0["scalar"], single["values"][:, 0] * 2)


def test_sync_free_last_wins_matches_dedupe_last() -> None:
    """The accelerator path (no compaction) writes the same winners as the host path's `dedupe_last`."""
    from lightning_reg.core.table import _last_wins

    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        index = torch.randint(0, 6, (12,), generator=g)
        real = torch.rand(12, generator=g) > 0.3
        values = torch.randn(12, 2, generator=g)
        i_ref, v_ref = dedupe_last(index, values, real)
        i, v = _last_wins(index, values, real)
        expected = dict(zip(i_ref.tolist(), v_ref.tolist()))
        assert set(i.tolist()) == set(expected)
        for k, row in zip(i.tolist(), v.tolist()):
            assert row == expected[k]
