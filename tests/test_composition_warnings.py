"""`warn_harmful_combinations`: warnings for combinations the interaction matrix found harmful, none for the recipe."""

from __future__ import annotations

import warnings
from types import SimpleNamespace
from typing import Any

import pytest

from lightning_reg import (
    ELR,
    PSKD,
    EMATeacher,
    GradientClipping,
    LabelSmoothing,
    Mixup,
    NoisyLabelConsistency,
    PseudoLabel,
)
from lightning_reg.core.compat import harmful_combinations, warn_harmful_combinations


def _trainer(*callbacks: Any) -> SimpleNamespace:
    return SimpleNamespace(callbacks=list(callbacks))


def _warned(*callbacks: Any) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        messages = warn_harmful_combinations(_trainer(*callbacks))
    emitted = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert emitted == messages  # every message is emitted, once
    return messages


@pytest.mark.parametrize(
    "softener",
    [PSKD(alpha_T=0.8), LabelSmoothing(smoothing=0.1), ELR(lam=3.0)],
    ids=["pskd", "label_smoothing", "elr"],
)
@pytest.mark.parametrize(
    "gated",
    [NoisyLabelConsistency(threshold=0.8), PseudoLabel(threshold=0.95)],
    ids=["consistency", "pseudo_label"],
)
def test_fixed_threshold_with_target_softener_warns_with_the_fix(softener: Any, gated: Any) -> None:
    messages = _warned(softener, gated)
    assert len(messages) == 1
    name = type(gated).__name__
    assert f"`{name}(threshold=" in messages[0]
    assert type(softener).__name__ in messages[0]
    assert f"`{name}(threshold=0.0)`" in messages[0]  # the fix
    assert "mask" in messages[0]


def test_zero_threshold_or_no_softener_does_not_warn() -> None:
    assert _warned(PSKD(), NoisyLabelConsistency(threshold=0.0)) == []
    assert _warned(ELR(), NoisyLabelConsistency(threshold=0.0)) == []
    assert _warned(NoisyLabelConsistency(threshold=0.8), GradientClipping(max_norm=1.0)) == []
    assert _warned(PSKD(alpha_T=0.0), NoisyLabelConsistency(threshold=0.8)) == []


def test_all_six_composed_warns_about_the_threshold() -> None:
    """The old main job: PS-KD and ELR with consistency at threshold 0.8 (mask rate ~0 % in epoch 1)."""
    messages = _warned(EMATeacher(), PSKD(), GradientClipping(), ELR(), NoisyLabelConsistency(teacher="ema"))
    assert len(messages) == 2
    assert "`PSKD(alpha_T=0.8)`" in messages[0] and "`ELR(lam=3)`" in messages[0] and "threshold" in messages[0]
    assert "own earlier predictions" in messages[1]  # and PS-KD with ELR


@pytest.mark.parametrize("teachers", [("self", "none"), ("ema", "none"), ("self", "ema")])
def test_pskd_with_elr_warns_with_the_fix(teachers: tuple[str, str]) -> None:
    """The interaction matrix: PS-KD + ELR ends below ELR alone (-0.7 +- 0.3 points, 3 paired seeds)."""
    messages = _warned(EMATeacher(), PSKD(teacher=teachers[0]), ELR(teacher=teachers[1]))  # type: ignore[arg-type]
    assert len(messages) == 1
    assert "`PSKD(alpha_T=0.8)`" in messages[0] and "`ELR(lam=3)`" in messages[0]
    assert "own earlier predictions" in messages[0] and "drop `PSKD`" in messages[0]
    assert _warned(PSKD(alpha_T=0.0), ELR()) == [] and _warned(PSKD(), ELR(lam=0.0)) == []


@pytest.mark.parametrize(
    "pair",
    [
        (PSKD(teacher="ema"), NoisyLabelConsistency(teacher="ema", threshold=0.0)),
        (ELR(teacher="ema"), NoisyLabelConsistency(teacher="ema", threshold=0.0, weight=1.0)),
        (PSKD(teacher="ema"), ELR(teacher="ema")),
        (NoisyLabelConsistency(teacher="ema", threshold=0.0), PseudoLabel(teacher="ema", threshold=0.0)),
    ],
    ids=["pskd+consistency", "elr+consistency", "pskd+elr", "consistency+pseudo_label"],
)
def test_two_full_weight_pulls_towards_the_same_teacher_warn(pair: tuple[Any, Any]) -> None:
    messages = [m for m in _warned(EMATeacher(), *pair) if "same EMA teacher" in m]
    assert len(messages) == 1
    for cb in pair:
        assert f"`{type(cb).__name__}(teacher='ema'" in messages[0]
    assert "lower the others" in messages[0]


def test_one_full_weight_pull_and_a_lowered_one_do_not_warn() -> None:
    assert not _warned(EMATeacher(), ELR(teacher="ema"), NoisyLabelConsistency(teacher="ema", threshold=0, weight=0.5))
    assert not _warned(EMATeacher(), PSKD(teacher="ema", alpha_T=0.4), ELR(teacher="ema"))
    # Self-teachers pull towards different targets: no shared teacher.
    assert not [m for m in _warned(PSKD(), NoisyLabelConsistency(threshold=0.0)) if "same EMA teacher" in m]


def test_recommended_recipe_does_not_warn() -> None:
    assert _warned(EMATeacher(decay=0.99), ELR(beta=0.7, lam=3.0, teacher="ema"), Mixup(alpha=1.0)) == []
    assert _warned(EMATeacher(decay=0.99), ELR(beta=0.7, lam=3.0), LabelSmoothing(0.1)) == []  # the main job


def test_harmful_combinations_has_no_side_effects_and_accepts_a_real_trainer() -> None:
    import lightning as L

    trainer = L.Trainer(callbacks=[PSKD(), NoisyLabelConsistency()], logger=False, enable_checkpointing=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(harmful_combinations(trainer)) == 1
    assert harmful_combinations(_trainer()) == []
    assert harmful_combinations(SimpleNamespace()) == []


def test_setup_warns_once_per_fit_through_the_pipeline() -> None:
    """The pipeline's setup calls ``warn_harmful_combinations`` once, whatever the number of regularizers."""
    import warnings

    from lightning_reg import PSKD, NoisyLabelConsistency
    from tests.helpers import fit

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit([PSKD(), NoisyLabelConsistency(threshold=0.8)], max_epochs=1, limit_train_batches=1)
    texts = [str(w.message) for w in caught if "threshold" in str(w.message) and "PSKD" in str(w.message)]
    assert len(texts) == 1, texts
