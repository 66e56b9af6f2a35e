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
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor

if TYPE_CHECKING:
    pass

__all__ = [
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
]

_STAGES = ("input", "label", "target", "loss")


class MissingIndexError(ValueError):
    """Raised when a technique that keeps per-sample state receives a batch without sample indices."""


def soft_cross_entropy(logits: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
    r"""Cross-entropy against a soft target, computed in fp32.

    .. math:: \mathcal{L} = -\frac{1}{B}\sum_i \sum_c q_{ic} \log \mathrm{softmax}(z_i)_c

    The gradient with respect to the logits is ``(softmax(z) - q) / B``; the
    target carries no gradient.

    Args:
        logits: ``(B, C)`` logits, any float dtype.
        target: ``(B, C)`` target distribution (rows sum to one).
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Example:
        >>> z = torch.tensor([[0.0, 0.0]])
        >>> round(soft_cross_entropy(z, torch.tensor([[0.5, 0.5]])).item(), 4)
        0.6931
    """
    loss = -(target.detach().float() * F.log_softmax(logits.float(), dim=-1)).sum(dim=-1)
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


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


@dataclass
class StepContext:
    """Everything a loss-side regularizer may read or change during one training step.

    Attributes:
        module: The LightningModule being trained.
        x: The input that is (or was) forwarded; the input stage may replace it.
        labels: The integer labels the base loss uses; the label stage may correct them.
        given_labels: The labels exactly as the batch carried them.
        index: The samples' indices in the training set, or ``None``.
        logits: The ``(B, C)`` logits (``None`` until the forward pass).
        target: The soft ``(B, C)`` fp32 target, or ``None`` meaning ``one_hot(labels)``.
        terms: Named loss terms; ``"base"`` is set by the pipeline.
        logs: Extra scalars to log (name -> value), e.g. schedule values.
        extras: Free-form data shared between regularizers, e.g. ``"clean_x"``
            (the input before the input stage) or ``"mixup"`` (``(perm, lam)``).
        batch_idx: The batch index within the epoch.
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

    @property
    def num_classes(self) -> int:
        """The number of classes, read from the logits."""
        if self.logits is None:
            raise RuntimeError("`num_classes` is only known after the forward pass.")
        return int(self.logits.shape[-1])

    @property
    def batch_size(self) -> int:
        """The number of samples in the batch."""
        return int(self.labels.shape[0])

    def probs(self) -> Tensor:
        """Detached fp32 softmax of the logits, computed once per step and cached."""
        cached = self.extras.get("_probs")
        if cached is None:
            assert self.logits is not None
            cached = torch.softmax(self.logits.detach().float(), dim=-1)
            self.extras["_probs"] = cached
        return cached

    def current_target(self) -> Tensor:
        """The current soft target: ``target`` if a refiner set one, else ``one_hot(labels)`` in fp32."""
        if self.target is not None:
            return self.target
        return F.one_hot(self.labels, self.num_classes).float()

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
    """Return the size of the training set, read from the train dataloader's dataset.

    Under DDP the dataloader's dataset is the full training set, so every rank
    gets the same number.

    Raises:
        ValueError: If it cannot be inferred; the message says to pass ``num_samples``.
    """
    loaders: Any = None
    try:
        loaders = trainer.train_dataloader
    except Exception:  # pragma: no cover - defensive
        loaders = None
    iterables = getattr(loaders, "flattened", None) or ([loaders] if loaders is not None else [])
    for loader in iterables:
        dataset = getattr(loader, "dataset", None)
        if dataset is not None:
            try:
                return len(dataset)
            except TypeError:
                pass
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

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if not isinstance(pl_module, RegularizedModule):
            raise TypeError(
                f"`{type(self).__name__}` changes the training loss, so the LightningModule must use the"
                " `RegularizedModule` mixin: `class MyModel(RegularizedModule, L.LightningModule)`. If you write your"
                " own `training_step`, return `self.regularized_loss(logits, y, index, x=x)` from it."
                f" Got `{type(pl_module).__name__}`, which does not."
            )
        check_pipeline(trainer)

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

    Put it *before* ``L.LightningModule`` in the bases. The module's
    ``forward`` must return logits. Batches are ``(x, y)``, ``(x, y, index)``
    or mappings (see :func:`unpack_batch`); techniques with per-sample state
    need the index.

    Users who write their own ``training_step`` call :meth:`regularized_loss`
    with the logits they computed; only the input stage (e.g. mixup) needs the
    mixin's own ``training_step`` or a call to :meth:`prepare_inputs`.

    Class attributes:
        check_inputs: Check every step that the logits are finite and the
            labels in range, raising a clear error instead of corrupting
            per-sample state. It costs one host sync per step; set it to
            ``False`` once your pipeline is trusted.

    Logged metrics:

    ====================  ==========================================
    ``train/loss``         the total loss (progress bar)
    ``train/loss_base``    the base loss (CE, or soft CE on a refined target)
    ``train/loss_<name>``  each added loss term
    ``<name>/<value>``     schedule values the regularizers report
    ====================  ==========================================

    Example:
        >>> import lightning as L
        >>> class Net(RegularizedModule, L.LightningModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.net = torch.nn.Linear(8, 3)
        ...     def forward(self, x):
        ...         return self.net(x)
    """

    check_inputs: bool = True

    # -- pipeline -----------------------------------------------------------
    def _regularizers(self) -> list[LossRegularizer]:
        trainer = getattr(self, "_trainer", None)
        return regularizers_of(trainer)

    def prepare_inputs(self, x: Any, y: Tensor, index: Tensor | None = None, batch_idx: int = 0) -> StepContext:
        """Run the input stage and return the step context (``ctx.x`` is what to forward)."""
        ctx = StepContext(module=self, x=x, labels=y, given_labels=y, index=index, batch_idx=batch_idx)  # type: ignore[arg-type]
        ctx.extras["clean_x"] = x
        for r in self._regularizers():
            if r.stage == "input":
                r.transform_input(ctx)
        return ctx

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Unpack the batch, run the input stage, forward, and return :meth:`run_pipeline`'s loss."""
        x, y, index = unpack_batch(batch)
        ctx = self.prepare_inputs(x, y, index, batch_idx)
        ctx.logits = self(ctx.x)  # type: ignore[operator]
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
    ) -> Tensor:
        """Run the label, target and loss stages on logits you computed, log every term, return the loss.

        Args:
            logits: ``(B, C)`` logits of the batch.
            y: ``(B,)`` integer labels as the batch carried them.
            index: ``(B,)`` sample indices (needed by per-sample techniques).
            x: The input, needed by techniques that run extra forward passes.
            batch_idx: The batch index (passed to the regularizers).
            log: Whether to ``self.log`` the terms.

        Example:
            >>> # inside your own training_step:
            >>> # logits = self(x); return self.regularized_loss(logits, y, index, x=x)
        """
        ctx = StepContext(module=self, x=x, labels=y, given_labels=y, index=index, logits=logits, batch_idx=batch_idx)  # type: ignore[arg-type]
        ctx.extras["clean_x"] = x
        return self.run_pipeline(ctx, log=log)

    def run_pipeline(self, ctx: StepContext, log: bool = True) -> Tensor:
        """Run label → target → base loss → loss terms on a context whose logits are set."""
        if ctx.logits is None:
            raise ValueError("Expected `ctx.logits` to be set before `run_pipeline`.")
        if self.check_inputs:
            _check_step_inputs(ctx.logits, ctx.labels, ctx.index)
        regs = self._regularizers()
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

    def base_loss(self, ctx: StepContext) -> Tensor:
        """The base loss: CE on ``ctx.labels``, or soft CE on ``ctx.target`` when a refiner set one.

        Override to change it (e.g. class weights); keep it a mean over the batch.
        """
        assert ctx.logits is not None
        if ctx.target is None:
            return F.cross_entropy(ctx.logits.float(), ctx.labels)
        return soft_cross_entropy(ctx.logits, ctx.target)

    def _log_terms(self, ctx: StepContext, total: Tensor) -> None:
        log = self.log  # type: ignore[attr-defined]
        bs = ctx.batch_size
        log("train/loss", total.detach(), prog_bar=True, on_step=True, on_epoch=True, batch_size=bs)
        for name, term in ctx.terms.items():
            log(f"train/loss_{name}", term.detach().float(), on_step=True, on_epoch=True, batch_size=bs)
        for name, value in ctx.logs.items():
            v = value.detach().float() if isinstance(value, Tensor) else float(value)
            log(name, v, on_step=True, on_epoch=True, batch_size=bs)


