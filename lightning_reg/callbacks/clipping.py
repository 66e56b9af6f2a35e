"""``GradientClipping``: every clipping rule, AMP-, FSDP- and manual-optimization-correct, with norm telemetry."""

from __future__ import annotations

import functools
import math
import types
from collections.abc import Callable, Hashable, Sequence
from fnmatch import fnmatchcase
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor
from torch.optim import Optimizer

from lightning_reg.core.protocol import RegularizerCallback
from lightning_reg.core.syncs import host_reads_are_free
from lightning_reg.core.validation import check_choice, check_float, check_int, check_optional_int
from lightning_reg.functional.clipping import (
    AllReduce,
    TensorBuckets,
    agc_coef,
    clip_coef,
    clip_grad_value_,
    percentile_threshold,
    scale_,
    scale_units_,
    segment_norms,
    tensor_norms,
    total_norm,
    unitwise_norms,
)

__all__ = ["DEFAULT_AGC_EXCLUDE", "GradientClipping"]

Rule = Literal["norm", "value", "component", "agc", "auto"]
NonFinite = Literal["skip", "raise", "ignore"]
_RULES: tuple[Rule, ...] = ("norm", "value", "component", "agc", "auto")
_NONFINITE: tuple[NonFinite, ...] = ("skip", "raise", "ignore")

#: Name patterns of the classifier head that AGC leaves unclipped by default (torchvision, timm, HF naming).
DEFAULT_AGC_EXCLUDE = ["fc", "head", "classifier", "*.fc", "*.head", "*.classifier"]
#: Wrapper prefixes stripped from parameter names before matching (FSDP, activation checkpointing, torch.compile).
_WRAPPERS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")
_STATE_VERSION = 1


class _SkipStep(Exception):
    """Raised from inside the optimizer's closure to abort a step whose gradients are non-finite."""

    def __init__(self, loss: Any) -> None:
        super().__init__("non-finite gradients: optimizer step skipped")
        self.loss = loss


def _clean_name(name: str) -> str:
    for w in _WRAPPERS:
        name = name.replace(w, "")
    return name


def _matches(name: str, pattern: str) -> bool:
    """A pattern matches a parameter name itself or any module that contains it (``"head"`` ≡ ``"head.*"``)."""
    return fnmatchcase(name, pattern) or fnmatchcase(name, pattern + ".*")


def _root(powsum: Tensor, p: float) -> Tensor:
    if math.isinf(p):
        return powsum
    return powsum.sqrt() if p == 2.0 else powsum.pow(1.0 / p)


def _power(norms: Tensor, p: float) -> Tensor:
    if math.isinf(p):
        return norms
    return norms.square() if p == 2.0 else norms.pow(p)


