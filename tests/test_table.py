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
