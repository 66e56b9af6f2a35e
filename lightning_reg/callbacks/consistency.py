"""``NoisyLabelConsistency`` (consistency term) and ``LabelCorrection`` (ADELE-style label correction).

Two callbacks, because they run in two different stages of the
:class:`~lightning_reg.RegularizedModule` pipeline: the consistency term is a
loss term (stage ``"loss"``), while label correction must change the labels
*before* the base loss and the target refiners see them (stage ``"label"``).
A :class:`~lightning_reg.core.protocol.LossRegularizer` runs in exactly one
stage, and the two are useful apart (label correction needs sample indices and
keeps a per-sample table; the consistency term needs neither and also helps
without noisy labels), so each is its own callback; ADELE is both together.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor

from lightning_reg.augment import Augmentation, AugmentationLike, get_augmentation
from lightning_reg.core.protocol import LossRegularizer, StepContext, TeacherProvider, find_teacher, infer_num_samples
from lightning_reg.core.schedules import ScheduleLike, get_schedule
from lightning_reg.core.table import PerSampleTable
from lightning_reg.core.validation import check_choice, check_float, check_int, check_optional_int
from lightning_reg.functional.consistency import (
    adele_multiscale_consistency,
    class_agreement_counts,
    class_iou,
    confidence_mask,
    consistency_loss,
    end_of_early_learning,
    sharpen,
)

__all__ = ["LabelCorrection", "NoisyLabelConsistency"]

_TEACHER_PROBS = "consistency/teacher_probs_clean"
_STUDENT_PROBS = "consistency/student_probs_clean"


def _clean_input(ctx: StepContext, who: str) -> Tensor:
    """The batch's input before the input stage (mixup), which the teacher and the views start from."""
    x = ctx.extras.get("clean_x", ctx.x)
    if x is None:
        raise ValueError(
            f"`{who}` runs extra forward passes on the batch's input, but none was given. Pass it to"
            " `self.regularized_loss(logits, y, index, x=x)` from your `training_step`."
        )
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(
            f"`{who}` augments and forwards the input, so it must be a floating-point tensor, but got"
            f" {type(x).__name__ if not isinstance(x, Tensor) else x.dtype}. Convert it in your dataset, or write"
            " an `Augmentation` subclass for your input type."
        )
    return x


def _student_clean_probs(ctx: StepContext, who: str) -> Tensor:
    """The student's detached fp32 probabilities on the clean input, without an extra forward when possible."""
    clean = _clean_input(ctx, who)
    if ctx.x is clean:
        return ctx.probs()
    cached = ctx.extras.get(_STUDENT_PROBS)
    if cached is None:  # an input-stage regularizer changed the input: one no-grad forward on the clean one
        with torch.no_grad():
            cached = torch.softmax(ctx.module(clean).detach().float(), dim=-1)
        ctx.extras[_STUDENT_PROBS] = cached
    return cached


def _teacher_clean_probs(ctx: StepContext, teacher: TeacherProvider, who: str) -> Tensor:
    """The teacher's fp32 probabilities on the clean input, computed once per step and shared."""
    cached = ctx.extras.get(_TEACHER_PROBS)
    if cached is None:
        with torch.no_grad():
            cached = torch.softmax(teacher.teacher_forward(_clean_input(ctx, who)).detach().float(), dim=-1)
        ctx.extras[_TEACHER_PROBS] = cached
    return cached


def _teacher_ready(teacher: TeacherProvider | None) -> bool:
    return teacher is not None and bool(getattr(teacher, "has_updated", True))