class _Plan:
    """Everything about one parameter list that does not change between steps, built once and cached."""

    def __init__(
        self,
        cb: GradientClipping,
        params: list[Tensor],
        names: list[str],
        grads: list[Tensor],
        positions: list[int] | None = None,
        n_full: int | None = None,
        module_of: list[int] | None = None,
        module_names: list[str] | None = None,
    ) -> None:
        self.params = params
        self.names = names
        self.ids = tuple(id(p) for p in params)
        self.n = len(params)
        self.buckets = TensorBuckets(grads)
        self.positions = positions
        self.n_full = n_full if n_full is not None else self.n
        # Threshold groups: 0 is the default (`max_norm`, or `clip_factor` for AGC), k > 0 the k-th pattern.
        patterns = list(cb.thresholds)
        default = cb.clip_factor if cb.rule == "agc" else cb.max_norm
        self.group_values = [default, *cb.thresholds.values()]
        self.group = [next((k + 1 for k, pat in enumerate(patterns) if _matches(n, pat)), 0) for n in names]
        self.num_groups = len(self.group_values)
        self.thr = [self.group_values[g] for g in self.group]
        # Modules (for the optional per-module norms): the module that owns each parameter.
        if module_of is None or module_names is None:
            mods = [n.rsplit(".", 1)[0] if "." in n else "root" for n in names]
            module_names = list(dict.fromkeys(mods))
            index = {m: k for k, m in enumerate(module_names)}
            module_of = [index[m] for m in mods]
        self.module_of = module_of
        self.module_names = module_names
        # AGC: clipped tensors (unit-wise) and excluded ones (the classifier head).
        self.agc_in = [i for i, n in enumerate(names) if not any(_matches(n, pat) for pat in cb.agc_exclude)]
        in_set = set(self.agc_in)
        self.agc_out = [i for i in range(self.n) if i not in in_set]
        self.agc_counts = [grads[i].shape[0] if grads[i].dim() > 1 else 1 for i in self.agc_in]
        self.agc_in_buckets = TensorBuckets([grads[i] for i in self.agc_in])
        self.agc_out_buckets = TensorBuckets([grads[i] for i in self.agc_out])
        self._cache: dict[tuple[str, torch.device], Tensor] = {}
        self._subplans: dict[tuple[bool, ...], _Plan] = {}
        self._cb = cb
        #: The full plan this one restricts (``None`` for a full plan).
        self.parent: _Plan | None = None

    def tensor(self, key: str, device: torch.device) -> Tensor:
        """A cached device tensor of per-step constants (thresholds, segment ids, ...)."""
        ck = (key, device)
        if ck not in self._cache:
            self._cache[ck] = self._build(key).to(device)
        return self._cache[ck]

    def _build(self, key: str) -> Tensor:
        long = torch.long
        if key == "group":
            return torch.tensor(self.group, dtype=long)
        if key == "group_thr":
            return torch.tensor(self.group_values, dtype=torch.float32)
        if key == "thr":
            return torch.tensor(self.thr, dtype=torch.float32)
        if key == "module":
            return torch.tensor(self.module_of, dtype=long)
        if key == "positions":
            return torch.tensor(self.positions if self.positions is not None else range(self.n), dtype=long)
        if key == "agc_lam":  # λ of every clipped unit
            counts = torch.tensor(self.agc_counts, dtype=long)
            lam = torch.tensor([self.thr[i] for i in self.agc_in], dtype=torch.float32)
            return lam.repeat_interleave(counts)
        if key == "agc_unit_tensor":  # the tensor (position in this plan) of every unit: clipped units, then excluded
            counts = torch.tensor(self.agc_counts, dtype=long)
            inner = torch.tensor(self.agc_in, dtype=long).repeat_interleave(counts)
            return torch.cat([inner, torch.tensor(self.agc_out, dtype=long)])
        raise KeyError(key)

    def subplan(self, present: tuple[bool, ...], grads: list[Tensor | None]) -> _Plan:
        """The plan restricted to the parameters that have a gradient this step (cached per pattern)."""
        sub = self._subplans.get(present)
        if sub is None:
            keep = [i for i, ok in enumerate(present) if ok]
            sub = _Plan(
                self._cb,
                [self.params[i] for i in keep],
                [self.names[i] for i in keep],
                [grads[i] for i in keep],  # type: ignore[misc]
                positions=keep,
                n_full=self.n,
                module_of=[self.module_of[i] for i in keep],
                module_names=self.module_names,
            )
            sub.parent = self
            self._subplans[present] = sub
        return sub


