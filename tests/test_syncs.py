"""No host syncs outside logging steps on the accelerator code paths (issue 16), counted on CPU."""

from __future__ import annotations

import pytest
import torch

from lightning_reg.core.syncs import accelerator_sync_policy, host_reads_are_free


def test_policy_switch_is_scoped() -> None:
    cpu = torch.device("cpu")
    assert host_reads_are_free(cpu)
    with accelerator_sync_policy():
        assert not host_reads_are_free(cpu)
        with accelerator_sync_policy():
            assert not host_reads_are_free(cpu)
        assert not host_reads_are_free(cpu)
    assert host_reads_are_free(cpu)
    with pytest.raises(RuntimeError), accelerator_sync_policy():
        raise RuntimeError
    assert host_reads_are_free(cpu)
    assert not host_reads_are_free(torch.device("meta"))


def test_no_host_sync_outside_logging_steps() -> None:
    from benchmarks.overhead import sync_counts

    names = ["ELR", "PSKD", "EMATeacher", "NoisyLabelConsistency", "all six"]
    out = sync_counts(steps=11, log_every_n_steps=5, arms=names)
    for name in names[:-1]:
        assert out[name]["other_step"] == 0, (name, out[name]["sites"])
        assert out[name]["logging_step"] > 0  # the input checks still run, on logging steps
    # All six: only GradientClipping(nonfinite="skip")'s one flag read (skipping a step is a host decision).
    assert out["all six"]["other_step"] == 1
    outside = {site for site, (_, other) in out["all six"]["sites"].items() if other > 1}
    assert all("clipping.py" in site or "table.py" in site for site in outside), outside