class NoisyLabelConsistency(LossRegularizer):
    r"""Consistency regularization against label noise: agree with a stop-gradient target on perturbed views.

    Two forms of the term. ``form="target"`` (the default; UDA, Mean Teacher, MIC) pulls every view towards a
    stop-gradient target:

    .. math:: \mathcal L_\text{cons} = w(t)\cdot\frac1B\sum_i m_i\,
              D\!\left(\mathrm{sg}(q_i)\,\|\,p(\tilde x_i)\right),\qquad
              m_i = \mathbb 1[\max_c q_{ic} \ge \text{threshold}]

    ``form="adele"`` is ADELE's official multi-scale term (``calc_jsd_multiscale``,
    :func:`~lightning_reg.functional.consistency.adele_multiscale_consistency`): every view and their mean
    :math:`\bar p = \mathrm{clip}(\sum_s w_s p_s, 10^{-3}, 1 - 10^{-3})` pull on each other, with gradients
    through :math:`\bar p`, no sharpening and the KL summed over the views:

    .. math:: \mathcal L_\text{cons} = w(t)\cdot\frac1B\sum_i m_i \sum_s
              \mathrm{KL}\!\left(p(x_{s,i}) \,\|\, \bar p_i\right),\qquad
              m_i = \mathbb 1[\max_c \bar p_{ic} \ge \text{threshold}]

    In both, the mean is over *all* samples, masked ones included. Papers: UDA
    https://arxiv.org/abs/1904.12848 (``τ = 0.4``, threshold 0.8, KL), Mean
    Teacher https://arxiv.org/abs/1703.01780 (EMA teacher, sigmoid ramp-up,
    softmax MSE), MIC https://arxiv.org/abs/2212.01322 (patch masking, EMA
    teacher), ADELE https://arxiv.org/abs/2110.03740 (multi-scale views,
    threshold 0.8). Functional core: :mod:`lightning_reg.functional.consistency`.

    **The target** :math:`q_i` of ``form="target"`` (fp32, detached):

    * ``teacher="self"`` (UDA, Π-model): the student's own prediction on the
      clean input. When the pipeline forwarded the clean input (no input-stage
      regularizer such as mixup changed it) the step's logits are reused, so
      there is no extra forward. With a multi-view augmentation
      (:class:`~lightning_reg.augment.MultiScale`) the target is ADELE's
      (weighted) mean of the student's predictions over the views.
    * ``teacher="ema"`` (Mean Teacher, MIC): the prediction of the trainer's
      :class:`~lightning_reg.EMATeacher` (any callback with ``teacher_forward``)
      on the clean input. Without one, ``setup`` raises. Until the teacher's
      first update (its ``has_updated`` is ``False``) it holds the initial
      weights, so the target falls back to ``teacher="self"``.
    * ``weak_augmentation``: if set, the teacher (or the student, under no-grad)
      sees this weakly augmented view instead of the clean input (UDA's weak view).

    Then :math:`m_i` is computed on :math:`q_i` (before sharpening, as UDA),
    and :math:`q_i` is sharpened with temperature ``τ`` (``τ = 1``: none).

    **ADELE's form** (``form="adele"``) needs no target: the views are the
    augmentation's views (:class:`~lightning_reg.augment.MultiScale`'s scales;
    a single-view augmentation is compared with the clean input, each weighing
    1/2 in :math:`\bar p`). It uses neither ``teacher="ema"``, a
    ``weak_augmentation``, a ``temperature`` other than 1, nor
    ``divergence="mse"``; giving one raises a ``ValueError``.

    **The student's views** :math:`\tilde x_i` come from ``augmentation``
    (a :mod:`lightning_reg.augment` class, or a short name) applied to the
    clean batch on its device, and are forwarded through the LightningModule
    inside the training step: under the same autocast as the main forward, and
    in the same DDP forward, so DDP's reducer sees one graph (no unused
    parameters, one all-reduce). In ``form="target"`` multi-view augmentations give
    :math:`\sum_s w_s D(q \| p(x_s))`; the scale-1 view *is* the clean input,
    so its forward is the step's own (with gradients, as in ADELE).

    Outside training steps (validation, test, the sanity check) the term is
    computed the same way if the pipeline runs; the callback keeps no state, so
    nothing changes.

    **The weight** :math:`w(t) = \text{weight}\cdot\text{rampup}(t, \text{rampup\_epochs})` with ``t`` the
    fractional epoch (``global_step`` / optimizer steps per epoch); the default
    is Mean Teacher's :math:`e^{-5(1 - t/T)^2}`.

    Cost per step: one extra forward with gradients per view (the method's
    inherent cost), plus one no-grad teacher forward for ``teacher="ema"`` or a
    weak view.

    Args:
        form: ``"target"`` (pull each view towards a stop-gradient target; UDA, Mean Teacher, MIC) or
            ``"adele"`` (ADELE's official multi-scale term; use it with ``augmentation=MultiScale()``).
        teacher: ``"self"`` or ``"ema"`` (see above; ``form="target"`` only).
        augmentation: The student's perturbation: a :class:`~lightning_reg.augment.Augmentation`
            (``class_path`` in YAML) or a short name: ``"patch_mask"`` (default; MIC),
            ``"gaussian_noise"``, ``"flip"``, ``"resized_crop"``, ``"multiscale"`` (ADELE).
        weak_augmentation: The teacher's view (``None``: the clean input; ``form="target"`` only).
        temperature: Sharpening ``τ`` in ``(0, inf)`` (1 = none); ``None``: UDA's 0.4 for ``form="target"``,
            none for ``form="adele"``.
        threshold: Confidence threshold in ``[0, 1]`` for :math:`m_i` (0 keeps every sample; UDA, ADELE: 0.8).
        divergence: ``"kl"`` (UDA) or ``"mse"`` (Mean Teacher's softmax MSE; ``form="target"`` only).
        weight: The final weight ``w`` (ADELE, MIC: 1).
        rampup: The ramp-up schedule: a :mod:`~lightning_reg.core.schedules` name or instance
            (``"sigmoid_rampup"``, ``"linear"``, ``"constant"``, ...).
        rampup_epochs: The ramp length ``T`` in epochs (0: no ramp).

    Logged metrics:

    ==================================  ====================================================================
    ``train/loss_consistency``           the term :math:`\mathcal L_\text{cons}` (weight included)
    ``consistency/weight``               :math:`w(t)`
    ``consistency/mask_rate``            the fraction of samples with :math:`m_i = 1`
    ``consistency/teacher_confidence``   the batch mean of :math:`\max_c q_{ic}` (before sharpening), or of
                                         :math:`\max_c \bar p_{ic}` in ``form="adele"``
    ==================================  ====================================================================

    Example:
        >>> import lightning as L
        >>> from lightning_reg.augment import PatchMask
        >>> cons = NoisyLabelConsistency(augmentation=PatchMask(patch_size=4, mask_ratio=0.5), threshold=0.7)
        >>> trainer = L.Trainer(callbacks=[cons], max_epochs=30, logger=False)

    ADELE's term: ``NoisyLabelConsistency(form="adele", augmentation=MultiScale(scales=[0.7, 1.0, 1.5]),
    rampup="constant")`` (see ``configs/adele_sym40.yaml``).

    YAML::

        trainer:
          callbacks:
            - class_path: lightning_reg.NoisyLabelConsistency
              init_args:
                teacher: ema
                augmentation:
                  class_path: lightning_reg.augment.PatchMask
                  init_args: {patch_size: 4, mask_ratio: 0.5}
            - class_path: lightning_reg.EMATeacher
              init_args: {decay: 0.999}
    """

    name = "consistency"
    stage = "loss"
    requires_index = False
    version = 1

    def __init__(
        self,
        teacher: Literal["self", "ema"] = "self",
        augmentation: AugmentationLike = "patch_mask",
        weak_augmentation: AugmentationLike | None = None,
        temperature: float | None = None,
        threshold: float = 0.8,
        divergence: Literal["kl", "mse"] = "kl",
        weight: float = 1.0,
        rampup: ScheduleLike = "sigmoid_rampup",
        rampup_epochs: float = 5.0,
        form: Literal["target", "adele"] = "target",
    ) -> None:
        super().__init__()
        self.form: Literal["target", "adele"] = check_choice("form", form, ["target", "adele"])
        self.teacher = check_choice("teacher", teacher, ["self", "ema"])
        self.augmentation: Augmentation = get_augmentation(augmentation, "augmentation")
        self.weak_augmentation: Augmentation | None = (
            None if weak_augmentation is None else get_augmentation(weak_augmentation, "weak_augmentation")
        )
        self.temperature = (
            None if temperature is None else check_float("temperature", temperature, 0.0, low_inclusive=False)
        )
        self.threshold = check_float("threshold", threshold, 0.0, 1.0)
        self.divergence: Literal["kl", "mse"] = check_choice("divergence", divergence, ["kl", "mse"])
        self.weight = check_float("weight", weight, 0.0)
        self.rampup = get_schedule(rampup, "rampup")
        self.rampup_epochs = check_float("rampup_epochs", rampup_epochs, 0.0)
        if self.form == "adele":
            unused = {
                "teacher": (self.teacher != "self", "its views agree with their own mean prediction"),
                "weak_augmentation": (self.weak_augmentation is not None, "no view is a target"),
                "temperature": (self.temperature not in (None, 1.0), "ADELE does not sharpen"),
                "divergence": (self.divergence != "kl", "ADELE's divergence is KL(p_s || p̄)"),
            }
            for arg, (given, why) in unused.items():
                if given:
                    raise ValueError(
                        f"`NoisyLabelConsistency(form='adele')` does not use `{arg}` ({why}), but got"
                        f" {arg}={getattr(self, arg)!r}. Remove it, or use `form='target'`."
                    )
        self._teacher: TeacherProvider | None = None

    @property
    def sharpen_temperature(self) -> float:
        """The temperature in use: ``temperature``, or its default (UDA's 0.4 for ``form="target"``, else 1)."""
        if self.temperature is not None:
            return self.temperature
        return 0.4 if self.form == "target" else 1.0

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.teacher == "ema":
            self._teacher = find_teacher(trainer)
            if self._teacher is None:
                raise ValueError(
                    "`NoisyLabelConsistency(teacher='ema')` takes its targets from an EMA teacher, but the trainer has"
                    " no callback with `teacher_forward`. Add `EMATeacher(decay=0.999)` to the Trainer's callbacks,"
                    " or use `NoisyLabelConsistency(teacher='self')`."
                )

    # -- schedule -------------------------------------------------------------------------------------------------
    def current_weight(self, trainer: Trainer) -> float:
        """``w(t) = weight · rampup(t, rampup_epochs)`` at the trainer's fractional epoch (a Python float)."""
        nb = trainer.num_training_batches
        if isinstance(nb, (int, float)) and math.isfinite(nb) and nb > 0:
            steps_per_epoch = max(1, math.ceil(nb / max(1, int(trainer.accumulate_grad_batches))))
            t = trainer.global_step / steps_per_epoch
        else:
            t = float(trainer.current_epoch)
        return self.weight * self.rampup(t, self.rampup_epochs)

    # -- the loss term --------------------------------------------------------------------------------------------
    def _target(self, ctx: StepContext, clean: Tensor, student: list[Tensor], weights: list[float]) -> Tensor:
        teacher = self._teacher if self.teacher == "ema" and _teacher_ready(self._teacher) else None
        if self.weak_augmentation is not None:
            weak = self.weak_augmentation(clean)
            with torch.no_grad():
                logits = teacher.teacher_forward(weak) if teacher is not None else ctx.module(weak)
            return torch.softmax(logits.detach().float(), dim=-1)
        if teacher is not None:
            return _teacher_clean_probs(ctx, teacher, type(self).__name__)
        if len(student) > 1:  # ADELE: the (weighted) mean prediction over the views
            return sum(w * torch.softmax(z.detach().float(), dim=-1) for w, z in zip(weights, student))  # type: ignore[return-value]
        return _student_clean_probs(ctx, type(self).__name__)

    def _adele_term(self, ctx: StepContext, clean: Tensor, views: list[Tensor], weights: list[float]) -> Tensor:
        assert ctx.logits is not None
        if len(views) == 1:  # a single-view augmentation: compare the clean input with its view
            views, weights = [clean, views[0]], [0.5, 0.5]
        student = [ctx.logits if v is ctx.x else ctx.module(v) for v in views]
        loss = adele_multiscale_consistency(student, weights, threshold=self.threshold)
        with torch.no_grad():
            mean = sum(wv * torch.softmax(z.detach().float(), dim=-1) for wv, z in zip(weights, student))
            conf = mean.clamp(1e-3, 1.0 - 1e-3).amax(dim=-1)  # type: ignore[union-attr]
        ctx.logs[f"{self.name}/mask_rate"] = (conf >= self.threshold).float().mean()
        ctx.logs[f"{self.name}/teacher_confidence"] = conf.mean()
        return loss

    def loss_term(self, ctx: StepContext) -> Tensor:
        assert ctx.logits is not None
        who = type(self).__name__
        w = self.current_weight(ctx.module.trainer)
        clean = _clean_input(ctx, who)
        views = self.augmentation.views(clean)
        weights = self.augmentation.view_weights()
        ctx.logs[f"{self.name}/weight"] = w
        if self.form == "adele":
            return w * self._adele_term(ctx, clean, views, weights)
        student = [ctx.logits if v is ctx.x else ctx.module(v) for v in views]
        q = self._target(ctx, clean, student, weights)
        mask = confidence_mask(q, self.threshold)
        target = sharpen(q, self.sharpen_temperature)
        loss = torch.stack(
            [wv * consistency_loss(z, target, mask, self.divergence) for wv, z in zip(weights, student)]
        ).sum()
        ctx.logs[f"{self.name}/mask_rate"] = mask.mean()
        ctx.logs[f"{self.name}/teacher_confidence"] = q.amax(dim=-1).mean()
        return w * loss

    # -- state ----------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        # Everything is a pure function of the trainer's step: nothing to save but the version.
        return {"version": self.version}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        check_choice("version", state_dict.get("version"), [self.version])


