"""``PseudoLabel``: FixMatch-style confident pseudo-labels on unlabeled data (and MIC's per-pixel variant)."""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor

from lightning_reg.augment import (
    Augmentation,
    AugmentationLike,
    Compose,
    Cutout,
    MultiScale,
    RandAugment,
    RandomFlip,
    RandomResizedCrop,
    WeakAugment,
    get_augmentation,
)
from lightning_reg.core.protocol import LossRegularizer, StepContext, TeacherProvider, classes_last, find_teacher
from lightning_reg.core.validation import check_bool, check_choice, check_float, check_int, load_true_labels
from lightning_reg.functional.pseudo_label import (
    align_distribution,
    confidence_quality,
    pseudo_label_loss,
    pseudo_label_targets,
)

__all__ = ["PseudoLabel"]

_GEOMETRIC_RANDAUGMENT_OPS = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")
_PHOTOMETRIC_RANDAUGMENT_OPS = [op for op in RandAugment.OPS if op not in _GEOMETRIC_RANDAUGMENT_OPS]


def _moves_elements(aug: Augmentation) -> str | None:
    """Why ``aug`` moves pixels (or tokens) away from their position, or ``None`` if it keeps them in place.

    Only the built-in augmentations are known; a custom one is trusted to keep positions.
    """
    if isinstance(aug, Compose):
        return next((r for r in map(_moves_elements, aug.augmentations) if r is not None), None)
    if isinstance(aug, WeakAugment):
        return "flips and shifts the image" if aug.flip_p > 0 or aug.translate > 0 else None
    if isinstance(aug, RandomFlip):
        return "flips the input" if aug.p > 0 else None
    if isinstance(aug, RandomResizedCrop):
        return "crops and resizes the image"
    if isinstance(aug, MultiScale):
        return "rescales the image"
    if isinstance(aug, RandAugment):
        geometric = [op for op in aug.ops if op in _GEOMETRIC_RANDAUGMENT_OPS]
        return f"applies the geometric ops {geometric}" if geometric and aug.num_ops > 0 else None
    return None


def _image_only(aug: Augmentation) -> bool:
    """Whether ``aug`` only makes sense on ``(B, C, H, W)`` images."""
    if isinstance(aug, Compose):
        return any(_image_only(a) for a in aug.augmentations)
    return isinstance(aug, (WeakAugment, RandAugment, Cutout, RandomResizedCrop, MultiScale))


def _teacher_ready(teacher: TeacherProvider | None) -> bool:
    return teacher is not None and bool(getattr(teacher, "has_updated", True))


