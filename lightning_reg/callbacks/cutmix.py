"""``CutMix``: an input-stage regularizer that pastes a box from one image into another (and its label map)."""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import torch
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor

from lightning_reg.core.protocol import LossRegularizer, StepContext, TeacherProvider, find_teacher
from lightning_reg.core.validation import check_choice, check_float
from lightning_reg.functional.cutmix import copy_paste_partners, cutmix_area_lambda, cutmix_box, paste_box
from lightning_reg.functional.mixup import mixup_lambda, mixup_permutation, mixup_tensors

__all__ = ["CutMix", "CutMixRecord"]


class CutMixRecord(NamedTuple):
    """What :class:`CutMix` did in a step, kept in ``ctx.extras["cutmix"]``.

    Attributes:
        perm: ``(B,)`` the partner :math:`\\pi(i)` whose box was pasted into sample ``i`` (on the input's device).
        box: ``(1, 4)`` int64 CPU tensor ``(y0, y1, x0, x1)``: the pasted rows ``[y0, y1)`` and columns
            ``[x0, x1)`` of the last two input dimensions (one box for the whole batch).
        lam: :math:`\\lambda'`, the share of each image left in place (``1 - box area / (H W)``).
    """

    perm: Tensor
    box: Tensor
    lam: float


class CutMix(LossRegularizer):
    r"""CutMix (Yun et al., ICCV 2019) and, for segmentation, copy-paste of the label map (BCP, CVPR 2023).

    Each step draws :math:`\lambda \sim \mathrm{Beta}(\alpha, \alpha)`, one box of area about
    :math:`(1-\lambda) HW` at a uniformly random centre, clipped to the image, and a partner
    :math:`\pi(i)` for every sample; it pastes the partner's box into the input before the forward pass:

    .. math:: \tilde x_i = M \odot x_i + (1 - M) \odot x_{\pi(i)} \qquad (M = 0 \text{ inside the box})

    The box covers the input's last two dimensions (``(B, C, H, W)`` images). The target follows:

    * **Classification** (``(B, C)`` logits): the final target is mixed with the share of the image
      actually kept, :math:`\lambda' = 1 - |\text{box}| / HW` (after clipping, as the paper):
      :math:`\tilde q_i = \lambda' q_i + (1-\lambda') q_{\pi(i)}`. Like :class:`~lightning_reg.Mixup` it
      runs after every target refiner, so it mixes whatever target they produced.
    * **Segmentation** (``(B, C, H, W)`` logits, ``(B, H, W)`` labels of the input's spatial size): the
      label map is pasted with the same box, :math:`\tilde y_i = M \odot y_i + (1-M) \odot y_{\pi(i)}`
      (ignored pixels of the partner stay ignored where pasted), and so is a soft target if a refiner
      set one (e.g. :class:`~lightning_reg.LabelSmoothing`, PS-KD). The base loss is then CE on the
      pasted label map (or soft CE on the pasted target), over its labelled pixels.
    * **Tokens** (``logits_layout = "channels_last"``): refused with a clear error (there is no 2-D box).

    **Semi-supervised batches and BCP** (``pseudo_labels``):

    * ``"none"`` (default): no label is invented. In classification only labeled rows are mixed (among
      themselves; an unlabeled row is its own partner, as with Mixup). In segmentation the partners are
      a random permutation of the whole batch: a box pasted from an unlabeled image has no label (its
      pixels are ignored), a box pasted from a labeled image into an unlabeled one brings its labels.
    * ``"teacher"`` (Bidirectional Copy-Paste): every unlabeled image (no labelled element: the rows
      after ``ctx.num_labeled``, or in a single loader the rows whose labels are all ``ignore_index``) is
      labelled, before pasting, with the argmax of the trainer's :class:`~lightning_reg.EMATeacher` on
      the *clean* input (``ctx.teacher_probs(teacher)``, the per-step teacher forward shared with every
      other consumer), at every pixel. So the mixed label map carries ground truth inside the region a
      labeled image contributed (void pixels stay void) and the teacher's labels inside the region an
      unlabeled image contributed. With a ``CombinedLoader`` batch (``ctx.num_labeled`` known) partners
      cross the split as in BCP: each labeled image gets a box from an unlabeled one and each unlabeled
      image a box from a labeled one (:func:`~lightning_reg.functional.cutmix.copy_paste_partners`); in
      the single-loader form they are a random permutation (which costs one host sync per step to see
      whether the batch has unlabeled rows at all; batches without any skip the teacher forward). In
      classification the unlabeled rows' target is the teacher's one-hot label, mixed with :math:`\lambda'`.
      Differences from the paper: the box follows CutMix (random area) rather than BCP's fixed
      :math:`\tfrac{2}{3}H \times \tfrac{2}{3}W`, all pixels weigh the same (BCP down-weights the
      pseudo-labelled ones by 0.5), and the teacher's labels have no connected-component cleaning.

    **What other techniques see.** Input-stage ``transform_input`` pastes ``ctx.x`` and records
    ``ctx.extras["cutmix"] =`` :class:`CutMixRecord` ``(perm, box, lam)``; ``ctx.extras["clean_x"]``
    keeps the un-pasted input (teachers and extra views start from it). The label and target stages
    run on the batch's own labels, one sample each (a target built from teacher predictions on the
    clean input is thus pasted consistently). CutMix's own ``refine_target`` runs after them and
    pastes ``ctx.labels`` (segmentation; with pseudo-labels in ``"teacher"`` mode) and ``ctx.target``,
    so the base loss and the loss-stage terms see the *pasted* labels, target and ``ctx.valid``.
    ``ctx.given_labels`` stays the batch's labels, aligned with the clean input and the sample
    indices: techniques that keep per-sample state must key it on ``ctx.given_labels`` and
    ``ctx.num_labeled`` (not on ``ctx.labels``/``ctx.labeled`` after pasting, which may give an
    unlabeled image pasted pixels), and must not record predictions on the pasted input as a sample's
    own (use the teacher on the clean input, as ELR+ does with mixup).

    Randomness: :math:`\lambda` and the box come from torch's CPU generator, the partners from the
    input device's global generator, so seed per step for bit-exact resumes. Under DDP each rank
    pastes within its own batch. CutMix needs the :class:`~lightning_reg.RegularizedModule` mixin's
    ``training_step`` (or :meth:`~lightning_reg.RegularizedModule.prepare_inputs` in your own); with
    ``regularized_loss`` alone it would do nothing, so that raises on the first step.

    Args:
        alpha: The Beta concentration :math:`\alpha > 0` (the paper uses 1: :math:`\lambda` uniform).
        pseudo_labels: ``"none"`` or ``"teacher"`` (BCP: the EMA teacher labels the unlabeled images; needs
            an :class:`~lightning_reg.EMATeacher` among the callbacks).

    Logged metrics:

    ===============  ==================================================
    ``cutmix/lam``    :math:`\lambda'`, the share of each image kept
    ===============  ==================================================

    Example:
        >>> import lightning as L
        >>> trainer = L.Trainer(callbacks=[CutMix(alpha=1.0)], logger=False)

    YAML (BCP on a semi-supervised segmentation datamodule)::

        trainer:
          callbacks:
            - class_path: lightning_reg.EMATeacher
              init_args: {decay: 0.99}
            - class_path: lightning_reg.CutMix
              init_args: {alpha: 1.0, pseudo_labels: teacher}
    """

    name = "cutmix"
    stage = "input"
    version = 1
    layouts = frozenset({"classification", "dense"})

    def __init__(self, alpha: float = 1.0, pseudo_labels: Literal["none", "teacher"] = "none") -> None:
        super().__init__()
        self.alpha = check_float("alpha", alpha, 0.0, low_inclusive=False)
        self.pseudo_labels = check_choice("pseudo_labels", pseudo_labels, ["none", "teacher"])
        self._teacher: TeacherProvider | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.pseudo_labels == "teacher":
            self._teacher = find_teacher(trainer)
            if self._teacher is None:
                raise ValueError(
                    "`CutMix(pseudo_labels='teacher')` labels the unlabeled images with an EMA teacher's predictions,"
                    " but the trainer has no callback with `teacher_forward`. Add `EMATeacher(decay=0.999)` to the"
                    " Trainer's callbacks, or use `CutMix(pseudo_labels='none')`."
                )

    def _check_inputs(self, ctx: StepContext) -> Tensor:
        x = ctx.x
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise TypeError(
                "`CutMix` pastes boxes of the batch input, so it must be a floating-point tensor, but got"
                f" {type(x).__name__ if not isinstance(x, Tensor) else x.dtype}. Convert inputs to float (e.g. images"
                " to [0, 1]) in the dataset."
            )
        if x.dim() < 3:
            raise ValueError(
                "`CutMix` pastes a box over the input's last two (spatial) dimensions, so it needs inputs of shape"
                f" (batch, ..., height, width), but got shape {tuple(x.shape)}."
            )
        if ctx.is_dense:
            if ctx.layout != "channels_first":
                raise ValueError(
                    "`CutMix` pastes a 2-D box of the input and of the label map, so it does not support"
                    f" channels_last (token) outputs (labels of shape {tuple(ctx.labels.shape)}). Use it with"
                    " (B, C, H, W) segmentation logits, or remove it for this model."
                )
            if ctx.labels.dim() != 3 or ctx.labels.shape[-2:] != x.shape[-2:]:
                raise ValueError(
                    "`CutMix` pastes the label map with the input's box, so it needs (B, H, W) labels of the input's"
                    f" spatial size {tuple(x.shape[-2:])}, but got labels of shape {tuple(ctx.labels.shape)}."
                    " Resize the masks to the input in the dataset, or remove `CutMix` for this model."
                )
        return x

    def _partners(self, ctx: StepContext, batch_size: int, device: torch.device) -> Tensor:
        if self.pseudo_labels == "teacher":  # every row ends up labelled
            if ctx.num_labeled is not None:
                return copy_paste_partners(ctx.num_labeled, batch_size, device=device)
            return mixup_permutation(batch_size, device=device)
        if ctx.is_dense:  # boxes from unlabeled images are ignored pixels; nothing to avoid
            return mixup_permutation(batch_size, device=device)
        # classification: a label share of an unlabeled row does not exist, so mix only within the labeled rows
        labeled = ctx.num_labeled if ctx.num_labeled is not None else ctx.labeled
        return mixup_permutation(batch_size, device=device, labeled=labeled)

    def transform_input(self, ctx: StepContext) -> None:
        x = self._check_inputs(ctx)
        size = (int(x.shape[-2]), int(x.shape[-1]))
        lam = mixup_lambda(self.alpha)
        box = cutmix_box(lam, size)
        kept = float(cutmix_area_lambda(box, size)[0])  # CPU: no device sync
        perm = self._partners(ctx, int(x.shape[0]), x.device)
        ctx.x = paste_box(x, perm, box)
        ctx.extras["cutmix"] = CutMixRecord(perm, box, kept)
        ctx.logs[f"{self.name}/lam"] = kept

    def _unlabeled_rows(self, ctx: StepContext) -> Tensor | None:
        """``(B,)`` mask of the rows the teacher labels, or ``None`` when there are none (or no teacher mode)."""
        if self.pseudo_labels != "teacher":
            return None
        if ctx.num_labeled is not None:
            return ~ctx.labeled if ctx.num_labeled < ctx.batch_size else None
        return ~ctx.labeled if ctx.has_unlabeled else None  # one host sync (single-loader form only)

    def refine_target(self, ctx: StepContext) -> None:
        record = ctx.extras.get("cutmix")
        if record is None:  # the input stage did not run (e.g. `regularized_loss` in a custom training_step)
            return
        perm, box, kept = record
        unlabeled = self._unlabeled_rows(ctx)
        labels, target = ctx.labels, ctx.target
        if unlabeled is not None:
            assert self._teacher is not None
            pseudo = ctx.teacher_probs(self._teacher).argmax(dim=ctx.class_dim)
            rows = unlabeled.view(-1, *([1] * (labels.dim() - 1)))
            labels = torch.where(rows, pseudo.to(labels.dtype), labels)
            if target is not None:
                rows_t = unlabeled.view(-1, *([1] * (target.dim() - 1)))
                target = torch.where(rows_t, ctx.one_hot(labels), target)
        if ctx.is_dense:
            ctx.labels = paste_box(labels, perm, box)
            if target is not None:
                ctx.target = paste_box(target, perm, box)
            return
        ctx.labels = labels
        ctx.target = mixup_tensors(target if target is not None else ctx.one_hot(labels), perm, kept)

    def state_dict(self) -> dict[str, Any]:
        return {"version": self.version}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("version") != self.version:
            raise ValueError(
                f"Expected a `CutMix` state of version {self.version}, but got {state_dict.get('version')!r}."
            )