class LabelCorrection(LossRegularizer):
    r"""ADELE-style label correction: once a class's early learning ends, relabel confident disagreements.

    Paper: *Adaptive Early-Learning Correction for Segmentation from Noisy
    Annotations* (ADELE), https://arxiv.org/abs/2110.03740, adapted from
    pixels to samples.

    1. **Agreement.** Every step it counts, per class, the training-mode
       predictions against the *given* labels; at each epoch's end the per-class
       IoU :math:`\frac{TP}{|\hat y = c| + |y = c| - TP}` over the epoch is
       appended to the class's agreement curve.
    2. **End of early learning.** It fits :math:`a(1 - e^{-x^b/c})` to each
       curve on ADELE's axis (the ``T`` points at ``linspace(0, T, T)``; ADELE's
       bounds and weights, see
       :func:`~lightning_reg.functional.consistency.fit_early_learning_curve`)
       and marks a class once the fitted slope has dropped by a relative
       ``relative_change`` (ADELE: ``r = 0.9``) from its value at epoch 1, i.e.
       at the end of the (0-based) epoch ``T − 1 >= 1 + #{e < horizon : δ(e) <= r}``
       (ADELE's ``if_update``). Marks are kept: correction never stops once it starts. ADELE's trimming of a flat
       start of the curve (a segmentation-IoU heuristic) is not applied.
    3. **Correction.** From the next epoch on, a sample whose given label ``y``
       and confident prediction :math:`\hat y \ne y` (confidence
       ``> threshold``, ADELE: 0.8) both belong to marked classes is relabelled
       :math:`\hat y`; a later confident prediction of ``y`` itself reverts it.
       Each sample's current correction is a row of a scalar
       :class:`~lightning_reg.PerSampleTable` (the corrected label, or ``-1``),
       so corrections are checkpointed and identical on every DDP rank; the
       step's ``ctx.labels`` (which the base loss, target refiners and loss
       terms use) are the corrected labels.

    The predictions are the student's on the clean input (reusing the step's
    logits; one extra no-grad forward only if an input-stage regularizer such
    as mixup changed the input), or the EMA teacher's with ``source="teacher"``
    (shared with :class:`NoisyLabelConsistency` ``(teacher="ema")``: one teacher
    forward per step). ``start_epoch`` starts correction for every class at a
    fixed epoch instead, skipping the detector (for ablations).

    Only training steps (``trainer.training``, not the sanity check) count,
    fit or correct. Called from ``validation_step`` or ``test_step`` (through
    ``regularized_loss``) it does nothing: those batches' indices are not
    training indices, so their labels are left as given.

    Under DDP the agreement counts are summed over ranks every step (one
    ``3 × C`` all-reduce), so each rank, and each checkpoint, holds the global
    counts, and every rank fits the same curves.

    When the true labels are known (a benchmark with injected noise), give
    them with ``true_labels_path`` (a ``torch.save``-d ``(N,)`` tensor) or
    :meth:`set_true_labels` to log the corrections' precision.

    Args:
        threshold: The confidence a prediction needs (strictly above) to relabel a sample (ADELE: 0.8).
        relative_change: ADELE's ``r`` in ``(0, 1)``: the relative drop of the fitted slope that ends early learning.
        min_epochs: Agreement points needed before the first fit (at least 2; three parameters want 3).
        horizon: The last epoch the detector considers (ADELE's ``n_epoch``); ``None``: the trainer's
            ``max_epochs`` (1000 if unbounded).
        start_epoch: If set, correct every class from this (0-based) epoch on, whatever the detector says.
        source: ``"student"`` or ``"teacher"`` (the :class:`~lightning_reg.EMATeacher`'s prediction).
        num_samples: Training-set size; inferred from the train dataloader if ``None``.
        table_device: ``"auto"`` (the module's device) or ``"cpu"``.
        true_labels_path: Optional path of a ``torch.save``-d ``(N,)`` tensor of true labels.

    Logged metrics (at each epoch's end):

    ======================================  ============================================================
    ``label_correction/num_corrected``       samples whose label is currently corrected
    ``label_correction/active_classes``      classes whose early learning has ended (being corrected)
    ``label_correction/agreement``           mean per-class IoU of predictions and given labels this epoch
    ``label_correction/precision``           fraction of corrections equal to the true label (if known
                                             and at least one correction exists)
    ======================================  ============================================================

    Example:
        >>> import lightning as L
        >>> trainer = L.Trainer(callbacks=[NoisyLabelConsistency(), LabelCorrection(threshold=0.8)], logger=False)

    YAML::

        trainer:
          callbacks:
            - class_path: lightning_reg.NoisyLabelConsistency
              init_args:
                augmentation: {class_path: lightning_reg.augment.MultiScale}
            - class_path: lightning_reg.LabelCorrection
              init_args: {threshold: 0.8, relative_change: 0.9}
    """

    name = "label_correction"
    stage = "label"
    requires_index = True
    version = 1

    def __init__(
        self,
        threshold: float = 0.8,
        relative_change: float = 0.9,
        min_epochs: int = 3,
        horizon: int | None = None,
        start_epoch: int | None = None,
        source: Literal["student", "teacher"] = "student",
        num_samples: int | None = None,
        table_device: Literal["auto", "cpu"] = "auto",
        true_labels_path: str | None = None,
    ) -> None:
        super().__init__()
        self.threshold = check_float("threshold", threshold, 0.0, 1.0, high_inclusive=False)
        self.relative_change = check_float(
            "relative_change", relative_change, 0.0, 1.0, low_inclusive=False, high_inclusive=False
        )
        self.min_epochs = check_int("min_epochs", min_epochs, low=2)
        self.horizon = check_optional_int("horizon", horizon, low=2)
        self.start_epoch = check_optional_int("start_epoch", start_epoch, low=0)
        self.source = check_choice("source", source, ["student", "teacher"])
        self.num_samples = check_optional_int("num_samples", num_samples, low=1)
        self.table_device = check_choice("table_device", table_device, ["auto", "cpu"])
        if true_labels_path is not None and not isinstance(true_labels_path, str):
            raise TypeError(f"Expected argument `true_labels_path` to be a str or None, but got {true_labels_path!r}.")
        self.true_labels_path = true_labels_path
        self.table = PerSampleTable(num_samples=self.num_samples, device=self.table_device, fill=-1.0)
        self._placed = False
        self._teacher: TeacherProvider | None = None
        self._counts: Tensor | None = None  # (3, C) long: TP, predicted, given, summed over ranks this epoch
        self._history: list[Tensor] = []  # per-epoch (C,) IoU
        self._detected_epoch: Tensor | None = None  # (C,) long: epoch at whose end early learning ended, or -1
        self._active: tuple[int, Tensor | None] | None = None  # cache: (epoch, (C,) bool on device or None)
        self._true_labels: Tensor | None = None

    # -- setup ----------------------------------------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.source == "teacher":
            self._teacher = find_teacher(trainer)
            if self._teacher is None:
                raise ValueError(
                    "`LabelCorrection(source='teacher')` relabels with an EMA teacher's predictions, but the trainer"
                    " has no callback with `teacher_forward`. Add `EMATeacher(decay=0.999)` to the Trainer's"
                    " callbacks, or use `LabelCorrection(source='student')`."
                )
        if self.true_labels_path is not None and self._true_labels is None:
            path = Path(self.true_labels_path)
            if not path.is_file():
                raise FileNotFoundError(
                    f"`LabelCorrection(true_labels_path=...)` found no file at {str(path)!r}. Save the true labels"
                    " with `torch.save(true_labels, path)`, or call `set_true_labels(tensor)` instead."
                )
            self.set_true_labels(torch.load(path, map_location="cpu", weights_only=True))

    def set_true_labels(self, true_labels: Tensor) -> None:
        """Give the true ``(N,)`` labels (indexed like the training set) to log the corrections' precision."""
        if not isinstance(true_labels, Tensor) or true_labels.dim() != 1 or true_labels.is_floating_point():
            raise TypeError(
                "Expected `true_labels` to be a 1-D integer tensor with one label per training sample, but got"
                f" {type(true_labels).__name__ if not isinstance(true_labels, Tensor) else true_labels.dtype}"
                f"{'' if not isinstance(true_labels, Tensor) else f' of shape {tuple(true_labels.shape)}'}."
            )
        self._true_labels = true_labels.detach().to("cpu", torch.long)

    def _ensure(self, trainer: Trainer, logits: Tensor) -> None:
        if self._placed:
            return
        n = self.num_samples if self.num_samples is not None else infer_num_samples(trainer, "LabelCorrection")
        self.table.allocate(n, None, device=logits.device)
        c = int(logits.shape[-1])
        if self._counts is None:
            self._counts = torch.zeros(3, c, dtype=torch.long, device=logits.device)
        elif self._counts.shape[1] != c:
            raise ValueError(f"The checkpointed agreement counts have {self._counts.shape[1]} classes, the model {c}.")
        else:
            self._counts = self._counts.to(logits.device)
        if self._detected_epoch is None:
            self._detected_epoch = torch.full((c,), -1, dtype=torch.long)
        self._active = None
        self._placed = True

    # -- the label stage ------------------------------------------------------------------------------------------
    def _predictions(self, ctx: StepContext) -> Tensor:
        if self.source == "teacher" and _teacher_ready(self._teacher):
            assert self._teacher is not None
            return _teacher_clean_probs(ctx, self._teacher, type(self).__name__)
        if ctx.extras.get("clean_x") is None or ctx.x is ctx.extras.get("clean_x"):
            return ctx.probs()
        return _student_clean_probs(ctx, type(self).__name__)

    def _active_classes(self, epoch: int, device: torch.device) -> Tensor | None:
        """The (C,) bool mask of classes being corrected in ``epoch`` on ``device``, or ``None`` if none (cached)."""
        if self._active is not None and self._active[0] == epoch:
            return self._active[1]
        assert self._detected_epoch is not None
        active = self._detected_epoch >= 0
        if self.start_epoch is not None and epoch >= self.start_epoch:
            active = torch.ones_like(active)
        mask = active.to(device) if bool(active.any()) else None
        self._active = (epoch, mask)
        return mask

    def refine_labels(self, ctx: StepContext) -> None:
        if not ctx.training:
            return  # validation, test, sanity check: no counts, no table, no relabelling by (non-training) index
        assert ctx.logits is not None
        trainer = ctx.module.trainer
        index = ctx.require_index(type(self).__name__)
        self._ensure(trainer, ctx.logits)
        assert self._counts is not None
        probs = self._predictions(ctx)
        conf, pred = probs.max(dim=-1)
        given = ctx.given_labels
        counts = class_agreement_counts(pred, given, probs.shape[-1])
        strategy = trainer.strategy
        if getattr(strategy, "world_size", 1) > 1:
            counts = strategy.reduce(counts, reduce_op="sum")
        self._counts += counts
        active = self._active_classes(trainer.current_epoch, given.device)
        if active is None:
            return
        old, _ = self.table.read(index, device=given.device)
        eligible = active[given] & active[pred] & (conf > self.threshold)
        proposal = torch.where(pred != given, pred.float(), torch.full_like(old, -1.0))
        new = torch.where(eligible, proposal, old)
        self.table.write(index, new, strategy=strategy)
        ctx.labels = torch.where(new >= 0, new.long(), ctx.labels)

    # -- epoch end: detection and logging -------------------------------------------------------------------------
    def _horizon(self, trainer: Trainer) -> int:
        if self.horizon is not None:
            return self.horizon
        me = trainer.max_epochs
        return int(me) if me is not None and me > 1 else 1000

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._counts is None or self._detected_epoch is None:
            return
        iou = class_iou(self._counts.cpu())
        self._counts.zero_()
        self._history.append(iou)
        ended = end_of_early_learning(
            torch.stack(self._history),
            r=self.relative_change,
            horizon=self._horizon(trainer),
            min_epochs=self.min_epochs,
        )
        newly = ended & (self._detected_epoch < 0)
        self._detected_epoch = torch.where(
            newly, torch.full_like(self._detected_epoch, trainer.current_epoch), self._detected_epoch
        )
        self._active = None
        logs: dict[str, float] = {
            f"{self.name}/num_corrected": float(self.num_corrected),
            f"{self.name}/active_classes": float(int((self._detected_epoch >= 0).sum())),
            f"{self.name}/agreement": float(iou.mean()),
        }
        precision = self.precision()
        if precision is not None:
            logs[f"{self.name}/precision"] = precision
        for key, value in logs.items():
            pl_module.log(key, value, on_step=False, on_epoch=True)

    # -- results --------------------------------------------------------------------------------------------------
    def corrections(self) -> Tensor:
        """The ``(N,)`` long tensor of corrected labels, ``-1`` where a sample keeps its given label."""
        if not self.table.is_allocated:
            raise RuntimeError("`LabelCorrection` has no table yet: train (or load a checkpoint) first.")
        return self.table.dense().long()

    @property
    def num_corrected(self) -> int:
        """How many samples currently have a corrected label (a host sync: not for per-step use)."""
        if not self.table.is_allocated:
            return 0
        return int((self.table.dense() >= 0).sum())

    @property
    def agreement_history(self) -> Tensor:
        """The ``(epochs, C)`` per-class IoU curves the detector fits."""
        if not self._history:
            return torch.zeros(0, 0)
        return torch.stack(self._history)

    @property
    def detected_epochs(self) -> Tensor | None:
        """Per class, the epoch at whose end early learning was found to end (``-1``: not yet)."""
        return None if self._detected_epoch is None else self._detected_epoch.clone()

    def precision(self) -> float | None:
        """The fraction of current corrections that equal the true label, or ``None`` if unknown or none."""
        if self._true_labels is None or not self.table.is_allocated:
            return None
        corr = self.corrections().cpu()
        if corr.shape != self._true_labels.shape:
            raise ValueError(
                f"Expected {corr.shape[0]} true labels (one per training sample), but got {self._true_labels.shape[0]}."
            )
        fixed = corr >= 0
        n = int(fixed.sum())
        if n == 0:
            return None
        return float((corr[fixed] == self._true_labels[fixed]).float().mean())

    # -- state ----------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "table": self.table.state_dict(),
            "history": self.agreement_history.clone(),
            "counts": None if self._counts is None else self._counts.detach().cpu().clone(),
            "detected_epoch": None if self._detected_epoch is None else self._detected_epoch.clone(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        check_choice("version", state_dict.get("version"), [self.version])
        self.table.load_state_dict(state_dict["table"])
        history = state_dict["history"]
        self._history = [row.clone() for row in history] if history.numel() else []
        self._counts = None if state_dict["counts"] is None else state_dict["counts"].clone()
        de = state_dict["detected_epoch"]
        self._detected_epoch = None if de is None else de.clone()
        self._active = None
        self._placed = False
