"""``DropoutSchedule``, ``EarlyDropout`` and ``LateDropout``: dropout and stochastic-depth schedules for any model."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden

from lightning_reg.core.protocol import RegularizerCallback, _is_log_flush_step
from lightning_reg.core.schedules import Constant, Schedule, ScheduleLike
from lightning_reg.core.steps import StepClock, optimizer_steps
from lightning_reg.core.validation import check_choice, check_float, check_int
from lightning_reg.functional.dropout import (
    DEFAULT_RATE_ATTRIBUTES,
    MODES,
    DropTarget,
    drop_rate_at,
    find_drop_targets,
    resolve_shape,
    restore_drop_rates_,
    set_drop_rates_,
)

__all__ = ["DropoutSchedule", "EarlyDropout", "LateDropout"]

_SCHEDULE_NAMES = ("constant", "linear", "cosine", "step", "sigmoid_rampup", "warmup")
_TARGETS = ("dropout", "drop_path", "both")
_SCALINGS = ("linear", "uniform")


def _check_patterns(name: str, value: Any) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str) or not isinstance(value, Sequence) or not all(isinstance(v, str) for v in value):
        raise TypeError(f"Expected argument `{name}` to be a list of str or None, but got {value!r}.")
    return list(value)


def _is_compiled(module: torch.nn.Module) -> bool:
    """Whether ``module`` (or a submodule) runs under ``torch.compile``."""
    if getattr(module, "_compiler_ctx", None):  # Lightning's `trainer.fit(torch.compile(model))`
        return True
    from torch._dynamo.eval_frame import OptimizedModule

    return any(
        isinstance(m, OptimizedModule) or getattr(m, "_compiled_call_impl", None) is not None for m in module.modules()
    )


class DropoutSchedule(RegularizerCallback):
    r"""Early, late or standard dropout and stochastic depth (Liu et al., 2023) for any ``LightningModule``.

    Before every training batch it sets the rate of each dropout and drop-path
    module to :func:`~lightning_reg.functional.dropout.drop_rate_at` of
    the number of optimizer steps that really ran
    (:func:`~lightning_reg.core.steps.optimizer_steps`: a step skipped by AMP's
    ``GradScaler`` or ``GradientClipping(nonfinite="skip")`` does not advance
    it; one value per optimizer step, micro-batches of one accumulation window
    share it). The count is checkpointed, so a resumed run follows exactly the
    same schedule. The rule (``C`` = cutoff in optimizer steps):

    * ``mode="early"``: ``"constant"`` gives ``p`` for ``t < C`` then 0;
      ``"linear"`` gives ``linspace(p, 0, C)[t]`` then 0 (the reference's
      ``drop_scheduler``). Early dropout helps *underfitting* models.
    * ``mode="late"``: 0 for ``t < C``, then ``p`` (``"constant"``); with
      ``"linear"`` it ramps from 0 at the cutoff to ``p`` at the last step (an
      extension: the reference only has constant). Late dropout regularizes
      *overfitting* models.
    * ``mode="standard"``: ``p`` at every step.

    Any other :mod:`~lightning_reg.core.schedules` shape is a multiplier of
    ``p`` over the active phase (see :mod:`lightning_reg.functional.dropout`).

    **What it drives** (found at ``setup``; a clear error lists what was
    searched if nothing is found):

    * ``targets="dropout"``: ``p`` of every ``nn.Dropout``, ``Dropout1d/2d/3d``,
      ``AlphaDropout`` and ``FeatureAlphaDropout``; ``dropout`` of
      ``nn.MultiheadAttention``; and every attribute in ``attributes`` that is
      a plain ``float`` on a module (default ``attn_drop``, ``proj_drop``,
      ``attn_dropout``, ``attention_dropout``, ``drop_rate``: rates that
      modules such as Hugging Face attention layers or timm heads pass to
      ``F.dropout`` at every forward).
    * ``targets="drop_path"``: ``drop_prob`` (or ``p``) of every drop-path
      module: :class:`lightning_reg.nn.DropPath`, timm's ``DropPath``,
      torchvision's ``StochasticDepth``. Block ``k`` of ``K`` gets
      ``linspace(0, rate, K)[k]`` (``drop_path_scaling="uniform"``: ``rate``).
      Drop-path modules with the same parent form one block. timm builds
      ``nn.Identity`` instead of ``DropPath`` when ``drop_path_rate=0``, so
      build the model with a non-zero rate.
    * ``targets="both"``: all of the above, with the same schedule.

    The scheduled rate *replaces* each module's own rate (as in the reference);
    use ``include``/``exclude`` (``fnmatch`` patterns on module names or
    ``"<module>.<attr>"``) to leave some modules alone.

    **Restore.** The rates found at ``setup`` are written back at the end of
    ``fit`` (``on_fit_end``) and when ``fit`` raises (``on_exception``), so
    the model leaves ``fit`` as it entered it; rates written during training
    are never saved in a checkpoint (they are attributes, not state).

    **torch.compile.** TorchDynamo treats the rates as constants and guards on
    them, so a new rate takes effect through a recompilation. A constant
    schedule recompiles once at the cutoff. A schedule that changes every step
    (``"linear"``) exceeds ``torch._dynamo.config.recompile_limit`` (8) after
    as many steps; dynamo then runs the compiled frame eagerly: the rates stay
    correct, the compile speed-up is lost. The callback warns at train start
    when that will happen.

    Args:
        p: The peak rate in ``[0, 1)`` (paper: 0.1 for early dropout on ViT-T,
            0.5 for early stochastic depth, 0.4 for late stochastic depth on ViT-B).
        mode: ``"early"``, ``"late"`` or ``"standard"``.
        schedule: ``"constant"``, ``"linear"`` or any schedule of
            :mod:`~lightning_reg.core.schedules` (name or instance). Must be
            ``"constant"`` in ``"standard"`` mode.
        cutoff_epochs: The cutoff in epochs (may be fractional), converted with
            ``steps_per_epoch = ceil(trainer.num_training_batches / accumulate_grad_batches)``,
            the optimizer steps of one epoch (per rank under DDP), and
            rounded to the nearest step. Paper default: 50 (of 300).
        cutoff_steps: The cutoff in optimizer steps; when given it takes
            precedence over ``cutoff_epochs``.
        targets: ``"dropout"``, ``"drop_path"`` or ``"both"``.
        include: Only drive targets whose module name (or ``name.attr``) matches one of these patterns.
        exclude: Skip targets whose module name (or ``name.attr``) matches one of these patterns.
        attributes: Float attribute names taken as dropout rates on any module
            (``None``: the defaults above; ``[]``: none).
        drop_path_scaling: ``"linear"`` (``linspace(0, rate, K)`` over blocks) or ``"uniform"``.

    Logged metrics (per step):

    ==============================  ==================================================
    ``dropout/rate``                 the current dropout rate (when dropout targets exist)
    ``dropout/drop_path_rate``       the current drop-path rate of the deepest block
    ==============================  ==================================================

    Example:
        >>> import lightning as L
        >>> trainer = L.Trainer(callbacks=[DropoutSchedule(p=0.1, mode="early", cutoff_epochs=5)], logger=False)

    YAML::

        trainer:
          callbacks:
            - class_path: lightning_reg.EarlyDropout
              init_args: {p: 0.1, schedule: linear, cutoff_epochs: 5}
    """

    name = "dropout"

    def __init__(
        self,
        p: float = 0.1,
        mode: Literal["early", "late", "standard"] = "early",
        schedule: ScheduleLike = "linear",
        cutoff_epochs: float | None = 50.0,
        cutoff_steps: int | None = None,
        targets: Literal["dropout", "drop_path", "both"] = "dropout",
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        attributes: list[str] | None = None,
        drop_path_scaling: Literal["linear", "uniform"] = "linear",
    ) -> None:
        super().__init__()
        self.p = check_float("p", p, 0.0, 1.0, high_inclusive=False)
        self.mode = check_choice("mode", mode, MODES)
        if isinstance(schedule, str):
            check_choice("schedule", schedule, _SCHEDULE_NAMES)
        elif not isinstance(schedule, Schedule):
            raise TypeError(
                f"Expected argument `schedule` to be one of {list(_SCHEDULE_NAMES)} or a `Schedule`, but got"
                f" {schedule!r}."
            )
        self.schedule = schedule
        self._shape = resolve_shape(schedule, mode)
        if mode == "standard" and not isinstance(self._shape, Constant):
            raise ValueError(
                f"Expected argument `schedule` to be 'constant' with mode='standard' (the rate is `p` at every step),"
                f" but got {schedule!r}. Use mode='early' or mode='late' for a schedule."
            )
        self.cutoff_epochs = None if cutoff_epochs is None else check_float("cutoff_epochs", cutoff_epochs, 0.0)
        self.cutoff_steps = None if cutoff_steps is None else check_int("cutoff_steps", cutoff_steps, 0)
        if mode != "standard" and self.cutoff_epochs is None and self.cutoff_steps is None:
            raise ValueError(f"mode={mode!r} needs a cutoff: pass `cutoff_epochs` or `cutoff_steps`.")
        self.targets = check_choice("targets", targets, _TARGETS)
        self.include = _check_patterns("include", include)
        self.exclude = _check_patterns("exclude", exclude)
        self.attributes = (
            list(DEFAULT_RATE_ATTRIBUTES) if attributes is None else _check_patterns("attributes", attributes)
        )
        self.drop_path_scaling = check_choice("drop_path_scaling", drop_path_scaling, _SCALINGS)
        self._found: list[DropTarget] | None = None
        self._steps_per_epoch: int | None = None
        self._cutoff: int | None = None
        self._total: int | None = None
        self._applied: float | None = None
        self._loaded: dict[str, Any] = {}
        self._clock = StepClock()  # the real optimizer steps drive the schedule

    # -- identity / state -----------------------------------------------------------------------------
    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            mode=self.mode, targets=self.targets, include=self.include, exclude=self.exclude
        )

    def state_dict(self) -> dict[str, Any]:
        """The resolved schedule geometry (``-1`` until known); the rate itself is a function of the global step."""
        return {
            "version": 1,
            "steps_per_epoch": -1 if self._steps_per_epoch is None else self._steps_per_epoch,
            "cutoff_steps": -1 if self._cutoff is None else self._cutoff,
            "total_steps": -1 if self._total is None else self._total,
            # The real optimizer steps so far (AMP / non-finite skips excluded): the schedule's position.
            "optimizer_steps": -1 if (steps := self._clock.state()) is None else steps,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded = dict(state_dict)
        self._clock.load(state_dict.get("optimizer_steps"))

    # -- the schedule ---------------------------------------------------------------------------------
    @property
    def drop_targets(self) -> list[DropTarget]:
        """The targets found at setup (empty before)."""
        return list(self._found or [])

    @property
    def cutoff(self) -> int | None:
        """The cutoff in optimizer steps (known from train start on)."""
        return self._cutoff

    @property
    def total_steps(self) -> int | None:
        """The total number of optimizer steps of the fit (``None`` if unknown or infinite)."""
        return self._total

    def rate_at(self, step: int) -> float:
        """The scheduled rate at optimizer step ``step`` (needs the geometry resolved at train start)."""
        if self.mode == "standard":
            return self.p
        if self._cutoff is None:
            raise RuntimeError("The cutoff is only known from `on_train_start` on.")
        return drop_rate_at(step, self.p, self._cutoff, self.mode, self._shape, self._total)  # type: ignore[arg-type]

    # -- hooks ----------------------------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._applied = None
        self._found = None
        found = self._discover(pl_module)
        if found or not is_overridden("configure_model", pl_module):
            self._accept(trainer, pl_module, found)
        # else: the modules may be created in `configure_model`; look again at fit start.

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        if self._found is None:
            self._accept(trainer, pl_module, self._discover(pl_module))

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._clock.start(trainer)
        batches = trainer.num_training_batches
        total = trainer.estimated_stepping_batches
        self._total = int(total) if math.isfinite(total) else None
        if math.isfinite(batches):
            self._steps_per_epoch = math.ceil(int(batches) / trainer.accumulate_grad_batches)
        if self.mode == "standard":
            self._cutoff = 0
        elif self.cutoff_steps is not None:
            self._cutoff = self.cutoff_steps
        else:
            if self._steps_per_epoch is None:
                raise ValueError(
                    f"`{type(self).__name__}(cutoff_epochs=...)` needs the number of optimizer steps per epoch, but the"
                    " train dataloader has no length. Pass `cutoff_steps=<optimizer steps>` instead."
                )
            assert self.cutoff_epochs is not None
            self._cutoff = round(self.cutoff_epochs * self._steps_per_epoch)
        if self.mode == "late" and not isinstance(self._shape, Constant) and self._total is None:
            raise ValueError(
                f"mode='late' with schedule {self.schedule!r} ramps up to the last training step, but the total number"
                " of steps is unknown (infinite dataloader and no `max_steps`). Set `Trainer(max_steps=...)` or use"
                " schedule='constant'."
            )
        self._check_geometry()
        self._check_compile(pl_module)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        rate = self.rate_at(optimizer_steps(trainer))  # real optimizer steps: a skipped step does not advance it
        if rate != self._applied:
            set_drop_rates_(self._found or [], rate)
            self._applied = rate
        if not _is_log_flush_step(trainer, batch_idx):  # per-step values: only the steps Lightning hands on
            return
        kinds = {t.kind for t in self._found or []}
        if "dropout" in kinds:
            pl_module.log(f"{self.name}/rate", rate, on_step=True, on_epoch=False, batch_size=1)
        if "drop_path" in kinds:
            pl_module.log(f"{self.name}/drop_path_rate", rate, on_step=True, on_epoch=False, batch_size=1)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.restore()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self.restore()

    def restore(self) -> None:
        """Write back the rates the model had at setup (called at the end of ``fit`` and on an exception)."""
        if self._found:
            restore_drop_rates_(self._found)
        self._applied = None

    # -- helpers --------------------------------------------------------------------------------------
    def _discover(self, pl_module: LightningModule) -> list[DropTarget]:
        return find_drop_targets(
            pl_module,
            self.targets,  # type: ignore[arg-type]
            self.include,
            self.exclude,
            self.attributes or (),
            self.drop_path_scaling,  # type: ignore[arg-type]
        )

    def _accept(self, trainer: Trainer, pl_module: LightningModule, found: list[DropTarget]) -> None:
        if not found:
            searched = []
            if self.targets in ("dropout", "both"):
                searched.append(
                    "dropout modules (nn.Dropout, Dropout1d/2d/3d, AlphaDropout, FeatureAlphaDropout),"
                    " nn.MultiheadAttention.dropout, float attributes named"
                    f" {self.attributes}"
                )
            if self.targets in ("drop_path", "both"):
                searched.append(
                    "drop-path modules (lightning_reg.nn.DropPath, timm DropPath, torchvision StochasticDepth, or any"
                    " `*DropPath*`/`*StochasticDepth*` class with a float `drop_prob` or `p`)"
                )
            filters = f" with include={self.include} and exclude={self.exclude}" if self.include or self.exclude else ""
            raise ValueError(
                f"`{type(self).__name__}(targets={self.targets!r})` found nothing to schedule in"
                f" `{type(pl_module).__name__}`{filters}. It searched for: {'; '.join(searched)}. Add such a module"
                " (e.g. `nn.Dropout(0.0)` or `lightning_reg.nn.DropPath(0.0)`), change `targets`, or relax the"
                " include/exclude patterns."
            )
        mine = {(id(t.module), t.attr): t.path for t in found}
        for cb in trainer.callbacks:  # type: ignore[attr-defined]
            if cb is self or not isinstance(cb, DropoutSchedule) or not cb._found:
                continue
            shared = [mine[(id(t.module), t.attr)] for t in cb._found if (id(t.module), t.attr) in mine]
            if shared:
                raise ValueError(
                    f"Conflicting regularizers: two `DropoutSchedule` callbacks drive the same rates {shared[:5]}."
                    " Give them disjoint `targets` or `include`/`exclude` patterns."
                )
        depth = len({t.block for t in found if t.kind == "drop_path"})
        if depth == 1 and self.drop_path_scaling == "linear":
            rank_zero_warn(
                f"`{type(self).__name__}` found a single drop-path block; `linspace(0, p, 1)` gives it rate 0, so it"
                " will never drop. Pass `drop_path_scaling='uniform'` to give it the full rate."
            )
        self._found = found

    def _check_geometry(self) -> None:
        if self._loaded.get("steps_per_epoch", -1) not in (-1, self._steps_per_epoch) and self.cutoff_steps is None:
            rank_zero_warn(
                f"`{type(self).__name__}`: the checkpoint was trained with {self._loaded['steps_per_epoch']} optimizer"
                f" steps per epoch, this run has {self._steps_per_epoch}; the cutoff of {self.cutoff_epochs} epochs is"
                f" now {self._cutoff} steps (it was {self._loaded.get('cutoff_steps')})."
            )
        total, cutoff = self._total, self._cutoff
        if self.mode != "standard" and total is not None and cutoff is not None and cutoff >= total:
            rank_zero_warn(
                f"`{type(self).__name__}(mode={self.mode!r})`: the cutoff ({cutoff} steps) is not before the end of"
                f" training ({total} steps), so the schedule never leaves its first phase. Lower"
                " `cutoff_epochs`/`cutoff_steps`."
            )

    def _check_compile(self, pl_module: LightningModule) -> None:
        if not _is_compiled(pl_module) or isinstance(self._shape, Constant) or self.mode == "standard":
            return
        assert self._cutoff is not None
        distinct: float = self._cutoff if self.mode == "early" else math.inf
        if self.mode == "late" and self._total is not None:
            distinct = self._total - self._cutoff
        limit = int(getattr(torch._dynamo.config, "recompile_limit", 8))
        if distinct > limit:
            rank_zero_warn(
                f"`{type(self).__name__}(schedule={self.schedule!r})` changes the rate on {distinct} steps, but the"
                " model runs under torch.compile, which treats dropout rates as constants and recompiles for every new"
                " value."
                f" After `torch._dynamo.config.recompile_limit` ({limit}) recompiles dynamo runs the compiled code"
                " eagerly: the rates stay correct, the compile speed-up is lost. Use schedule='constant' (one recompile"
                " at the cutoff) or raise the limit."
            )


class EarlyDropout(DropoutSchedule):
    """:class:`DropoutSchedule` with ``mode="early"``: dropout only at the start of training (for underfitting models).

    Args:
        p: The initial rate (paper: 0.1 for ViT-T dropout, 0.5 for stochastic depth).
        schedule: ``"linear"`` (``p → 0`` over the cutoff, the paper's default) or ``"constant"``.
        cutoff_epochs: Epochs with dropout (paper: 50 of 300).
        cutoff_steps: The cutoff in optimizer steps instead (takes precedence).
        targets: ``"dropout"``, ``"drop_path"`` or ``"both"``.
        include: Module-name patterns to drive.
        exclude: Module-name patterns to leave alone.
        attributes: Float rate attribute names (``None``: defaults).
        drop_path_scaling: ``"linear"`` or ``"uniform"`` per-block drop-path rates.

    Logged metrics: ``dropout/rate`` and/or ``dropout/drop_path_rate`` (see :class:`DropoutSchedule`).

    Example:
        >>> cb = EarlyDropout(p=0.1, cutoff_epochs=5)
        >>> cb.mode, cb.schedule
        ('early', 'linear')
    """

    def __init__(
        self,
        p: float = 0.1,
        schedule: ScheduleLike = "linear",
        cutoff_epochs: float | None = 50.0,
        cutoff_steps: int | None = None,
        targets: Literal["dropout", "drop_path", "both"] = "dropout",
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        attributes: list[str] | None = None,
        drop_path_scaling: Literal["linear", "uniform"] = "linear",
    ) -> None:
        super().__init__(
            p, "early", schedule, cutoff_epochs, cutoff_steps, targets, include, exclude, attributes, drop_path_scaling
        )


class LateDropout(DropoutSchedule):
    """:class:`DropoutSchedule` with ``mode="late"``: no dropout until the cutoff, then ``p`` (for overfitting models).

    Args:
        p: The rate after the cutoff (paper: 0.4 stochastic depth for ViT-B).
        schedule: ``"constant"`` (the paper's) or ``"linear"`` (0 at the cutoff up to ``p`` at the last step).
        cutoff_epochs: Epochs without dropout (paper: 50).
        cutoff_steps: The cutoff in optimizer steps instead (takes precedence).
        targets: ``"dropout"``, ``"drop_path"`` or ``"both"``.
        include: Module-name patterns to drive.
        exclude: Module-name patterns to leave alone.
        attributes: Float rate attribute names (``None``: defaults).
        drop_path_scaling: ``"linear"`` or ``"uniform"`` per-block drop-path rates.

    Logged metrics: ``dropout/rate`` and/or ``dropout/drop_path_rate`` (see :class:`DropoutSchedule`).

    Example:
        >>> cb = LateDropout(p=0.4, cutoff_epochs=50, targets="drop_path")
        >>> cb.mode, cb.schedule
        ('late', 'constant')
    """

    def __init__(
        self,
        p: float = 0.1,
        schedule: ScheduleLike = "constant",
        cutoff_epochs: float | None = 50.0,
        cutoff_steps: int | None = None,
        targets: Literal["dropout", "drop_path", "both"] = "dropout",
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        attributes: list[str] | None = None,
        drop_path_scaling: Literal["linear", "uniform"] = "linear",
    ) -> None:
        super().__init__(
            p, "late", schedule, cutoff_epochs, cutoff_steps, targets, include, exclude, attributes, drop_path_scaling
        )
