"""``PerSampleTable``: one row of state per training sample, keyed by dataset index.

PS-KD (last predictions), ELR (temporal-ensemble targets), label correction
and the label-noise diagnostics all keep an ``N × C`` (or ``N``) table. This is
the one abstraction they share. It is modelled on torchmetrics' ``add_state``:

* **Rows by index.** :meth:`read` and :meth:`write` take the batch's dataset
  indices; a ``seen`` mask records which rows were ever written.
* **DDP.** :meth:`write` takes the strategy and all-gathers ``(index, rows)``
  from every rank with Lightning's collectives, so every rank applies the same
  writes in the same order and holds the same table as one process that saw
  the same samples. When ranks write the same index in one step (the padding
  ``DistributedSampler`` adds) the write from the highest rank, and within a
  rank the last position, wins: deterministic and rank-independent.
* **No host sync under DDP.** With ``pad_to`` (the loader's batch size, see
  :func:`train_batch_size`) every rank pads its rows to the same size, known
  without communication, so the gather needs no size exchange. Padded rows carry
  index ``-1`` and are dropped on device: they never win over a real write of
  the same index and mark nothing as seen. :meth:`gather` gathers the rows of
  several tables in ONE all-gather (one float buffer) and
  :meth:`write_gathered` applies them per table. Without ``pad_to`` the ranks
  exchange their batch sizes first (one host sync per write).
* **Safety.** Rows with a non-finite value are not written (the old row is
  kept), so one NaN batch cannot corrupt the table.
* **Checkpoints.** :meth:`state_dict` / :meth:`load_state_dict` hold plain
  tensors and a ``"version"`` key. Rows are keyed by the position in the
  training set, so a loaded table only fits the training set it was saved
  with: :meth:`allocate` compares the checkpoint's rows with the current
  training-set size and raises a ``ValueError`` naming both when they differ
  (in either direction). ``allocate()`` without a size adopts the loaded shape.
* **Compact storage.**

  =========================  ==========================  ==================================
  mode                       bytes per row (C classes)   error
  =========================  ==========================  ==================================
  ``dtype=float32``           ``4·C``                     none
  ``dtype=bfloat16``          ``2·C``                     relative ≤ 2⁻⁸ per entry
  ``dtype=float16``           ``2·C``                     relative ≤ 2⁻¹¹ (values ≥ 6e-5)
  ``topk=k`` (+ any dtype)    ``k·(dtype + 2 or 4)``      keeps the k largest probabilities
                                                          exactly (up to dtype), spreads the
                                                          remaining mass uniformly
  =========================  ==========================  ==================================

  ``device="cpu"`` keeps the table in host memory (pinned when CUDA is
  available) and moves only the batch's rows; ``device="auto"`` puts it on the
  module's device. With a CUDA module, a host table costs, per :meth:`read`
  and per :meth:`write`, one wait for the stream (the batch's indices, and for
  a write its rows, must have reached the host before they are used; the
  device→host copies are therefore blocking) plus the PCIe transfer of the
  batch's rows each way. The host→device copy of the rows read is
  non-blocking. Keep the table on the device (``"auto"``) unless it does not
  fit there.

Example:
    >>> import torch
    >>> table = PerSampleTable(num_samples=4, num_columns=3).allocate()
    >>> table.write(torch.tensor([2, 0]), torch.tensor([[0.2, 0.3, 0.5], [1.0, 0.0, 0.0]]))
    >>> rows, seen = table.read(torch.tensor([0, 1, 2]))
    >>> rows.tolist(), seen.tolist()
    ([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.20000000298023224, 0.30000001192092896, 0.5]], [True, False, True])
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_reg.core.syncs import host_reads_are_free
from lightning_reg.core.validation import check_choice, check_optional_int

__all__ = ["PerSampleTable", "dedupe_last", "resolve_dtype", "train_batch_size"]

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "16": torch.float16,
}


def resolve_dtype(dtype: str | torch.dtype, name: str = "dtype") -> torch.dtype:
    """Map ``"float32"/"fp32"``, ``"bfloat16"/"bf16"``, ``"float16"/"fp16"`` (or a dtype) to a torch dtype."""
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"Expected argument `{name}` to be float32, bfloat16 or float16, but got {dtype}.")
        return dtype
    if not isinstance(dtype, str) or dtype not in _DTYPES:
        raise ValueError(
            f"Expected argument `{name}` to be one of ['float32', 'bfloat16', 'float16'], but got {dtype!r}."
        )
    return _DTYPES[dtype]


def dedupe_last(index: Tensor, values: Tensor, real: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Keep, for each repeated index, only its last occurrence (vectorised, deterministic).

    Args:
        index: ``(R,)`` integer indices.
        values: ``(R, ...)`` rows.
        real: Optional ``(R,)`` bool: rows marked ``False`` (padding) lose to any ``True`` row of the same
            index, wherever they stand.

    Example:
        >>> i, v = dedupe_last(torch.tensor([3, 1, 3]), torch.tensor([[1.0], [2.0], [3.0]]))
        >>> i.tolist(), v.tolist()
        ([1, 3], [[2.0], [3.0]])
        >>> i, v = dedupe_last(torch.tensor([3, 3]), torch.tensor([1.0, 2.0]), real=torch.tensor([True, False]))
        >>> i.tolist(), v.tolist()
        ([3], [1.0])
    """
    if index.numel() <= 1:
        return index, values
    key = index if real is None else index * 2 + real.long()  # padding sorts before the real rows of its index
    _, order = torch.sort(key, stable=True)
    sorted_idx = index[order]
    keep = torch.ones_like(sorted_idx, dtype=torch.bool)
    keep[:-1] = sorted_idx[1:] != sorted_idx[:-1]
    sel = order[keep]
    return index[sel], values[sel]


