"""``ELR``: early-learning regularization against noisy labels, with label-noise diagnostics."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor

from lightning_reg.callbacks._per_element import per_element_table_error
from lightning_reg.core.protocol import (
    LossRegularizer,
    StepContext,
    TeacherProvider,
    find_teacher,
    infer_num_samples,
    regularizers_of,
)
from lightning_reg.core.schedules import ScheduleLike, get_schedule
from lightning_reg.core.steps import StepClock, optimizer_steps
from lightning_reg.core.table import PerSampleTable, train_batch_size
from lightning_reg.core.validation import check_choice, check_float, check_int, check_optional_int
from lightning_reg.functional.cutmix import paste_box
from lightning_reg.functional.elr import (
    elr_clamp,
    elr_mixed_targets,
    elr_regularizer,
    elr_teacher_targets,
    elr_updated_targets,
)
from lightning_reg.metrics.noise import SuspectedLabels, label_noise_scores, suspected_mislabeled, write_suspected_csv

__all__ = ["ELR"]


class ELR(LossRegularizer):
    r"""Early-learning regularization (Liu et al., NeurIPS 2020): resist memorizing noisy labels.

    Every training step, for the batch's samples (dataset indices ``i``), it

    1. computes :math:`p_i = \mathrm{clamp}(\mathrm{softmax}(z_i), 10^{-4}, 1-10^{-4})`;
    2. updates the per-sample temporal-ensemble target
       :math:`t_i \leftarrow \beta t_i + (1-\beta)\,\hat p_i / \sum_c \hat p_{ic}`
       (:math:`\hat p` detached; :math:`t` starts at zero);
    3. adds :math:`\lambda_t \cdot \frac1B \sum_i \log(1 - \langle t_i, p_i\rangle)` to the loss, using the
       targets just updated (as the reference code does). The gradient flows through :math:`p` only.

    The cross-entropy is the module's base loss (``train/loss_base``); ELR's
    term is logged separately as ``train/loss_elr``. **The term is negative**
    (it approaches :math:`\lambda \log 10^{-4} \approx -9.2\lambda` as the model agrees with its
    targets), so the total ``train/loss`` goes negative and must not be used
    for early stopping or checkpoint selection; monitor ``train/loss_base`` or
    a validation metric instead.

    The targets live in a :class:`~lightning_reg.PerSampleTable`: they are
    checkpointed (the reference code loses them on resume), synchronised
    across DDP ranks (every rank holds the same table, equal to one process
    that saw the same samples), and can be stored compactly
    (``table_dtype``, ``topk``, ``table_device``). The given labels and visit
    counts are kept in a second, ``N × 2`` table, so :meth:`suspected_labels`,
    :meth:`write_suspected_csv` and :meth:`diagnostics` work after training
    with no extra input.

    **ELR+ extensions** (off by default; Liu et al., Sec. 4.2 and Appendix):

    * ``teacher="ema"``: the target update uses the predictions of the
      :class:`~lightning_reg.EMATeacher` on the un-mixed input (``ctx.teacher_probs``: one teacher
      forward per step, shared with every other consumer such as PS-KD or consistency), instead of
      the student's own. Until the teacher's first update (its ``has_updated`` is ``False``) the
      student's predictions are used.
    * ``lam_schedule="sigmoid_rampup"`` (any shared schedule) ramps
      :math:`\lambda_t = \lambda \cdot s(\text{step or epoch}, \text{ramp\_length})`.
    * With :class:`~lightning_reg.Mixup` before it (``ctx.extras["mixup"] = (π, λ_mix)``),
      the term uses the mixed target :math:`\lambda_\text{mix} t_i + (1-\lambda_\text{mix}) t_{\pi(i)}`
      against the prediction on the mixed input, as ELR+ does, while the
      table is updated from predictions on the *clean* input. The student's
      predictions on a mixed input say nothing about one sample, so mixup
      (and any input-stage regularizer) requires ``teacher="ema"`` (a clear error at ``setup`` otherwise).
      :class:`~lightning_reg.CutMix` works the same: in classification the target is mixed with the kept
      share :math:`\lambda'`, on dense outputs the teacher's per-element target is pasted with CutMix's box.
      Before the teacher's first update, the clean predictions then come from
      one extra no-grad forward pass of the student.

    **Training steps only.** Only training steps (``ctx.training``) read or write the table. Called from
    ``validation_step``/``test_step`` or during the sanity check (``regularized_loss`` there), ELR adds no
    term (``None``) and touches nothing: validation indices are not training indices, so reading the table
    by them would be meaningless. The table is allocated at the first training step, so ``num_samples`` may
    be left to inference even when the sanity check runs the pipeline.

    **Unlabeled samples** (semi-supervised batches; labels equal to ``ignore_index``) never touch the
    table, the visit counts or the stored labels, and the term is the mean over the *labelled* samples.
    A ``CombinedLoader`` batch (``ctx.num_labeled`` rows labeled, first) is sliced statically; in a single
    loader the unlabeled rows are masked (no host sync). The table then only needs the labeled samples'
    indices (e.g. ``num_samples`` = the labeled set's size when they come first).

    **Dense outputs** (``(B, C, *d)`` segmentation, ``(B, T, C)`` tokens) need ``teacher="ema"``: a
    per-element table does not fit (``N × prod(d) × C`` values), so no per-sample table is kept and each
    element's target is the EMA teacher's clamped, normalised prediction
    :math:`t_e = \hat p^{\mathrm{teacher}}_e / \sum_c \hat p^{\mathrm{teacher}}_{ec}` (ELR+-style: the
    teacher's weights are the temporal ensemble). The term is
    :math:`\lambda_t \cdot \frac{1}{|V|}\sum_{e \in V} \log(1 - \langle t_e, p_e\rangle)` over the labelled
    elements :math:`V`; ignored pixels, padding tokens and unlabeled images add nothing and get zero
    gradient. Until the teacher's first update the student's own detached prediction is the target.
    ``teacher="none"`` on dense outputs raises at the first step with the table size it would need.
    The diagnostics (:meth:`suspected_labels`, ...) need the table, so they are classification-only.

    Args:
        beta: The temporal-ensembling momentum :math:`\beta \in [0, 1)`; the paper uses 0.7 (CIFAR-10
            symmetric noise) or 0.9 (asymmetric noise, CIFAR-100) and finds it robust.
        lam: The weight :math:`\lambda \ge 0`; 3 (CIFAR-10 symmetric), 1 (asymmetric), 7 (CIFAR-100).
            It needs tuning.
        num_samples: The training-set size (rows of the table); inferred from the train dataloader if ``None``.
        lam_schedule: A multiplier on ``lam``: ``"constant"`` (default), ``"sigmoid_rampup"`` (ELR+),
            or any :mod:`~lightning_reg.core.schedules` name or instance.
        ramp_length: The schedule's length in ``ramp_unit`` (``None``: the whole run; 0: no ramp).
        ramp_unit: ``"epoch"`` (Lightning's ``current_epoch``) or ``"step"`` (the optimizer steps that really
            ran, :func:`~lightning_reg.core.steps.optimizer_steps`, as ELR+'s ``coef_step``).
        teacher: ``"none"`` (the student's own predictions update the targets) or ``"ema"`` (ELR+).
        table_dtype: Storage dtype of the targets: ``"float32"``, ``"bfloat16"`` or ``"float16"``.
        table_device: ``"auto"`` (the module's device), ``"cpu"`` (host memory) or a device string.
        topk: Store only the ``topk`` largest entries of each target row (``None``: dense).

    Compact storage (``table_dtype="bfloat16"``/``"float16"`` or ``topk``)
    stores each target normalised, :math:`\hat t_i = t_i / \sum_c t_{ic}`, a
    probability vector as the top-k mode requires, and rebuilds
    :math:`t_i = (1 - \beta^{n_i})\,\hat t_i / \sum_c \hat t_{ic}` from the
    sample's visit count :math:`n_i` (a dense target sums to exactly
    :math:`1 - \beta^{n_i}`). The rebuilt row sums to :math:`1 - \beta^{n_i} < 1`
    whatever the rounding, so :math:`1 - \langle t, p\rangle` stays positive. The
    only error left is the storage's: about :math:`2^{-8}` relative per entry
    for bf16, and for top-k the dropped classes share their mass uniformly.

    Logged metrics:

    =====================  =======================================================================
    ``train/loss_elr``      the ELR term (negative; logged by the mixin)
    ``train/loss_base``     the cross-entropy (logged by the mixin)
    ``elr/lam``             the current weight :math:`\lambda_t`
    ``elr/disagreement``    fraction of the labelled samples (elements) whose target argmax differs
                            from the given label
    =====================  =======================================================================

    Example:
        >>> import lightning as L
        >>> trainer = L.Trainer(callbacks=[ELR(beta=0.7, lam=3.0)], logger=False)

    YAML::

        trainer:
          callbacks:
            - class_path: lightning_reg.ELR
              init_args: {beta: 0.7, lam: 3.0}
    """

    name = "elr"
    stage = "loss"
    requires_index = True
    #: Dense outputs only with ``teacher="ema"`` (see :meth:`check_layout`).
    layouts = frozenset({"classification", "dense"})
    version = 1

    def __init__(
        self,
        beta: float = 0.7,
        lam: float = 3.0,
        num_samples: int | None = None,
        lam_schedule: ScheduleLike = "constant",
        ramp_length: int | None = None,
        ramp_unit: Literal["epoch", "step"] = "epoch",
        teacher: Literal["none", "ema"] = "none",
        table_dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        table_device: str = "auto",
        topk: int | None = None,
    ) -> None:
        super().__init__()
        self.beta = check_float("beta", beta, 0.0, 1.0, high_inclusive=False)
        self.lam = check_float("lam", lam, 0.0)
        self.num_samples = check_optional_int("num_samples", num_samples, low=1)
        self.lam_schedule = get_schedule(lam_schedule, "lam_schedule")
        self.ramp_length = None if ramp_length is None else check_int("ramp_length", ramp_length, low=0)
        self.ramp_unit = check_choice("ramp_unit", ramp_unit, ["epoch", "step"])
        self.teacher = check_choice("teacher", teacher, ["none", "ema"])
        self.table_dtype = check_choice("table_dtype", table_dtype, ["float32", "bfloat16", "float16"])
        if not isinstance(table_device, str):
            raise TypeError(f"Expected argument `table_device` to be a str, but got {table_device!r}.")
        self.table_device = table_device
        self.topk = check_optional_int("topk", topk, low=1)
        self.table = PerSampleTable(
            self.num_samples, dtype=self.table_dtype, device=self.table_device, topk=self.topk, fill=0.0
        )
        # Per sample: [given label, visits]. The labels let the diagnostics run with no extra input; the visit
        # count n restores a compactly stored (normalised) target t = (1 - beta^n) t_hat. fp32 holds both exactly.
        self.meta = PerSampleTable(self.num_samples, 2, dtype="float32", device=self.table_device, fill=0.0)
        self._teacher: TeacherProvider | None = None
        self._ramp_total: float | None = None
        self._global_rank = 0
        self._ready = False
        self._pad_to: int | None = None
        self._clock = StepClock()  # the real optimizer steps drive `ramp_unit="step"`
        self._compact = self.table_dtype != "float32" or self.topk is not None

    # -- setup ----------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._global_rank = int(trainer.global_rank)
        self._ready = False
        self._teacher = None
        if self.teacher == "ema":
            self._teacher = find_teacher(trainer)
            if self._teacher is None:
                raise ValueError(
                    "`ELR(teacher='ema')` computes its targets with an EMA teacher, but the Trainer has no callback"
                    " with `teacher_forward`. Add one, e.g. `callbacks=[EMATeacher(decay=0.997), ELR(teacher='ema')]`,"
                    " or use `teacher='none'`."
                )
        else:
            mixer = next((r for r in regularizers_of(trainer) if r.stage == "input"), None)
            if mixer is not None:  # Mixup, CutMix: the student's predictions are not any one sample's
                other = type(mixer).__name__
                raise ValueError(
                    f"`ELR` with `{other}` needs predictions on the un-mixed inputs to update its per-sample targets"
                    " (the student only sees mixed inputs), as in ELR+. Use `ELR(teacher='ema')` together with an"
                    f" `EMATeacher`, or remove `{other}`."
                )

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._clock.start(trainer)  # the real optimizer steps (skipped steps not counted)
        self._ramp_total = None
        if self.ramp_length is not None:
            self._ramp_total = float(self.ramp_length)
        elif self.ramp_unit == "epoch":
            self._ramp_total = float(max(int(trainer.max_epochs or 1), 1))
        else:
            self._ramp_total = float(trainer.estimated_stepping_batches)

    # -- schedule -------------------------------------------------------------
    def current_lam(self, trainer: Trainer) -> float:
        r""":math:`\lambda_t = \lambda \cdot` ``lam_schedule(position, ramp_length)``: a pure function of the step."""
        position = optimizer_steps(trainer) if self.ramp_unit == "step" else trainer.current_epoch
        total = self._ramp_total
        if total is None:
            total = float(self.ramp_length) if self.ramp_length is not None else float(trainer.max_epochs or 1)
        return self.lam * self.lam_schedule(position, total)

    # -- the step -------------------------------------------------------------
    def _allocate(self, trainer: Trainer, ctx: StepContext) -> None:
        """Create (or move a loaded) table once per fit, when the number of classes is known."""
        if self._ready:
            return
        assert ctx.logits is not None
        n = self.num_samples or self.table.num_samples or infer_num_samples(trainer, type(self).__name__)
        self.table.allocate(n, ctx.num_classes, device=ctx.logits.device)
        self.meta.allocate(n, 2, device=ctx.logits.device)
        self._pad_to = train_batch_size(trainer)  # DDP: rows padded to it, so the gather needs no size exchange
        self._ready = True

    def check_layout(self, ctx: StepContext) -> None:
        """Refuse dense outputs with ``teacher="none"``: say the per-element table size and the fix."""
        if ctx.is_dense and self.teacher == "none":
            raise per_element_table_error(
                "ELR(teacher='none')",
                ctx,
                self.num_samples or self.table.num_samples,
                "temporal-ensemble targets",
                "Use `ELR(teacher='ema')` with an `EMATeacher` in the callbacks (e.g. `callbacks=[EMATeacher("
                "decay=0.999), ELR(teacher='ema')]`): on dense outputs its target is the EMA teacher's per-element"
                " prediction (ELR+'s temporal ensemble), with no table.",
                dtype=self.table_dtype,
                topk=self.topk,
            )
        super().check_layout(ctx)

    def _clean_probs(self, ctx: StepContext) -> Tensor:
        """Detached fp32 predictions on the clean input: the teacher's once it has updated, else the student's."""
        teacher = self._teacher
        if teacher is not None and getattr(teacher, "has_updated", True):
            ctx.clean_input("ELR(teacher='ema')")  # a clear error if no input was given
            return ctx.teacher_probs(teacher)
        if "mixup" in ctx.extras or "cutmix" in ctx.extras:
            if self.teacher == "none":
                raise RuntimeError(
                    "`ELR` got a mixed batch (`ctx.extras['mixup']` or `['cutmix']`) but has no teacher for"
                    " predictions on the clean inputs. Use `ELR(teacher='ema')` with an `EMATeacher`."
                )
            return ctx.student_clean_probs("ELR")  # before the teacher's first update: the student, clean input
        return ctx.probs()

    @staticmethod
    def _mixed_like_input(ctx: StepContext, target: Tensor) -> Tensor:
        """Mix the (whole batch's) target as the input stage mixed the inputs: Mixup, or CutMix's box."""
        mix = ctx.extras.get("mixup")
        if mix is not None:
            perm, mix_lam = mix
            target = elr_mixed_targets(target, perm, mix_lam)
        cut = ctx.extras.get("cutmix")
        if cut is not None:
            perm, box, kept = cut
            target = paste_box(target, perm, box) if ctx.is_dense else elr_mixed_targets(target, perm, kept)
        return target

    def loss_term(self, ctx: StepContext) -> Tensor | None:
        if not ctx.training:
            # Sanity check, validation, test: no term, and the table is neither read nor written (the batch's
            # indices are not training indices).
            return None
        assert ctx.logits is not None
        trainer = ctx.module.trainer
        lam_t = self.current_lam(trainer)
        ctx.logs[f"{self.name}/lam"] = lam_t
        if ctx.is_dense:
            return self._dense_term(ctx, lam_t)
        return self._table_term(ctx, lam_t, trainer)

    def _table_term(self, ctx: StepContext, lam_t: float, trainer: Trainer) -> Tensor:
        """Classification: update the labelled samples' rows, then the term over the labelled samples."""
        assert ctx.logits is not None
        index = ctx.require_index(type(self).__name__)
        self._allocate(trainer, ctx)
        strategy = trainer.strategy
        logits, given = ctx.logits, ctx.given_labels
        probs = elr_clamp(self._clean_probs(ctx))
        n, batch = ctx.num_labeled, ctx.batch_size
        part = n is not None and n < batch
        if part:  # a semi-supervised batch: the labeled rows come first (a static slice, no host sync)
            index, logits, probs, given = index[:n], logits[:n], probs[:n], given[:n]
        keep = given != ctx.ignore_index  # unlabeled samples of a single loader carry `ignore_index`
        dev = logits.device
        old, _ = self.table.read(index, device=dev)
        meta, _ = self.meta.read(index, device=dev)
        visits = meta[:, 1]
        if self._compact:  # stored normalised: t = (1 - beta^n) * t_hat / sum(t_hat)
            scale = (1.0 - torch.pow(self.beta, visits)) / old.sum(dim=-1).clamp_min(1e-12)
            old = old * scale.unsqueeze(-1)
        new = elr_updated_targets(old, probs, self.beta)
        stored = new / new.sum(dim=-1, keepdim=True) if self._compact else new
        # Rows with a non-finite value are not written (PerSampleTable.write): NaN rows skip unlabeled samples.
        skip = torch.full((), float("nan"), device=dev)
        counted = (torch.isfinite(new).all(dim=-1) & keep).to(visits.dtype)  # the table keeps a non-finite row's old
        rows = torch.stack([given.to(new), visits + counted], dim=-1)
        # Both tables' rows from every rank in ONE all-gather, padded to the loader's batch size (no host sync).
        gathered, (t_rows, m_rows) = PerSampleTable.gather(
            strategy,
            index,
            torch.where(keep[:, None], stored, skip),
            torch.where(keep[:, None], rows, skip),
            pad_to=self._pad_to,
        )
        self.table.write_gathered(gathered, t_rows)
        self.meta.write_gathered(gathered, m_rows)
        target = torch.where(keep[:, None], new, torch.zeros((), device=dev))  # unlabeled rows have no target
        if "mixup" in ctx.extras or "cutmix" in ctx.extras:
            if part:  # a labeled row mixed with an unlabeled one mixes with a zero target
                assert n is not None
                full = torch.cat([target, target.new_zeros(batch - n, target.shape[1])])
                target = self._mixed_like_input(ctx, full)[:n]
            else:
                target = self._mixed_like_input(ctx, target)
        disagree = (new.argmax(dim=-1) != given) & keep
        ctx.logs[f"{self.name}/disagreement"] = disagree.float().sum() / keep.sum().clamp_min(1)
        return elr_regularizer(logits, target, lam=lam_t, valid=keep)

    def _dense_term(self, ctx: StepContext, lam_t: float) -> Tensor:
        """Dense outputs: the EMA teacher's per-element prediction is the target; no table (ELR+-style)."""
        assert ctx.logits is not None
        self.check_layout(ctx)  # teacher="none" refuses (also when called outside the pipeline)
        dim = ctx.class_dim
        # The teacher saw the clean input: paste its per-element target like CutMix pasted the input.
        target = self._mixed_like_input(ctx, elr_teacher_targets(self._clean_probs(ctx), dim=dim))
        valid = ctx.valid  # after CutMix: the pasted label map's labelled pixels
        disagree = (target.argmax(dim=dim) != ctx.given_labels) & valid
        ctx.logs[f"{self.name}/disagreement"] = disagree.float().sum() / valid.sum().clamp_min(1)
        return elr_regularizer(ctx.logits, target, lam=lam_t, dim=dim, valid=valid)

    # -- diagnostics ----------------------------------------------------------
    def _require_table(self) -> None:
        if not self.table.is_allocated or not self.meta.is_allocated:
            raise RuntimeError(
                "`ELR` has no targets yet: train (or load a checkpoint) first. It keeps no per-sample targets for"
                " dense outputs (their targets come from the EMA teacher), so these diagnostics are"
                " classification-only."
            )

    @property
    def targets(self) -> Tensor:
        """The ``(N, C)`` fp32 ELR targets ``t`` (a dense copy; zeros for samples never seen)."""
        self._require_table()
        t = self.table.dense()
        if self._compact:
            visits = self.meta.dense()[:, 1].to(t.device)
            t = t * ((1.0 - torch.pow(self.beta, visits)) / t.sum(dim=-1).clamp_min(1e-12)).unsqueeze(-1)
        return t

    @property
    def given_labels(self) -> Tensor:
        """The ``(N,)`` labels training saw (``-1`` for samples never seen)."""
        self._require_table()
        labels = self.meta.dense()[:, 0].long()
        return torch.where(self.seen.to(labels.device), labels, torch.full_like(labels, -1))

    @property
    def visits(self) -> Tensor:
        """The ``(N,)`` number of target updates of each sample (``n``: its target sums to ``1 - β^n``)."""
        self._require_table()
        return self.meta.dense()[:, 1].long()

    @property
    def seen(self) -> Tensor:
        """``(N,)`` bool: samples that have a target and a stored label."""
        self._require_table()
        assert self.table.seen is not None and self.meta.seen is not None
        return self.table.seen & self.meta.seen.to(self.table.seen.device)

    def suspected_labels(self, min_confidence: float = 0.0) -> SuspectedLabels:
        """Samples whose ELR target's argmax differs from the given label, most confident first.

        Args:
            min_confidence: Keep only suspects whose normalised target gives the suggested label at least this
                probability.
        """
        self._require_table()
        return suspected_mislabeled(self.targets, self.given_labels.clamp_min(0), self.seen, min_confidence)

    def write_suspected_csv(
        self, path: str | Path, min_confidence: float = 0.0, class_names: list[str] | None = None
    ) -> int:
        """Write :meth:`suspected_labels` as CSV (``index,given_label,suggested_label,confidence``).

        Under DDP only global rank zero writes (every rank holds the same table).

        Returns:
            The number of rows written (0 on the other ranks).
        """
        suspects = self.suspected_labels(min_confidence)
        if self._global_rank != 0:
            return 0
        return write_suspected_csv(path, suspects, class_names)

    def diagnostics(self, noise_mask: Tensor | None = None, predictions: Tensor | None = None) -> dict[str, float]:
        """Label-noise scores of the targets (see :mod:`lightning_reg.metrics.noise`), over the seen samples.

        Args:
            noise_mask: ``(N,)`` bool, ``True`` where the given label is wrong (when known).
            predictions: ``(N,)`` classes or ``(N, C)`` scores of the model on the training set.
        """
        seen = self.seen
        targets, labels = self.targets, self.given_labels
        dev = targets.device
        mask = None if noise_mask is None else noise_mask.to(dev)[seen]
        preds = None if predictions is None else predictions.to(dev)[seen]
        scores = label_noise_scores(targets[seen], labels[seen], mask, preds)
        return {k: float(v) for k, v in scores.items()}

    # -- state ----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "targets": self.table.state_dict(),
            "meta": self.meta.state_dict(),
            "optimizer_steps": self._clock.state(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("version") != self.version:
            raise ValueError(
                f"Expected an `ELR` state of version {self.version}, but got {state_dict.get('version')!r}."
            )
        self.table.load_state_dict(state_dict["targets"])
        self.meta.load_state_dict(state_dict["meta"])
        self._clock.load(state_dict.get("optimizer_steps"))
        self._ready = False
