"""Where a host read is free: the one policy behind "check on CPU, stay sync-free on accelerators".

On CPU, reading a tensor's value on the host (``.item()``, ``bool(t)``, ``.cpu()``) costs nothing more than the
read, so the package checks inputs, indices and non-finite flags eagerly there. On an accelerator the same read
stalls the launch queue until the device catches up, so those paths switch to device-side work (masked updates,
checks on logging steps only). Every such choice asks :func:`host_reads_are_free`.

:func:`accelerator_sync_policy` makes CPU tensors take the accelerator paths, so the host syncs an accelerator
run would make can be counted on a CPU-only machine (``benchmarks/overhead.py`` does; the results are the same
code paths, not a model of them).

Example:
    >>> import torch
    >>> host_reads_are_free(torch.device("cpu"))
    True
    >>> with accelerator_sync_policy():
    ...     host_reads_are_free(torch.device("cpu"))
    False
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["accelerator_sync_policy", "host_reads_are_free"]

_accelerator_policy_on_cpu = False


def host_reads_are_free(device: torch.device) -> bool:
    """Whether reading a value of a tensor on ``device`` on the host costs no device synchronisation."""
    return device.type == "cpu" and not _accelerator_policy_on_cpu


@contextmanager
def accelerator_sync_policy() -> Iterator[None]:
    """Within the block, CPU tensors take the accelerator (sync-free) code paths; for measuring host syncs."""
    global _accelerator_policy_on_cpu
    saved, _accelerator_policy_on_cpu = _accelerator_policy_on_cpu, True
    try:
        yield
    finally:
        _accelerator_policy_on_cpu = saved
