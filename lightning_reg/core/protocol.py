"""The regularization protocol: callbacks, the step context and the ``RegularizedModule`` mixin.

There are three kinds of techniques:

1. **Weight-space and gradient-space** techniques (EMA, dropout schedules,
   clipping) are plain :class:`RegularizerCallback` subclasses. They work with
   any ``LightningModule``.
2. **Target refiners** (label smoothing, PS-KD) change the training target.
3. **Loss terms** (ELR, consistency) add a named term to the loss.

Kinds 2 and 3 subclass :class:`LossRegularizer`. They need the logits, labels
and sample indices *before* backward, so the module must use the
:class:`RegularizedModule` mixin, whose ``training_step`` runs one fixed,
documented pipeline over a :class:`StepContext`::

    batch (x, y, index)
      -> transform_input   (input stage, e.g. mixup)      in callback-list order
      -> forward           (self(x) -> logits)
      -> refine_labels     (label stage, e.g. label correction)
      -> refine_target     (target stage, e.g. label smoothing, PS-KD; then the input
                            stage's own refine_target, e.g. mixup mixing the final target)
      -> base loss         (CE on the hard label, or soft CE on the refined target)
      -> loss_term         (loss stage, e.g. ELR, consistency)
      -> log every term    ("train/loss", "train/loss_base", "train/loss_<name>")

Within a stage, regularizers run in the order they are listed in the
``Trainer``'s callbacks. Conflicts (for example two instances that both own the
same per-sample state) raise at ``setup``, never silently.

**The tensor contract.** Logits are ``(B, C, *d)`` as :func:`torch.nn.functional.cross_entropy`
takes them (``(B, C)`` for classification, ``(B, C, H, W)`` for segmentation) with integer labels
``(B, *d)``; a module that returns ``(B, T, C)`` (token classification) sets
``logits_layout = "channels_last"``. Labels equal to the module's ``ignore_index`` (default
``-100``) mark elements without a label (padding, void pixels, unlabeled samples): they contribute
nothing to the base loss or any label-dependent term, table or metric. :meth:`StepContext.elements`
gives every technique the same flat view. Semi-supervised batches from a ``CombinedLoader``
(``{"labeled": ..., "unlabeled": ...}``) are forwarded in one pass; see
:meth:`RegularizedModule.training_step`.

**Training only.** Only steps of ``trainer.training`` (not the sanity check, validation or test)
may change per-sample tables, curves or counters: :attr:`StepContext.training` tells techniques
which steps those are. Everywhere else a technique is a pure function of its state.

Example:
    >>> import lightning as L, torch
    >>> from lightning_reg import RegularizedModule, LabelSmoothing
    >>> class Net(RegularizedModule, L.LightningModule):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.layer = torch.nn.Linear(4, 3)
    ...     def forward(self, x):
    ...         return self.layer(x)
    ...     def configure_optimizers(self):
    ...         return torch.optim.SGD(self.parameters(), lr=0.1)
    >>> net = Net()
    >>> loss = net.regularized_loss(torch.zeros(2, 3), torch.tensor([0, 1]), log=False)
    >>> round(loss.item(), 4)  # log(3)
    1.0986
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal, NamedTuple, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor

from lightning_reg.core.syncs import host_reads_are_free

if TYPE_CHECKING:
    pass

__all__ = [
    "IGNORE_INDEX",
    "ElementView",
    "LossRegularizer",
    "MissingIndexError",
    "RegularizedModule",
    "RegularizerCallback",
    "StepContext",
    "TeacherProvider",
    "find_teacher",
    "infer_num_samples",
    "regularizers_of",
    "soft_cross_entropy",
    "unpack_batch",
    "unpack_semi_supervised_batch",
]

_STAGES = ("input", "label", "target", "loss")
_LAYOUTS = ("channels_first", "channels_last")

#: The label that marks an element without a label (as in :func:`torch.nn.functional.cross_entropy`).
IGNORE_INDEX = -100


class MissingIndexError(ValueError):
    """Raised when a technique that keeps per-sample state receives a batch without sample indices."""


def soft_cross_entropy(
    logits: Tensor, target: Tensor, reduction: str = "mean", *, dim: int = -1, valid: Tensor | None = None
) -> Tensor:
    r"""Cross-entropy against a soft target, computed in fp32.

    .. math:: \mathcal{L} = -\frac{1}{|V|}\sum_{i \in V} \sum_c q_{ic} \log \mathrm{softmax}(z_i)_c

    over the valid elements :math:`V` (every element if ``valid`` is ``None``). The gradient with
    respect to the logits is ``(softmax(z) - q) / |V|``; the target carries no gradient.

    Args:
        logits: Logits with the classes along ``dim`` (``(B, C)``, ``(B, C, H, W)``, ...), any float dtype.
        target: Target distribution of the same shape (sums to one along ``dim``).
        reduction: ``"mean"`` (over valid elements), ``"sum"`` or ``"none"`` (per element, zero where invalid).
        dim: The class dimension.
        valid: Optional boolean mask of the elements' shape (the logits without ``dim``).

    Example:
        >>> z = torch.tensor([[0.0, 0.0]])
        >>> round(soft_cross_entropy(z, torch.tensor([[0.5, 0.5]])).item(), 4)
        0.6931
    """
    loss = -(target.detach().float() * F.log_softmax(logits.float(), dim=dim)).sum(dim=dim)
    if valid is not None:
        loss = torch.where(valid, loss, torch.zeros((), device=loss.device))
    if reduction == "mean":
        if valid is None:
            return loss.mean()
        return loss.sum() / valid.sum().clamp_min(1)
    if reduction == "sum":
        return loss.sum()
    return loss


class ElementView(NamedTuple):
    """A flat view of a step's elements (samples, pixels or tokens), the same for every layout.

    Attributes:
        logits: ``(E, C)`` logits (a view of the step's logits where the layout allows; gradients flow).
        labels: ``(E,)`` labels, ``ignore_index`` where an element has none.
        valid: ``(E,)`` boolean: the element has a label.
        sample: ``(E,)`` the position in the batch of the sample each element belongs to.
    """

    logits: Tensor
    labels: Tensor
    valid: Tensor
    sample: Tensor


def classes_last(t: Tensor, layout: str) -> Tensor:
    """Move the class dimension of ``t`` (laid out as ``layout``) last: ``(B, C, *d) -> (B, *d, C)``."""
    return t.movedim(1, -1) if layout == "channels_first" and t.dim() > 2 else t


def classes_back(t: Tensor, layout: str) -> Tensor:
    """Inverse of :func:`classes_last`: ``(B, *d, C) -> (B, C, *d)`` for ``"channels_first"``."""
    return t.movedim(-1, 1) if layout == "channels_first" and t.dim() > 2 else t


def unpack_batch(batch: Any) -> tuple[Any, Tensor, Tensor | None]:
    """Split a batch into ``(x, y, index)``.

    Accepted forms: ``(x, y)``, ``(x, y, index)`` (tuple or list), or a mapping
    with keys ``x``/``input``/``inputs``, ``y``/``target``/``label``/``labels``
    and optionally ``index``/``idx``.

    Raises:
        ValueError: If the batch has another form.

    Example:
        >>> x, y, i = unpack_batch((torch.zeros(2, 3), torch.tensor([0, 1]), torch.tensor([5, 6])))
        >>> i.tolist()
        [5, 6]
    """
    if isinstance(batch, Mapping):
        x = next((batch[k] for k in ("x", "input", "inputs") if k in batch), None)
        y = next((batch[k] for k in ("y", "target", "label", "labels") if k in batch), None)
        index = next((batch[k] for k in ("index", "idx") if k in batch), None)
        if x is None or y is None:
            raise ValueError(
                "Expected a batch mapping with keys `x` and `y` (and optionally `index`), but got keys"
                f" {sorted(batch)}."
            )
        return x, y, index
    if isinstance(batch, Sequence) and not isinstance(batch, (str, bytes)) and len(batch) in (2, 3):
        x, y = batch[0], batch[1]
        return x, y, (batch[2] if len(batch) == 3 else None)
    raise ValueError(
        "Expected a batch `(x, y)` or `(x, y, index)` or a mapping with keys `x`, `y`, `index`, but got "
        f"{type(batch).__name__}{'' if not isinstance(batch, Sequence) else f' of length {len(batch)}'}."
        " Wrap your dataset in `lightning_reg.data.IndexedDataset` to yield `(x, y, index)`."
    )


def _unpack_unlabeled(part: Any) -> tuple[Any, Tensor | None]:
    if isinstance(part, Tensor):
        return part, None
    if isinstance(part, Mapping):
        x = next((part[k] for k in ("x", "input", "inputs") if k in part), None)
        if x is None:
            raise ValueError(
                f"Expected the unlabeled batch mapping to have a key `x` (and optionally `index`), but got keys"
                f" {sorted(part)}."
            )
        return x, next((part[k] for k in ("index", "idx") if k in part), None)
    if isinstance(part, Sequence) and not isinstance(part, (str, bytes)) and len(part) in (1, 2):
        return part[0], (part[1] if len(part) == 2 else None)
    raise ValueError(
        "Expected the unlabeled batch to be `x`, `(x,)` or `(x, index)`, but got"
        f" {type(part).__name__}{f' of length {len(part)}' if isinstance(part, Sequence) else ''}."
    )


def unpack_semi_supervised_batch(
    batch: Mapping[str, Any], ignore_index: int = IGNORE_INDEX
) -> tuple[Tensor, Tensor, Tensor | None, int]:
    """Concatenate a ``{"labeled": ..., "unlabeled": ...}`` batch into one ``(x, y, index, num_labeled)``.

    The labeled part is any form :func:`unpack_batch` takes; the unlabeled part is ``x``, ``(x,)``,
    ``(x, index)`` or a mapping with ``x`` and ``index``. The unlabeled rows come last, labelled
    ``ignore_index`` (with the labeled labels' trailing shape, so dense labels work too). A part
    that is ``None`` (a ``CombinedLoader`` mode that exhausted it) is left out.

    Raises:
        ValueError: If only one part carries sample indices, or the inputs do not concatenate.

    Example:
        >>> b = {"labeled": (torch.zeros(2, 3), torch.tensor([0, 1]), torch.tensor([0, 1])),
        ...      "unlabeled": (torch.ones(3, 3), torch.tensor([7, 8, 9]))}
        >>> x, y, index, n = unpack_semi_supervised_batch(b)
        >>> x.shape, y.tolist(), index.tolist(), n
        (torch.Size([5, 3]), [0, 1, -100, -100, -100], [0, 1, 7, 8, 9], 2)
    """
    labeled, unlabeled = batch.get("labeled"), batch.get("unlabeled")
    if labeled is None:
        if unlabeled is None:
            raise ValueError("Expected the batch to have a `labeled` or an `unlabeled` part, but both are None.")
        raise ValueError(
            "Expected every semi-supervised batch to carry a `labeled` part (the supervised loss needs one), but it"
            " is None. Use `CombinedLoader(..., mode='max_size_cycle')` so the labeled loader cycles."
        )
    x_l, y_l, i_l = unpack_batch(labeled)
    if unlabeled is None:
        return x_l, y_l, i_l, int(y_l.shape[0])
    x_u, i_u = _unpack_unlabeled(unlabeled)
    if (i_l is None) != (i_u is None):
        raise ValueError(
            "Expected both the labeled and the unlabeled batches to carry sample indices, or neither, but only the"
            f" {'labeled' if i_u is None else 'unlabeled'} one does. Index both parts into one training table"
            " (labeled samples first), e.g. with `lightning_reg.data.SemiSupervisedDataModule`."
        )
    if not isinstance(x_l, Tensor) or not isinstance(x_u, Tensor) or x_l.shape[1:] != x_u.shape[1:]:
        raise ValueError(
            "Expected the labeled and unlabeled inputs to be tensors of the same per-sample shape (they are"
            " forwarded together), but got"
            f" {tuple(getattr(x_l, 'shape', ()))} and {tuple(getattr(x_u, 'shape', ()))}."
        )
    n_u = int(x_u.shape[0])
    y_u = torch.full((n_u, *y_l.shape[1:]), ignore_index, dtype=y_l.dtype, device=y_l.device)
    index = None if i_l is None else torch.cat([i_l, i_u.to(i_l.device)])  # type: ignore[union-attr]
    return torch.cat([x_l, x_u.to(x_l.device)]), torch.cat([y_l, y_u]), index, int(y_l.shape[0])


def is_semi_supervised_batch(batch: Any) -> bool:
    """Whether ``batch`` is a ``{"labeled": ..., "unlabeled": ...}`` mapping (e.g. from a ``CombinedLoader``)."""
    return isinstance(batch, Mapping) and ("labeled" in batch or "unlabeled" in batch) and "x" not in batch


@dataclass
class StepContext:
    """Everything a loss-side regularizer may read or change during one training step.

    Attributes:
        module: The LightningModule being trained.
        x: The input that is (or was) forwarded; the input stage may replace it.
        labels: The integer labels the base loss uses, ``(B, *d)``; the label stage may correct them.
            Elements equal to ``ignore_index`` have no label.
        given_labels: The labels exactly as the batch carried them.
        index: The samples' indices in the training set, or ``None``.
        logits: The logits, ``(B, C, *d)`` (``None`` until the forward pass).
        target: The soft fp32 target, the logits' shape, or ``None`` meaning ``one_hot(labels)``.
        terms: Named loss terms; ``"base"`` is set by the pipeline.
        logs: Extra scalars to log (name -> value), e.g. schedule values.
        extras: Free-form data shared between regularizers, e.g. ``"clean_x"``
            (the input before the input stage) or ``"mixup"`` (``(perm, lam)``).
        batch_idx: The batch index within the epoch.
        training: Whether this is a training step (``trainer.training``, not the sanity check): only
            then may a technique change its state (tables, curves, counters).
        layout: ``"channels_first"`` (``(B, C, *d)``, the default) or ``"channels_last"`` (``(B, *d, C)``,
            e.g. ``(B, T, C)`` token logits).
        ignore_index: The label of elements without one.
        num_labeled: With a semi-supervised batch, the first ``num_labeled`` rows are labeled and the
            rest unlabeled; ``None`` otherwise (then :attr:`labeled` is read from the labels).
    """

    module: LightningModule
    x: Any
    labels: Tensor
    given_labels: Tensor
    index: Tensor | None = None
    logits: Tensor | None = None
    target: Tensor | None = None
    terms: dict[str, Tensor] = field(default_factory=dict)
    logs: dict[str, Tensor | float] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)
    batch_idx: int = 0
    training: bool = True
    layout: str = "channels_first"
    ignore_index: int = IGNORE_INDEX
    num_labeled: int | None = None
    views: dict[str, Tensor] = field(default_factory=dict)
    view_logits: dict[str, Tensor] = field(default_factory=dict)

    # -- extra views in the step's one forward -----------------------------------------------------------------
    def add_view(self, key: str, x: Tensor) -> None:
        """Append ``x`` (rows of extra inputs, e.g. a strong augmentation of the unlabeled samples) to the forward.

        Called from :meth:`LossRegularizer.add_views`, before the forward pass. The mixin's
        ``training_step`` forwards ``cat([ctx.x, *views])`` in one call (one DDP graph, one autocast
        region, one BatchNorm batch, as FixMatch's reference does) and puts each view's logits in
        :attr:`view_logits` under its key. With a custom ``training_step`` that forwards only the
        batch, :attr:`view_logits` stays empty and a technique forwards its view itself.
        """
        if key in self.views:
            raise ValueError(f"Two regularizers added a view named {key!r}; give one a distinct key.")
        if not isinstance(self.x, Tensor) or not isinstance(x, Tensor) or x.shape[1:] != self.x.shape[1:]:
            raise ValueError(
                f"Expected the view {key!r} to be a tensor with the batch input's per-sample shape"
                f" {tuple(getattr(self.x, 'shape', ())[1:])}, but got {tuple(getattr(x, 'shape', ()))}."
            )
        self.views[key] = x

    # -- shape ----------------------------------------------------------------------------------------------------
    @property
    def class_dim(self) -> int:
        """The class dimension of the logits and targets: 1 (``channels_first``) or -1 (``channels_last``)."""
        return 1 if self.layout == "channels_first" else -1

    @property
    def num_classes(self) -> int:
        """The number of classes, read from the logits."""
        if self.logits is None:
            raise RuntimeError("`num_classes` is only known after the forward pass.")
        return int(self.logits.shape[self.class_dim])

    @property
    def batch_size(self) -> int:
        """The number of samples in the batch."""
        return int(self.labels.shape[0])

    @property
    def is_dense(self) -> bool:
        """Whether each sample has several labelled elements (pixels, tokens): labels of more than one dim."""
        return self.labels.dim() > 1

    @property
    def valid(self) -> Tensor:
        """Boolean mask of the labels' shape: the element has a label (``labels != ignore_index``). Cached."""
        cached = self.extras.get("_valid")
        if cached is None or cached[0] is not self.labels:
            cached = (self.labels, self.labels != self.ignore_index)
            self.extras["_valid"] = cached
        return cached[1]

    @property
    def labeled(self) -> Tensor:
        """``(B,)`` boolean: the sample came with at least one labelled element (unlabeled samples have none).

        Read from :attr:`given_labels`, so a label map an input-stage regularizer pasted into an unlabeled
        image (copy-paste) does not make it a labeled sample.
        """
        if self.num_labeled is not None:
            out = torch.zeros(self.batch_size, dtype=torch.bool, device=self.labels.device)
            out[: self.num_labeled] = True
            return out
        given = self.labels if self.given_labels is None else self.given_labels
        valid = given != self.ignore_index
        return valid.reshape(valid.shape[0], -1).any(dim=1) if valid.dim() > 1 else valid

    def term_rows(self, on: str) -> tuple[slice, Tensor | None]:
        """The rows a term over ``on="all"`` or ``on="unlabeled"`` samples uses, without a host sync.

        Returns:
            A static row slice, and for the unlabeled rows of a single loader (``ignore_index`` labels) the
            ``(B,)`` mask of those rows on the device (``None`` when the slice is exact): all rows; the rows
            after :attr:`num_labeled` of a semi-supervised batch; or all rows with ``~labeled``.
        """
        if on == "all":
            return slice(None), None
        if self.num_labeled is not None:
            return slice(self.num_labeled, None), None
        return slice(None), ~self.labeled

    @property
    def has_unlabeled(self) -> bool:
        """Whether the batch may contain unlabeled samples (a semi-supervised batch, or any ignored label).

        Free for semi-supervised batches; otherwise it reads one flag from the device (only techniques
        that need it call it).
        """
        if self.num_labeled is not None:
            return self.num_labeled < self.batch_size
        return not bool(self.labeled.all())

    def elements(self) -> ElementView:
        """The step's elements as flat ``(E, C)`` logits, ``(E,)`` labels, validity and sample position.

        For ``(B, C)`` logits the elements are the samples (``E = B``).
        """
        if self.logits is None:
            raise RuntimeError("`elements()` is only available after the forward pass.")
        c = self.num_classes
        logits = classes_last(self.logits, self.layout).reshape(-1, c)
        labels = self.labels.reshape(-1)
        per_sample = labels.numel() // max(self.batch_size, 1)
        sample = torch.arange(self.batch_size, device=labels.device).repeat_interleave(per_sample)
        return ElementView(logits, labels, self.valid.reshape(-1), sample)

    def per_element(self, t: Tensor) -> Tensor:
        """Flatten a tensor in the logits' layout (``(B, C, *d)`` or ``(B, *d, C)``) to ``(E, C)``."""
        return classes_last(t, self.layout).reshape(-1, t.shape[self.class_dim])

    def from_elements(self, t: Tensor) -> Tensor:
        """Inverse of :meth:`per_element`: ``(E, C)`` back to the logits' layout and shape."""
        assert self.logits is not None
        shape = classes_last(self.logits, self.layout).shape
        return classes_back(t.reshape(shape), self.layout)

    # -- predictions and targets ----------------------------------------------------------------------------------
    def probs(self) -> Tensor:
        """Detached fp32 softmax of the logits (the logits' shape), computed once per step and cached."""
        cached = self.extras.get("_probs")
        if cached is None:
            assert self.logits is not None
            cached = torch.softmax(self.logits.detach().float(), dim=self.class_dim)
            self.extras["_probs"] = cached
        return cached

    def one_hot(self, labels: Tensor | None = None) -> Tensor:
        """``one_hot(labels)`` in fp32 in the logits' layout; all-zero for ignored elements."""
        labels = self.labels if labels is None else labels
        valid = labels != self.ignore_index
        out = F.one_hot(torch.where(valid, labels, torch.zeros_like(labels)), self.num_classes).float()
        return classes_back(out * valid.unsqueeze(-1), self.layout)

    def current_target(self) -> Tensor:
        """The current soft target: ``target`` if a refiner set one, else :meth:`one_hot` of the labels."""
        if self.target is not None:
            return self.target
        return self.one_hot()

    def clean_input(self, who: str) -> Tensor:
        """The batch's input before the input stage (e.g. mixup), which teachers and extra views start from.

        Raises:
            ValueError: If no input was given (``regularized_loss`` called without ``x``).
            TypeError: If the input is not a floating-point tensor.
        """
        x = self.extras.get("clean_x", self.x)
        if x is None:
            raise ValueError(
                f"`{who}` runs extra forward passes on the batch's input, but none was given. Pass it to"
                " `self.regularized_loss(logits, y, index, x=x)` from your `training_step`."
            )
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise TypeError(
                f"`{who}` forwards the batch's input again, so it must be a floating-point tensor, but got"
                f" {type(x).__name__ if not isinstance(x, Tensor) else x.dtype}. Convert it in your dataset."
            )
        return x

    def teacher_logits(self, teacher: TeacherProvider, x: Tensor | None = None, key: str = "clean") -> Tensor:
        """The teacher's detached logits on a view of the batch, run once per step and view and shared.

        Every consumer (PS-KD, ELR, consistency, label correction, pseudo-labels) that asks for the same
        ``key`` in one step reads the same tensor: ``teacher_forward`` runs once per view per step,
        whatever the number of consumers.

        Args:
            teacher: The teacher (e.g. :class:`~lightning_reg.EMATeacher`).
            x: The view; ``None`` means the clean input (:meth:`clean_input`).
            key: The view's name in the cache (``"clean"``, ``"weak"``, ...). Use distinct keys for distinct views.
        """
        cache: dict[str, Tensor] = self.extras.setdefault("_teacher_logits", {})
        out = cache.get(key)
        if out is None:
            view = self.clean_input(type(teacher).__name__) if x is None else x
            with torch.no_grad():
                out = teacher.teacher_forward(view).detach()
            cache[key] = out
        return out

    def teacher_probs(self, teacher: TeacherProvider, x: Tensor | None = None, key: str = "clean") -> Tensor:
        """fp32 softmax of :meth:`teacher_logits` along the class dimension, cached per view like it."""
        cache: dict[str, Tensor] = self.extras.setdefault("_teacher_probs", {})
        out = cache.get(key)
        if out is None:
            out = torch.softmax(self.teacher_logits(teacher, x, key).float(), dim=self.class_dim)
            cache[key] = out
        return out

    def student_clean_probs(self, who: str) -> Tensor:
        """The student's detached fp32 probabilities on the clean input, without an extra forward when possible.

        When the input stage left the input alone this is :meth:`probs`; otherwise one no-grad forward on
        the clean input, cached for the step.
        """
        clean = self.clean_input(who)
        if self.x is clean:
            return self.probs()
        cached = self.extras.get("_student_clean_probs")
        if cached is None:
            with torch.no_grad():
                cached = torch.softmax(self.module(clean).detach().float(), dim=self.class_dim)
            self.extras["_student_clean_probs"] = cached
        return cached

    def require_index(self, who: str) -> Tensor:
        """Return the sample indices, or raise a :class:`MissingIndexError` that explains the fix."""
        if self.index is None:
            raise MissingIndexError(
                f"`{who}` keeps per-sample state and needs each batch to carry the samples' indices in the training"
                " set, but the batch has none. Yield `(x, y, index)` batches, e.g. by wrapping your dataset in"
                " `lightning_reg.data.IndexedDataset(dataset)`."
            )
        return self.index


@runtime_checkable
class TeacherProvider(Protocol):
    """A callback that can run a teacher model (e.g. :class:`~lightning_reg.EMATeacher`)."""

    def teacher_forward(self, x: Any) -> Tensor:
        """Return the teacher's logits for ``x`` without tracking gradients."""
        ...


def find_teacher(trainer: Trainer) -> TeacherProvider | None:
    """Return the first callback in the trainer that provides ``teacher_forward``, or ``None``."""
    for cb in trainer.callbacks:  # type: ignore[attr-defined]
        if isinstance(cb, TeacherProvider):
            return cb
    return None


def infer_num_samples(trainer: Trainer, who: str) -> int:
    """Return the size of the training set, read from the datamodule or the train dataloader's dataset.

    A datamodule's ``num_train_samples`` (an int) wins. Otherwise the train dataloader's dataset gives
    it; with several train loaders (a ``{"labeled": ..., "unlabeled": ...}`` ``CombinedLoader`` or
    mapping) it is the sum of their distinct datasets' sizes: one index space covering every part
    (labeled samples first), as :class:`~lightning_reg.data.SemiSupervisedDataModule` numbers them. Under DDP
    the dataloader's dataset is the full training set, so every rank gets the same number.

    Raises:
        ValueError: If it cannot be inferred; the message says to pass ``num_samples``.
    """
    declared = getattr(getattr(trainer, "datamodule", None), "num_train_samples", None)
    if isinstance(declared, int) and not isinstance(declared, bool) and declared > 0:
        return declared
    loaders: Any = None
    try:
        loaders = trainer.train_dataloader
    except Exception:  # pragma: no cover - defensive
        loaders = None
    if isinstance(loaders, Mapping):
        iterables: list[Any] = list(loaders.values())
    else:
        iterables = getattr(loaders, "flattened", None) or ([loaders] if loaders is not None else [])
    sizes: list[int | None] = []
    seen: set[int] = set()
    for loader in iterables:
        dataset = getattr(loader, "dataset", None)
        if dataset is not None and id(dataset) in seen:  # parts drawn from one dataset: count it once
            continue
        seen.add(id(dataset))
        try:
            sizes.append(len(dataset))  # type: ignore[arg-type]
        except TypeError:
            sizes.append(None)
    if sizes and all(n is not None for n in sizes):
        return int(sum(sizes))  # type: ignore[arg-type]
    raise ValueError(
        f"`{who}` could not infer the number of training samples from the train dataloader (it needs a map-style"
        " dataset with `__len__`). Pass `num_samples=<size of the training set>` explicitly."
    )


class RegularizerCallback(Callback):
    """Base class of every ``lightning_reg`` callback.

    It gives each technique a ``name`` (the logging prefix), a one-line
    description of its hyperparameters for the fit-start summary, and prints
    that summary once per fit on rank zero (set ``LIGHTNING_REG_SUMMARY=0`` to
    silence it).
    """

    #: Logging prefix and display name, e.g. ``"elr"`` logs ``elr/lam``.
    name: ClassVar[str] = "regularizer"

    def describe(self) -> dict[str, Any]:
        """Key hyperparameters for the summary: the constructor arguments stored as attributes."""
        out: dict[str, Any] = {}
        for pname in inspect.signature(type(self).__init__).parameters:
            if pname in ("self", "args", "kwargs") or not hasattr(self, pname):
                continue
            out[pname] = getattr(self, pname)
        return out

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        regs = [cb for cb in trainer.callbacks if isinstance(cb, RegularizerCallback)]  # type: ignore[attr-defined]
        if regs and regs[0] is self and os.environ.get("LIGHTNING_REG_SUMMARY", "1") != "0":
            _print_summary(regs)


@rank_zero_only
def _print_summary(regs: Sequence[RegularizerCallback]) -> None:
    from rich.console import Console

    from lightning_reg.core.summary import summary_table

    Console().print(summary_table(regs))


class LossRegularizer(RegularizerCallback):
    """Base class of target refiners and loss terms (kinds 2 and 3).

    Subclasses set :attr:`stage` and implement the matching hook:

    * ``"input"``: :meth:`transform_input` (before the forward pass);
    * ``"label"``: :meth:`refine_labels`;
    * ``"target"``: :meth:`refine_target`;
    * ``"loss"``: :meth:`loss_term`, whose return value is added to the loss as
      ``train/loss_<name>``.

    At ``setup`` it checks that the module uses :class:`RegularizedModule` and
    that no two regularizers conflict (see :meth:`conflicts_with`).
    """

    #: Which pipeline stage the regularizer runs in.
    stage: ClassVar[str] = "loss"
    #: Whether the technique needs sample indices.
    requires_index: ClassVar[bool] = False
    #: The output layouts it supports: ``"classification"`` (``(B, C)`` logits, one label per sample) and/or
    #: ``"dense"`` (``(B, C, *d)`` or ``(B, T, C)`` logits with ``(B, *d)`` labels: segmentation, tokens).
    layouts: ClassVar[frozenset[str]] = frozenset({"classification"})
    #: Whether it reads the labels. Label-dependent techniques use labelled elements only: an
    #: ``ignore_index`` element (padding, void pixel, unlabeled sample) never touches their state.
    needs_labels: ClassVar[bool] = True

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if not isinstance(pl_module, RegularizedModule):
            raise TypeError(
                f"`{type(self).__name__}` changes the training loss, so the LightningModule must use the"
                " `RegularizedModule` mixin: `class MyModel(RegularizedModule, L.LightningModule)`. If you write your"
                " own `training_step`, return `self.regularized_loss(logits, y, index, x=x)` from it."
                f" Got `{type(pl_module).__name__}`, which does not."
            )
        check_pipeline(trainer)
        self._pipeline_checked = False
        if regularizers_of(trainer)[:1] == [self]:  # once per setup: known harmful combinations, with the fix
            from lightning_reg.core.compat import warn_harmful_combinations

            warn_harmful_combinations(trainer)

    def unsupported_layout_hint(self) -> str:
        """The fix to print when the step's layout is not in :attr:`layouts` (override to be specific)."""
        return "Remove it from the callbacks for this model."

    def check_layout(self, ctx: StepContext) -> None:
        """Raise a clear error if the step's outputs have a layout this technique does not support."""
        kind = "dense" if ctx.is_dense else "classification"
        if kind not in self.layouts:
            shape = tuple(ctx.logits.shape) if ctx.logits is not None else None
            raise ValueError(
                f"`{type(self).__name__}` does not support {kind} outputs (logits of shape {shape}, labels of shape"
                f" {tuple(ctx.labels.shape)}); it supports {sorted(self.layouts)}. {self.unsupported_layout_hint()}"
            )

    # -- silent no-op detection: the first training batch must run the pipeline (and the input stage) --------
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if not getattr(self, "_pipeline_checked", True):
            self._calls_before = _pipeline_calls(pl_module)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if getattr(self, "_pipeline_checked", True):
            return
        self._pipeline_checked = True
        pipeline_before, inputs_before = getattr(self, "_calls_before", (0, 0))
        pipeline_now, inputs_now = _pipeline_calls(pl_module)
        who = type(self).__name__
        if pipeline_now == pipeline_before:
            raise RuntimeError(
                f"`{who}` is listed in the Trainer's callbacks but did nothing: the first training step did not run"
                f" the regularization pipeline, because `{type(pl_module).__name__}.training_step` computes its own"
                " loss. Delete your `training_step` to use `RegularizedModule`'s, or end it with"
                " `return self.regularized_loss(logits, y, index, x=x)`."
            )
        if self.stage == "input" and inputs_now == inputs_before:
            raise RuntimeError(
                f"`{who}` transforms the input before the forward pass, but the first training step forwarded the"
                " batch without the input stage (`regularized_loss` alone cannot change an input that was already"
                " forwarded). Delete your `training_step` to use `RegularizedModule`'s, or write it as"
                " `ctx = self.prepare_inputs(x, y, index); ctx.logits = self.forward_views(ctx);"
                " return self.run_pipeline(ctx)`."
            )

    def conflicts_with(self, other: LossRegularizer) -> str | None:
        """Return a reason if ``self`` cannot be combined with ``other``, else ``None``.

        The default forbids two instances of the same class with the same
        ``state_key`` (they would overwrite each other's checkpointed state).
        """
        if type(self) is type(other) and self.state_key == other.state_key:
            return (
                f"two `{type(self).__name__}` callbacks share the state key {self.state_key!r}; keep one, or give"
                " them distinct configurations"
            )
        return None

    def transform_input(self, ctx: StepContext) -> None:
        """Input stage: replace ``ctx.x`` (and record what you did in ``ctx.extras``)."""

    def add_views(self, ctx: StepContext) -> None:
        """Before the forward pass (any stage, training steps only): append extra views with ``ctx.add_view``.

        Their logits come back in ``ctx.view_logits`` from the step's single forward.
        """

    def refine_labels(self, ctx: StepContext) -> None:
        """Label stage: replace ``ctx.labels`` (e.g. with corrected labels)."""

    def refine_target(self, ctx: StepContext) -> None:
        """Target stage: set ``ctx.target`` from ``ctx.current_target()``.

        Input-stage regularizers may implement it too: theirs runs after every
        target-stage regularizer, so it sees the final target (mixup mixes it
        with the permutation it mixed the inputs with).
        """

    def loss_term(self, ctx: StepContext) -> Tensor | None:
        """Loss stage: return a scalar term to add to the loss, or ``None`` to add nothing."""
        return None


def _pipeline_calls(module: Any) -> tuple[int, int]:
    """How often the module ran the pipeline and the input stage in training steps."""
    return int(getattr(module, "_lreg_pipeline_calls", 0)), int(getattr(module, "_lreg_input_calls", 0))


def regularizers_of(trainer: Trainer | None) -> list[LossRegularizer]:
    """The loss-side regularizers of a trainer, in callback-list order."""
    if trainer is None:
        return []
    return [cb for cb in trainer.callbacks if isinstance(cb, LossRegularizer)]  # type: ignore[attr-defined]


def check_pipeline(trainer: Trainer) -> None:
    """Raise ``ValueError`` if two loss-side regularizers conflict or one has an unknown stage."""
    regs = regularizers_of(trainer)
    for r in regs:
        if r.stage not in _STAGES:
            raise ValueError(f"`{type(r).__name__}.stage` must be one of {list(_STAGES)}, but got {r.stage!r}.")
    for i, a in enumerate(regs):
        for b in regs[i + 1 :]:
            reason = a.conflicts_with(b) or b.conflicts_with(a)
            if reason:
                raise ValueError(f"Conflicting regularizers `{type(a).__name__}` and `{type(b).__name__}`: {reason}.")


class RegularizedModule:
    """Mixin for LightningModules: a ``training_step`` that runs the regularization pipeline.

    Put it *before* ``L.LightningModule`` in the bases (the other order raises a ``TypeError`` at
    class definition). The module's ``forward`` must return logits. Batches are ``(x, y)``,
    ``(x, y, index)`` or mappings (see :func:`unpack_batch`); techniques with per-sample state
    need the index.

    **Dense and sequence outputs.** ``forward`` may return ``(B, C, *d)`` logits (segmentation:
    ``(B, C, H, W)``) with ``(B, *d)`` labels, as :func:`torch.nn.functional.cross_entropy` takes them;
    set ``logits_layout = "channels_last"`` for ``(B, T, C)`` token logits with ``(B, T)`` labels.
    Labels equal to ``ignore_index`` contribute nothing.

    **Unlabeled data.** A training batch ``{"labeled": (x, y[, index]), "unlabeled": x or (x, index)}``
    (Lightning's ``CombinedLoader(..., mode="max_size_cycle")``) is concatenated and forwarded *once*
    (one DDP graph, one autocast region); the unlabeled rows get ``ignore_index`` labels, so the base
    loss sees labeled elements only, and loss terms that work without labels (consistency,
    pseudo-labels) see all. A single loader whose unlabeled samples carry ``ignore_index`` works the same.

    Users who write their own ``training_step`` call :meth:`regularized_loss`
    with the logits they computed; input-stage techniques (e.g. mixup) need
    :meth:`prepare_inputs` too (a listed technique that the step never reaches raises on the
    first training step instead of silently doing nothing).

    Class attributes:
        check_inputs: Check that the logits are finite and the labels in range, raising a clear error
            instead of corrupting per-sample state. On the CPU it checks every step (there is no device to
            sync with); on an accelerator it checks the first training step, every logging step
            (``trainer.log_every_n_steps``) and every step outside training, so other steps run without a
            host sync (a non-finite row is never written to a per-sample table either way). Set it to
            ``False`` to skip the checks altogether.
        logits_layout: ``"channels_first"`` (``(B, C, *d)``, default) or ``"channels_last"``
            (``(B, *d, C)``, e.g. ``(B, T, C)`` for token classification).
        ignore_index: The label of elements without one (default ``-100``, as ``F.cross_entropy``).

    Logged metrics:

    ====================  ==========================================
    ``train/loss``         the total loss (progress bar)
    ``train/loss_base``    the base loss (CE, or soft CE on a refined target)
    ``train/loss_<name>``  each added loss term
    ``<name>/<value>``     schedule values the regularizers report
    ====================  ==========================================

    Each is logged with ``on_step=True, on_epoch=True`` (``<name>_step`` and ``<name>_epoch`` in the
    logger), but ``self.log`` runs only on logging steps (``trainer.log_every_n_steps``) and at the
    epoch's end: in between, the values accumulate on their device. ``<name>_step`` is therefore the
    mean over the steps since the previous logging step (or the epoch's start), and ``<name>_epoch`` the
    exact epoch mean. With ``log_every_n_steps=1`` this is Lightning's usual per-step logging.

    Example:
        >>> import lightning as L
        >>> class Net(RegularizedModule, L.LightningModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.net = torch.nn.Linear(8, 3)
        ...     def forward(self, x):
        ...         return self.net(x)
        >>> class Tagger(RegularizedModule, L.LightningModule):
        ...     logits_layout = "channels_last"  # forward returns (B, T, C)
    """

    check_inputs: bool = True
    logits_layout: Literal["channels_first", "channels_last"] = "channels_first"
    ignore_index: int = IGNORE_INDEX

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        mro = cls.__mro__
        if LightningModule in mro and mro.index(LightningModule) < mro.index(RegularizedModule):
            raise TypeError(
                f"`{cls.__name__}` lists `LightningModule` before `RegularizedModule` in its bases, so Lightning's"
                " `training_step` hides the mixin's and no regularizer would run. Put the mixin first:"
                f" `class {cls.__name__}(RegularizedModule, L.LightningModule)`."
            )
        if cls.logits_layout not in _LAYOUTS:
            raise ValueError(
                f"Expected `{cls.__name__}.logits_layout` to be one of {list(_LAYOUTS)}, but got {cls.logits_layout!r}."
            )

    # -- pipeline -----------------------------------------------------------
    def _regularizers(self) -> list[LossRegularizer]:
        trainer = getattr(self, "_trainer", None)
        return regularizers_of(trainer)

    def _in_training(self) -> bool:
        trainer = getattr(self, "_trainer", None)
        return trainer is not None and bool(trainer.training) and not bool(trainer.sanity_checking)

    def _new_context(
        self, x: Any, y: Tensor, index: Tensor | None, batch_idx: int, num_labeled: int | None, logits: Tensor | None
    ) -> StepContext:
        ctx = StepContext(
            module=self,  # type: ignore[arg-type]
            x=x,
            labels=y,
            given_labels=y,
            index=index,
            logits=logits,
            batch_idx=batch_idx,
            training=self._in_training(),
            layout=self.logits_layout,
            ignore_index=self.ignore_index,
            num_labeled=num_labeled,
        )
        ctx.extras["clean_x"] = x
        return ctx

    def prepare_inputs(
        self, x: Any, y: Tensor, index: Tensor | None = None, batch_idx: int = 0, *, num_labeled: int | None = None
    ) -> StepContext:
        """Run the input stage and return the step context (``ctx.x`` is what to forward)."""
        ctx = self._new_context(x, y, index, batch_idx, num_labeled, None)
        regs = self._regularizers()
        if ctx.training:
            self._lreg_input_calls = getattr(self, "_lreg_input_calls", 0) + 1
        for r in regs:
            if r.stage == "input":
                r.transform_input(ctx)
        if ctx.training:
            for r in regs:
                r.add_views(ctx)
        return ctx

    def forward_views(self, ctx: StepContext) -> Tensor:
        """Forward ``ctx.x`` and every view added with ``ctx.add_view`` in one call; return the batch's logits.

        The views' logits are split off into ``ctx.view_logits``.
        """
        if not ctx.views:
            return self(ctx.x)  # type: ignore[operator]
        sizes = [int(ctx.x.shape[0]), *(int(v.shape[0]) for v in ctx.views.values())]
        out = self(torch.cat([ctx.x, *ctx.views.values()]))  # type: ignore[operator]
        parts = torch.split(out, sizes)
        ctx.view_logits = dict(zip(ctx.views, parts[1:]))
        return parts[0]

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Unpack the batch, run the input stage, forward once, and return :meth:`run_pipeline`'s loss.

        A ``{"labeled": ..., "unlabeled": ...}`` batch is concatenated first (see
        :func:`unpack_semi_supervised_batch`), so both parts share one forward, together with any
        extra views the regularizers add (see :meth:`forward_views`).
        """
        num_labeled = None
        if is_semi_supervised_batch(batch):
            x, y, index, num_labeled = unpack_semi_supervised_batch(batch, self.ignore_index)
        else:
            x, y, index = unpack_batch(batch)
        ctx = self.prepare_inputs(x, y, index, batch_idx, num_labeled=num_labeled)
        ctx.logits = self.forward_views(ctx)
        return self.run_pipeline(ctx)

    def regularized_loss(
        self,
        logits: Tensor,
        y: Tensor,
        index: Tensor | None = None,
        x: Any = None,
        *,
        batch_idx: int = 0,
        log: bool = True,
        num_labeled: int | None = None,
    ) -> Tensor:
        """Run the label, target and loss stages on logits you computed, log every term, return the loss.

        It may be called from ``validation_step`` or ``test_step`` too: outside training steps every
        technique is a pure function of its state (no table, curve or counter changes).

        Args:
            logits: ``(B, C, *d)`` logits of the batch (``(B, *d, C)`` with ``logits_layout = "channels_last"``).
            y: ``(B, *d)`` integer labels as the batch carried them (``ignore_index`` where there is none).
            index: ``(B,)`` sample indices (needed by per-sample techniques).
            x: The input, needed by techniques that run extra forward passes.
            batch_idx: The batch index (passed to the regularizers).
            log: Whether to ``self.log`` the terms.
            num_labeled: For a concatenated semi-supervised batch, the number of labeled rows (first).

        Example:
            >>> # inside your own training_step:
            >>> # logits = self(x); return self.regularized_loss(logits, y, index, x=x)
        """
        ctx = self._new_context(x, y, index, batch_idx, num_labeled, logits)
        return self.run_pipeline(ctx, log=log)

    def run_pipeline(self, ctx: StepContext, log: bool = True) -> Tensor:
        """Run label → target → base loss → loss terms on a context whose logits are set."""
        if ctx.logits is None:
            raise ValueError("Expected `ctx.logits` to be set before `run_pipeline`.")
        if self.check_inputs and self._should_check(ctx):
            _check_step_inputs(ctx.logits, ctx.labels, ctx.index, ctx.layout, ctx.ignore_index)
        regs = self._regularizers()
        if ctx.training:
            self._lreg_pipeline_calls = getattr(self, "_lreg_pipeline_calls", 0) + 1
        for r in regs:
            r.check_layout(ctx)
        for stage in ("label", "target"):
            for r in regs:
                if r.stage == stage:
                    getattr(r, "refine_labels" if stage == "label" else "refine_target")(ctx)
        for r in regs:  # input-stage regularizers (mixup) finish the target last, so they mix the final target
            if r.stage == "input":
                r.refine_target(ctx)
        ctx.terms = {"base": self.base_loss(ctx), **ctx.terms}
        for r in regs:
            if r.stage == "loss":
                term = r.loss_term(ctx)
                if term is not None:
                    if r.name in ctx.terms:
                        raise ValueError(f"Two loss terms are named {r.name!r}; give one a distinct `name`.")
                    ctx.terms[r.name] = term
        total = torch.stack([t.float() for t in ctx.terms.values()]).sum()
        if log and getattr(self, "_trainer", None) is not None:
            self._log_terms(ctx, total)
        return total

    def _should_check(self, ctx: StepContext) -> bool:
        """Whether this step validates its inputs (see ``check_inputs``): free on CPU, else sync-free steps."""
        assert ctx.logits is not None
        trainer = getattr(self, "_trainer", None)
        if host_reads_are_free(ctx.logits.device) or trainer is None or not ctx.training:
            return True
        if not getattr(self, "_lreg_checked_once", False):
            self._lreg_checked_once = True
            return True
        connector = getattr(trainer, "_logger_connector", None)
        return bool(getattr(connector, "should_update_logs", True))

    def base_loss(self, ctx: StepContext) -> Tensor:
        """The base loss: CE on ``ctx.labels``, or soft CE on ``ctx.target`` when a refiner set one.

        It is the mean over labelled elements (``ignore_index`` elements and unlabeled samples
        contribute nothing); a batch without any labelled element gives exactly zero, not NaN.
        Override to change it (e.g. class weights); keep it a mean over the labelled elements.
        """
        assert ctx.logits is not None
        if ctx.target is None:
            logits = ctx.logits.float()
            if ctx.layout == "channels_last" and logits.dim() > 2:
                logits = logits.movedim(-1, 1)
            total = F.cross_entropy(logits, ctx.labels, ignore_index=ctx.ignore_index, reduction="sum")
            return total / ctx.valid.sum().clamp_min(1)
        return soft_cross_entropy(ctx.logits, ctx.target, dim=ctx.class_dim, valid=ctx.valid)

    def _log_terms(self, ctx: StepContext, total: Tensor) -> None:
        """Log every term and value, calling ``self.log`` only on logging steps (and at the epoch's end).

        Between logging steps the values accumulate on their device (a sum weighted by the batch size);
        a logging step logs the mean since the values were last handed over (the previous logging step
        or the epoch's start) with that weight, so the epoch aggregate is the exact epoch mean.
        Outside training steps every call logs at once, as a plain ``self.log``.
        """
        bs = ctx.batch_size
        values: dict[str, Tensor | float] = {"train/loss": total.detach()}
        for name, term in ctx.terms.items():
            values[f"train/loss_{name}"] = term.detach().float()
        for name, value in ctx.logs.items():
            values[name] = value.detach().float() if isinstance(value, Tensor) else float(value)
        window: dict[str, tuple[Any, int]] = self.__dict__.setdefault("_lreg_log_window", {})
        flush = not ctx.training or _is_log_flush_step(self._trainer, ctx.batch_idx)  # type: ignore[attr-defined]
        for name, v in values.items():
            acc, count = window.pop(name, (0.0, 0))
            acc, count = acc + v * bs, count + bs
            if not flush:
                window[name] = (acc, count)
                continue
            mean = acc / count
            self.log(  # type: ignore[attr-defined]
                name, mean, prog_bar=name == "train/loss", on_step=True, on_epoch=True, batch_size=count
            )


def _is_log_flush_step(trainer: Trainer, batch_idx: int) -> bool:
    """Whether a training step must hand its logged values to Lightning now.

    True on logging steps, on the last batch of the epoch (so the epoch aggregate is complete), on the
    last step of ``max_steps``, when the trainer is stopping, and whenever the epoch length is unknown.
    """
    connector = getattr(trainer, "_logger_connector", None)
    if (
        connector is None
        or bool(getattr(connector, "should_update_logs", True))
        or getattr(trainer, "fast_dev_run", False)
    ):
        return True
    nb = trainer.num_training_batches
    if not isinstance(nb, int) or batch_idx + 1 >= nb or trainer.should_stop:
        return True
    return trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps - 1


def _check_step_inputs(
    logits: Tensor,
    labels: Tensor,
    index: Tensor | None,
    layout: str = "channels_first",
    ignore_index: int = IGNORE_INDEX,
) -> None:
    """Validate logits, labels and indices with a single host sync."""
    if logits.dim() < 2:
        raise ValueError(f"Expected logits of shape (batch, num_classes, *dims), but got shape {tuple(logits.shape)}.")
    class_dim = 1 if layout == "channels_first" else logits.dim() - 1
    expected = tuple(s for d, s in enumerate(logits.shape) if d != class_dim)
    if tuple(labels.shape) != expected:
        hint = ""
        if labels.dim() == logits.dim() - 1 and layout == "channels_first" and logits.shape[-1] != labels.shape[-1]:
            hint = " For (batch, seq, num_classes) logits set `logits_layout = 'channels_last'` on the module."
        raise ValueError(
            f"Expected labels of shape {expected} matching the logits {tuple(logits.shape)} ({layout}), but got"
            f" shape {tuple(labels.shape)}.{hint}"
        )
    if labels.is_floating_point():
        raise TypeError(f"Expected integer class labels, but got dtype {labels.dtype}.")
    if index is not None and (index.dim() != 1 or index.shape[0] != labels.shape[0] or index.is_floating_point()):
        raise ValueError(
            f"Expected an integer sample index of shape ({labels.shape[0]},), but got {index.dtype} of shape"
            f" {tuple(index.shape)}."
        )
    c = logits.shape[class_dim]
    in_range = ((labels >= 0) & (labels < c)) | (labels == ignore_index)
    flags = torch.stack(
        [
            ~torch.isfinite(logits.detach()).all(),
            ~in_range.all(),
            (index < 0).any() if index is not None else torch.zeros((), dtype=torch.bool, device=labels.device),
        ]
    ).cpu()
    if bool(flags[0]):
        raise FloatingPointError(
            "The model produced non-finite logits (NaN or inf); no per-sample state was updated. Lower the learning"
            " rate, enable gradient clipping (`GradientClipping`), or check the inputs."
        )
    if bool(flags[1]):
        bad = labels[~in_range]
        raise ValueError(
            f"Expected labels in [0, {c}) for {c} classes (or `ignore_index` = {ignore_index} for elements without a"
            f" label), but got min {int(bad.min())} and max {int(bad.max())} outside that."
        )
    if bool(flags[2]):
        raise ValueError(f"Expected non-negative sample indices, but got min {int(index.min())}.")  # type: ignore[union-attr]
