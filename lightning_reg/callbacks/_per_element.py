"""Per-sample tables stay per sample: the size a per-element table would need, for ELR's and PS-KD's refusals.

ELR (``teacher="none"``) and PS-KD (``teacher="self"``) keep one row of ``C`` values per training sample. On
dense outputs (``(B, C, H, W)`` segmentation, ``(B, T, C)`` tokens) a faithful port would need one row per
*element*: ``N × prod(d) × C`` values, and random crops or flips would move pixels between visits anyway. So
they refuse dense outputs with the size spelled out, and point to ``teacher="ema"``, which needs no table.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lightning_reg.core.protocol import StepContext, infer_num_samples
from lightning_reg.core.table import resolve_dtype

__all__ = ["format_bytes", "per_element_table_error", "per_element_table_size"]


def format_bytes(n: int) -> str:
    """``n`` bytes in binary units with one decimal, e.g. ``"1.9 GiB"``.

    Example:
        >>> format_bytes(512), format_bytes(65536), format_bytes(60000 * 784 * 11 * 4)
        ('512 B', '64.0 KiB', '1.9 GiB')
    """
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


def per_element_table_size(
    num_samples: int | None,
    dims: Sequence[int],
    num_classes: int,
    dtype: str | torch.dtype = "float32",
    topk: int | None = None,
) -> tuple[str, int | None]:
    """The formula, with the numbers, and the bytes of a table with one row per element.

    Args:
        num_samples: ``N``, the training-set size (``None`` if unknown: the formula keeps the letter).
        dims: ``d``, each sample's element dimensions (``(H, W)``, ``(T,)``).
        num_classes: ``C``.
        dtype: The table's storage dtype.
        topk: With top-k storage, ``k`` values and their column indices per row.

    Returns:
        ``(formula, nbytes)``; ``nbytes`` is ``None`` when ``num_samples`` is.

    Example:
        >>> per_element_table_size(60000, (28, 28), 11)
        ('N × prod(d) × C × bytes = 60000 × 784 × 11 × 4 B = 1.9 GiB', 2069760000)
    """
    elems = 1
    for d in dims:
        elems *= int(d)
    item = torch.empty((), dtype=resolve_dtype(dtype)).element_size()
    n_text = "N" if num_samples is None else str(int(num_samples))
    if topk is None:
        symbolic = "N × prod(d) × C × bytes"
        numbers = f"{n_text} × {elems} × {num_classes} × {item} B"
        per_elem = num_classes * item
    else:
        col = 2 if num_classes <= 32767 else 4
        symbolic = f"N × prod(d) × k × (bytes + {col})"
        numbers = f"{n_text} × {elems} × {topk} × ({item} + {col}) B"
        per_elem = topk * (item + col)
    if num_samples is None:
        return f"{symbolic} = {numbers}", None
    nbytes = int(num_samples) * elems * per_elem
    return f"{symbolic} = {numbers} = {format_bytes(nbytes)}", nbytes


def _num_samples(ctx: StepContext, given: int | None) -> int | None:
    if given is not None:
        return given
    try:
        return infer_num_samples(ctx.module.trainer, "")
    except (ValueError, RuntimeError, AttributeError):  # no trainer, or no loader yet (the sanity check)
        return None


def per_element_table_error(
    who: str,
    ctx: StepContext,
    num_samples: int | None,
    what: str,
    fix: str,
    dtype: str | torch.dtype = "float32",
    topk: int | None = None,
) -> ValueError:
    """The refusal of a per-sample-table technique on dense outputs: the table size it would need, and the fix.

    Args:
        who: The technique as the user configured it, e.g. ``"ELR(teacher='none')"``.
        ctx: The step (its logits and labels give ``prod(d)`` and ``C``).
        num_samples: ``N`` if known (else inferred from the train dataloader where possible).
        what: What the table holds, e.g. ``"temporal-ensemble targets"``.
        fix: The sentence that says what to use instead.
        dtype: The table's storage dtype.
        topk: The table's top-k storage, if any.
    """
    assert ctx.logits is not None
    formula, _ = per_element_table_size(
        _num_samples(ctx, num_samples), tuple(ctx.labels.shape[1:]), ctx.num_classes, dtype, topk
    )
    return ValueError(
        f"`{who}` does not support dense outputs (logits of shape {tuple(ctx.logits.shape)}, labels of shape"
        f" {tuple(ctx.labels.shape)}): it keeps"
        f" one row of {what} per training sample, and on dense outputs it would need one per element:"
        f" {formula}. It keeps no per-element tables (random crops and flips would also move pixels between"
        f" visits). {fix}"
    )
