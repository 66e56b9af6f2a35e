"""``LabelSmoothing``: a target refiner that mixes the target with the uniform distribution."""

from __future__ import annotations

from lightning_reg.core.protocol import LossRegularizer, StepContext
from lightning_reg.core.schedules import ScheduleLike, get_schedule
from lightning_reg.core.validation import check_float
from lightning_reg.functional.label_smoothing import label_smoothing_targets

__all__ = ["LabelSmoothing"]


class LabelSmoothing(LossRegularizer):
    r"""Label smoothing as a target refiner: :math:`q = (1-\varepsilon_t)\,q + \varepsilon_t / C`.

    It smooths whatever target the refiners before it produced (the one-hot
    label if none). Listed *after* :class:`~lightning_reg.PSKD` it smooths the
    PS-KD target; listed before, PS-KD mixes its past predictions into the
    smoothed label. Both orders are valid and deterministic.

    **Every layout.** It works per element, for ``(B, C)`` classification, ``(B, C, H, W)``
    segmentation and ``(B, T, C)`` token logits alike: with a one-hot target its loss is exactly
    ``F.cross_entropy(logits, y, ignore_index=..., label_smoothing=ε)``. Elements labelled
    ``ignore_index`` (void pixels, padding, unlabeled samples) keep an all-zero target row, so they
    get no smoothed label and no gradient (the base loss masks them with ``ctx.valid`` too).

    Args:
        smoothing: The final smoothing ``ε`` in ``[0, 1)``; the paper's default is 0.1.
        schedule: A multiplier on ``smoothing`` over epochs (``"constant"`` by
            default; any :mod:`~lightning_reg.core.schedules` name or instance).

    Logged metrics:

    ==============================  ===========================
    ``label_smoothing/epsilon``      the current ``ε_t``
    ==============================  ===========================

    Example:
        >>> import lightning as L
        >>> trainer = L.Trainer(callbacks=[LabelSmoothing(smoothing=0.1)], logger=False)

    YAML::

        trainer:
          callbacks:
            - class_path: lightning_reg.LabelSmoothing
              init_args: {smoothing: 0.1}
    """

    name = "label_smoothing"
    stage = "target"
    layouts = frozenset({"classification", "dense"})

    def __init__(self, smoothing: float = 0.1, schedule: ScheduleLike = "constant") -> None:
        super().__init__()
        self.smoothing = check_float("smoothing", smoothing, 0.0, 1.0, high_inclusive=False)
        self.schedule = get_schedule(schedule, "schedule")

    def current_smoothing(self, epoch: int, max_epochs: int) -> float:
        """``ε_t = smoothing · schedule(epoch, max_epochs)``."""
        return self.smoothing * self.schedule(epoch, max_epochs)

    def refine_target(self, ctx: StepContext) -> None:
        trainer = ctx.module.trainer
        eps = self.current_smoothing(trainer.current_epoch, max(int(trainer.max_epochs or 1), 1))
        ctx.target = label_smoothing_targets(ctx.current_target(), eps, dim=ctx.class_dim, valid=ctx.valid)
        ctx.logs[f"{self.name}/epsilon"] = eps
