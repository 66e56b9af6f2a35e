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
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor

from lightning_reg.augment import Augmentation, AugmentationLike, WeakAugment, get_augmentation
from lightning_reg.core.protocol import LossRegularizer, StepContext, TeacherProvider, find_teacher, infer_num_samples
from lightning_reg.core.schedules import ScheduleLike, get_schedule
from lightning_reg.core.steps import StepClock, optimizer_steps
from lightning_reg.core.table import PerSampleTable
from lightning_reg.core.validation import (
    check_bool,
    check_choice,
    check_float,
    check_int,
    check_optional_int,
    load_true_labels,
)
from lightning_reg.functional.consistency import (
    adele_confidence,
    adele_multiscale_consistency,
    class_agreement_counts,
    class_iou,
    consistency_loss,
    end_of_early_learning,
    sharpen,
)
from lightning_reg.functional.pseudo_label import confidence_quality

__all__ = ["LabelCorrection", "NoisyLabelConsistency"]


def _teacher_ready(teacher: TeacherProvider | None) -> bool:
    return teacher is not None and bool(getattr(teacher, "has_updated", True))


def _weak_key(aug: Augmentation) -> str:
    """The per-step cache key of a weak view; the same as :class:`~lightning_reg.PseudoLabel`'s, so two consumers
    of one weak augmentation share the view and the teacher forward on it."""
    return "weak" if aug == WeakAugment() else f"weak:{aug!r}"


def _expand(per_sample: Tensor, like: Tensor) -> Tensor:
    """Broadcast a ``(B,)`` tensor to ``like``'s ``(B, *d)`` shape."""
    return per_sample.view(-1, *([1] * (like.dim() - 1))).expand(like.shape)


def _masked_mean(values: Tensor, keep: Tensor | None) -> Tensor:
    """The mean of ``values`` over ``keep`` (all if ``None``), 0 if nothing is kept; no host sync."""
    values = values.float()
    if keep is None:
        return values.mean()
    return (values * keep).sum() / keep.sum().clamp_min(1)


