"""The rich summary of active regularizers printed at fit start (rank zero only)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.table import Table

__all__ = ["summary_table"]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    text = repr(value) if not isinstance(value, str) else value
    return text if len(text) <= 60 else text[:57] + "..."


def summary_table(regularizers: Sequence[Any]) -> Table:
    """Build a ``rich`` table with one row per regularizer: name, kind and key hyperparameters.

    Args:
        regularizers: ``RegularizerCallback`` instances, in callback-list order.

    Example:
        >>> from lightning_reg import LabelSmoothing
        >>> summary_table([LabelSmoothing(0.1)]).row_count
        1
    """
    table = Table(title="lightning-reg: active regularizers", title_justify="left")
    table.add_column("#", justify="right")
    table.add_column("callback")
    table.add_column("stage")
    table.add_column("hyperparameters and schedules")
    for i, reg in enumerate(regularizers):
        stage = getattr(reg, "stage", None) or "weights/gradients"
        params = ", ".join(f"{k}={_fmt(v)}" for k, v in reg.describe().items())
        table.add_row(str(i), type(reg).__name__, str(stage), params)
    return table
