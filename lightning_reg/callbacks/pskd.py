"""``PSKD``: progressive self-knowledge distillation as a target refiner, with a compact per-sample table."""

from __future__ import annotations

from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor

from lightning_reg.callbacks._per_element import per_element_table_error
from lightning_reg.core.protocol import LossRegularizer, StepContext, TeacherProvider, find_teacher, infer_num_samples
from lightning_reg.core.schedules import ScheduleLike, get_schedule
from lightning_reg.core.steps import StepClock, optimizer_steps
from lightning_reg.core.table import PerSampleTable, train_batch_size
from lightning_reg.core.validation import check_choice, check_float, check_optional_int
from lightning_reg.functional.pskd import pskd_soft_targets, target_entropy

__all__ = ["PSKD"]


class PSKD(LossRegularizer):
    r"""Progressive self-knowledge distillation (Kim et al., ICCV 2021), https://arxiv.org/abs/2006.12000.

    Each sample's target is its label mixed with the prediction the model made
    for that sample at its previous visit:

    .. math::

        q_i = (1 - \alpha_t)\, y_i + \alpha_t\, P^{\mathrm{prev}}_i, \qquad
        \alpha_t = \alpha_T \cdot t / T,

    and the base loss becomes the soft cross-entropy :math:`-\sum_c q_c \log p_c`
    (its logit gradient is :math:`p - q`). ``t`` is the one-based epoch
    (``trainer.current_epoch + 1``, as in the reference code's
    ``alpha_T * (epoch + 1) / end_epoch``) and ``T`` is ``trainer.max_epochs``,
    so ``α_t`` reaches ``α_T`` in the last epoch.

    **Previous predictions.** ``P_prev[i]`` is the softmax (temperature 1) of
    the train-mode logits of the step that last saw sample ``i``, on its
    augmented input: the paper's definition. Each step first reads the batch's
    old rows, then writes the new predictions into a
    :class:`~lightning_reg.core.table.PerSampleTable` (all-gathered across DDP
    ranks, vectorised, ``DistributedSampler`` padding handled). A sample never
    seen before (the whole first epoch, or a sample ``drop_last`` skipped) gets
    its hard label (``torch.where``, no host sync); the reference instead
    writes one-hot rows in epoch 0, which is the same target.

    **Training steps only.** Outside training steps (``ctx.training`` is ``False``: the sanity check,
    ``regularized_loss`` called in ``validation_step`` or ``test_step``) PS-KD leaves the target and the
    table alone, and reads nothing by index (those indices are not training indices).

    **Unlabeled samples** (semi-supervised batches; labels equal to ``ignore_index``) keep their target
    and never touch the table: only labelled rows are refined and stored. A ``CombinedLoader`` batch
    (``ctx.num_labeled`` labeled rows first) is sliced statically; in a single loader the unlabeled rows
    are masked (no host sync). The base loss ignores unlabeled rows anyway.

    **Dense outputs** (``(B, C, *d)`` segmentation, ``(B, T, C)`` tokens) need ``teacher="ema"``: a
    per-element table of previous predictions does not fit (``N × prod(d) × C`` values), so no table is
    kept and the EMA teacher's current per-element prediction on the clean input stands in for the
    previous one: :math:`q_e = (1 - \alpha_t)\, y_e + \alpha_t\, p^{\mathrm{teacher}}_e` for every labelled
    element (ignored elements keep their target; the base loss skips them). Until the teacher's first
    update the target is the hard label, as for an unseen sample. ``teacher="self"`` on dense outputs
    raises at the first step with the table size it would need.

    **Extension (not the paper).** ``teacher="ema"`` stores the prediction of an
    :class:`~lightning_reg.EMATeacher` (any callback with ``teacher_forward``)
    on the clean input instead of the student's (``ctx.teacher_probs``: one teacher forward per step,
    shared with every other consumer, e.g. ELR).
    Until the teacher's first update (its ``has_updated`` is ``False``) the
    student's prediction is stored, unless an input-stage regularizer changed
    the student's input, in which case the teacher is used from the start.

    **Composition.** PS-KD refines ``ctx.current_target()``, whatever the
    refiners before it produced:

    * ``[LabelSmoothing(ε), PSKD(α_T)]``: ``q = (1-α)·LS(y) + α·P_prev``;
    * ``[PSKD(α_T), LabelSmoothing(ε)]``: ``q = (1-ε)·((1-α)·y + α·P_prev) + ε/C``.

    Both orders are valid and deterministic. PS-KD changes only the *base*
    loss's target: ``ctx.labels``/``ctx.given_labels`` stay the hard labels,
    so loss terms that read them are unaffected. With
    :class:`~lightning_reg.ELR`, whose CE part is the module's base loss, that
    CE becomes PS-KD's soft CE, while ELR's own term reads its own table and
    its diagnostics record the given labels. Input-stage regularizers (e.g. :class:`~lightning_reg.Mixup`)
    mix the final target after PS-KD, which is correct for the target, but the
    student's prediction on a mixed input is not any one sample's: so
    ``PSKD(teacher="self")`` with an input-stage regularizer raises at
    ``setup``; ``PSKD(teacher="ema")`` composes with it (the teacher sees the
    clean input). Two ``PSKD`` callbacks also raise at ``setup``.

    Args:
        alpha_T: ``α_T`` in ``[0, 1]``, the final weight of the past predictions (paper: 0.8).
        schedule: The shape of ``α_t / α_T`` over training: ``"linear"`` (the
            paper's ``t / T``) or any :mod:`~lightning_reg.core.schedules` name or instance,
            evaluated as ``schedule(t, T)``; its values must stay in ``[0, 1]``.
        schedule_unit: ``"epoch"`` (the paper: ``t = current_epoch + 1``,
            ``T = max_epochs``) or ``"step"`` (``t`` = the optimizer steps that really ran + 1,
            ``T = trainer.estimated_stepping_batches``).
        teacher: ``"self"`` (the paper) or ``"ema"`` (store the EMA teacher's predictions; see above).
        num_samples: Training-set size; inferred from the train dataloader when ``None``.
        table_dtype: Storage of the table: ``"float32"``, ``"bfloat16"`` or ``"float16"``.
        table_device: ``"auto"`` (the module's device) or ``"cpu"`` (host memory, pinned on CUDA machines).
        topk: Keep only the ``topk`` largest probabilities of each row and spread the
            remaining mass uniformly (``None`` = dense rows). Must be below the number of classes.

    Logged metrics:

    ===========================  ==========================================================
    ``pskd/alpha``                ``α_t``
    ``pskd/target_entropy``       mean entropy (nats) of the labelled samples' (elements') targets
    ``train/loss_base``           the soft-target cross-entropy (logged by the mixin)
    ===========================  ==========================================================

    Example:
        >>> import lightning as L
        >>> trainer = L.Trainer(callbacks=[PSKD(alpha_T=0.8)], max_epochs=300, logger=False)

    YAML::

        trainer:
          max_epochs: 300
          callbacks:
            - class_path: lightning_reg.PSKD
              init_args: {alpha_T: 0.8, table_dtype: bfloat16}
    """

    name = "pskd"
    stage = "target"
    requires_index = True
    #: Dense outputs only with ``teacher="ema"`` (see :meth:`check_layout`).
    layouts = frozenset({"classification", "dense"})
    version = 1

    def __init__(
        self,
        alpha_T: float = 0.8,
        schedule: ScheduleLike = "linear",
        schedule_unit: Literal["epoch", "step"] = "epoch",
        teacher: Literal["self", "ema"] = "self",
        num_samples: int | None = None,
        table_dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        table_device: Literal["auto", "cpu"] = "auto",
        topk: int | None = None,
    ) -> None:
        super().__init__()
        self.alpha_T = check_float("alpha_T", alpha_T, 0.0, 1.0)
        self.schedule = get_schedule(schedule, "schedule")
        self.schedule_unit = check_choice("schedule_unit", schedule_unit, ["epoch", "step"])
        self._clock = StepClock()  # the real optimizer steps drive `schedule_unit="step"`
        self.teacher = check_choice("teacher", teacher, ["self", "ema"])
        self.num_samples = check_optional_int("num_samples", num_samples, low=1)
        self.table_dtype = check_choice("table_dtype", table_dtype, ["float32", "bfloat16", "float16"])
        self.table_device = check_choice("table_device", table_device, ["auto", "cpu"])
        self.topk = check_optional_int("topk", topk, low=1)
        self.table = PerSampleTable(
            num_samples=self.num_samples, dtype=self.table_dtype, device=self.table_device, topk=self.topk
        )
        self._placed = False
        self._pad_to: int | None = None
        self._teacher: TeacherProvider | None = None
        self._total_steps: int | None = None

    # -- setup and composition ------------------------------------------------
    def conflicts_with(self, other: LossRegularizer) -> str | None:
        if isinstance(other, PSKD) and other is not self:
            return "PS-KD owns one table of previous predictions and one progressive target; keep a single `PSKD`"
        if other.stage == "input" and self.teacher == "self":
            return (
                f"`PSKD(teacher='self')` stores the student's prediction as each sample's previous prediction, but"
                f" the input-stage regularizer `{type(other).__name__}` changes the inputs (e.g. mixes samples), so"
                " that prediction would not belong to the sample and the table would be corrupted. Use"
                " `PSKD(teacher='ema')` with an `EMATeacher` (the teacher runs on the clean input), or remove one of"
                " them"
            )
        return super().conflicts_with(other)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        self._total_steps = None
        if self.schedule_unit == "epoch" and (trainer.max_epochs is None or trainer.max_epochs <= 0):
            raise ValueError(
                "`PSKD(schedule_unit='epoch')` ramps α_t over `Trainer(max_epochs=...)`, but the trainer has"
                f" max_epochs={trainer.max_epochs}. Set `max_epochs`, or use `PSKD(schedule_unit='step')` with"
                " `max_steps`."
            )
        if self.teacher == "ema":
            self._teacher = find_teacher(trainer)
            if self._teacher is None:
                raise ValueError(
                    "`PSKD(teacher='ema')` stores the EMA teacher's predictions, but the trainer has no callback with"
                    " `teacher_forward`. Add `EMATeacher(...)` to the callbacks, or use `PSKD(teacher='self')`."
                )

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._clock.start(trainer)  # the real optimizer steps (skipped steps not counted)

    # -- schedule -------------------------------------------------------------
    def current_alpha(self, trainer: Trainer) -> float:
        """``α_t = α_T · schedule(t, T)`` for the trainer's current epoch (or step); a Python float."""
        if self.schedule_unit == "epoch":
            t, total = trainer.current_epoch + 1, int(trainer.max_epochs or 1)
        else:
            if self._total_steps is None:
                est = trainer.estimated_stepping_batches
                if not 0 < est < float("inf"):
                    raise ValueError(
                        "`PSKD(schedule_unit='step')` needs a finite number of training steps; set `max_steps` or"
                        " `max_epochs` on the Trainer."
                    )
                self._total_steps = int(est)
            t, total = optimizer_steps(trainer) + 1, self._total_steps
        alpha = self.alpha_T * self.schedule(t, total)
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"`PSKD` needs α_t in [0, 1], but its schedule gave {alpha!r} at t={t} of {total}.")
        return alpha

    # -- the target stage -------------------------------------------------------
    def check_layout(self, ctx: StepContext) -> None:
        """Refuse dense outputs with ``teacher="self"``: say the per-element table size and the fix."""
        if ctx.is_dense and self.teacher == "self":
            raise per_element_table_error(
                "PSKD(teacher='self')",
                ctx,
                self.num_samples or self.table.num_samples,
                "previous predictions",
                "Use `PSKD(teacher='ema')` with an `EMATeacher` in the callbacks (e.g. `callbacks=[EMATeacher("
                "decay=0.999), PSKD(teacher='ema')]`): on dense outputs the EMA teacher's per-element prediction"
                " stands in for the previous one, with no table.",
                dtype=self.table_dtype,
                topk=self.topk,
            )
        super().check_layout(ctx)

    def _ensure_table(self, trainer: Trainer, ctx: StepContext) -> None:
        if self._placed:
            return
        assert ctx.logits is not None
        n = self.num_samples if self.num_samples is not None else infer_num_samples(trainer, "PSKD")
        self.table.allocate(n, ctx.num_classes, device=ctx.logits.device)
        self._pad_to = train_batch_size(trainer)  # DDP: rows padded to it, so the gather needs no size exchange
        self._placed = True

    def _teacher_ready(self, ctx: StepContext) -> bool:
        teacher = self._teacher
        if self.teacher != "ema" or teacher is None:
            return False
        # Before its first update the teacher holds the initial weights: use the student's prediction instead,
        # unless an input-stage regularizer changed the input the student saw.
        return bool(getattr(teacher, "has_updated", True)) or ctx.x is not ctx.extras.get("clean_x")

    def _predictions(self, ctx: StepContext) -> Tensor:
        """The rows to store for this step: the student's (default) or the EMA teacher's probabilities."""
        if self._teacher_ready(ctx):
            assert self._teacher is not None
            ctx.clean_input("PSKD(teacher='ema')")  # a clear error if no input was given
            return ctx.teacher_probs(self._teacher)
        return ctx.probs()

    def refine_target(self, ctx: StepContext) -> None:
        if not ctx.training:  # sanity check, validation, test: no targets to refine, no table reads or writes
            return
        trainer = ctx.module.trainer
        assert ctx.logits is not None
        alpha = self.current_alpha(trainer)
        ctx.logs[f"{self.name}/alpha"] = alpha
        if ctx.is_dense:
            self._refine_dense(ctx, alpha)
        else:
            self._refine_with_table(ctx, alpha, trainer)

    def _refine_with_table(self, ctx: StepContext, alpha: float, trainer: Trainer) -> None:
        index = ctx.require_index("PSKD")
        self._ensure_table(trainer, ctx)
        assert ctx.logits is not None
        current = ctx.current_target()
        given = ctx.given_labels
        n = ctx.num_labeled
        part = n is not None and n < ctx.batch_size
        if part:  # a semi-supervised batch: the labeled rows come first (a static slice, no host sync)
            index, given = index[:n], given[:n]
        keep = given != ctx.ignore_index  # unlabeled samples of a single loader carry `ignore_index`
        # Read the previous predictions first, then overwrite them with this step's.
        prev, seen = self.table.read(index, device=ctx.logits.device)
        refined = pskd_soft_targets(current[:n] if part else current, prev, alpha, seen & keep)
        ctx.target = torch.cat([refined, current[n:].float()]) if part else refined
        preds = self._predictions(ctx)
        preds = preds[:n] if part else preds
        # Rows with a non-finite value are not written (PerSampleTable.write): NaN rows skip unlabeled samples.
        skip = torch.full((), float("nan"), device=preds.device)
        self.table.write(index, torch.where(keep[:, None], preds, skip), strategy=trainer.strategy, pad_to=self._pad_to)
        ctx.logs[f"{self.name}/target_entropy"] = target_entropy(refined, valid=keep)

    def _refine_dense(self, ctx: StepContext, alpha: float) -> None:
        """Dense outputs: the EMA teacher's per-element prediction stands in for the previous one (no table)."""
        self.check_layout(ctx)  # teacher="self" refuses (also when called outside the pipeline)
        dim = ctx.class_dim
        current = ctx.current_target()
        if self._teacher_ready(ctx):
            assert self._teacher is not None
            ctx.clean_input("PSKD(teacher='ema')")
            target = pskd_soft_targets(current, ctx.teacher_probs(self._teacher), alpha, ctx.valid, dim=dim)
            ctx.target = target
        else:
            target = current.float()  # before the teacher's first update: the hard label, as an unseen sample's
        ctx.logs[f"{self.name}/target_entropy"] = target_entropy(target, valid=ctx.valid, dim=dim)

    # -- state ------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"version": self.version, "table": self.table.state_dict(), "optimizer_steps": self._clock.state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        check_choice("version", state_dict.get("version"), [self.version])
        self.table.load_state_dict(state_dict["table"])
        self._clock.load(state_dict.get("optimizer_steps"))
        self._placed = False
