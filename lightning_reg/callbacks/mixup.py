"""``Mixup``: an input-stage regularizer that mixes pairs of inputs and their targets."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from lightning_reg.core.protocol import LossRegularizer, StepContext
from lightning_reg.core.validation import check_bool, check_float
from lightning_reg.functional.mixup import mixup_lambda, mixup_permutation, mixup_tensors

__all__ = ["Mixup"]


class Mixup(LossRegularizer):
    r"""Mixup (Zhang et al., ICLR 2018): train on :math:`\lambda x_i + (1-\lambda) x_{\pi(i)}`.

    Each step draws :math:`\lambda \sim \mathrm{Beta}(\alpha, \alpha)` (optionally
    :math:`\max(\lambda, 1-\lambda)`, as ELR+ does) and a permutation :math:`\pi`
    of the batch, mixes the input before the forward pass, and mixes the
    *final* training target with the same :math:`(\pi, \lambda)`: it runs after
    every target refiner (label smoothing, PS-KD), so it mixes whatever target
    they produced (the one-hot label if none). The base loss is then the soft
    cross-entropy against the mixed target, i.e.
    :math:`\lambda\,\mathrm{CE}(z, y_i) + (1-\lambda)\,\mathrm{CE}(z, y_{\pi(i)})`
    for hard labels.

    It records ``ctx.extras["mixup"] = (perm, lam)`` so loss terms can stay
    consistent (:class:`~lightning_reg.ELR` mixes its targets the same way,
    as ELR+ does); ``ctx.extras["clean_x"]`` keeps the un-mixed input for
    teachers.

    **Per sample, classification only.** Mixup gives each mixed sample one mixed label, so dense
    outputs (segmentation ``(B, C, H, W)``, tokens ``(B, T, C)``) raise a clear error on the first
    step: for segmentation use :class:`~lightning_reg.CutMix`, which pastes a box of the input and
    of the label map with the same mask.

    **Unlabeled rows** (a semi-supervised batch, whose ``ctx.num_labeled`` rows come first, or rows
    labelled ``ignore_index`` in a single loader): mixup mixes only *within the labeled rows*. A
    labeled row's partner is another labeled row, and every unlabeled row is its own partner, so its
    input stays as it was (up to rounding) and its target stays empty. Mixing a labeled with an
    unlabeled row would leave part of the mixed sample without a target. Loss terms that use
    unlabeled rows (consistency, pseudo-labels) start from ``ctx.extras["clean_x"]`` anyway.

    Under DDP each rank mixes within its own batch (ranks draw different
    permutations and weights). Randomness comes from torch's global RNG (the
    weight from its CPU generator), so seed it per step for bit-exact resumes.
    Mixup needs the :class:`~lightning_reg.RegularizedModule` mixin's
    ``training_step`` (or :meth:`~lightning_reg.RegularizedModule.prepare_inputs`
    in your own); with ``regularized_loss`` alone it does nothing.

    Args:
        alpha: The Beta concentration :math:`\alpha > 0` (1.0 draws :math:`\lambda` uniformly; ELR+ uses 1).
        max_lam: Use :math:`\max(\lambda, 1-\lambda)` (ELR+), so each mixed sample is dominated by its own input.

    Logged metrics:

    ==============  ==================================
    ``mixup/lam``    the step's mixing weight λ
    ==============  ==================================

    Example:
        >>> import lightning as L
        >>> trainer = L.Trainer(callbacks=[Mixup(alpha=1.0, max_lam=True)], logger=False)

    YAML::

        trainer:
          callbacks:
            - class_path: lightning_reg.Mixup
              init_args: {alpha: 1.0, max_lam: true}
    """

    name = "mixup"
    stage = "input"
    version = 1

    def __init__(self, alpha: float = 1.0, max_lam: bool = False) -> None:
        super().__init__()
        self.alpha = check_float("alpha", alpha, 0.0, low_inclusive=False)
        self.max_lam = check_bool("max_lam", max_lam)

    def unsupported_layout_hint(self) -> str:
        return (
            "Mixup mixes whole samples with one label each. For segmentation logits (B, C, H, W) use `CutMix`,"
            " which pastes a box of the input and of the label map with the same mask; for token logits"
            " (B, T, C) remove it."
        )

    def transform_input(self, ctx: StepContext) -> None:
        if ctx.is_dense:  # refuse before the forward pass, as `check_layout` would after it
            raise ValueError(
                f"`Mixup` does not support dense outputs (labels of shape {tuple(ctx.labels.shape)}); it supports"
                f" {sorted(self.layouts)}. {self.unsupported_layout_hint()}"
            )
        x = ctx.x
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise TypeError(
                "`Mixup` mixes the batch input, so it must be a floating-point tensor, but got"
                f" {type(x).__name__ if not isinstance(x, Tensor) else x.dtype}. Convert inputs to float (e.g. images"
                " to [0, 1]) in the dataset, or mix them yourself in `training_step`."
            )
        lam = mixup_lambda(self.alpha, self.max_lam)
        # Only labeled rows are mixed (among themselves); unlabeled rows are their own partners. The split is
        # static for a semi-supervised batch; otherwise it is read from the labels on the device (no host sync).
        labeled = ctx.num_labeled if ctx.num_labeled is not None else ctx.labeled
        perm = mixup_permutation(x.shape[0], device=x.device, labeled=labeled)
        ctx.x = mixup_tensors(x, perm, lam)
        ctx.extras["mixup"] = (perm, lam)
        ctx.logs[f"{self.name}/lam"] = lam

    def refine_target(self, ctx: StepContext) -> None:
        mix = ctx.extras.get("mixup")
        if mix is None:  # the input stage did not run (e.g. `regularized_loss` in a custom training_step)
            return
        perm, lam = mix
        ctx.target = mixup_tensors(ctx.current_target(), perm, lam)

    def state_dict(self) -> dict[str, Any]:
        return {"version": self.version}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("version") != self.version:
            raise ValueError(
                f"Expected a `Mixup` state of version {self.version}, but got {state_dict.get('version')!r}."
            )