def _check_step_inputs(logits: Tensor, labels: Tensor, index: Tensor | None) -> None:
    """Validate logits, labels and indices with a single host sync."""
    if logits.dim() != 2:
        raise ValueError(f"Expected logits of shape (batch, num_classes), but got shape {tuple(logits.shape)}.")
    if labels.dim() != 1 or labels.shape[0] != logits.shape[0]:
        raise ValueError(
            f"Expected labels of shape ({logits.shape[0]},) matching the logits, but got shape {tuple(labels.shape)}."
        )
    if labels.is_floating_point():
        raise TypeError(f"Expected integer class labels, but got dtype {labels.dtype}.")
    if index is not None and (index.dim() != 1 or index.shape[0] != labels.shape[0] or index.is_floating_point()):
        raise ValueError(
            f"Expected an integer sample index of shape ({labels.shape[0]},), but got {index.dtype} of shape"
            f" {tuple(index.shape)}."
        )
    c = logits.shape[1]
    flags = torch.stack(
        [
            ~torch.isfinite(logits.detach()).all(),
            (labels < 0).any() | (labels >= c).any(),
            (index < 0).any() if index is not None else torch.zeros((), dtype=torch.bool, device=labels.device),
        ]
    ).cpu()
    if bool(flags[0]):
        raise FloatingPointError(
            "The model produced non-finite logits (NaN or inf); no per-sample state was updated. Lower the learning"
            " rate, enable gradient clipping (`GradientClipping`), or check the inputs."
        )
    if bool(flags[1]):
        raise ValueError(
            f"Expected labels in [0, {c}) for {c} classes, but got min {int(labels.min())} and max {int(labels.max())}."
        )
    if bool(flags[2]):
        raise ValueError(f"Expected non-negative sample indices, but got min {int(index.min())}.")  # type: ignore[union-attr]
