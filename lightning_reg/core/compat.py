"""Setup-time warnings about combinations of techniques that are known to work against each other.

The interaction matrix of ``benchmarks/composition.py`` (noisy Fashion-MNIST, paired seeds; see
``benchmarks/RESULTS.md``) measures every pair of techniques against each alone. Three patterns it and the
main job exposed are checked here, at ``setup``, with the fix in the message:

1. **A fixed confidence threshold with a target softener.** :class:`~lightning_reg.NoisyLabelConsistency`
   and :class:`~lightning_reg.PseudoLabel` keep a sample's term only when the teacher's confidence
   :math:`\\max_c q_c` reaches ``threshold``. :class:`~lightning_reg.PSKD`,
   :class:`~lightning_reg.LabelSmoothing` and :class:`~lightning_reg.ELR` soften the training targets, so
   the network (and an EMA of it) stops producing confident predictions: the mask stays nearly empty and
   the term does nothing (in the main job, consistency's mask rate was 0.02 % in epoch 1 with PS-KD and
   ELR at ``threshold=0.8``; label smoothing with ``ε = 0.1`` caps the confidence a target asks for at
   ``1 − ε + ε/C``, 0.91 for ten classes, below FixMatch's 0.95). Fix: ``threshold=0.0`` (every sample;
   the target is already soft), or drop the softener.
2. **Two techniques that both pull towards the same teacher with full weight.** Each of
   ``PSKD(teacher="ema")``, ``NoisyLabelConsistency(teacher="ema")``, ``PseudoLabel(teacher="ema")`` and
   ``ELR(teacher="ema")`` adds a term that moves the student towards the EMA teacher's prediction. At
   their full (paper-default) weight, two of them double the pull towards one teacher and its mistakes
   (confirmation bias). Fix: keep one at full weight and lower the other (e.g.
   ``NoisyLabelConsistency(weight=0.5)``), or drop one.
3. **PS-KD with ELR.** Both pull the model towards its own earlier predictions (PS-KD's as the training
   target, ELR's temporal ensemble as a loss term); the matrix measures the pair below ELR alone
   (−0.7 ± 0.3 points, 3 paired seeds). Fix: against noisy labels keep ELR; for calibration keep PS-KD.
   When both use ``teacher="ema"``, rule 2 covers them.

:func:`warn_harmful_combinations` returns the messages (empty when nothing is found) and emits each with
``rank_zero_warn``; it never raises. Call it once the trainer's callbacks are known (``setup``).
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.utilities import rank_zero_warn

__all__ = ["FULL_WEIGHT", "harmful_combinations", "warn_harmful_combinations"]

#: The weight (attribute, value) from which a teacher consumer pulls "with full weight": the paper defaults.
FULL_WEIGHT: dict[str, tuple[str, float]] = {
    "PSKD": ("alpha_T", 0.8),
    "NoisyLabelConsistency": ("weight", 1.0),
    "PseudoLabel": ("weight", 1.0),
    "ELR": ("lam", 3.0),
}


def _callbacks(trainer: Any) -> list[Any]:
    return list(getattr(trainer, "callbacks", None) or [])


def _softeners(callbacks: list[Any]) -> list[str]:
    """The callbacks that soften the training targets, as ``Name(arg=value)`` strings."""
    from lightning_reg.callbacks.elr import ELR
    from lightning_reg.callbacks.label_smoothing import LabelSmoothing
    from lightning_reg.callbacks.pskd import PSKD

    found = []
    for cb in callbacks:
        if isinstance(cb, PSKD) and cb.alpha_T > 0:
            found.append(f"PSKD(alpha_T={cb.alpha_T:g})")
        elif isinstance(cb, LabelSmoothing) and cb.smoothing > 0:
            found.append(f"LabelSmoothing(smoothing={cb.smoothing:g})")
        elif isinstance(cb, ELR) and cb.lam > 0:
            found.append(f"ELR(lam={cb.lam:g})")
    return found


def _thresholded(callbacks: list[Any]) -> list[Any]:
    """The callbacks that gate their term on a fixed confidence threshold above 0."""
    from lightning_reg.callbacks.consistency import NoisyLabelConsistency
    from lightning_reg.callbacks.pseudo_label import PseudoLabel

    return [
        cb
        for cb in callbacks
        if isinstance(cb, NoisyLabelConsistency | PseudoLabel) and cb.threshold > 0 and _weight(cb) > 0
    ]


def _weight(cb: Any) -> float:
    attr, _ = FULL_WEIGHT.get(type(cb).__name__, ("weight", 1.0))
    return float(getattr(cb, attr, 0.0))


def _teacher_pullers(callbacks: list[Any]) -> list[Any]:
    """The callbacks whose term pulls the student towards the EMA teacher at (or above) full weight."""
    from lightning_reg.callbacks.consistency import NoisyLabelConsistency
    from lightning_reg.callbacks.elr import ELR
    from lightning_reg.callbacks.pseudo_label import PseudoLabel
    from lightning_reg.callbacks.pskd import PSKD

    kinds = PSKD | NoisyLabelConsistency | PseudoLabel | ELR
    return [
        cb
        for cb in callbacks
        if isinstance(cb, kinds)
        and getattr(cb, "teacher", None) == "ema"
        and _weight(cb) >= FULL_WEIGHT[type(cb).__name__][1]
    ]


def _self_distillation_pair(callbacks: list[Any]) -> list[str]:
    """PS-KD and ELR together, unless both take the EMA teacher (then rule 2 speaks)."""
    from lightning_reg.callbacks.elr import ELR
    from lightning_reg.callbacks.pskd import PSKD

    pskd = next((cb for cb in callbacks if isinstance(cb, PSKD) and cb.alpha_T > 0), None)
    elr = next((cb for cb in callbacks if isinstance(cb, ELR) and cb.lam > 0), None)
    if pskd is None or elr is None or (pskd.teacher == "ema" and elr.teacher == "ema"):
        return []
    return [
        f"`PSKD(alpha_T={pskd.alpha_T:g})` and `ELR(lam={elr.lam:g})` both pull the model towards its own earlier"
        " predictions (PS-KD's as the training target, ELR's temporal ensemble as a loss term), two different"
        " targets for one prediction: on noisy Fashion-MNIST the pair ends below ELR alone (benchmarks/RESULTS.md,"
        " Composition). Against noisy labels keep `ELR` and drop `PSKD`; for calibration on clean labels keep"
        " `PSKD` and drop `ELR`."
    ]


def harmful_combinations(trainer: Any) -> list[str]:
    """The warnings :func:`warn_harmful_combinations` would emit for ``trainer``'s callbacks (no side effects).

    Args:
        trainer: A ``lightning.Trainer`` (or anything with a ``callbacks`` list).

    Returns:
        One message per harmful combination found, each with its fix; empty when there is none.

    Example:
        >>> from types import SimpleNamespace
        >>> from lightning_reg import ELR, EMATeacher, Mixup, NoisyLabelConsistency, PSKD
        >>> recipe = [EMATeacher(), ELR(teacher="ema"), Mixup()]
        >>> harmful_combinations(SimpleNamespace(callbacks=recipe))
        []
        >>> msgs = harmful_combinations(SimpleNamespace(callbacks=[PSKD(), NoisyLabelConsistency()]))
        >>> "threshold=0.0" in msgs[0]
        True
    """
    callbacks = _callbacks(trainer)
    messages = []
    softeners = _softeners(callbacks)
    for cb in _thresholded(callbacks) if softeners else []:
        name = type(cb).__name__
        messages.append(
            f"`{name}(threshold={cb.threshold:g})` keeps a sample's term only when the teacher's confidence reaches"
            f" {cb.threshold:g}, but {', '.join(f'`{s}`' for s in softeners)} soften the training targets, which keeps"
            " the confidence below a fixed threshold: the mask stays nearly empty and the term does almost nothing"
            f" (watch `{cb.name}/mask_rate`). Use `{name}(threshold=0.0)` (the targets are already soft) or drop"
            " the softener."
        )
    messages.extend(_self_distillation_pair(callbacks))
    pullers = _teacher_pullers(callbacks)
    if len(pullers) >= 2:
        names = ", ".join(
            f"`{type(cb).__name__}(teacher='ema', {FULL_WEIGHT[type(cb).__name__][0]}={_weight(cb):g})`"
            for cb in pullers
        )
        messages.append(
            f"{names} all pull the student towards the same EMA teacher with full weight, which doubles the pull"
            " towards the teacher's own mistakes (confirmation bias). Keep one at full weight and lower the others"
            " (e.g. `NoisyLabelConsistency(weight=0.5)`, `PSKD(alpha_T=0.4)`), or drop one."
        )
    return messages


def warn_harmful_combinations(trainer: Any) -> list[str]:
    """Warn (``rank_zero_warn``) about known harmful combinations of the trainer's techniques, each with its fix.

    The checks and the evidence behind them are in this module's docstring. It never raises.

    Args:
        trainer: A ``lightning.Trainer`` (or anything with a ``callbacks`` list).

    Returns:
        The messages emitted (empty when the combination is fine).
    """
    messages = harmful_combinations(trainer)
    for message in messages:
        rank_zero_warn(message, category=UserWarning)
    return messages