def _last_wins(index: Tensor, values: Tensor, real: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """:func:`dedupe_last` without a host sync: every row of a repeated index gets the winning row's values.

    The rows are not compacted (a boolean selection would wait for the device), so a repeated index is
    written several times with the same values: the result does not depend on the order of the writes.

    Example:
        >>> i, v = _last_wins(torch.tensor([3, 1, 3]), torch.tensor([[1.0], [2.0], [3.0]]))
        >>> i.tolist(), v.tolist()
        ([1, 3, 3], [[2.0], [3.0], [3.0]])
    """
    if index.numel() <= 1:
        return index, values
    key = index if real is None else index * 2 + real.long()
    _, order = torch.sort(key, stable=True)
    sorted_idx = index[order]
    last = torch.ones_like(sorted_idx, dtype=torch.bool)
    last[:-1] = sorted_idx[1:] != sorted_idx[:-1]
    pos = torch.arange(sorted_idx.numel(), device=index.device)
    big = torch.full_like(pos, sorted_idx.numel())
    group_last = torch.flip(torch.cummin(torch.flip(torch.where(last, pos, big), [0]), 0).values, [0])
    return sorted_idx, values[order[group_last]]


def _copy_is_async(src: torch.device, dst: torch.device) -> bool:
    """Whether a copy from ``src`` to ``dst`` may be issued with ``non_blocking=True``.

    A device→host copy may not: the host would read the destination before
    the copy lands (PyTorch returns a pinned tensor whose contents are only
    valid after the stream synchronises). A host→device copy may: the stream
    orders it before the kernels that use it, and its source is a fresh
    tensor that nobody writes again.

    Example:
        >>> cpu, cuda = torch.device("cpu"), torch.device("cuda")
        >>> _copy_is_async(cuda, cpu), _copy_is_async(cpu, cuda)
        (False, True)
    """
    return src.type == "cpu" and dst.type != "cpu"


def _to_host(*tensors: Tensor) -> tuple[Tensor, ...]:
    """Copy ``tensors`` to the host and wait until they are there: one stream synchronisation in all."""
    if all(t.device.type == "cpu" for t in tensors):
        return tensors
    if all(t.device.type == "cuda" for t in tensors) and len({t.device for t in tensors}) == 1:
        out = tuple(t.to("cpu", non_blocking=True) for t in tensors)  # into pinned memory, in flight ...
        torch.cuda.current_stream(tensors[0].device).synchronize()  # ... until the stream has caught up
        return out
    return tuple(t.to("cpu") for t in tensors)  # blocking copies


def _to_device(tensor: Tensor, device: torch.device) -> Tensor:
    """Move ``tensor`` to ``device``: blocking towards the host, non-blocking towards an accelerator."""
    if tensor.device == device:
        return tensor
    if device.type == "cpu":
        return _to_host(tensor)[0]
    return tensor.to(device, non_blocking=_copy_is_async(tensor.device, device))


class PerSampleTable:
    """A table of ``num_samples`` rows of ``num_columns`` floats (or scalars), keyed by dataset index.

    Args:
        num_samples: Rows (the training-set size). May be given later to :meth:`allocate`.
        num_columns: Columns per row, or ``None`` for one scalar per sample. May be given later.
        dtype: Storage dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``.
        device: ``"cpu"`` (host memory, pinned when CUDA is available), ``"auto"``
            (the device passed to :meth:`allocate`, i.e. the module's) or a device string.
        topk: Keep only the ``topk`` largest entries of each row and spread the rest
            of the row's mass uniformly. Only for rows that are probability vectors.
        fill: The value of rows never written.

    Reads always return fp32.
    """

    version = 1

    def __init__(
        self,
        num_samples: int | None = None,
        num_columns: int | None = None,
        *,
        dtype: str | torch.dtype = "float32",
        device: str = "cpu",
        topk: int | None = None,
        fill: float = 0.0,
    ) -> None:
        self.num_samples = check_optional_int("num_samples", num_samples, low=1)
        self.num_columns = check_optional_int("num_columns", num_columns, low=1)
        self.dtype = resolve_dtype(dtype)
        if not isinstance(device, str):
            raise TypeError(f"Expected argument `device` to be a str, but got {device!r}.")
        self.device_spec = device
        self.topk = check_optional_int("topk", topk, low=1)
        if self.topk is not None and self.num_columns is not None and self.topk >= self.num_columns:
            raise ValueError(
                f"Expected argument `topk` to be smaller than the number of columns ({self.num_columns}), but got"
                f" {self.topk}."
            )
        self.fill = float(fill)
        self._declared = (self.num_samples, self.num_columns)
        #: The shape ``(rows, columns)`` of a loaded checkpoint until :meth:`allocate` has checked it.
        self._checkpoint_shape: tuple[int, int | None] | None = None
        self.values: Tensor | None = None
        self.cols: Tensor | None = None
        self.seen: Tensor | None = None
        self._validated_on_accelerator = False

    # -- allocation ---------------------------------------------------------
    @property
    def is_allocated(self) -> bool:
        """Whether storage exists (allocated or loaded from a checkpoint)."""
        return self.values is not None

    @property
    def checkpoint_rows(self) -> int | None:
        """The rows of a loaded checkpoint not yet checked by :meth:`allocate` (``None`` otherwise)."""
        return None if self._checkpoint_shape is None else self._checkpoint_shape[0]

    @property
    def device(self) -> torch.device:
        """Where the storage lives."""
        if self.values is None:
            raise RuntimeError("The table is not allocated yet.")
        return self.values.device

    def _target_device(self, device: torch.device | str | None) -> torch.device:
        if self.device_spec == "auto":
            return torch.device(device) if device is not None else torch.device("cpu")
        return torch.device(self.device_spec)

    def allocate(
        self, num_samples: int | None = None, num_columns: int | None = None, device: torch.device | str | None = None
    ) -> PerSampleTable:
        """Create the storage (idempotent), or check a loaded state against the training set and move it.

        Args:
            num_samples: The training-set size, if not given at construction.
            num_columns: Columns per row, if not given at construction (``None`` = scalar rows).
            device: The module's device, used when ``device="auto"``.

        Raises:
            ValueError: If a loaded checkpoint has another number of rows or columns than the training set and
                model now have (the message names both and the fix), or an earlier shape disagrees.
        """
        ckpt = self._checkpoint_shape
        n = self.num_samples if num_samples is None else num_samples
        c = self.num_columns if num_columns is None else num_columns
        if ckpt is not None:  # a loaded checkpoint: it must fit the training set and model of this run
            rows, cols = ckpt
            if n is not None and int(n) != rows:
                raise ValueError(
                    f"The checkpoint's per-sample table has {rows} rows (one per sample of the training set it was"
                    f" saved with), but the current training set has {int(n)} samples. Per-sample state is keyed by"
                    " the sample's position in the training set, so it cannot be carried over to another one: resume"
                    " with the same training set, or start fresh (fit without `ckpt_path`)."
                )
            if c is not None and c != cols:
                raise ValueError(
                    f"The checkpoint's per-sample table has {cols} columns (classes), but {c} are needed now. Resume"
                    " with the same model and training set, or start fresh (fit without `ckpt_path`)."
                )
            n, c = rows, cols
        else:
            if self.num_samples is not None and n != self.num_samples:
                raise ValueError(f"The table has {self.num_samples} rows but {n} samples were requested.")
            if self.num_columns is not None and c != self.num_columns:
                raise ValueError(f"The table has {self.num_columns} columns but {c} were requested.")
        if n is None:
            raise ValueError("Expected `num_samples` to allocate the table, but got None.")
        self.num_samples, self.num_columns = int(n), (None if c is None else int(c))
        if self.topk is not None and (self.num_columns is None or self.topk >= self.num_columns):
            raise ValueError(
                f"Expected argument `topk` to be smaller than the number of columns ({self.num_columns}), but got"
                f" {self.topk}."
            )
        dev = self._target_device(device)
        width = self.topk if self.topk is not None else (self.num_columns or 1)
        if self.values is None:
            self.values = torch.full((self.num_samples, width), self.fill, dtype=self.dtype, device=dev)
            if self.topk is not None:
                self.cols = torch.zeros((self.num_samples, width), dtype=self._col_dtype(), device=dev)
            self.seen = torch.zeros(self.num_samples, dtype=torch.bool, device=dev)
        else:
            self.values = self.values.to(dev, self.dtype)
            self.seen = self.seen.to(dev) if self.seen is not None else None
            self.cols = self.cols.to(dev) if self.cols is not None else None
        self._checkpoint_shape = None
        if dev.type == "cpu" and torch.cuda.is_available():
            self.values = self.values.pin_memory()
        return self

    def _col_dtype(self) -> torch.dtype:
        return torch.int16 if (self.num_columns or 0) <= 32767 else torch.int32

    @property
    def nbytes(self) -> int:
        """Bytes of storage (values, column indices and the seen mask)."""
        total = 0
        for t in (self.values, self.cols, self.seen):
            if t is not None:
                total += t.numel() * t.element_size()
        return total

    @staticmethod
    def estimate_nbytes(
        num_samples: int, num_columns: int, dtype: str | torch.dtype = "float32", topk: int | None = None
    ) -> int:
        """Bytes a table of this shape and mode would take, without allocating it.

        Example:
            >>> PerSampleTable.estimate_nbytes(1_281_167, 1000) / 2**30  # ImageNet-1k, fp32
            4.773...
        """
        item = torch.empty((), dtype=resolve_dtype(dtype)).element_size()
        if topk is None:
            per_row = num_columns * item
        else:
            per_row = topk * (item + (2 if num_columns <= 32767 else 4))
        return num_samples * (per_row + 1)

    # -- access -------------------------------------------------------------
    def _check_index(self, index: Tensor) -> None:
        assert self.values is not None
        rows = self.values.shape[0]
        if not host_reads_are_free(index.device) and self._validated_on_accelerator:
            return
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= rows):
            raise IndexError(
                f"Expected sample indices in [0, {rows}), but got min {int(index.min())} and max"
                f" {int(index.max())}. The index must be the sample's position in the training set."
            )
        if not host_reads_are_free(index.device):
            self._validated_on_accelerator = True

    def _decode(self, values: Tensor, cols: Tensor | None) -> Tensor:
        values = values.float()
        if cols is None:
            return values
        assert self.num_columns is not None and self.topk is not None
        rest = (1.0 - values.sum(dim=1, keepdim=True)).clamp_min(0.0) / (self.num_columns - self.topk)
        dense = rest.expand(values.shape[0], self.num_columns).clone()
        return dense.scatter_(1, cols.long(), values)

    def read(self, index: Tensor, device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
        """Return ``(rows, seen)`` for ``index``: fp32 rows (``(B, C)``, or ``(B,)`` for scalars) and a bool mask.

        Args:
            index: ``(B,)`` integer dataset indices.
            device: Where to return them (default: ``index.device``).
        """
        if self.values is None or self.seen is None:
            raise RuntimeError("The table is not allocated yet; call `allocate` first.")
        out_dev = index.device if device is None else torch.device(device)
        idx = _to_device(index, self.values.device)  # a host table waits for the indices: see the module docs
        self._check_index(idx)
        idx = idx.long()
        rows = self._decode(
            self.values.index_select(0, idx), None if self.cols is None else self.cols.index_select(0, idx)
        )
        seen = self.seen.index_select(0, idx)
        rows, seen = _to_device(rows, out_dev), _to_device(seen, out_dev)
        return (rows.squeeze(1) if self.num_columns is None else rows), seen

    def write(self, index: Tensor, values: Tensor, strategy: Any = None, pad_to: int | None = None) -> None:
        """Write rows for ``index`` on every rank.

        Args:
            index: ``(B,)`` integer dataset indices of this rank's batch.
            values: ``(B, C)`` (or ``(B,)`` for scalar tables) new rows; they are detached.
            strategy: The Lightning strategy (``trainer.strategy``). When its
                world size is above one, the writes of all ranks are gathered
                and applied on every rank.
            pad_to: Rows every rank pads to before the gather (see :meth:`gather`): no host sync.
        """
        if self.values is None or self.seen is None:
            raise RuntimeError("The table is not allocated yet; call `allocate` first.")
        values = values.detach()
        if values.dim() == 1:
            values = values.unsqueeze(1)
        if values.shape[0] != index.shape[0]:
            raise ValueError(f"Expected {index.shape[0]} rows for {index.shape[0]} indices, got {values.shape[0]}.")
        expected = self.num_columns or 1
        if values.shape[1] != expected:
            raise ValueError(f"Expected rows of width {expected}, but got {values.shape[1]}.")
        if index.device.type == "cpu" or self.values.device.type != "cpu":
            self._check_index(index)
        index = index.long()
        if strategy is not None and getattr(strategy, "world_size", 1) > 1:
            index, (values,) = self.gather(strategy, index, values, pad_to=pad_to)
            self._apply(index, values, padded=True)
        else:
            self._apply(index, values, padded=False)

    @staticmethod
    def gather(strategy: Any, index: Tensor, *values: Tensor, pad_to: int | None = None) -> tuple[Tensor, list[Tensor]]:
        """All-gather ``index`` and the rows of one or more tables from every rank in ONE collective.

        The rows are cast to fp32 and concatenated with the index (split into two exactly representable
        parts) into one ``(B, 2 + sum(columns))`` buffer, padded to ``pad_to`` rows, and all-gathered. Padded
        rows come back with index ``-1``; :meth:`write_gathered` drops them on device.

        Args:
            strategy: The Lightning strategy (``trainer.strategy``); ``None`` or a world size of one returns the
                local ``index`` and ``values`` as they are.
            index: ``(B,)`` integer dataset indices of this rank's batch.
            *values: ``(B, C_k)`` (or ``(B,)``) rows, one tensor per table.
            pad_to: Rows every rank pads to (the loader's batch size, see :func:`train_batch_size`): no host
                sync. ``None``: the ranks exchange their batch sizes first (one host sync).

        Returns:
            ``(index, [values...])`` in rank order (``world_size * pad_to`` rows), detached, fp32 values in the
            shapes given (``(R,)`` for ``(B,)`` inputs).

        Raises:
            ValueError: If this rank's batch has more than ``pad_to`` rows.
        """
        values = tuple(v.detach() for v in values)
        b = index.shape[0]
        for v in values:
            if v.shape[0] != b:
                raise ValueError(f"Expected {b} rows for {b} indices, got {v.shape[0]}.")
        if strategy is None or getattr(strategy, "world_size", 1) <= 1:
            return index, list(values)
        if pad_to is None:  # the ranks' batch sizes are not known in advance: exchange them (one host sync)
            sizes = strategy.all_gather(torch.tensor([b], device=index.device)).reshape(-1)
            pad_to = int(sizes.max().cpu())
        elif b > pad_to:
            raise ValueError(
                f"Expected a batch of at most {pad_to} rows (`pad_to`, the loader's batch size) to gather per-sample"
                f" table rows across ranks, but got {b}. Pass the largest batch size any rank can have."
            )
        index = index.long()
        cols = [v.reshape(b, -1) for v in values]
        widths = [c.shape[1] for c in cols]
        dev = index.device
        hi = torch.div(index, _INDEX_SPLIT, rounding_mode="floor")
        lo = index - hi * _INDEX_SPLIT  # both exact in fp32 (|hi| < 2**24, 0 <= lo < 2**20)
        buf = torch.cat(
            [hi.unsqueeze(1).float(), lo.unsqueeze(1).float(), *(c.to(dev, torch.float32) for c in cols)], 1
        )
        if pad_to > b:
            pad = buf.new_zeros((pad_to - b, buf.shape[1]))
            pad[:, 0] = -1.0
            pad[:, 1] = float(_INDEX_SPLIT - 1)  # hi * SPLIT + lo = -1
            buf = torch.cat([buf, pad])
        out = strategy.all_gather(buf).reshape(-1, buf.shape[1])
        all_idx = out[:, 0].long() * _INDEX_SPLIT + out[:, 1].long()
        parts = list(out[:, 2:].split(widths, dim=1))
        shaped = [p.reshape(-1, *v.shape[1:]) for p, v in zip(parts, values)]
        return all_idx, shaped

    def write_gathered(self, index: Tensor, values: Tensor) -> None:
        """Write rows returned by :meth:`gather` (no collective): padded rows (index ``-1``) are dropped on device.

        Args:
            index: The gathered ``(R,)`` indices; ``-1`` marks a padded row.
            values: This table's gathered ``(R, C)`` (or ``(R,)``) rows.
        """
        if self.values is None or self.seen is None:
            raise RuntimeError("The table is not allocated yet; call `allocate` first.")
        values = values.detach()
        if values.dim() == 1:
            values = values.unsqueeze(1)
        if values.shape[0] != index.shape[0]:
            raise ValueError(f"Expected {index.shape[0]} rows for {index.shape[0]} indices, got {values.shape[0]}.")
        expected = self.num_columns or 1
        if values.shape[1] != expected:
            raise ValueError(f"Expected rows of width {expected}, but got {values.shape[1]}.")
        self._apply(index.long(), values, padded=True)

    def _apply(self, index: Tensor, values: Tensor, padded: bool) -> None:
        """Dedupe and write rows (``padded``: rows with index ``-1`` are padding and never written)."""
        assert self.values is not None and self.seen is not None
        real = None
        if padded:  # a padded row goes to row 0 with non-finite values: it keeps the old row and loses to real ones
            real = index >= 0
            index = torch.where(real, index, torch.zeros((), dtype=index.dtype, device=index.device))
            values = torch.where(real.unsqueeze(1), values.float(), torch.full((), float("nan"), device=values.device))
            if index.device.type == "cpu" or self.values.device.type != "cpu":
                self._check_index(index)
        if self.values.device.type == "cpu" or index.device.type == "cpu":
            index, values = dedupe_last(index, values, real)  # on the host: compact
        else:
            index, values = _last_wins(index, values, real)  # on the device: no host sync
        if self.values.device.type == "cpu" and index.device.type != "cpu":
            idx, values = _to_host(index, values)  # one wait for both: see the module docs
            self._check_index(idx)
        else:
            idx, values = _to_device(index, self.values.device), _to_device(values, self.values.device)
        values = values.float()
        finite = torch.isfinite(values).all(dim=1)
        old = self._decode(
            self.values.index_select(0, idx), None if self.cols is None else self.cols.index_select(0, idx)
        )
        values = torch.where(finite.unsqueeze(1), values, old)
        if self.cols is None:
            self.values.index_copy_(0, idx, values.to(self.dtype))
        else:
            assert self.topk is not None
            top, cols = values.topk(self.topk, dim=1)
            self.values.index_copy_(0, idx, top.to(self.dtype))
            self.cols.index_copy_(0, idx, cols.to(self.cols.dtype))
        self.seen.index_copy_(0, idx, self.seen.index_select(0, idx) | finite)

    def dense(self) -> Tensor:
        """The whole table as fp32 (``(N, C)`` or ``(N,)``). Allocates N×C: use for diagnostics, not per step."""
        if self.values is None:
            raise RuntimeError("The table is not allocated yet.")
        out = self._decode(self.values, self.cols)
        return out.squeeze(1) if self.num_columns is None else out

    # -- state --------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Plain tensors, ints and a ``"version"`` key."""
        return {
            "version": self.version,
            "num_samples": self.num_samples if self.values is None else int(self.values.shape[0]),
            "num_columns": self.num_columns if self._checkpoint_shape is None else self._checkpoint_shape[1],
            "topk": self.topk,
            "dtype": str(self.dtype).replace("torch.", ""),
            "values": None if self.values is None else self.values.detach().cpu().clone(),
            "cols": None if self.cols is None else self.cols.detach().cpu().clone(),
            "seen": None if self.seen is None else self.seen.detach().cpu().clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`; storage moves to its device at the next :meth:`allocate`.

        Raises:
            ValueError: If the saved storage mode (``topk``) differs from this table's.
        """
        check_choice("version", state.get("version"), [1])
        if state.get("topk") != self.topk:
            raise ValueError(
                f"The checkpointed table was stored with topk={state.get('topk')}, but this one has topk={self.topk}."
                " Resume with the same storage configuration."
            )
        values = state["values"]
        # Back to the declared shape: the caller's next `allocate` gives the current training-set size, which is
        # checked against the checkpoint's rows there (`num_samples` does not silently become the checkpoint's).
        self.num_samples, self.num_columns = self._declared
        if values is None:
            self.values = self.cols = self.seen = None
            self._checkpoint_shape = None
            if self.num_samples is None:
                self.num_samples = state["num_samples"]
            if self.num_columns is None:
                self.num_columns = state["num_columns"]
            return
        dev = self.values.device if self.values is not None else values.device
        self.values = values.to(dev, self.dtype)
        self.cols = None if state["cols"] is None else state["cols"].to(dev)
        self.seen = state["seen"].to(dev)
        self._checkpoint_shape = (int(values.shape[0]), state["num_columns"])

    def __repr__(self) -> str:
        shape = self._checkpoint_shape or (self.num_samples, self.num_columns)
        return f"PerSampleTable(shape={shape}, dtype={self.dtype}, device={self.device_spec!r}, topk={self.topk})"


_INDEX_SPLIT = 2**20  # an index travels in the fp32 buffer as (index // 2**20, index % 2**20): exact below 2**44


def train_batch_size(trainer: Any) -> int | None:
    """The largest batch one training step can have on a rank, from the train loader(s), without communication.

    A ``DataLoader``'s ``batch_size`` (or its batch sampler's); for several loaders combined into one step (a
    ``CombinedLoader``, a dict or a list of loaders: the semi-supervised form) the sum. ``None`` when unknown
    (e.g. a custom batch sampler without ``batch_size``): then :meth:`PerSampleTable.gather` exchanges sizes.
    """
    try:
        loader = trainer.train_dataloader
    except Exception:  # no trainer or loop yet
        return None
    return _loader_batch_size(loader)


def _loader_batch_size(loader: Any) -> int | None:
    if loader is None:
        return None
    iterables = getattr(loader, "iterables", None)  # lightning's CombinedLoader
    if iterables is not None and not hasattr(loader, "batch_size"):
        return _loader_batch_size(iterables)
    if isinstance(loader, dict):
        loader = list(loader.values())
    if isinstance(loader, (list, tuple)):
        sizes = [_loader_batch_size(x) for x in loader]
        return None if not sizes or any(s is None for s in sizes) else sum(s for s in sizes if s is not None)
    size = getattr(loader, "batch_size", None)
    if size is None:
        size = getattr(getattr(loader, "batch_sampler", None), "batch_size", None)
    return int(size) if isinstance(size, int) and size > 0 else None