class NoisyLabelConsistency(LossRegularizer):
    r"""Consistency regularization against label noise: agree with a stop-gradient target on perturbed views.

    Two forms of the term. ``form="target"`` (the default; UDA, Mean Teacher, MIC) pulls every view towards a
    stop-gradient target:

    .. math:: \mathcal L_\text{cons} = w(t)\cdot\frac{1}{|E|}\sum_{i \in E} m_i\,
              D\!\left(\mathrm{sg}(q_i)\,\|\,p(\tilde x_i)\right),\qquad
              m_i = \mathbb 1[\max_c q_{ic} \ge \text{threshold}]

    ``form="adele"`` is ADELE's official multi-scale term (``calc_jsd_multiscale``,
    :func:`~lightning_reg.functional.consistency.adele_multiscale_consistency`): every view and their mean
    :math:`\bar p = \mathrm{clip}(\sum_s w_s p_s, 10^{-3}, 1 - 10^{-3})` pull on each other, with gradients
    through :math:`\bar p`, no sharpening and the KL summed over the views:

    .. math:: \mathcal L_\text{cons} = w(t)\cdot\frac{1}{|E|}\sum_{(b, j) \in E} m_b \sum_s
              \mathrm{KL}\!\left(p(x_{s})_{bj} \,\|\, \bar p_{bj}\right),\qquad
              m_b = \mathbb 1[\max_{c,\,j} \bar p_{bcj} \ge \text{threshold}]

    :math:`E` are the elements that count (below): for classification, every sample of the batch, so the
    mean is over *all* samples, masked ones included (UDA). Papers: UDA
    https://arxiv.org/abs/1904.12848 (``τ = 0.4``, threshold 0.8, KL), Mean
    Teacher https://arxiv.org/abs/1703.01780 (EMA teacher, sigmoid ramp-up,
    softmax MSE), MIC https://arxiv.org/abs/2212.01322 (patch masking, EMA
    teacher, quality weight), ADELE https://arxiv.org/abs/2110.03740 (multi-scale views,
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
      on the clean input, read from the step's shared teacher cache
      (:meth:`~lightning_reg.core.protocol.StepContext.teacher_probs`): one teacher
      forward per step, shared with PS-KD, ELR, ``LabelCorrection`` and ``PseudoLabel``.
      Without a teacher, ``setup`` raises. Until the teacher's first update (its
      ``has_updated`` is ``False``) it holds the initial weights, so the target falls
      back to ``teacher="self"``.
    * ``weak_augmentation``: if set, the teacher (or the student, under no-grad)
      sees this weakly augmented view instead of the clean input (UDA's weak view;
      one view per step, shared with a ``PseudoLabel`` that uses the same augmentation).

    Then :math:`m_i` is computed on :math:`q_i` (before sharpening, as UDA),
    and :math:`q_i` is sharpened with temperature ``τ`` (``τ = 1``: none). With
    ``quality_weight=True`` (MIC, DAFormer) the hard mask is replaced by each image's
    *quality*: every element of image ``b`` weighs the share of its counted elements with
    :math:`\max_c q \ge` threshold (MIC's τ = 0.968). (MIC's own loss is a CE to the teacher's
    hard pseudo-labels: that is :class:`~lightning_reg.PseudoLabel` with ``quality_weight``; this is
    the divergence form.)

    **ADELE's form** (``form="adele"``) needs no target: the views are the
    augmentation's views (:class:`~lightning_reg.augment.MultiScale`'s scales;
    a single-view augmentation is compared with the clean input, each weighing
    1/2 in :math:`\bar p`). It uses neither ``teacher="ema"``, a
    ``weak_augmentation``, a ``temperature`` other than 1, ``divergence="mse"`` nor
    ``quality_weight``; giving one raises a ``ValueError``.

    **The student's views** :math:`\tilde x_i` come from ``augmentation``
    (a :mod:`lightning_reg.augment` class, or a short name) applied to the
    clean batch on its device. Views of the batch's shape are appended to the
    step's single forward (:meth:`~lightning_reg.core.protocol.LossRegularizer.add_views`:
    one DDP graph, one autocast region, one BatchNorm batch, as FixMatch's reference);
    views of another size (``MultiScale``'s rescaled views) and every view of a custom
    ``training_step`` that only calls ``regularized_loss`` are forwarded apart, inside the
    training step and under the same autocast. In ``form="target"`` multi-view augmentations
    give :math:`\sum_s w_s D(q \| p(x_s))`; the scale-1 view *is* the clean input, so its
    forward is the step's own (with gradients, as in ADELE).

    **Dense outputs** (segmentation ``(B, C, H, W)``, tokens ``(B, T, C)``): :math:`i` runs over
    elements (pixels, tokens), each with its own divergence and mask (``form="adele"``: one mask per
    image, the largest mean probability over its classes and labelled pixels, as the official code).
    Views that keep the geometry (``PatchMask``, ``GaussianNoise``, ``Cutout``, photometric
    ``RandAugment`` ops) compare element by element as they are; geometric ones are undone on the
    output before comparing (:meth:`~lightning_reg.augment.Augmentation.invert_output`):
    ``RandomFlip`` flips each prediction back, ``MultiScale`` resizes it back bilinearly (ADELE). Views that
    cannot be undone (random crops, shifts, rotations), a geometric ``weak_augmentation``, and any geometric
    view on ``(B, T, C)`` token logits raise a ``ValueError`` at the first step.

    **Which elements count** (:math:`E`). Consistency needs no label, so every row takes part: labeled and
    unlabeled samples (semi-supervised batches, UDA and Mean Teacher) with ``on="all"``, or only the
    unlabeled rows with ``on="unlabeled"`` (the rows after ``num_labeled`` of a ``CombinedLoader`` batch, or
    the samples without any label in a single loader). Within a *labeled* dense sample, the elements whose
    given label is ``ignore_index`` (void pixels, padding tokens) are left out when ``ignore_void=True``
    (the default: padding must not count, and it cannot be told apart from void); ``ignore_void=False``
    lets void pixels take part too (consistency is label-free; ADELE's official mean runs over all pixels).
    Every element of an *unlabeled* sample counts (its padding cannot be told apart: pad unlabeled
    sequences with an input the model maps to a fixed prediction, or train tokens with ``on="all"`` on
    labeled data).

    Outside training steps (validation, test, the sanity check) the term is
    computed the same way if the pipeline runs (its views forwarded apart); the callback keeps no state, so
    nothing changes.

    **The weight** :math:`w(t) = \text{weight}\cdot\text{rampup}(t, \text{rampup\_epochs})` with ``t`` the
    fractional epoch (real optimizer steps / optimizer steps per epoch); the default
    is Mean Teacher's :math:`e^{-5(1 - t/T)^2}`.

    Cost per step: the views' rows in the step's forward (with gradients; the method's
    inherent cost), plus at most one no-grad teacher forward, shared by every consumer.

    Args:
        teacher: ``"self"`` or ``"ema"`` (see above; ``form="target"`` only).
        augmentation: The student's perturbation: a :class:`~lightning_reg.augment.Augmentation`
            (``class_path`` in YAML) or a short name: ``"patch_mask"`` (default; MIC),
            ``"gaussian_noise"``, ``"flip"``, ``"resized_crop"``, ``"multiscale"`` (ADELE).
        weak_augmentation: The teacher's view (``None``: the clean input; ``form="target"`` only).
        temperature: Sharpening ``τ`` in ``(0, inf)`` (1 = none); ``None``: UDA's 0.4 for ``form="target"``,
            none for ``form="adele"``.
        threshold: Confidence threshold in ``[0, 1]`` for :math:`m_i` (0 keeps every element; UDA, ADELE: 0.8;
            MIC's quality weight: 0.968).
        divergence: ``"kl"`` (UDA) or ``"mse"`` (Mean Teacher's softmax MSE; ``form="target"`` only).
        weight: The final weight ``w`` (ADELE, MIC: 1).
        rampup: The ramp-up schedule: a :mod:`~lightning_reg.core.schedules` name or instance
            (``"sigmoid_rampup"``, ``"linear"``, ``"constant"``, ...).
        rampup_epochs: The ramp length ``T`` in epochs (0: no ramp).
        form: ``"target"`` (pull each view towards a stop-gradient target; UDA, Mean Teacher, MIC) or
            ``"adele"`` (ADELE's official multi-scale term; use it with ``augmentation=MultiScale()``).
        on: ``"all"`` rows (labeled and unlabeled) or only the ``"unlabeled"`` ones (see above).
        quality_weight: MIC's per-image quality weight instead of the per-element mask (``form="target"``).
        ignore_void: Leave out the ``ignore_index`` elements of labeled dense samples (see above).

    Logged metrics:

    ==================================  ====================================================================
    ``train/loss_consistency``           the term :math:`\mathcal L_\text{cons}` (weight included)
    ``consistency/weight``               :math:`w(t)`
    ``consistency/mask_rate``            the fraction of counted elements with :math:`m_i = 1` (of samples in
                                         ``form="adele"``)
    ``consistency/teacher_confidence``   the mean of :math:`\max_c q_{ic}` (before sharpening) over the counted
                                         elements, or of the per-sample :math:`\max \bar p` in ``form="adele"``
    ==================================  ====================================================================

    Example:
        >>> import lightning as L
        >>> from lightning_reg.augment import PatchMask
        >>> cons = NoisyLabelConsistency(augmentation=PatchMask(patch_size=4, mask_ratio=0.5), threshold=0.7)
        >>> trainer = L.Trainer(callbacks=[cons], max_epochs=30, logger=False)

    ADELE's term: ``NoisyLabelConsistency(form="adele", augmentation=MultiScale(scales=[0.7, 1.0, 1.5]),
    rampup="constant")`` (see ``configs/adele_sym40.yaml``; on segmentation, ``configs/noisy_segmentation.yaml``).
    MIC on segmentation: ``NoisyLabelConsistency(teacher="ema", augmentation=PatchMask(patch_size=8,
    mask_ratio=0.7), temperature=1.0, threshold=0.968, quality_weight=True, rampup="constant")`` with an
    ``EMATeacher(decay=0.999)``. Mean Teacher / UDA on unlabeled data: ``on="unlabeled"`` (or ``"all"``) with a
    ``CombinedLoader({"labeled": ..., "unlabeled": ...})``.

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
    layouts = frozenset({"classification", "dense"})
    needs_labels = False
    version = 1

    #: ``ctx.extras`` key of the views this callback put into the step's forward.
    _VIEWS = "consistency/views"

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
        on: Literal["all", "unlabeled"] = "all",
        quality_weight: bool = False,
        ignore_void: bool = True,
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
        self._clock = StepClock()  # the real optimizer steps drive the ramp
        self.on: Literal["all", "unlabeled"] = check_choice("on", on, ["all", "unlabeled"])
        self.quality_weight = check_bool("quality_weight", quality_weight)
        self.ignore_void = check_bool("ignore_void", ignore_void)
        if self.form == "adele":
            unused = {
                "teacher": (self.teacher != "self", "its views agree with their own mean prediction"),
                "weak_augmentation": (self.weak_augmentation is not None, "no view is a target"),
                "temperature": (self.temperature not in (None, 1.0), "ADELE does not sharpen"),
                "divergence": (self.divergence != "kl", "ADELE's divergence is KL(p_s || p̄)"),
                "quality_weight": (self.quality_weight, "its mask is one flag per image"),
            }
            for arg, (given, why) in unused.items():
                if given:
                    raise ValueError(
                        f"`NoisyLabelConsistency(form='adele')` does not use `{arg}` ({why}), but got"
                        f" {arg}={getattr(self, arg)!r}. Remove it, or use `form='target'`."
                    )
        self._teacher: TeacherProvider | None = None
        self._checked_layouts: set[tuple[str, bool]] = set()

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

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._clock.start(trainer)  # the real optimizer steps (skipped steps not counted)

    # -- schedule -------------------------------------------------------------------------------------------------
    def current_weight(self, trainer: Trainer) -> float:
        """``w(t) = weight · rampup(t, rampup_epochs)`` at the trainer's fractional epoch (a Python float).

        ``t`` counts the optimizer steps that really ran (:func:`~lightning_reg.core.steps.optimizer_steps`):
        a step skipped by AMP's ``GradScaler`` or ``GradientClipping(nonfinite="skip")`` does not advance it.
        """
        nb = trainer.num_training_batches
        if isinstance(nb, (int, float)) and math.isfinite(nb) and nb > 0:
            steps_per_epoch = max(1, math.ceil(nb / max(1, int(trainer.accumulate_grad_batches))))
            t = optimizer_steps(trainer) / steps_per_epoch
        else:
            t = float(trainer.current_epoch)
        return self.weight * self.rampup(t, self.rampup_epochs)

    # -- checks ---------------------------------------------------------------------------------------------------
    def _check_views(self, ctx: StepContext) -> None:
        """Refuse views whose dense predictions cannot be compared element by element (once per layout)."""
        key = (ctx.layout, ctx.is_dense)
        if key in self._checked_layouts:
            return
        if ctx.is_dense:
            tokens = ctx.layout == "channels_last"
            what = "token" if tokens else "pixel"
            weak = self.weak_augmentation
            if weak is not None and weak.moves_elements:
                raise ValueError(
                    f"`NoisyLabelConsistency` compares each {what}'s prediction on the student's view with the target"
                    f" at the same {what}, so on dense outputs its `weak_augmentation` {weak!r} must keep every {what}"
                    " in place, but it moves them. Pass `weak_augmentation=None` (the clean input, as MIC's teacher"
                    " sees it) or a photometric view (`GaussianNoise`, `RandAugment` with photometric ops only)."
                )
            aug = self.augmentation
            if aug.moves_elements and tokens:
                raise ValueError(
                    f"`NoisyLabelConsistency` got (B, T, C) token logits, but its `augmentation` {aug!r} moves elements"
                    " of the input, so the tokens of a view cannot be matched with the input's. Use a view that keeps"
                    " every token in place, e.g. `GaussianNoise(std=0.1)` or `PatchMask(patch_size=...)`"
                    " (`lightning_reg.augment`)."
                )
            if aug.moves_elements and not aug.can_invert_output:
                raise ValueError(
                    f"`NoisyLabelConsistency` maps each view's dense prediction back onto the input's {what} grid"
                    f" before comparing (`Augmentation.invert_output`), but its `augmentation` {aug!r} moves {what}s"
                    " in a way that cannot be undone. Use `RandomFlip` or `MultiScale` (ADELE; undone on the output), a"
                    " `Compose` of those, or a view that keeps the geometry: `PatchMask` (MIC), `GaussianNoise`,"
                    " `Cutout`, or `RandAugment` with photometric ops only."
                )
        self._checked_layouts.add(key)

    # -- rows and elements ----------------------------------------------------------------------------------------
    def _counted(self, ctx: StepContext, rows: slice, row_keep: Tensor | None) -> Tensor | None:
        """The ``(B_r, *d)`` elements of the rows that count (``None``: all of them)."""
        given = ctx.given_labels[rows]
        keep: Tensor | None = None
        if ctx.is_dense and self.ignore_void:
            keep = (given != ctx.ignore_index) | _expand(~ctx.labeled[rows], given)
        if row_keep is not None:
            rk = _expand(row_keep, given)
            keep = rk if keep is None else keep & rk
        return keep

    # -- views in the step's one forward --------------------------------------------------------------------------
    def _make_views(self, ctx: StepContext, rows: slice) -> list[tuple[Tensor | None, Any, str | None]]:
        """``(view or None for the batch itself, record for invert_output, key in ctx.view_logits or None)``."""
        clean = ctx.clean_input(type(self).__name__)
        sub = clean if rows == slice(None) else clean[rows]
        views, params = self.augmentation.views_and_params(sub)
        return [(None if v is sub else v, p, None) for v, p in zip(views, params)]

    def add_views(self, ctx: StepContext) -> None:
        """Append the student's views of the batch's shape to the step's single forward (training steps only)."""
        self._check_views(ctx)
        rows, _ = ctx.term_rows(self.on)
        plan = self._make_views(ctx, rows)
        keyed = []
        for i, (view, params, _) in enumerate(plan):
            key = None
            if view is not None and view.shape[0] > 0 and view.shape[1:] == ctx.x.shape[1:]:
                key = f"{self.name}/view{i}"
                ctx.add_view(key, view)
            keyed.append((view, params, key))
        ctx.extras[self._VIEWS] = (rows, keyed)

    def _clean_logits(self, ctx: StepContext, rows: slice) -> Tensor:
        """The student's logits (with gradients) on the clean rows: the step's own when the input is unchanged."""
        assert ctx.logits is not None
        clean = ctx.clean_input(type(self).__name__)
        return ctx.logits[rows] if ctx.x is clean else ctx.module(clean[rows])

    def _student(self, ctx: StepContext, rows: slice) -> list[Tensor]:
        """The student's logits on each view, mapped back onto the clean output's grid on dense outputs."""
        assert ctx.logits is not None
        record = ctx.extras.get(self._VIEWS)
        plan = record[1] if record is not None and record[0] == rows else self._make_views(ctx, rows)
        shape = ctx.logits[rows].shape
        undo = ctx.is_dense and self.augmentation.moves_elements
        out = []
        for view, params, key in plan:
            if view is None:  # the view is the batch itself (MultiScale's scale 1)
                out.append(self._clean_logits(ctx, rows))
                continue
            z = ctx.view_logits[key] if key is not None and key in ctx.view_logits else ctx.module(view)
            if undo:
                z = self.augmentation.invert_output(z, params, tuple(shape[2:]))
            if z.shape != shape:
                raise ValueError(
                    f"`NoisyLabelConsistency` expected the logits on a view to have the batch's shape {tuple(shape)},"
                    f" but got {tuple(z.shape)} from `augmentation` {self.augmentation!r}. An augmentation that changes"
                    " the output's size must say so (`moves_elements`) and map it back (`invert_output`)."
                )
            out.append(z)
        return out

    # -- the loss term --------------------------------------------------------------------------------------------
    def _target(self, ctx: StepContext, rows: slice, student: list[Tensor], weights: list[float]) -> Tensor:
        who = type(self).__name__
        dim = ctx.class_dim
        teacher = self._teacher if self.teacher == "ema" and _teacher_ready(self._teacher) else None
        if self.weak_augmentation is not None:
            key = _weak_key(self.weak_augmentation)
            views: dict[str, Tensor] = ctx.extras.setdefault("_views", {})
            if key not in views:  # one weak view of the whole batch per step, shared by the consumers of the key
                views[key] = self.weak_augmentation(ctx.clean_input(who))
            if teacher is not None:
                return ctx.teacher_probs(teacher, x=views[key], key=key)[rows]
            with torch.no_grad():
                logits = ctx.module(views[key][rows])
            return torch.softmax(logits.detach().float(), dim=dim)
        if teacher is not None:
            return ctx.teacher_probs(teacher)[rows]
        if len(student) > 1:  # ADELE: the (weighted) mean prediction over the views
            return torch.stack([w * torch.softmax(z.detach().float(), dim=dim) for w, z in zip(weights, student)]).sum(
                0
            )
        return ctx.student_clean_probs(who)[rows]

    def _adele_term(
        self, ctx: StepContext, rows: slice, counted: Tensor | None, row_keep: Tensor | None, student: list[Tensor]
    ) -> Tensor:
        weights = self.augmentation.view_weights()
        if len(student) == 1:  # a single-view augmentation: compare the clean input with its view
            student, weights = [self._clean_logits(ctx, rows), student[0]], [0.5, 0.5]
        valid = None  # the per-image maximum runs over labelled pixels (all pixels of unlabeled images)
        if ctx.is_dense:
            given = ctx.given_labels[rows]
            valid = (given != ctx.ignore_index) | _expand(~ctx.labeled[rows], given)
        dim = ctx.class_dim
        loss = adele_multiscale_consistency(
            student, weights, threshold=self.threshold, valid=valid, counted=counted, dim=dim
        )
        conf = adele_confidence(student, weights, valid=valid, dim=dim)
        ctx.logs[f"{self.name}/mask_rate"] = _masked_mean(conf >= self.threshold, row_keep)
        ctx.logs[f"{self.name}/teacher_confidence"] = _masked_mean(conf, row_keep)
        return loss

    def loss_term(self, ctx: StepContext) -> Tensor:
        assert ctx.logits is not None
        w = self.current_weight(ctx.module.trainer)
        ctx.logs[f"{self.name}/weight"] = w
        self._check_views(ctx)
        rows, row_keep = ctx.term_rows(self.on)
        if ctx.logits[rows].shape[0] == 0:  # a semi-supervised batch without unlabeled rows (a static shape)
            zero = torch.zeros((), device=ctx.logits.device)
            ctx.logs[f"{self.name}/mask_rate"] = zero
            ctx.logs[f"{self.name}/teacher_confidence"] = zero
            return zero
        counted = self._counted(ctx, rows, row_keep)
        student = self._student(ctx, rows)
        if self.form == "adele":
            return w * self._adele_term(ctx, rows, counted, row_keep, student)
        weights = self.augmentation.view_weights()
        dim = ctx.class_dim
        q = self._target(ctx, rows, student, weights)
        conf = q.amax(dim=dim)
        confident = conf >= self.threshold
        mask = _expand(confidence_quality(confident, counted), conf) if self.quality_weight else confident.float()
        target = sharpen(q, self.sharpen_temperature, dim=dim)
        loss = torch.stack(
            [
                wv * consistency_loss(z, target, mask, self.divergence, dim=dim, valid=counted)
                for wv, z in zip(weights, student)
            ]
        ).sum()
        ctx.logs[f"{self.name}/mask_rate"] = _masked_mean(confident, counted)
        ctx.logs[f"{self.name}/teacher_confidence"] = _masked_mean(conf, counted)
        return w * loss

    # -- state ----------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        # The ramp is a pure function of the real optimizer steps: save their count for an exact resume.
        return {"version": self.version, "optimizer_steps": self._clock.state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        check_choice("version", state_dict.get("version"), [self.version])
        self._clock.load(state_dict.get("optimizer_steps"))


class LabelCorrection(LossRegularizer):
    r"""ADELE-style label correction: once a class's early learning ends, relabel confident disagreements.

    Paper: *Adaptive Early-Learning Correction for Segmentation from Noisy
    Annotations* (ADELE), https://arxiv.org/abs/2110.03740. Its original setting
    is segmentation (pixels); classification (samples) is the special case of
    one element per sample, and token classification works like segmentation.

    1. **Agreement.** Every training step it counts, per class, the predictions
       against the *given* labels over the labelled elements (samples, pixels or
       tokens; ``ignore_index`` elements and unlabeled samples are never counted):
       true positives, predicted and given counts. The counts accumulate on the
       device without a host sync; at each epoch's end they are summed over DDP
       ranks (one all-reduce per epoch, so every rank fits the same curves) and
       the per-class IoU :math:`\frac{TP}{|\hat y = c| + |y = c| - TP}` over the
       epoch is appended to the class's agreement curve.
    2. **End of early learning.** It fits :math:`a(1 - e^{-x^b/c})` to each
       curve on ADELE's axis (the ``T`` points at ``linspace(0, T, T)``; ADELE's
       bounds and weights, see
       :func:`~lightning_reg.functional.consistency.fit_early_learning_curve`)
       and marks a class once the fitted slope has dropped by a relative
       ``relative_change`` (ADELE: ``r = 0.9``) from its value at epoch 1, i.e.
       at the end of the (0-based) epoch ``T − 1 >= 1 + #{e < horizon : δ(e) <= r}``
       (ADELE's ``if_update``). Marks are kept: correction never stops once it starts. ADELE's trimming of a flat
       start of the curve (a segmentation-IoU heuristic) is not applied.
    3. **Correction.** From the next epoch on, in every training step:

       * **Classification** (``(B, C)`` logits): a sample whose given label ``y``
         and confident prediction :math:`\hat y \ne y` (confidence
         ``> threshold``, ADELE: 0.8) both belong to marked classes is relabelled
         :math:`\hat y`; a later confident prediction of ``y`` itself reverts it.
         Each sample's current correction is a row of a scalar
         :class:`~lightning_reg.PerSampleTable` (the corrected label, or ``-1``),
         so corrections are checkpointed and identical on every DDP rank.
       * **Dense outputs** (``(B, C, H, W)`` segmentation, ``(B, T, C)`` tokens): a labelled
         element whose confident prediction :math:`\hat y` (``> threshold``) differs from its given
         label and whose predicted class is marked is relabelled :math:`\hat y` (ADELE's ``single``
         rule). There is no per-pixel table: the corrected map is recomputed from the *current*
         prediction (the student's, or the EMA teacher's with ``source="teacher"``) in each step, so it
         costs nothing to store and follows the model as it improves. (ADELE's code instead re-predicts
         the whole training set with multi-scale and flip inference after each epoch and keeps the
         corrected masks; ADELE also restricts the predicted class to those in the image's mask and
         always corrects the background, which are dataset heuristics not applied here.) Void pixels and
         padding (``ignore_index``) are never relabelled.

       The step's ``ctx.labels`` (which the base loss, target refiners and loss
       terms use) are the corrected labels.

    The predictions are the student's on the clean input (reusing the step's
    logits; one extra no-grad forward only if an input-stage regularizer such
    as mixup changed the input), or the EMA teacher's with ``source="teacher"``
    (the step's shared teacher forward, :meth:`~lightning_reg.core.protocol.StepContext.teacher_probs`:
    one per step whatever the number of consumers). ``start_epoch`` starts correction for every class at a
    fixed epoch instead, skipping the detector (for ablations).

    **Unlabeled data.** Samples without labels (the unlabeled rows of a semi-supervised batch, or samples
    whose labels are all ``ignore_index``) are never counted, relabelled or written to the table.

    Only training steps (``trainer.training``, not the sanity check) count,
    fit or correct. Called from ``validation_step`` or ``test_step`` (through
    ``regularized_loss``) it does nothing: those batches' indices are not
    training indices, so their labels are left as given.

    **Checkpoints.** The counts of the running epoch are saved with the curves, so a run resumed mid-epoch
    fits the same curve. Under DDP each rank holds its own counts until the epoch's end; a checkpoint
    stores their sum over ranks (rank 0 continues from it, the other ranks from zero).

    When the true labels are known (a benchmark with injected noise), give
    them with ``true_labels_path`` (a ``torch.save``-d ``(N,)`` tensor) or
    :meth:`set_true_labels` to log the corrections' precision (classification).

    Args:
        threshold: The confidence a prediction needs (strictly above) to relabel an element (ADELE: 0.8).
        relative_change: ADELE's ``r`` in ``(0, 1)``: the relative drop of the fitted slope that ends early learning.
        min_epochs: Agreement points needed before the first fit (at least 2; three parameters want 3).
        horizon: The last epoch the detector considers (ADELE's ``n_epoch``); ``None``: the trainer's
            ``max_epochs`` (1000 if unbounded).
        start_epoch: If set, correct every class from this (0-based) epoch on, whatever the detector says.
        source: ``"student"`` or ``"teacher"`` (the :class:`~lightning_reg.EMATeacher`'s prediction).
        num_samples: Training-set size (classification's table); inferred from the train dataloader if ``None``.
        table_device: ``"auto"`` (the module's device) or ``"cpu"``.
        true_labels_path: Optional path of a ``torch.save``-d ``(N,)`` tensor of true labels.

    Logged metrics (at each epoch's end):

    ==========================================  ============================================================
    ``label_correction/num_corrected``           samples whose label is currently corrected (classification)
    ``label_correction/relabeled_fraction``      the share of labelled elements (samples, pixels, tokens)
                                                 trained on a corrected label during the epoch
    ``label_correction/active_classes``          classes whose early learning has ended (being corrected)
    ``label_correction/agreement``               mean per-class IoU of predictions and given labels this epoch
    ``label_correction/precision``               fraction of corrections equal to the true label (if known
                                                 and at least one correction exists; classification)
    ==========================================  ============================================================

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
    layouts = frozenset({"classification", "dense"})
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
        self._placed = False  # counts on the step's device (and the table, for classification)
        self._teacher: TeacherProvider | None = None
        self._counts: Tensor | None = None  # (3, C) long: TP, predicted, given, this rank's since the epoch's start
        self._relabeled: Tensor | None = None  # (2,) long: elements trained on a corrected label, labelled elements
        self._counts_global = False  # the loaded counts are a DDP checkpoint's sum over ranks
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
            self.set_true_labels(load_true_labels(self.true_labels_path, "LabelCorrection"))

    def set_true_labels(self, true_labels: Tensor) -> None:
        """Give the true ``(N,)`` labels (indexed like the training set) to log the corrections' precision."""
        if not isinstance(true_labels, Tensor) or true_labels.dim() != 1 or true_labels.is_floating_point():
            raise TypeError(
                "Expected `true_labels` to be a 1-D integer tensor with one label per training sample, but got"
                f" {type(true_labels).__name__ if not isinstance(true_labels, Tensor) else true_labels.dtype}"
                f"{'' if not isinstance(true_labels, Tensor) else f' of shape {tuple(true_labels.shape)}'}."
            )
        self._true_labels = true_labels.detach().to("cpu", torch.long)

    def _ensure(self, trainer: Trainer, logits: Tensor, class_dim: int = -1, table: bool = True) -> None:
        """Place the counts on the step's device (and allocate classification's table) at the first step."""
        if self._placed:
            return
        if table:
            n = self.num_samples if self.num_samples is not None else infer_num_samples(trainer, "LabelCorrection")
            self.table.allocate(n, None, device=logits.device)
        c = int(logits.shape[class_dim])
        if self._counts is None:
            self._counts = torch.zeros(3, c, dtype=torch.long, device=logits.device)
        elif self._counts.shape[1] != c:
            raise ValueError(f"The checkpointed agreement counts have {self._counts.shape[1]} classes, the model {c}.")
        else:
            self._counts = self._counts.to(logits.device)
        relabeled = self._relabeled if self._relabeled is not None else torch.zeros(2, dtype=torch.long)
        self._relabeled = relabeled.to(logits.device)
        if self._counts_global and int(getattr(trainer, "global_rank", 0)) != 0:
            # A DDP checkpoint holds the epoch's counts summed over ranks: rank 0 continues from the sum, the
            # others from zero, so the end-of-epoch all-reduce gives the same total as an uninterrupted run.
            self._counts.zero_()
            self._relabeled.zero_()
        self._counts_global = False
        if self._detected_epoch is None:
            self._detected_epoch = torch.full((c,), -1, dtype=torch.long)
        self._active = None
        self._placed = True

    # -- the label stage ------------------------------------------------------------------------------------------
    def _predictions(self, ctx: StepContext) -> Tensor:
        if self.source == "teacher" and _teacher_ready(self._teacher):
            assert self._teacher is not None
            return ctx.teacher_probs(self._teacher)
        if ctx.extras.get("clean_x") is None or ctx.x is ctx.extras.get("clean_x"):
            return ctx.probs()
        return ctx.student_clean_probs(type(self).__name__)

    def _active_classes(self, epoch: int, device: torch.device) -> Tensor | None:
        """The (C,) bool mask of classes being corrected in ``epoch`` on ``device``, or ``None`` if none (cached)."""
        if self._active is not None and self._active[0] == epoch:
            return self._active[1]
        assert self._detected_epoch is not None
        active = self._detected_epoch >= 0
        if self.start_epoch is not None and epoch >= self.start_epoch:
            active = torch.ones_like(active)
        mask = active.to(device) if bool(active.any()) else None  # one host read per epoch
        self._active = (epoch, mask)
        return mask

    def refine_labels(self, ctx: StepContext) -> None:
        if not ctx.training:
            return  # validation, test, sanity check: no counts, no table, no relabelling by (non-training) index
        assert ctx.logits is not None
        trainer = ctx.module.trainer
        dense = ctx.is_dense
        index = None if dense else ctx.require_index(type(self).__name__)
        self._ensure(trainer, ctx.logits, ctx.class_dim, table=not dense)
        assert self._counts is not None and self._relabeled is not None
        probs = self._predictions(ctx)
        conf, pred = probs.max(dim=ctx.class_dim)
        given = ctx.given_labels
        valid = given != ctx.ignore_index  # labelled elements only: unlabeled samples never count
        self._counts += class_agreement_counts(pred, given, probs.shape[ctx.class_dim], valid=valid)
        active = self._active_classes(trainer.current_epoch, given.device)
        if active is None:
            self._relabeled[1] += valid.sum()
            return
        if dense:  # ADELE's rule, recomputed from the current prediction each step: no per-element table
            changed = valid & active[pred] & (conf > self.threshold) & (pred != given)
            ctx.labels = torch.where(changed, pred, ctx.labels)
        else:
            assert index is not None
            old, _ = self.table.read(index, device=given.device)
            safe = torch.where(valid, given, torch.zeros_like(given))
            eligible = valid & active[safe] & active[pred] & (conf > self.threshold)
            proposal = torch.where(pred != given, pred.float(), torch.full_like(old, -1.0))
            new = torch.where(eligible, proposal, old)
            # Rows of unlabeled samples are non-finite, which the table does not write (no host sync).
            self.table.write(index, torch.where(valid, new, torch.full_like(new, math.nan)), strategy=trainer.strategy)
            changed = valid & (new >= 0)
            ctx.labels = torch.where(changed, new.long(), ctx.labels)
        self._relabeled += torch.stack([changed.sum(), valid.sum()])

    # -- epoch end: detection and logging -------------------------------------------------------------------------
    def _horizon(self, trainer: Trainer) -> int:
        if self.horizon is not None:
            return self.horizon
        me = trainer.max_epochs
        return int(me) if me is not None and me > 1 else 1000

    def _summed_over_ranks(self, trainer: Trainer) -> tuple[Tensor, Tensor]:
        """This epoch's ``(counts, relabeled)`` summed over DDP ranks (one all-reduce; a collective call)."""
        assert self._counts is not None and self._relabeled is not None
        packed = torch.cat([self._counts.flatten(), self._relabeled])
        strategy = trainer.strategy
        if getattr(strategy, "world_size", 1) > 1:
            packed = strategy.reduce(packed, reduce_op="sum")
        packed = packed.cpu()
        c = self._counts.shape[1]
        return packed[: 3 * c].view(3, c), packed[3 * c :]

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._counts is None or self._detected_epoch is None or self._relabeled is None:
            return
        counts, relabeled = self._summed_over_ranks(trainer)
        iou = class_iou(counts)
        self._counts.zero_()
        self._relabeled.zero_()
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
            f"{self.name}/relabeled_fraction": float(relabeled[0]) / max(1, int(relabeled[1])),
            f"{self.name}/active_classes": float(int((self._detected_epoch >= 0).sum())),
            f"{self.name}/agreement": float(iou.mean()),
        }
        if self.table.is_allocated:
            logs[f"{self.name}/num_corrected"] = float(self.num_corrected)
        precision = self.precision()
        if precision is not None:
            logs[f"{self.name}/precision"] = precision
        for key, value in logs.items():
            pl_module.log(key, value, on_step=False, on_epoch=True)

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        """Under DDP, store the running epoch's counts summed over ranks (every rank saves the checkpoint)."""
        if getattr(trainer.strategy, "world_size", 1) <= 1 or self._counts is None or self._relabeled is None:
            return
        state = checkpoint.get("callbacks", {}).get(self.state_key)
        if state is None:
            return
        counts, relabeled = self._summed_over_ranks(trainer)
        state["counts"], state["relabeled"], state["counts_global"] = counts, relabeled, True

    # -- results --------------------------------------------------------------------------------------------------
    def corrections(self) -> Tensor:
        """The ``(N,)`` long tensor of corrected labels, ``-1`` where a sample keeps its given label (classification).

        Dense outputs keep no table (their corrections are recomputed in each step), so there is none to return.
        """
        if not self.table.is_allocated:
            raise RuntimeError(
                "`LabelCorrection` has no table: train (or load a checkpoint) first. Dense outputs keep none (their"
                " corrected labels are recomputed from the prediction in each step)."
            )
        return self.table.dense().long()

    @property
    def num_corrected(self) -> int:
        """How many samples currently have a corrected label (a host sync: not for per-step use; 0 for dense)."""
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
            "relabeled": None if self._relabeled is None else self._relabeled.detach().cpu().clone(),
            "counts_global": False,  # `on_save_checkpoint` stores the sum over DDP ranks and sets it
            "detected_epoch": None if self._detected_epoch is None else self._detected_epoch.clone(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        check_choice("version", state_dict.get("version"), [self.version])
        self.table.load_state_dict(state_dict["table"])
        history = state_dict["history"]
        self._history = [row.clone() for row in history] if history.numel() else []
        self._counts = None if state_dict["counts"] is None else state_dict["counts"].clone()
        relabeled = state_dict.get("relabeled")
        self._relabeled = None if relabeled is None else relabeled.clone()
        self._counts_global = bool(state_dict.get("counts_global", False))
        de = state_dict["detected_epoch"]
        self._detected_epoch = None if de is None else de.clone()
        self._active = None
        self._placed = False
