"""One count of the optimizer steps that really ran, shared by every schedule of a trainer.

``trainer.global_step`` also advances on steps that did not happen: AMP's ``GradScaler`` skips
``optimizer.step()`` on non-finite gradients, and so does ``GradientClipping(nonfinite="skip")``, while Lightning
still increments ``global_step``. A schedule keyed on ``global_step`` (a dropout cutoff, a λ ramp, an EMA warm-up)
would then advance on a step in which the weights did not move.

:func:`attach` installs, once per trainer and fit, a step post-hook on each optimizer
(``optimizer.register_step_post_hook``). A post-hook runs only after the optimizer's own ``step`` returned: a
``GradScaler`` skip never calls it, and ``GradientClipping(nonfinite="skip")`` aborts from inside the closure,
before the optimizer's body, so neither is counted. :func:`optimizer_steps` returns a Python ``int`` (no host
sync).

**Checkpoints.** Each consumer saves ``optimizer_steps(trainer)`` in its own ``state_dict`` and passes the loaded
value back to :func:`attach` at ``on_train_start`` (``restored=``); the counter then continues from it exactly.
Without a restored value the count starts at ``trainer.global_step`` (0 for a fresh fit; for a checkpoint written
before this counter existed, skipped steps before the resume are counted as real).

Example:
    >>> import torch
    >>> from types import SimpleNamespace
    >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    >>> trainer = SimpleNamespace(optimizers=[opt], global_step=0)
    >>> _ = attach(trainer)
    >>> opt.step(); opt.step()
    >>> optimizer_steps(trainer)
    2
"""

from __future__ import annotations

from typing import Any

__all__ = ["StepClock", "StepCounter", "attach", "optimizer_steps"]

_ATTR = "_lightning_reg_step_counter"


class StepCounter:
    """Real optimizer steps of one trainer's fit: ``base`` (at train start) plus the post-hook calls since."""

    def __init__(self, optimizers: list[Any], base: int) -> None:
        self.base = int(base)
        self.ran = 0
        self.optimizer_ids = [id(o) for o in optimizers]
        self._handles = [o.register_step_post_hook(self._hook) for o in optimizers]

    def _hook(self, *args: Any, **kwargs: Any) -> None:
        self.ran += 1

    @property
    def value(self) -> int:
        """The optimizer steps that ran, including those before a resume."""
        return self.base + self.ran

    def remove(self) -> None:
        """Remove the post-hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


def attach(trainer: Any, restored: int | None = None) -> StepCounter:
    """Install the shared counter on ``trainer`` (idempotent within a fit); call it from ``on_train_start``.

    Args:
        trainer: The Lightning trainer (``trainer.optimizers`` must exist: from ``on_fit_start`` on).
        restored: The count a consumer saved in its checkpoint (:func:`optimizer_steps` at save time). While
            no step has run yet, the counter continues from it.

    Returns:
        The trainer's :class:`StepCounter`.
    """
    optimizers = list(getattr(trainer, "optimizers", None) or [])
    counter: StepCounter | None = getattr(trainer, _ATTR, None)
    if counter is None or counter.optimizer_ids != [id(o) for o in optimizers]:  # a new fit: new optimizers
        if counter is not None:
            counter.remove()
        counter = StepCounter(optimizers, int(getattr(trainer, "global_step", 0)))
        setattr(trainer, _ATTR, counter)
    if restored is not None and counter.ran == 0:
        counter.base = int(restored)
    return counter


def optimizer_steps(trainer: Any) -> int:
    """The optimizer steps that really ran in this trainer's fits (a Python ``int``, no host sync).

    Falls back to ``trainer.global_step`` when no consumer attached the counter.
    """
    counter: StepCounter | None = getattr(trainer, _ATTR, None)
    if counter is None:
        return int(getattr(trainer, "global_step", 0))
    return counter.value


class StepClock:
    """One consumer's handle on the shared count: attach at train start, save and restore with its own state.

    Every schedule that follows :func:`optimizer_steps` (dropout schedules, ELR's and consistency's ramps,
    PS-KD's step schedule) keeps one: :meth:`start` from ``on_train_start``, :meth:`state` into its
    ``state_dict`` and :meth:`load` from its ``load_state_dict``.

    Example:
        >>> import torch
        >>> from types import SimpleNamespace
        >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        >>> clock = StepClock()
        >>> clock.load(5)  # from a checkpoint
        >>> clock.state()  # before the fit starts: the restored count
        5
        >>> clock.start(SimpleNamespace(optimizers=[opt], global_step=7))
        >>> opt.step()
        >>> clock.state()
        6
    """

    def __init__(self) -> None:
        self._trainer: Any = None
        self.restored: int | None = None

    def start(self, trainer: Any) -> None:
        """Attach the trainer's counter, continuing from the restored count if there is one."""
        attach(trainer, restored=self.restored)
        self._trainer = trainer

    def state(self) -> int | None:
        """The real optimizer steps of the started trainer; before :meth:`start`, the restored count (or ``None``)."""
        return self.restored if self._trainer is None else optimizer_steps(self._trainer)

    def load(self, value: Any) -> None:
        """Take a saved count; ``None`` or a negative value (an older checkpoint's placeholder) means none."""
        self.restored = None if value is None or int(value) < 0 else int(value)