class PseudoLabel(LossRegularizer):
    r"""FixMatch: train the student on a strong view towards the teacher's confident pseudo-label of a weak view.

    .. math:: \mathcal L_u = \lambda_u\,\frac{1}{|U|}\sum_{u \in U} \mathbb 1[\max_c q_{uc} \ge \tau]\;
              \mathrm{CE}\big(\arg\max_c q_{uc},\ f(\mathcal A(u))\big),\qquad
              q_u = \mathrm{softmax}(f_\text{teacher}(\alpha(u)))

    over the batch's unlabeled samples :math:`U` (FixMatch's :math:`\mu B`): masked samples count in the
    denominator. Papers: FixMatch https://arxiv.org/abs/2001.07685 (``τ = 0.95``, ``λ_u = 1``, weak view
    flip + translate, strong view RandAugment + Cutout); *Pseudo-Labeling and Confirmation Bias*
    https://arxiv.org/abs/1908.02983 (soft pseudo-labels); ReMixMatch https://arxiv.org/abs/1911.09785
    (distribution alignment); MIC https://arxiv.org/abs/2212.01322 (per-pixel pseudo-labels with a quality
    weight). Functional core: :mod:`lightning_reg.functional.pseudo_label`.

    **Which samples** (``on``): ``"unlabeled"`` (default) uses the rows of a semi-supervised batch beyond
    ``ctx.num_labeled`` (a ``CombinedLoader({"labeled": ..., "unlabeled": ...})``), or, with one loader,
    the samples without any valid label (every element ``ignore_index``). ``"all"`` uses every sample.
    With one loader which rows are unlabeled is only known on the device, so, to avoid a host sync, the
    views of *every* row are forwarded and the labeled rows are masked out of the term; a ``CombinedLoader``
    forwards only the unlabeled rows.

    **The teacher's prediction** :math:`q` (fp32, no gradient), on the weak view :math:`\alpha(u)`:

    * ``teacher="self"`` (FixMatch): the model itself. With ``weak_augmentation=None`` the weak view is the
      batch's own input (let the datamodule yield weakly augmented unlabeled samples): :math:`q` is read from
      the step's logits, detached, with **no extra forward**. Otherwise, on a semi-supervised batch with
      ``on="unlabeled"``, the weak view replaces the unlabeled rows of the step's own forward (no extra
      forward either); in the remaining cases one no-grad forward of the weak view of the selected rows.
    * ``teacher="ema"`` (Mean-Teacher-style FixMatch, MIC): the trainer's :class:`~lightning_reg.EMATeacher`
      via :meth:`~lightning_reg.core.protocol.StepContext.teacher_probs`: one teacher forward per view and
      step, shared with every other consumer of the same view (``key="clean"`` for ``weak_augmentation=None``,
      ``"weak"`` for the default :class:`~lightning_reg.augment.WeakAugment`, so the view covers the whole
      batch). Until the EMA's first update it falls back to ``"self"``.

    Then, optionally, distribution alignment (:math:`q \leftarrow \mathrm{normalize}(q\,p_\text{target} /
    \bar p_\text{model})`, :math:`\bar p_\text{model}` the mean prediction on unlabeled elements over the last
    ``da_length`` steps, all-reduced over DDP ranks, checkpointed); the mask :math:`\max_c q_c \ge \tau`; and the
    target: the arg-max, or with ``soft=True`` :math:`q^{1/T}` normalised.

    **The student** sees the strong view :math:`\mathcal A(u)` of the selected rows *with* gradients
    (FixMatch's inherent cost). Through :meth:`add_views` the view joins the step's single forward, as in
    FixMatch's reference code: ``forward(cat(x_l, weak(u), strong(u)))``, one autocast region, one DDP graph,
    and BatchNorm sees the three parts as one batch (with ``teacher="self"``, a weak view and a
    semi-supervised batch, the unlabeled rows of that forward *are* the weak view, so the pseudo-labels cost no
    forward either). Only when an input-stage regularizer (mixup, CutMix) changed the batch does the strong view
    run in a forward of its own. ``strong_augmentation=None`` reuses the step's own logits instead (Lee's
    Pseudo-Label: no extra view at all).

    **Dense outputs** (segmentation ``(B, C, H, W)``, tokens ``(B, T, C)``): every element gets its own
    pseudo-label and the mean runs over the selected samples' elements. The views must keep every element in
    place, so geometric augmentations (the default :class:`~lightning_reg.augment.WeakAugment`, RandAugment's
    rotate/shear/translate ops) are refused at the first step with the fix; use ``weak_augmentation=None``
    (the datamodule's view, as MIC's teacher sees the clean image) and a photometric strong view such as
    ``RandAugment(ops=[...photometric...])`` or :class:`~lightning_reg.augment.PatchMask` (MIC's masking).
    Token inputs refuse image augmentations; use e.g. :class:`~lightning_reg.augment.GaussianNoise` or
    :class:`~lightning_reg.augment.PatchMask`, or ``strong_augmentation=None``. With ``quality_weight=True``
    (MIC, DAFormer) pixels are not masked: each image's CE is weighted by the share of its confident pixels
    (DAFormer's equation is per image; its code pools the share over each GPU's batch). MIC uses ``τ = 0.968``.
    The padding of an unlabeled token sequence cannot be told from its tokens (both are ``ignore_index``),
    so it is pseudo-labelled too.

    **Hidden labels.** When the true labels of the unlabeled samples are known (a benchmark that hides them),
    give them, indexed like the training table (labeled and unlabeled samples in one index), with
    ``true_labels_path`` (a ``torch.save``-d ``(N,)`` or ``(N, *d)`` integer tensor, ``ignore_index`` where
    unknown) or :meth:`set_true_labels` to log the kept pseudo-labels' accuracy (the batch needs indices).
    Without either, a datamodule's ``true_labels`` tensor is used when it has one
    (:class:`~lightning_reg.data.semi_supervised.SemiSupervisedDataModule` keeps the hidden labels of its
    unlabeled part); then batches without indices just skip the accuracy.

    Outside training steps (sanity check, validation, test) it adds no term and changes no state.

    Args:
        threshold: The confidence threshold ``τ`` in ``[0, 1]`` (FixMatch: 0.95; MIC: 0.968).
        weight: The term's weight ``λ_u >= 0`` (FixMatch: 1).
        teacher: ``"self"`` or ``"ema"`` (see above).
        weak_augmentation: The teacher's view: an :class:`~lightning_reg.augment.Augmentation` (``class_path``
            in YAML), a short name (default ``"weak"``: :class:`~lightning_reg.augment.WeakAugment`, flip and
            12.5 % translation), or ``None`` for the batch's own input (no extra forward with ``teacher="self"``).
        strong_augmentation: The student's view: an augmentation or a short name (default ``"strong"``:
            :class:`~lightning_reg.augment.RandAugment`, two random ops and Cutout), or ``None`` for the batch's
            own input.
        on: ``"unlabeled"`` or ``"all"`` samples (see above).
        soft: Soft pseudo-labels :math:`q^{1/T}` (normalised) instead of the arg-max.
        temperature: ``T > 0`` for soft labels (1: ``q`` itself, as USB's FixMatch).
        distribution_alignment: Align :math:`q` to ``da_target`` before thresholding (ReMixMatch, USB).
        da_target: ``"uniform"``, ``"labeled"`` (the class frequencies of the labeled elements over the same
            window) or a list of ``C`` class probabilities.
        da_length: The window of :math:`\bar p_\text{model}` in steps (ReMixMatch: 128).
        quality_weight: MIC's quality weight instead of the per-element mask (dense outputs).
        true_labels_path: Optional path of a ``torch.save``-d tensor of hidden true labels (see above).

    Logged metrics:

    ==============================  ===================================================================
    ``train/loss_pseudo_label``      the term :math:`\mathcal L_u` (weight included)
    ``pseudo_label/weight``          :math:`\lambda_u`
    ``pseudo_label/mask_rate``       the fraction of selected samples (elements) with :math:`\max q \ge \tau`
    ``pseudo_label/accuracy``        the fraction of kept pseudo-labels equal to the hidden true label
                                     (with true labels; 0 on a step that keeps none)
    ==============================  ===================================================================

    Example:
        >>> import lightning as L
        >>> from lightning_reg import EMATeacher
        >>> fixmatch = PseudoLabel(threshold=0.95, teacher="ema")
        >>> trainer = L.Trainer(callbacks=[fixmatch, EMATeacher(decay=0.999)], logger=False)

    YAML::

        trainer:
          callbacks:
            - class_path: lightning_reg.PseudoLabel
              init_args:
                threshold: 0.95
                strong_augmentation:
                  class_path: lightning_reg.augment.RandAugment
                  init_args: {num_ops: 2, cutout: 0.5}
    """

    name = "pseudo_label"
    stage = "loss"
    requires_index = False
    needs_labels = False
    layouts = frozenset({"classification", "dense"})
    version = 1

    def __init__(
        self,
        threshold: float = 0.95,
        weight: float = 1.0,
        teacher: Literal["self", "ema"] = "self",
        weak_augmentation: AugmentationLike | None = "weak",
        strong_augmentation: AugmentationLike | None = "strong",
        on: Literal["unlabeled", "all"] = "unlabeled",
        soft: bool = False,
        temperature: float = 1.0,
        distribution_alignment: bool = False,
        da_target: Literal["uniform", "labeled"] | list[float] = "uniform",
        da_length: int = 128,
        quality_weight: bool = False,
        true_labels_path: str | None = None,
    ) -> None:
        super().__init__()
        self.threshold = check_float("threshold", threshold, 0.0, 1.0)
        self.weight = check_float("weight", weight, 0.0)
        self.teacher = check_choice("teacher", teacher, ["self", "ema"])
        self.weak_augmentation = self._resolve(weak_augmentation, "weak_augmentation")
        self.strong_augmentation = self._resolve(strong_augmentation, "strong_augmentation")
        self.on = check_choice("on", on, ["unlabeled", "all"])
        self.soft = check_bool("soft", soft)
        self.temperature = check_float("temperature", temperature, 0.0, low_inclusive=False)
        self.distribution_alignment = check_bool("distribution_alignment", distribution_alignment)
        self.da_target: str | list[float] = self._check_da_target(da_target)
        self.da_length = check_int("da_length", da_length, low=1)
        self.quality_weight = check_bool("quality_weight", quality_weight)
        if true_labels_path is not None and not isinstance(true_labels_path, str):
            raise TypeError(f"Expected argument `true_labels_path` to be a str or None, but got {true_labels_path!r}.")
        self.true_labels_path = true_labels_path
        self._teacher: TeacherProvider | None = None
        self._true_labels: Tensor | None = None
        self._true_on_device: Tensor | None = None
        self._true_from_datamodule = False
        self._checked_layouts: set[tuple[str, bool]] = set()
        # Distribution alignment: a ring of per-step sums [sum of q over the unlabeled elements (C), their count,
        # label counts of the labeled elements (C), their count], all-reduced over ranks; `_da_steps` pushes so far.
        self._da_queue: Tensor | None = None
        self._da_steps = 0

    @staticmethod
    def _resolve(aug: AugmentationLike | None, name: str) -> Augmentation | None:
        if aug is None:
            return None
        out = get_augmentation(aug, name)
        if out.num_views != 1:
            raise ValueError(
                f"Expected argument `{name}` to be a single-view augmentation, but got {out!r} with {out.num_views}"
                " views."
            )
        return out

    @staticmethod
    def _check_da_target(value: Any) -> str | list[float]:
        if isinstance(value, str):
            return check_choice("da_target", value, ["uniform", "labeled"])
        if isinstance(value, (list, tuple)) and len(value) >= 2:
            probs = [check_float("da_target", v, 0.0) for v in value]
            if sum(probs) > 0:
                total = sum(probs)
                return [p / total for p in probs]
        raise ValueError(
            "Expected argument `da_target` to be 'uniform', 'labeled' or a list of at least two non-negative class"
            f" probabilities with a positive sum, but got {value!r}."
        )

    # -- setup ----------------------------------------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.teacher == "ema":
            self._teacher = find_teacher(trainer)
            if self._teacher is None:
                raise ValueError(
                    "`PseudoLabel(teacher='ema')` takes its pseudo-labels from an EMA teacher, but the trainer has no"
                    " callback with `teacher_forward`. Add `EMATeacher(decay=0.999)` to the Trainer's callbacks, or"
                    " use `PseudoLabel(teacher='self')`."
                )
        if self.true_labels_path is not None and self._true_labels is None:
            self.set_true_labels(load_true_labels(self.true_labels_path, "PseudoLabel"))
        if self._true_labels is None:  # a datamodule that keeps hidden labels (SemiSupervisedDataModule)
            true = getattr(getattr(trainer, "datamodule", None), "true_labels", None)
            if isinstance(true, Tensor) and true.dim() >= 1 and not true.is_floating_point():
                self.set_true_labels(true)
                self._true_from_datamodule = True

    def set_true_labels(self, true_labels: Tensor) -> None:
        """Give the hidden true labels, ``(N,)`` or ``(N, *d)`` indexed like the training table, to log accuracy."""
        if not isinstance(true_labels, Tensor) or true_labels.dim() < 1 or true_labels.is_floating_point():
            raise TypeError(
                "Expected `true_labels` to be an integer tensor with one label (or label map) per training sample,"
                f" but got {type(true_labels).__name__ if not isinstance(true_labels, Tensor) else true_labels.dtype}"
                f"{'' if not isinstance(true_labels, Tensor) else f' of shape {tuple(true_labels.shape)}'}."
            )
        self._true_labels = true_labels.detach().to("cpu", torch.long)
        self._true_on_device = None
        self._true_from_datamodule = False

    # -- checks ---------------------------------------------------------------------------------------------------
    def _check_views(self, ctx: StepContext) -> None:
        """Refuse views that break the element-wise correspondence of dense pseudo-labels (once per layout)."""
        tokens = ctx.layout == "channels_last" and ctx.is_dense
        key = (ctx.layout, ctx.is_dense)
        if key in self._checked_layouts:
            return
        if ctx.is_dense:
            what = "token" if tokens else "pixel"
            for arg in ("weak_augmentation", "strong_augmentation"):
                aug = getattr(self, arg)
                if aug is None:
                    continue
                if tokens and _image_only(aug):
                    raise ValueError(
                        f"`PseudoLabel` got (B, T, C) token logits, but its `{arg}` {aug!r} is an image augmentation."
                        " Pass a view that suits token inputs, e.g. `GaussianNoise(std=0.1)` or `PatchMask`"
                        " (`lightning_reg.augment`), your own `Augmentation`, or `None` (the batch's own input)."
                    )
                reason = _moves_elements(aug)
                if reason is not None:
                    raise ValueError(
                        f"`PseudoLabel` gives each {what} the teacher's pseudo-label at the same position, so its views"
                        f" must keep every {what} in place, but `{arg}` {aug!r} {reason}. For dense outputs pass"
                        " `weak_augmentation=None` (the datamodule's view, as MIC's teacher sees the full image) and a"
                        f" photometric `strong_augmentation`, e.g. `RandAugment(ops={_PHOTOMETRIC_RANDAUGMENT_OPS})` or"
                        " `PatchMask(patch_size=..., mask_ratio=0.5)` (MIC)."
                    )
        self._checked_layouts.add(key)

    # -- the loss term --------------------------------------------------------------------------------------------
    def _weak_key(self) -> str:
        aug = self.weak_augmentation
        return "weak" if aug == WeakAugment() else f"weak:{aug!r}"

    def _clean(self, ctx: StepContext) -> Tensor:
        return ctx.clean_input(type(self).__name__)

    def _input_unchanged(self, ctx: StepContext) -> bool:
        """Whether the step forwarded the batch's own input (no input-stage regularizer such as mixup changed it)."""
        return ctx.x is ctx.extras.get("clean_x", ctx.x) or bool(ctx.extras.get(self._WEAK_IN_MAIN))

    # -- views in the step's one forward (FixMatch: forward(cat(x_l, weak(u), strong(u)))) -------------------------
    _WEAK_IN_MAIN = "pseudo_label/weak_in_main"
    _STRONG = "pseudo_label/strong"

    def add_views(self, ctx: StepContext) -> None:
        """Put the views into the step's single forward, as FixMatch's reference implementation does.

        With ``teacher="self"``, a weak view and a semi-supervised batch, the unlabeled rows of the
        forwarded input *are* replaced by their weak view, so the pseudo-labels come from the step's own
        logits (detached); the strong view of the selected rows is appended to the same forward.
        """
        if self.on == "unlabeled" and ctx.num_labeled is None and not isinstance(ctx.x, Tensor):
            return
        self._check_views(ctx)
        if not self._input_unchanged(ctx):  # an input-stage regularizer (mixup) changed the input: forward apart
            return
        rows, _ = ctx.term_rows(self.on)
        clean = self._clean(ctx)
        if clean[rows].shape[0] == 0:
            return
        if self.strong_augmentation is not None:
            ctx.add_view(self._STRONG, self.strong_augmentation(clean[rows]))
        if (
            self.teacher == "self"
            and self.weak_augmentation is not None
            and self.on == "unlabeled"
            and ctx.num_labeled is not None
        ):
            n = ctx.num_labeled
            ctx.x = torch.cat([clean[:n], self.weak_augmentation(clean[n:])])
            ctx.extras[self._WEAK_IN_MAIN] = True

    def _teacher_probs(self, ctx: StepContext, rows: slice) -> Tensor:
        if ctx.extras.get(self._WEAK_IN_MAIN):  # the step's forward saw the weak view of these rows
            return ctx.probs()[rows]
        teacher = self._teacher if self.teacher == "ema" and _teacher_ready(self._teacher) else None
        if teacher is not None:
            if self.weak_augmentation is None:
                return ctx.teacher_probs(teacher)[rows]
            key = self._weak_key()
            views: dict[str, Tensor] = ctx.extras.setdefault("_views", {})
            if key not in views:  # one weak view of the whole batch per step, shared by consumers of the key
                views[key] = self.weak_augmentation(self._clean(ctx))
            return ctx.teacher_probs(teacher, x=views[key], key=key)[rows]
        if self.weak_augmentation is None:
            probs = ctx.probs() if self._input_unchanged(ctx) else ctx.student_clean_probs(type(self).__name__)
            return probs[rows]
        with torch.no_grad():
            logits = ctx.module(self.weak_augmentation(self._clean(ctx)[rows]))
        return torch.softmax(logits.detach().float(), dim=ctx.class_dim)

    def _student_logits(self, ctx: StepContext, rows: slice) -> Tensor:
        assert ctx.logits is not None
        if self._STRONG in ctx.view_logits:  # forwarded with the batch
            return ctx.view_logits[self._STRONG]
        if self.strong_augmentation is None:
            return ctx.logits[rows] if self._input_unchanged(ctx) else ctx.module(self._clean(ctx)[rows])
        return ctx.module(self.strong_augmentation(self._clean(ctx)[rows]))

    def loss_term(self, ctx: StepContext) -> Tensor | None:
        if not ctx.training:
            return None
        assert ctx.logits is not None
        self._check_views(ctx)
        rows, row_valid = ctx.term_rows(self.on)
        labels = ctx.labels[rows]
        ctx.logs[f"{self.name}/weight"] = self.weight
        if labels.shape[0] == 0:  # a semi-supervised batch without unlabeled rows
            if self.distribution_alignment:  # still join the step's all-reduce (with zero statistics)
                self._align(ctx, ctx.probs()[rows], None)
            zero = torch.zeros((), device=ctx.logits.device)
            ctx.logs[f"{self.name}/mask_rate"] = zero
            return zero
        valid = None
        if row_valid is not None:
            valid = row_valid.view(-1, *([1] * (labels.dim() - 1))).expand(labels.shape)
        q = self._teacher_probs(ctx, rows)
        if self.distribution_alignment:
            q = self._align(ctx, q, valid)
        targets, mask = pseudo_label_targets(q, self.threshold, self.soft, self.temperature, dim=ctx.class_dim)
        if self.quality_weight:
            w = confidence_quality(mask, valid).view(-1, *([1] * (labels.dim() - 1)))
        else:
            w = mask
        student = self._student_logits(ctx, rows)
        loss = pseudo_label_loss(student, targets, w, dim=ctx.class_dim, valid=valid)
        kept = mask if valid is None else mask & valid
        n = labels.numel() if valid is None else valid.sum().clamp_min(1)
        ctx.logs[f"{self.name}/mask_rate"] = kept.sum() / n
        if self._true_labels is not None and (ctx.index is not None or not self._true_from_datamodule):
            ctx.logs[f"{self.name}/accuracy"] = self._accuracy(ctx, rows, q, kept)
        return self.weight * loss

    def _accuracy(self, ctx: StepContext, rows: slice, q: Tensor, kept: Tensor) -> Tensor:
        index = ctx.require_index(type(self).__name__)[rows]
        if self._true_on_device is None or self._true_on_device.device != index.device:
            assert self._true_labels is not None
            self._true_on_device = self._true_labels.to(index.device)
        true = self._true_on_device[index]
        if true.shape != kept.shape:
            raise ValueError(
                f"Expected the true labels to have one label per element, {tuple(kept.shape[1:])} per sample, but got"
                f" {tuple(true.shape[1:])}."
            )
        known = kept & (true != ctx.ignore_index)
        correct = known & (q.argmax(dim=ctx.class_dim) == true)
        return correct.sum() / known.sum().clamp_min(1)

    # -- distribution alignment -----------------------------------------------------------------------------------
    def _align(self, ctx: StepContext, q: Tensor, valid: Tensor | None) -> Tensor:
        c = int(q.shape[ctx.class_dim])
        flat = classes_last(q, ctx.layout).reshape(-1, c)
        v = torch.ones(flat.shape[0], device=q.device) if valid is None else valid.reshape(-1).float()
        parts = [(flat * v[:, None]).sum(0), v.sum().view(1)]
        if self.da_target == "labeled":
            given = ctx.given_labels
            lv = given != ctx.ignore_index
            counts = F.one_hot(torch.where(lv, given, torch.zeros_like(given)).reshape(-1), c).float()
            counts = counts * lv.reshape(-1, 1)
            parts += [counts.sum(0), lv.sum().view(1).float()]
        stats = torch.cat(parts)
        trainer = getattr(ctx.module, "_trainer", None)  # None when called without a Trainer (tests, notebooks)
        strategy = getattr(trainer, "strategy", None)
        if strategy is not None and getattr(strategy, "world_size", 1) > 1:
            stats = strategy.reduce(stats, reduce_op="sum")
        queue = self._queue(stats, c)
        queue[self._da_steps % self.da_length] = stats
        self._da_steps += 1
        window = queue[: min(self._da_steps, self.da_length)].sum(0)
        uniform = torch.full((c,), 1.0 / c, device=q.device)
        p_model = torch.where(window[c] > 0, window[:c] / window[c].clamp_min(1e-12), uniform)
        if self.da_target == "uniform":
            p_target = uniform
        elif self.da_target == "labeled":
            p_target = torch.where(window[-1] > 0, window[c + 1 : 2 * c + 1] / window[-1].clamp_min(1.0), uniform)
        else:
            p_target = torch.tensor(self.da_target, device=q.device)
        return align_distribution(q, p_target, p_model, dim=ctx.class_dim)

    def _queue(self, stats: Tensor, c: int) -> Tensor:
        if isinstance(self.da_target, list) and len(self.da_target) != c:
            raise ValueError(
                f"Expected argument `da_target` to hold one probability per class ({c}), but got {len(self.da_target)}."
            )
        if self._da_queue is None:
            self._da_queue = torch.zeros(self.da_length, stats.numel(), device=stats.device)
        elif self._da_queue.shape != (self.da_length, stats.numel()):
            raise ValueError(
                f"The checkpointed distribution-alignment window has shape {tuple(self._da_queue.shape)}, but this run"
                f" needs {(self.da_length, stats.numel())} (da_length, statistics of {c} classes); keep `da_length`,"
                " `da_target` and the number of classes when resuming."
            )
        elif self._da_queue.device != stats.device:
            self._da_queue = self._da_queue.to(stats.device)
        return self._da_queue

    @property
    def p_model(self) -> Tensor | None:
        """The current :math:`\\bar p_\\text{model}` of distribution alignment (``None`` before the first step)."""
        if self._da_queue is None or self._da_steps == 0:
            return None
        window = self._da_queue[: min(self._da_steps, self.da_length)].sum(0)
        c = (window.numel() - 1) if self.da_target != "labeled" else (window.numel() - 2) // 2
        return window[:c] / window[c].clamp_min(1e-12)

    # -- state ----------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "da_queue": None if self._da_queue is None else self._da_queue.detach().cpu().clone(),
            "da_steps": self._da_steps,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        check_choice("version", state_dict.get("version"), [self.version])
        queue = state_dict.get("da_queue")
        self._da_queue = None if queue is None else queue.clone()
        self._da_steps = int(state_dict.get("da_steps", 0))