class GradientClipping(RegularizerCallback):
    r"""Gradient clipping with every common rule, applied to *unscaled* gradients, with norm telemetry.

    It runs in ``on_before_optimizer_step``, where Lightning has already
    unscaled AMP gradients, in automatic **and** manual optimization (Lightning's
    own ``gradient_clip_val`` clips scaled gradients in manual optimization,
    #18089). It supports FSDP (norms summed over the shards of all ranks,
    #19235), per-module thresholds (#4767) and logs the pre-clip norm (#1462).

    Rules (``c`` is ``max_norm`` or the matching ``thresholds`` value):

    ============= ==========================================================================================
    ``norm``       global norm clipping (Pascanu et al., 2013): ``g ← g·min(1, c/‖g‖_p)`` over all parameters
                   (over each threshold group separately when ``thresholds`` is set).
    ``value``      ``g ← clamp(g, −c, c)``.
    ``component``  component-wise clipping (Yang & Ma, 2022): the norm rule applied to each parameter tensor
                   on its own; there is no global clip.
    ``agc``        adaptive unit-wise clipping (NFNets): ``G_i ← G_i·min(1, λ·max(‖W_i‖, ε)/‖G_i‖)`` per
                   output row/filter, ``λ = clip_factor``, ``ε = eps``; parameters matching ``agc_exclude``
                   (the classifier head) are not clipped.
    ``auto``       norm clipping at the ``percentile``-th percentile of the last ``history_size`` pre-clip
                   norms (the current one included), Pascanu et al.'s advice made automatic (AutoClip). The
                   history is checkpointed, so a resumed run clips exactly as an uninterrupted one.
    ============= ==========================================================================================

    Args:
        max_norm: The threshold ``c`` of ``norm``/``component`` and the clip value of ``value``
            (unused by ``agc`` and ``auto``).
        rule: One of ``"norm"``, ``"value"``, ``"component"``, ``"agc"``, ``"auto"``.
        norm_type: ``p`` of the norms (``2.0``; any ``p > 0``; ``.inf`` in YAML or ``float("inf")``).
        thresholds: Per-parameter-name-pattern thresholds, e.g. ``{"head": 0.5}``; the first matching
            pattern wins and the rest use the default. A pattern is an ``fnmatch`` glob matched against
            the parameter name or any enclosing module name (``"head"`` matches ``head.weight`` and
            ``head.0.bias``). For ``agc`` the values replace ``clip_factor``. Not used by ``auto``.
        clip_factor: AGC's ``λ`` (0.01 as in NFNets).
        eps: AGC's ``ε``, the floor on the weight norm (1e-3 as in NFNets).
        agc_exclude: Name patterns AGC leaves unclipped; default :data:`DEFAULT_AGC_EXCLUDE`
            (``fc``, ``head``, ``classifier``). Pass your classifier's name if it differs.
        percentile: ``auto``'s percentile ``q`` in ``(0, 100]`` (AutoClip's default 10).
        history_size: How many past pre-clip norms ``auto`` keeps.
        nonfinite: What to do when the gradient norm is NaN/inf: ``"skip"`` skips the optimizer step, so
            the weights *and* the optimizer state (momentum buffers, Adam's moments and step counters,
            fused and foreach optimizers alike) stay bitwise unchanged and an :class:`~lightning_reg.EMATeacher`
            counts the step as skipped, as it does for a ``GradScaler`` skip; ``"raise"`` raises
            ``FloatingPointError`` naming the offending parameters; ``"ignore"`` clips anyway (the
            non-finite norm spreads to every gradient, like ``torch.nn.utils.clip_grad_norm_``). Under a
            ``GradScaler`` (``16-mixed``) non-finite steps are the scaler's: it skips them and lowers
            its scale, so nothing is skipped, raised or counted here. Lightning still advances
            ``global_step`` and steps the LR schedulers on a skipped step, as it does for a scaler skip.
        log_module_norms_every_n_steps: Also log the pre-clip norm of every module's gradients
            (``grad/norm_pre/<module>``) every that many steps (``None``: never).

    Logged metrics (every ``trainer.log_every_n_steps`` steps, ``on_step``):

    ===========================  ===============================================================
    ``grad/norm_pre``            total gradient norm before clipping
    ``grad/norm_post``           total gradient norm after clipping
    ``grad/clip_coef``           ``norm_post / norm_pre``
    ``grad/clipped_frac``        fraction of (finite) steps so far on which something was clipped
    ``grad/nonfinite_steps``     number of steps with a non-finite gradient norm (not counted under AMP)
    ``grad/threshold``           the current threshold (``auto`` only)
    ``grad/norm_pre/<module>``   per-module pre-clip norms (with ``log_module_norms_every_n_steps``)
    ===========================  ===============================================================

    How ``"skip"`` skips: at ``fit`` start the callback wraps each optimizer's ``step`` (restored at the
    end of ``fit``). ``on_before_optimizer_step`` runs inside ``optimizer.step(closure)``, after the
    closure's backward pass; on a non-finite step it leaves the gradients alone and the wrapped step
    returns the closure's loss without updating anything (with a ``GradScaler`` or a caller that runs the
    hook before ``step()``, the wrapped step returns at once). An optimizer that evaluates its closure
    several times (LBFGS) is stopped at the first non-finite evaluation.

    Host syncs: ``nonfinite="skip"`` and ``"raise"`` read one flag on the host per optimizer step,
    because skipping a step is a host decision. On CPU that read is free. On accelerators it is one
    synchronisation per step: the host waits for the backward pass to finish before it queues the
    optimizer step, which costs the time the host then needs to queue the next kernels (tens to a few
    hundred microseconds; most for small, launch-bound models). ``"ignore"`` never syncs, and neither
    does a ``GradScaler`` run (the scaler decides). The logged values are read by Lightning when it logs.
    :meth:`clip_` alone (e.g. with Fabric) does not sync: with ``"skip"`` it zeroes non-finite gradients
    with a masked fill and returns ``finite``; skip your ``optimizer.step()`` when it is ``False``, since
    zero gradients still move momentum and Adam's moments.

    Example:
        >>> import lightning as L
        >>> trainer = L.Trainer(callbacks=[GradientClipping(max_norm=1.0, thresholds={"head": 0.5})], logger=False)

    YAML::

        trainer:
          callbacks:
            - class_path: lightning_reg.GradientClipping
              init_args: {rule: agc, clip_factor: 0.01, agc_exclude: [fc]}
    """

    name = "grad"

    def __init__(
        self,
        max_norm: float = 1.0,
        rule: Rule = "norm",
        norm_type: float = 2.0,
        thresholds: dict[str, float] | None = None,
        clip_factor: float = 0.01,
        eps: float = 1e-3,
        agc_exclude: list[str] | None = None,
        percentile: float = 10.0,
        history_size: int = 1000,
        nonfinite: NonFinite = "skip",
        log_module_norms_every_n_steps: int | None = None,
    ) -> None:
        super().__init__()
        self.max_norm = check_float("max_norm", max_norm, 0.0, None, low_inclusive=False)
        self.rule: Rule = check_choice("rule", rule, _RULES)
        self.norm_type = check_float("norm_type", norm_type, 0.0, None, low_inclusive=False)
        self.thresholds = self._check_thresholds(thresholds)
        if self.thresholds and self.rule == "auto":
            raise ValueError(
                "Expected argument `thresholds` to be empty with `rule='auto'` (its threshold is the percentile of"
                f" the norm history), but got {thresholds!r}."
            )
        self.clip_factor = check_float("clip_factor", clip_factor, 0.0, None, low_inclusive=False)
        self.eps = check_float("eps", eps, 0.0, None)
        self.agc_exclude = self._check_patterns("agc_exclude", agc_exclude)
        self.percentile = check_float("percentile", percentile, 0.0, 100.0, low_inclusive=False)
        self.history_size = check_int("history_size", history_size, 1)
        self.nonfinite: NonFinite = check_choice("nonfinite", nonfinite, _NONFINITE)
        self.log_module_norms_every_n_steps = check_optional_int(
            "log_module_norms_every_n_steps", log_module_norms_every_n_steps, 1
        )
        self._plans: dict[Hashable, _Plan] = {}
        self._strategy: Any = None
        self._sharded = False
        self._checked_optimizers: set[int] = set()
        # nonfinite="skip": optimizers whose `step` is wrapped (id -> (optimizer, instance attribute it replaced))
        self._wrapped: dict[int, tuple[Optimizer, Any]] = {}
        self._skip: set[int] = set()  # optimizers whose current step is to be skipped
        self._reset_state()

    # -- validation -------------------------------------------------------------------------------
    @staticmethod
    def _check_thresholds(thresholds: Any) -> dict[str, float]:
        if thresholds is None:
            return {}
        if not isinstance(thresholds, dict) or not all(isinstance(k, str) for k in thresholds):
            raise TypeError(
                "Expected argument `thresholds` to be a mapping from parameter-name patterns to positive floats,"
                f" but got {thresholds!r}."
            )
        return {k: check_float(f"thresholds[{k!r}]", v, 0.0, None, low_inclusive=False) for k, v in thresholds.items()}

    @staticmethod
    def _check_patterns(name: str, patterns: Any) -> list[str]:
        if patterns is None:
            return list(DEFAULT_AGC_EXCLUDE)
        if isinstance(patterns, str) or not isinstance(patterns, (list, tuple)):
            raise TypeError(f"Expected argument `{name}` to be a list of name patterns, but got {patterns!r}.")
        if not all(isinstance(p, str) for p in patterns):
            raise TypeError(f"Expected argument `{name}` to be a list of name patterns, but got {patterns!r}.")
        return list(patterns)

    @property
    def state_key(self) -> str:
        return self._generate_state_key(rule=self.rule, max_norm=self.max_norm, norm_type=self.norm_type)

    # -- state ------------------------------------------------------------------------------------
    def _reset_state(self) -> None:
        zero = torch.zeros((), dtype=torch.long)
        self._num_steps = zero.clone()
        self._num_clipped = zero.clone()
        self._num_nonfinite = zero.clone()
        size = self.history_size if self.rule == "auto" else 0
        self._history = torch.full((size,), math.nan, dtype=torch.float32)
        self._history_count = 0

    def _state_to(self, device: torch.device) -> None:
        if self._num_steps.device != device:
            self._num_steps = self._num_steps.to(device)
            self._num_clipped = self._num_clipped.to(device)
            self._num_nonfinite = self._num_nonfinite.to(device)
            self._history = self._history.to(device)

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": _STATE_VERSION,
            "num_steps": self._num_steps.detach().cpu().clone(),
            "num_clipped": self._num_clipped.detach().cpu().clone(),
            "num_nonfinite": self._num_nonfinite.detach().cpu().clone(),
            "history": self._history.detach().cpu().clone(),
            "history_count": self._history_count,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        version = state_dict.get("version")
        if version != _STATE_VERSION:
            raise ValueError(f"Cannot load `GradientClipping` state version {version!r}; expected {_STATE_VERSION}.")
        self._num_steps = state_dict["num_steps"].clone()
        self._num_clipped = state_dict["num_clipped"].clone()
        self._num_nonfinite = state_dict["num_nonfinite"].clone()
        history, count = state_dict["history"].float(), int(state_dict["history_count"])
        size = self.history_size if self.rule == "auto" else 0
        if history.numel() == size:
            self._history, self._history_count = history.clone(), count
            return
        # A different `history_size`: keep the most recent norms, oldest first.
        if history.numel() and count >= history.numel():
            history = history.roll(-(count % history.numel()))
        else:
            history = history[: min(count, history.numel())]
        keep = history[max(history.numel() - size, 0) :] if size else history[:0]
        self._history = torch.full((size,), math.nan, dtype=torch.float32)
        self._history[: keep.numel()] = keep
        self._history_count = keep.numel()

    # -- Lightning hooks --------------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        clip_val = trainer.gradient_clip_val
        if clip_val is not None and float(clip_val) > 0:
            raise ValueError(
                f"`GradientClipping` clips the gradients itself, but the Trainer was also given"
                f" `gradient_clip_val={clip_val}`: the gradients would be clipped twice, silently. Remove"
                " `gradient_clip_val` (and `gradient_clip_algorithm`) from the Trainer and configure the callback"
                f" instead, e.g. `GradientClipping(max_norm={clip_val}, rule="
                f"{'value' if trainer.gradient_clip_algorithm == 'value' else 'norm'!r})`."
            )
        self._strategy, self._sharded = trainer.strategy, self._check_strategy(trainer.strategy)
        self._plans = {}
        self._checked_optimizers = set()

    def _check_strategy(self, strategy: Any) -> bool:
        """Raise for strategies we cannot clip correctly; return whether gradients are sharded across ranks."""
        from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

        if isinstance(strategy, DeepSpeedStrategy):
            raise RuntimeError(
                "`GradientClipping` cannot clip under DeepSpeed, whose engine owns the gradients. Set"
                " `gradient_clipping` in the DeepSpeed config instead, or use `strategy='ddp'` or `'fsdp'`."
            )
        if isinstance(strategy, ModelParallelStrategy):
            raise RuntimeError(
                "`GradientClipping` does not support `ModelParallelStrategy` (DTensor gradients) yet. Use"
                " `strategy='fsdp'` (FSDPStrategy) or `'ddp'`."
            )
        if not isinstance(strategy, FSDPStrategy):
            return False
        sharding = getattr(strategy.sharding_strategy, "name", str(strategy.sharding_strategy))
        if "HYBRID" in sharding:
            raise RuntimeError(
                f"`GradientClipping` does not support FSDP's `{sharding}` (shards replicated across nodes) yet: the"
                " norm would count the replicas. Use `sharding_strategy='FULL_SHARD'`, `'SHARD_GRAD_OP'` or"
                " `'NO_SHARD'`."
            )
        if self.rule == "agc":
            raise ValueError(
                "`GradientClipping(rule='agc')` needs each weight's full output rows, but FSDP flattens and shards"
                " them across ranks. Use `rule='norm'` or `'component'` under FSDP, or AGC under `strategy='ddp'`."
            )
        if not strategy.kwargs.get("use_orig_params", True) and (self.rule == "component" or self.thresholds):
            raise ValueError(
                "Per-tensor rules (`rule='component'`, `thresholds`) need FSDP's original parameters; set"
                " `FSDPStrategy(use_orig_params=True)` (Lightning's default)."
            )
        return sharding != "NO_SHARD"

    def _all_reduce(self, tensor: Tensor, op: str) -> Tensor:
        return self._strategy.reduce(tensor, reduce_op=op)

    # -- skipping a step: a wrapped `optimizer.step` ----------------------------------------------------
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        if self.nonfinite == "skip":
            for optimizer in trainer.optimizers:
                self._wrap_step(optimizer)

    def _wrap_step(self, optimizer: Optimizer) -> None:
        if id(optimizer) in self._wrapped:
            return
        replaced = optimizer.__dict__.get("step")  # e.g. an LR scheduler's wrapper, or None (the class's)
        inner = optimizer.step
        callback = self

        def step(opt: Optimizer, *args: Any, **kwargs: Any) -> Any:
            if id(opt) not in callback._wrapped:  # unwrapped meanwhile but kept by a later wrapper: pass through
                return inner(*args, **kwargs)
            if callback._take_skip(opt):  # the hook already ran (GradScaler, or the caller clipped first)
                return None
            closure = args[0] if args else kwargs.get("closure")
            if closure is None:
                return inner(*args, **kwargs)

            def guarded() -> Any:
                loss = closure()  # forward, backward and `on_before_optimizer_step`, which decides
                if callback._take_skip(opt):
                    raise _SkipStep(loss)  # before the optimizer has touched a weight or its state
                return loss

            rest = {k: v for k, v in kwargs.items() if k != "closure"}
            try:
                return inner(guarded, *args[1:], **rest)
            except _SkipStep as skipped:
                return skipped.loss

        functools.update_wrapper(step, getattr(inner, "__func__", inner))
        step._lightning_reg_owner = self  # type: ignore[attr-defined]
        if getattr(inner, "_wrapped_by_lr_sched", False):  # LR schedulers check this attribute at their first step
            step._wrapped_by_lr_sched = True  # type: ignore[attr-defined]
        optimizer.step = types.MethodType(step, optimizer)  # type: ignore[method-assign]
        self._wrapped[id(optimizer)] = (optimizer, replaced)

    def _take_skip(self, optimizer: Optimizer) -> bool:
        if id(optimizer) in self._skip:
            self._skip.discard(id(optimizer))
            return True
        return False

    def _unwrap_steps(self) -> None:
        for optimizer, replaced in self._wrapped.values():
            bound = optimizer.__dict__.get("step")
            if getattr(getattr(bound, "__func__", None), "_lightning_reg_owner", None) is not self:
                continue  # wrapped again by someone else: our wrapper stays in the chain but passes through
            if replaced is None:
                del optimizer.__dict__["step"]
            else:
                optimizer.step = replaced  # type: ignore[method-assign]
        self._wrapped = {}
        self._skip = set()

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._skip = set()  # a decision never consumed (a step not taken) must not leak into the next step

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._unwrap_steps()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._unwrap_steps()

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            self._unwrap_steps()

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Optimizer) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        scaler_active = scaler is not None and scaler.is_enabled()
        if id(optimizer) not in self._checked_optimizers:
            if scaler_active and getattr(optimizer, "_step_supports_amp_scaling", False):
                raise RuntimeError(
                    f"`{type(optimizer).__name__}` unscales the gradients inside its own `step()` (a fused"
                    " optimizer), so they are still scaled when `GradientClipping` runs. Use a non-fused optimizer"
                    " (e.g. `fused=False`) with `precision='16-mixed'`, or `precision='bf16-mixed'`."
                )
            self._checked_optimizers.add(id(optimizer))
        step = trainer.global_step
        telemetry = (step + 1) % max(int(getattr(trainer, "log_every_n_steps", 50)), 1) == 0
        every = self.log_module_norms_every_n_steps
        module_norms = every is not None and (step + 1) % every == 0

        def names() -> list[str]:
            named = {id(p): _clean_name(n) for n, p in pl_module.named_parameters()}
            return [named.get(id(p), f"unnamed.{i}") for i, p in enumerate(params)]

        skip_on_host = self.nonfinite == "skip" and not scaler_active and id(optimizer) in self._wrapped
        out = self._clip(
            params,
            names,
            key=id(optimizer),
            scaler_active=scaler_active,
            all_reduce=self._all_reduce if self._sharded else None,
            telemetry=telemetry,
            module_norms=module_norms,
            step=step,
            skip_on_host=skip_on_host,
        )
        if out.get("skip_step"):
            self._skip.add(id(optimizer))
        if telemetry or module_norms:
            self._log(pl_module, out, telemetry)

    def _log(self, pl_module: LightningModule, out: dict[str, Any], telemetry: bool) -> None:
        keys = ("norm_pre", "norm_post", "clip_coef", "clipped_frac", "nonfinite_steps", "threshold")
        for key in keys if telemetry else ():
            if key in out:
                pl_module.log(f"{self.name}/{key}", out[key].float(), on_step=True, on_epoch=False, batch_size=1)
        for module, value in out.get("module_norms", {}).items():
            pl_module.log(f"{self.name}/norm_pre/{module}", value, on_step=True, on_epoch=False, batch_size=1)

    # -- the hot path -----------------------------------------------------------------------------
    def clip_(
        self,
        params: Sequence[Tensor],
        names: Sequence[str] | None = None,
        *,
        key: Hashable = "default",
        scaler_active: bool = False,
        all_reduce: AllReduce | None = None,
        telemetry: bool = True,
        module_norms: bool = False,
    ) -> dict[str, Any]:
        """Clip ``params``' gradients in place with this callback's rule and update its state.

        This is what the hook runs each optimizer step; call it yourself in a
        custom loop (e.g. with Fabric). The per-parameter plan is cached under ``key``.

        Args:
            params: The parameters whose ``.grad`` to clip (``None`` gradients are skipped).
            names: Their names, for ``thresholds``, ``agc_exclude`` and module norms (default
                ``param0``, ``param1``, ...).
            key: Cache key of the parameter list (the hook uses the optimizer's id).
            scaler_active: Whether a ``GradScaler`` will skip non-finite steps (see ``nonfinite``).
            all_reduce: Cross-rank reduction for sharded gradients (see
                :data:`~lightning_reg.functional.clipping.AllReduce`).
            telemetry: Also return the norms (for ``value`` this costs extra passes).
            module_norms: Also return the per-module pre-clip norms.

        Returns:
            Tensors (no host sync): ``norm_pre``, ``norm_post``, ``clip_coef``, ``clipped_frac``,
            ``nonfinite_steps``, ``clipped``, ``finite`` (``threshold`` for ``auto``, ``module_norms``
            on request; the norms of ``value`` only with ``telemetry``).

        Example:
            >>> layer = torch.nn.Linear(2, 1)
            >>> layer.weight.grad, layer.bias.grad = torch.tensor([[3.0, 0.0]]), torch.tensor([4.0])
            >>> out = GradientClipping(max_norm=1.0).clip_(list(layer.parameters()))
            >>> out["norm_pre"], layer.bias.grad
            (tensor(5.), tensor([0.8000]))
        """
        name_list = list(names) if names is not None else None
        return self._clip(
            list(params),
            lambda: name_list if name_list is not None else [f"param{i}" for i in range(len(params))],
            key=key,
            scaler_active=scaler_active,
            all_reduce=all_reduce,
            telemetry=telemetry,
            module_norms=module_norms,
        )

    def _plan(self, key: Hashable, params: list[Tensor], names: Callable[[], list[str]]) -> _Plan:
        plan = self._plans.get(key)
        if plan is None or plan.ids != tuple(id(p) for p in params):
            grads = [p.grad if p.grad is not None else p for p in params]
            plan = _Plan(self, params, names(), grads)
            self._plans[key] = plan
        return plan

    @torch.no_grad()
    def _clip(
        self,
        params: list[Tensor],
        names: Callable[[], list[str]],
        *,
        key: Hashable,
        scaler_active: bool,
        all_reduce: AllReduce | None,
        telemetry: bool,
        module_norms: bool,
        step: int | None = None,
        skip_on_host: bool = False,
    ) -> dict[str, Any]:
        plan = self._plan(key, params, names)
        raw = [p.grad for p in plan.params]
        if any(g is None for g in raw):
            plan = plan.subplan(tuple(g is not None for g in raw), raw)
        grads: list[Tensor] = [g for g in raw if g is not None]
        if not grads and all_reduce is None:
            return {}
        device = grads[0].device if grads else torch.device(self._strategy.root_device)
        self._state_to(device)
        rule, p = self.rule, self.norm_type
        want_norms = module_norms
        out: dict[str, Any] = {}
        tnorms: Tensor | None = None  # per-tensor pre-clip norms of the local gradients (shards under FSDP)
        post: Tensor | None = None
        pre: Tensor | None = None

        if rule in ("norm", "auto"):
            tnorms = tensor_norms(grads, p, plan.buckets).to(device)
            if plan.num_groups == 1:
                pre = total_norm(tnorms, p, all_reduce)
                thr: float | Tensor = self._push_history(pre) if rule == "auto" else self.max_norm
                coef = clip_coef(pre, thr)
                post, clipped = pre * coef, pre > thr
                if rule == "auto":
                    out["threshold"] = thr
            else:
                group = plan.tensor("group", device)
                gnorms = segment_norms(tnorms, group, plan.num_groups, p)
                if all_reduce is not None:
                    gnorms = self._reduce_norms(gnorms, p, all_reduce)
                gthr = plan.tensor("group_thr", device)
                gcoef = clip_coef(gnorms, gthr)
                coef = gcoef.index_select(0, group)
                pre = torch.linalg.vector_norm(gnorms, p)
                post = torch.linalg.vector_norm(gnorms * gcoef, p)
                clipped = (gnorms > gthr).any()

            def apply() -> None:
                scale_(grads, coef, plan.buckets)

        elif rule == "component":
            tnorms = tensor_norms(grads, p, plan.buckets).to(device)
            full, top = tnorms, plan
            if all_reduce is not None:  # every tensor's global norm, laid out over all parameters on every rank
                full, top = self._reduce_per_tensor(tnorms, plan, p, all_reduce, device), plan.parent or plan
            thr_full = top.tensor("thr", device)
            coef = clip_coef(full, thr_full)
            pre = torch.linalg.vector_norm(full, p)
            post = torch.linalg.vector_norm(full * coef, p)
            clipped = (full > thr_full).any()
            if top is not plan:
                coef = coef.index_select(0, plan.tensor("positions", device))

            def apply() -> None:
                scale_(grads, coef, plan.buckets)

        elif rule == "value":
            amax = tensor_norms(grads, math.inf, plan.buckets).to(device)
            thr_t = plan.tensor("thr", device)
            flags = torch.stack([(amax > thr_t).any(), ~torch.isfinite(amax).all()]).float()
            if all_reduce is not None:
                flags = all_reduce(flags, "max")
            clipped, finite_v = flags[0] > 0, flags[1] == 0
            if telemetry or want_norms:
                tnorms = tensor_norms(grads, p, plan.buckets).to(device)
                pre = total_norm(tnorms, p, all_reduce)

            def apply() -> None:
                clip_grad_value_(grads, plan.thr, plan.buckets)

        else:  # agc
            if all_reduce is not None:
                raise ValueError("`rule='agc'` does not support sharded gradients (see `setup`).")
            g_in = [grads[i] for i in plan.agc_in]
            w_in = [plan.params[i].detach() for i in plan.agc_in]
            g_units = unitwise_norms(g_in, p).to(device)
            w_units = unitwise_norms(w_in, p).to(device)
            lam = plan.tensor("agc_lam", device) if plan.num_groups > 1 else self.clip_factor
            ucoef = agc_coef(w_units, g_units, lam, self.eps)
            clipped = (
                (g_units > w_units.clamp(min=self.eps) * lam).any()
                if g_units.numel()
                else torch.zeros((), dtype=torch.bool, device=device)
            )
            out_norms = tensor_norms([grads[i] for i in plan.agc_out], p, plan.agc_out_buckets).to(device)
            units = torch.cat([g_units, out_norms])
            pre = torch.linalg.vector_norm(units, p) if units.numel() else units.new_zeros(())
            post = torch.linalg.vector_norm(torch.cat([g_units * ucoef, out_norms]), p) if units.numel() else pre
            if want_norms:
                tnorms = segment_norms(units, plan.tensor("agc_unit_tensor", device), plan.n, p)

            def apply() -> None:
                scale_units_(g_in, ucoef, plan.agc_counts, plan.agc_in_buckets)

        finite = finite_v if rule == "value" else torch.isfinite(pre)  # type: ignore[arg-type]
        deferred = scaler_active or self.nonfinite == "ignore"
        skipped_on_host = False
        if not scaler_active and self.nonfinite == "raise" and not bool(finite):
            raise FloatingPointError(self._nonfinite_message(plan, grads, step))
        if skip_on_host and not deferred:  # the optimizer step will be skipped: leave the gradients alone
            skipped_on_host = out["skip_step"] = not bool(finite)  # one host read (a sync on accelerators)
        elif not deferred and self.nonfinite == "skip" and host_reads_are_free(device) and not bool(finite):
            for ts in plan.buckets.split(grads):  # a host read is free on CPU: zero only on a bad step
                torch._foreach_zero_(ts)
            skipped_on_host = True
        if not skipped_on_host:
            apply()
        if not deferred and not skip_on_host and self.nonfinite == "skip" and not host_reads_are_free(device):
            bad = ~finite  # NaN·0 is NaN, so zero with a masked fill rather than a multiply (no host sync)
            for g in grads:
                g.masked_fill_(bad, 0.0)

        if rule == "value" and telemetry:
            post = total_norm(tensor_norms(grads, p, plan.buckets).to(device), p, all_reduce)
        if post is not None and not deferred and self.nonfinite == "skip":
            post = torch.where(finite, post, torch.zeros_like(post))
        self._num_steps += finite
        self._num_clipped += clipped & finite
        if not scaler_active:
            self._num_nonfinite += ~finite
        out.update(clipped=clipped, finite=finite, nonfinite_steps=self._num_nonfinite)
        out["clipped_frac"] = self._num_clipped / self._num_steps.clamp(min=1)
        if pre is not None:
            out["norm_pre"] = pre
        if pre is not None and post is not None:
            out["norm_post"] = post
            out["clip_coef"] = torch.where(pre > 0, post / pre, torch.ones_like(pre))
        if want_norms and tnorms is not None:
            mnorms = segment_norms(tnorms, plan.tensor("module", device), len(plan.module_names), p)
            if all_reduce is not None:  # local shards' module norms → global ones
                mnorms = self._reduce_norms(mnorms, p, all_reduce)
            out["module_norms"] = dict(zip(plan.module_names, mnorms.unbind(0)))
        return out

    # -- helpers ----------------------------------------------------------------------------------
    def _push_history(self, norm: Tensor) -> Tensor:
        """Record the pre-clip norm (NaN if non-finite) and return the percentile threshold."""
        h = self._history
        h[self._history_count % h.numel()] = torch.where(torch.isfinite(norm), norm, torch.full_like(norm, math.nan))
        self._history_count += 1
        return percentile_threshold(h, self.percentile)

    @staticmethod
    def _reduce_norms(norms: Tensor, p: float, all_reduce: AllReduce) -> Tensor:
        """Combine per-rank partial norms (of the same segments) into global ones."""
        return _root(all_reduce(_power(norms, p), "max" if math.isinf(p) else "sum"), p)

    def _reduce_per_tensor(
        self, tnorms: Tensor, plan: _Plan, p: float, all_reduce: AllReduce, device: torch.device
    ) -> Tensor:
        """Global per-tensor norms over *all* parameters (ranks may lack a gradient for some), from local shards."""
        if plan.positions is None:
            return self._reduce_norms(tnorms, p, all_reduce)
        pos = plan.tensor("positions", device)
        full = torch.zeros(plan.n_full, dtype=torch.float32, device=device).index_copy_(0, pos, _power(tnorms, p))
        return _root(all_reduce(full, "max" if math.isinf(p) else "sum"), p)

    def _nonfinite_message(self, plan: _Plan, grads: list[Tensor], step: int | None) -> str:
        bad = [n for n, g in zip(plan.names, grads) if not bool(torch.isfinite(g).all())]
        shown = ", ".join(f"`{n}`" for n in bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        where = f" at step {step}" if step is not None else ""
        return (
            f"The gradient norm is non-finite{where}; non-finite gradients in {shown or 'no local tensor'}."
            " Lower the learning rate, check the loss and inputs, or pass `GradientClipping(nonfinite='skip')` to"
            " skip such steps."
        )
