from __future__ import annotations

import math

import pytest
from jsonargparse import ArgumentParser

from lightning_reg.core import schedules as S


@pytest.mark.parametrize(
    ("fn", "args", "expected"),
    [
        (S.constant_schedule, (3, 10, 0.25), 0.25),
        (S.linear_schedule, (0, 10, 0.0, 0.8), 0.0),
        (S.linear_schedule, (5, 10, 0.0, 0.8), 0.4),
        (S.linear_schedule, (15, 10, 0.0, 0.8), 0.8),
        (S.cosine_schedule, (0, 10, 1.0, 0.0), 1.0),
        (S.cosine_schedule, (10, 10, 1.0, 0.0), 0.0),
        (S.step_schedule, (2, 10, [3, 6], 0.1, 1.0), 1.0),
        (S.step_schedule, (7, 10, [3, 6], 0.1, 1.0), 0.01),
        (S.sigmoid_rampup, (0, 10), math.exp(-5)),
        (S.sigmoid_rampup, (10, 10), 1.0),
        (S.sigmoid_rampup, (3, 10), math.exp(-5 * 0.7**2)),
        (S.warmup_schedule, (1, 100, 4, 0.0, 1.0), 0.25),
        (S.warmup_schedule, (9, 100, 4, 0.0, 1.0), 1.0),
    ],
)
def test_functional_values(fn, args, expected) -> None:  # type: ignore[no-untyped-def]
    assert fn(*args) == pytest.approx(expected)


def test_classes_match_functions_and_are_pure() -> None:
    sched = S.Linear(0.2, 0.6)
    assert sched(4, 8) == pytest.approx(S.linear_schedule(4, 8, 0.2, 0.6))
    assert sched(4, 8) == sched(4, 8)  # no hidden state
    assert S.SigmoidRampUp(length=5)(5, 100) == 1.0
    assert S.Step([2], 0.5)(3, 10) == 0.5
    assert S.Warmup(2)(1, 10) == 0.5
    assert S.get_schedule("cosine") == S.Cosine()
    assert S.get_schedule(sched) is sched


def test_zero_total_counts_as_finished() -> None:
    assert S.linear_schedule(0, 0, 0.0, 1.0) == 1.0


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="Expected argument `schedule` to be one of"):
        S.get_schedule("exp")
    with pytest.raises(TypeError, match="Expected argument `schedule` to be a str or a `Schedule`"):
        S.get_schedule(3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="Expected argument `start` to be a finite float"):
        S.Linear(start="a")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="Expected argument `warmup` to be a float >= 0"):
        S.Warmup(-1)


def test_yaml_configurable() -> None:
    parser = ArgumentParser()
    parser.add_argument("--schedule", type=S.ScheduleLike, default="linear")
    cfg = parser.parse_object(
        {"schedule": {"class_path": "lightning_reg.core.schedules.Cosine", "init_args": {"start": 0.5}}}
    )
    sched = parser.instantiate_classes(cfg).schedule
    assert isinstance(sched, S.Cosine) and sched.start == 0.5
    cfg = parser.parse_object({"schedule": "sigmoid_rampup"})
    assert S.get_schedule(parser.instantiate_classes(cfg).schedule) == S.SigmoidRampUp()
