"""``EMATeacher``: an exponential moving average of the weights, for evaluation, export and as a teacher."""

from __future__ import annotations

import ast
import contextlib
import fnmatch
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from lightning_reg.core.protocol import RegularizerCallback, _is_log_flush_step
from lightning_reg.core.syncs import host_reads_are_free
from lightning_reg.core.validation import check_bool, check_choice, check_float, check_int
from lightning_reg.functional.ema import (
    EMA_WARMUPS,
    all_finite,
    clean_state_dict,
    clean_state_dict_key,
    ema_decay,
    group_by_device_and_dtype,
)

__all__ = ["EMATeacher", "export_ema_state_dict"]

_STATE_VERSION = 1
_Group = tuple[list[Tensor], list[Tensor]]
NonFinite = Literal["skip", "raise", "ignore"]
#: The hyperparameters recorded in the checkpoint and compared on resume (none of them is part of the state key).
_HPARAMS = ("decay", "warmup", "inv_gamma", "power", "update_every", "start_step", "buffers", "include", "exclude")
#: Elements per chunk of the sync-free masked update (bounds its scratch buffer: 64 MiB in fp32).
_CHUNK = 1 << 24


@dataclass
class _Entry:
    """One tracked tensor of the module: a parameter or a persistent buffer."""

    names: list[str]  # every name the module's state_dict uses for it (tied weights have several)
    clean: list[str]  # the same names without wrapper prefixes (`_orig_mod.`, `module.`, FSDP's)
    live: Tensor
    kind: str  # "lerp" (averaged), "copy" (copied every update) or "keep" (left to the teacher's own passes)
    ema: Tensor = field(default=None)  # type: ignore[assignment]


def _is_dense(t: Tensor) -> bool:
    """Whether ``t`` covers exactly ``t.numel()`` consecutive elements of its storage (any order of the dims)."""
    if t.is_contiguous():
        return True
    expected = 1
    for stride, size in sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


class _Bucket:
    """The tracked tensors of one kind (``"lerp"`` or ``"copy"``), device and dtype.

    The EMA tensors of the dense ones are views into one flat buffer, laid out in each live tensor's
    memory order (a channels-last weight gets a channels-last EMA). The host-checked update runs one
    ``_foreach_lerp_``/``_foreach_copy_`` over the views; the sync-free update gathers the live tensors into
    a scratch buffer with the same layout, chunk by chunk, and applies ``where(finite, live, ema)`` and the
    lerp to the flat buffer: three kernels per chunk, whatever the number of tensors.
    """

    def __init__(self, kind: str, entries: list[_Entry], init: dict[int, Tensor]) -> None:
        self.kind = kind
        self.live = [e.live for e in entries]
        first = entries[0].live
        self.device, self.dtype = first.device, first.dtype
        self.floating = first.is_floating_point() or first.is_complex()
        dense = [i for i, e in enumerate(entries) if _is_dense(e.live)]
        self.loose = [i for i in range(len(entries)) if i not in set(dense)]
        offsets, total = [], 0
        for i in dense:
            offsets.append(total)
            total += entries[i].live.numel()
        self.flat = torch.empty(total, dtype=self.dtype, device=self.device)
        for i, off in zip(dense, offsets):
            live = entries[i].live
            entries[i].ema = self.flat.as_strided(live.shape, live.stride(), off)
            entries[i].ema.copy_(init[id(entries[i])])
        for i in self.loose:
            entries[i].ema = init[id(entries[i])].clone()
        self.ema = [e.ema for e in entries]
        # Chunks of the dense tensors: (positions in `dense`, start and stop in `flat`).
        self._dense, self._offsets = dense, offsets
        self.chunks: list[tuple[list[int], int, int]] = []
        members: list[int] = []
        start = 0
        for k, i in enumerate(dense):
            n = entries[i].live.numel()
            if members and offsets[k] + n - start > _CHUNK:
                self.chunks.append((members, start, offsets[k]))
                members, start = [], offsets[k]
            members.append(k)
        if members:
            self.chunks.append((members, start, total))
        self._chunk_live = [[self.live[dense[k]] for k in members] for members, _, _ in self.chunks]
        self._scratch: Tensor | None = None
        self._scratch_views: list[list[Tensor]] = []

    def update(self, weight: float) -> None:
        """``ema ← lerp(ema, live, weight)`` (or a copy), one multi-tensor kernel per call."""
        if self.kind == "lerp":
            torch._foreach_lerp_(self.ema, self.live, weight)
        else:
            torch._foreach_copy_(self.ema, self.live)

    def update_where(self, finite: Tensor, weight: float) -> None:
        """The same update where ``finite`` (a 0-dim device bool) holds, none where not; no host sync."""
        if self._scratch is None:
            size = max((stop - start for _, start, stop in self.chunks), default=0)
            self._scratch = torch.empty(size, dtype=self.dtype, device=self.device)
            for members, start, _ in self.chunks:
                views = []
                for k in members:
                    live = self.live[self._dense[k]]
                    views.append(self._scratch.as_strided(live.shape, live.stride(), self._offsets[k] - start))
                self._scratch_views.append(views)
        for (_, start, stop), views, lives in zip(self.chunks, self._scratch_views, self._chunk_live):
            torch._foreach_copy_(views, lives)
            gathered, ema = self._scratch[: stop - start], self.flat[start:stop]
            if self.kind == "lerp":  # on a bad step the target is the EMA itself: lerp(e, e, w) == e exactly
                ema.lerp_(torch.where(finite, gathered, ema, out=gathered), weight)
            else:
                torch.where(finite, gathered, ema, out=ema)
        for i in self.loose:
            ema, live = self.ema[i], self.live[i]
            target = torch.where(finite, live, ema)
            if self.kind == "lerp":
                ema.lerp_(target, weight)
            else:
                ema.copy_(target)


def _check_patterns(name: str, value: Any) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise TypeError(f"Expected argument `{name}` to be a list of name patterns (str) or None, but got {value!r}.")
    return list(value)


class EMATeacher(RegularizerCallback):
    r"""Keep an exponential moving average (EMA) of the weights: :math:`\theta' \leftarrow a\,\theta' + (1-a)\,\theta`.

    Mean Teacher (Tarvainen & Valpola, 2017, https://arxiv.org/abs/1703.01780).
    It works with any ``LightningModule`` (the :class:`~lightning_reg.RegularizedModule`
    mixin is not needed) and does four jobs:

    * **Averaging.** After every *real* optimizer step, so with
      ``accumulate_grad_batches=k`` once per ``k`` batches, and never after a
      step that AMP's ``GradScaler`` skipped because of inf/NaN gradients (it
      counts steps with a post-hook on each optimizer, which only fires when
      ``optimizer.step()`` really runs). The decay warms up as
      :func:`~lightning_reg.functional.ema.ema_decay` describes.
    * **Evaluation.** With ``eval_with_ema=True`` the EMA weights are copied
      into the model for validation and test and the training weights are put
      back afterwards, also when validation raises. Nothing is swapped before the
      first update. A checkpoint saved while swapped still holds the training
      weights under ``"state_dict"``.
    * **Checkpoints.** ``"state_dict"`` always holds the live training weights;
      the EMA and its counters live in this callback's state
      (``checkpoint["callbacks"][state_key]["ema"]``, keys without wrapper
      prefixes). Resuming continues exactly. :func:`export_ema_state_dict`
      turns a callback or a ``.ckpt`` file into a plain ``state_dict`` for the
      bare model.
    * **Teacher.** :meth:`teacher_forward` runs the model with the EMA weights
      under ``torch.no_grad()`` (with ``torch.func.functional_call``; the live
      weights are never touched), so consistency and ELR+-style techniques can
      find it with :func:`~lightning_reg.core.protocol.find_teacher`.

    The hot path caches the tensor lists once at fit start (after the strategy
    has wrapped the model), groups them by device and dtype, and runs one
    ``torch._foreach_lerp_`` per group. Counters are Python ints and the decay a
    Python float.

    **Non-finite weights.** A NaN or infinity in the live weights (a diverged
    step) would make the EMA non-finite for good. Before each update the
    callback checks the tracked live tensors (one multi-tensor L2 norm, see
    :func:`~lightning_reg.functional.ema.all_finite`). With ``nonfinite="skip"``
    (the default) a non-finite update is skipped, so the EMA keeps its last
    finite value, counted in :attr:`skipped_nonfinite` and ``ema/skipped_nonfinite``,
    with one warning per fit. On CPU the check is read on the host (free), so a
    skipped update does not count in :attr:`num_updates`. On accelerators nothing
    is read on the host: the update is applied with ``where(finite, live, ema)``
    on the device (three kernels per 16M-element chunk, and a scratch buffer of at
    most one chunk), the skips are counted on the device and :attr:`num_updates`
    counts the attempted updates; the warning comes at the next epoch end,
    validation or checkpoint. Costs: the check reads the live weights once more
    (on one CPU thread a ResNet-50-sized update took 35 ms with it and 25 ms
    without); on accelerators the masked update moves about 3 times the bytes
    of the plain one (copy the live weights, select, lerp: still a fraction of
    a millisecond for 25M parameters on a current GPU). ``"raise"`` raises
    ``FloatingPointError`` naming the tensors, which costs one host sync per update
    on accelerators; ``"ignore"`` skips the check (the old behaviour and speed).

    **Checkpoint key.** The callback's state is stored under ``"EMATeacher"``
    (``state_key``), which does not change with the hyperparameters: a run resumed
    with another ``decay`` (or warm-up, ``include``...) restores the EMA and its
    counters, warns naming each changed hyperparameter with its old and new value,
    and goes on with the new values. Checkpoints written under the old key, which
    held the decay, warm-up and patterns, are still found. Give several
    ``EMATeacher`` callbacks in one Trainer distinct ``key`` values.

    **Strategies.** Single device and DDP (every rank averages its identical
    replica). FSDP (``FSDPStrategy`` with ``use_orig_params=True`` and
    ``state_dict_type="full"``, the defaults): each rank keeps the EMA of its own
    parameter shard with no per-step communication; the checkpointed EMA is
    gathered to a full state dict like the model's and re-sharded on load.
    :meth:`teacher_forward` is not available under FSDP. DeepSpeed, XLA and
    ``ModelParallelStrategy`` raise at ``setup``.

    Args:
        decay: The EMA decay ``a`` in ``[0, 1]``: 0.99 for short runs, 0.999 (MIC), 0.9997–0.9999 for ImageNet scale.
        warmup: Decay warm-up, ``n`` counting EMA updates from 1: ``"mean_teacher"`` ``min(a, 1 − 1/(n+1))``,
            ``"timm"`` ``min(a, (1+n)/(10+n))``, ``"power"`` ``min(a, 1 − (1 + n/inv_gamma)^−power)``, or ``"none"``.
        inv_gamma: ``γ`` of the ``"power"`` warm-up.
        power: ``p`` of the ``"power"`` warm-up (2/3 for runs of a million steps, 3/4 for shorter ones).
        update_every: Update once every ``k`` optimizer steps (the decay is not rescaled; the EMA's horizon is
            about ``k / (1 − a)`` steps).
        start_step: Leave the EMA alone for the first ``start_step`` optimizer steps; at step ``start_step`` it
            is reset to the live weights and the updates (and the warm-up) start after it.
        buffers: Floating-point buffers (e.g. BatchNorm statistics) are ``"average"``\ d like the parameters,
            ``"copy"``\ ed from the model at every update, or ``"keep"``: left to the teacher's own forward
            passes (Mean Teacher's choice, with ``teacher_mode="train"``). Integer buffers (e.g.
            ``num_batches_tracked``) are always copied, never averaged.
        include: ``fnmatch`` patterns (``*``, ``?``, ``[seq]``) on state-dict names without wrapper prefixes,
            e.g. ``["backbone.*"]``; only matching tensors are averaged. ``None`` tracks everything.
        exclude: Patterns of tensors not to track, e.g. ``["*.num_batches_tracked", "head.*"]``. Untracked
            tensors keep their live values in the teacher, the swap and the export.
        eval_with_ema: Swap the EMA weights in for validation and test.
        teacher_mode: The mode of the model in :meth:`teacher_forward`: ``"eval"`` (deterministic targets,
            BatchNorm uses the EMA running statistics) or ``"train"`` (dropout noise and batch statistics, as in
            Mean Teacher; with ``buffers="keep"`` the teacher's running statistics come from its own passes).
        overlap: On CUDA, run the update on a side stream that the next optimizer step, a swap, a save or a
            teacher forward waits for. It assumes nothing else writes the weights between the update and the
            next optimizer step. Ignored on CPU.
        nonfinite: What to do when the live weights hold a NaN or an infinity at an update: ``"skip"`` the
            update (and warn once), ``"raise"`` a ``FloatingPointError``, or ``"ignore"`` (no check; the EMA
            becomes non-finite). See *Non-finite weights* above for the costs.
        key: A name that tells several ``EMATeacher`` callbacks of one Trainer apart in the checkpoint
            (e.g. ``key="slow"``); ``None`` (the default) for a single one.

    Logged metrics (after every update, per step):

    ==========================  ==============================================
    ``ema/decay``                the decay ``a_n`` of the update just applied
    ``ema/updates``              the number of EMA updates so far
    ``ema/skipped_nonfinite``    updates skipped because the weights were non-finite (not with ``"ignore"``)
    ==========================  ==============================================

    Example:
        >>> import lightning as L
        >>> ema = EMATeacher(decay=0.999, warmup="mean_teacher")
        >>> trainer = L.Trainer(callbacks=[ema], logger=False)
        >>> ema.has_updated
        False

    YAML::

        trainer:
          callbacks:
            - class_path: lightning_reg.EMATeacher
              init_args: {decay: 0.999, warmup: mean_teacher, eval_with_ema: true}
    """

    name = "ema"

    def __init__(
        self,
        decay: float = 0.999,
        warmup: Literal["none", "mean_teacher", "timm", "power"] = "mean_teacher",
        inv_gamma: float = 1.0,
        power: float = 2.0 / 3.0,
        update_every: int = 1,
        start_step: int = 0,
        buffers: Literal["average", "copy", "keep"] = "average",
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        eval_with_ema: bool = True,
        teacher_mode: Literal["eval", "train"] = "eval",
        overlap: bool = False,
        nonfinite: NonFinite = "skip",
        key: str | None = None,
    ) -> None:
        super().__init__()
        self.decay = check_float("decay", decay, 0.0, 1.0)
        self.warmup = check_choice("warmup", warmup, EMA_WARMUPS)
        self.inv_gamma = check_float("inv_gamma", inv_gamma, 0.0, None, low_inclusive=False)
        self.power = check_float("power", power, 0.0, None, low_inclusive=False)
        self.update_every = check_int("update_every", update_every, 1)
        self.start_step = check_int("start_step", start_step, 0)
        self.buffers = check_choice("buffers", buffers, ("average", "copy", "keep"))
        self.include = _check_patterns("include", include)
        self.exclude = _check_patterns("exclude", exclude)
        self.eval_with_ema = check_bool("eval_with_ema", eval_with_ema)
        self.teacher_mode = check_choice("teacher_mode", teacher_mode, ("eval", "train"))
        self.overlap = check_bool("overlap", overlap)
        self.nonfinite: NonFinite = check_choice("nonfinite", nonfinite, ("skip", "raise", "ignore"))
        if key is not None and not isinstance(key, str):
            raise TypeError(f"Expected argument `key` to be a str or None, but got {key!r}.")
        self.key = key

        # counters (Python ints, checkpointed)
        self._num_updates = 0
        self._steps = 0
        self._skipped_steps = 0
        self._last_decay = 0.0
        self._skipped_nonfinite = 0  # skips known on the host
        self._nonfinite_dev: Tensor | None = None  # skips counted on the device (sync-free path)
        self._warned_nonfinite = False
        #: Force (True) or forbid (False) the sync-free masked update; ``None``: on accelerators only.
        self._sync_free: bool | None = None
        # bound state (rebuilt at every fit start)
        self._module: nn.Module | None = None
        self._trainer: Trainer | None = None
        self._fsdp = False
        self._entries: list[_Entry] | None = None
        self._buckets: list[_Bucket] = []
        self._all: list[_Group] = []
        self._teacher_tensors: dict[str, Tensor] = {}
        self._modules: list[nn.Module] = []
        self._pending: dict[str, Tensor] | None = None
        self._backup: list[list[Tensor]] | None = None
        # step detection (host-side, no sync)
        self._hooks: list[Any] = []
        self._hook_count = 0
        self._hook_mark = 0
        self._last_global_step: int | None = None
        # optional CUDA side stream
        self._stream: Any = None
        self._stream_busy = False

    # -- public read-only state ------------------------------------------------------------------
    @property
    def state_key(self) -> str:
        """``"EMATeacher"`` (or ``"EMATeacher{'key': ...}"``): independent of the hyperparameters."""
        return type(self).__qualname__ if self.key is None else self._generate_state_key(key=self.key)

    @property
    def skipped_nonfinite(self) -> int:
        """Updates skipped because the live weights were non-finite (a host read on accelerators)."""
        return self._skipped_nonfinite + (0 if self._nonfinite_dev is None else int(self._nonfinite_dev))

    @property
    def num_updates(self) -> int:
        """The number of EMA updates applied so far."""
        return self._num_updates

    @property
    def has_updated(self) -> bool:
        """Whether the EMA has been updated at least once (before that it equals the weights at fit start)."""
        return self._num_updates > 0

    @property
    def skipped_steps(self) -> int:
        """Optimizer steps that advanced ``global_step`` but did not run (e.g. skipped by AMP's GradScaler)."""
        return self._skipped_steps

    @property
    def current_decay(self) -> float:
        """The decay of the last update applied (0.0 before the first)."""
        return self._last_decay

    @property
    def is_swapped(self) -> bool:
        """Whether the model currently holds the EMA weights (during validation/test with ``eval_with_ema``)."""
        return self._backup is not None

    # -- setup ---------------------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        from lightning.pytorch.strategies import (
            DDPStrategy,
            DeepSpeedStrategy,
            FSDPStrategy,
            ModelParallelStrategy,
            SingleDeviceStrategy,
        )

        strategy = trainer.strategy
        name = type(strategy).__name__
        if isinstance(strategy, DeepSpeedStrategy):
            raise RuntimeError(
                "`EMATeacher` does not support DeepSpeed: ZeRO partitions and flattens the weights outside Lightning's"
                " view, so an EMA of them cannot be kept or checkpointed reliably. Use `strategy='ddp'` or"
                " `strategy='fsdp'` (sharded, supported), or DeepSpeed's own EMA."
            )
        unsupported = isinstance(strategy, ModelParallelStrategy) or "XLA" in name
        if unsupported or not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy, FSDPStrategy)):
            raise RuntimeError(
                f"`EMATeacher` does not support the `{name}` strategy. Supported: single device, DDP (`'ddp'`,"
                " `'ddp_spawn'`, ...) and FSDP (`'fsdp'` with `use_orig_params=True`, `state_dict_type='full'`)."
            )
        if isinstance(strategy, FSDPStrategy):
            if not strategy.kwargs.get("use_orig_params", True):
                raise RuntimeError(
                    "`EMATeacher` under FSDP needs `FSDPStrategy(use_orig_params=True)` (Lightning's default) so that"
                    " each parameter's local shard is visible; remove `use_orig_params=False`."
                )
            if getattr(strategy, "_state_dict_type", "full") != "full":
                raise RuntimeError(
                    "`EMATeacher` under FSDP supports `FSDPStrategy(state_dict_type='full')` only (the default): with"
                    " sharded checkpoints only rank 0's callback state is written, which would lose the other ranks'"
                    " EMA shards. Set `state_dict_type='full'`."
                )

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        self._bind(trainer, pl_module, carry_over=True)
        self._remove_hooks()
        for opt in trainer.optimizers:
            self._hooks.append(opt.register_step_post_hook(self._count_step))

    def _count_step(self, *args: Any, **kwargs: Any) -> None:
        self._hook_count += 1

    def _remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    # -- binding: cache the tensor lists once ----------------------------------------------------
    def _bind(self, trainer: Trainer, pl_module: LightningModule, carry_over: bool) -> None:
        from lightning.pytorch.strategies import FSDPStrategy

        previous: dict[str, Tensor] = {}
        if carry_over and self._entries is not None and self._module is pl_module and not self._fsdp:
            previous = {c: e.ema for e in self._entries for c in e.clean}
        self._swap_out()
        self._module, self._trainer = pl_module, trainer
        self._fsdp = isinstance(trainer.strategy, FSDPStrategy)

        entries: list[_Entry] = []
        by_id: dict[int, _Entry] = {}
        for pname, p in pl_module.named_parameters(remove_duplicate=False):
            if id(p) in by_id:
                by_id[id(p)].names.append(pname)
                by_id[id(p)].clean.append(clean_state_dict_key(pname))
                continue
            kind = "lerp" if (p.is_floating_point() or p.is_complex()) else "copy"
            by_id[id(p)] = _Entry([pname], [clean_state_dict_key(pname)], p, kind)
            entries.append(by_id[id(p)])
        has_float_buffer = False
        for mname, mod in pl_module.named_modules():
            for bname, b in mod._buffers.items():
                if b is None or bname in mod._non_persistent_buffers_set:
                    continue
                full = f"{mname}.{bname}" if mname else bname
                if id(b) in by_id:
                    by_id[id(b)].names.append(full)
                    by_id[id(b)].clean.append(clean_state_dict_key(full))
                    continue
                if b.is_floating_point() or b.is_complex():
                    has_float_buffer = True
                    kind = {"average": "lerp", "copy": "copy", "keep": "keep"}[self.buffers]
                else:
                    kind = "copy"
                by_id[id(b)] = _Entry([full], [clean_state_dict_key(full)], b, kind)
                entries.append(by_id[id(b)])

        def tracked(e: _Entry) -> bool:
            if self.include is not None and not any(fnmatch.fnmatchcase(c, p) for c in e.clean for p in self.include):
                return False
            return not (self.exclude and any(fnmatch.fnmatchcase(c, p) for c in e.clean for p in self.exclude))

        entries = [e for e in entries if tracked(e)]
        if not entries:
            raise ValueError(
                f"`EMATeacher(include={self.include}, exclude={self.exclude})` matched no parameter or buffer of"
                f" `{type(pl_module).__name__}`. Patterns use fnmatch syntax on names like"
                f" {next(iter(n for n, _ in pl_module.named_parameters()), 'layer.weight')!r}."
            )
        if self.buffers == "keep" and self.teacher_mode == "eval" and has_float_buffer:
            rank_zero_warn(
                "`EMATeacher(buffers='keep', teacher_mode='eval')`: the EMA model's floating-point buffers (e.g."
                " BatchNorm running statistics) stay at their fit-start values, a known failure mode of EMA teachers."
                " Use `buffers='average'`/`'copy'`, or `teacher_mode='train'` so the teacher updates its own."
            )
        with torch.no_grad():
            init: dict[int, Tensor] = {}
            for e in entries:
                prev = previous.get(e.clean[0])
                same = prev is not None and (prev.shape, prev.dtype, prev.device) == (
                    e.live.shape,
                    e.live.dtype,
                    e.live.device,
                )
                init[id(e)] = prev if same and prev is not None else e.live.detach()
            groups: dict[tuple[str, torch.device, torch.dtype], list[_Entry]] = {}
            for e in entries:
                if e.kind == "keep":
                    e.ema = init[id(e)].clone()
                else:
                    groups.setdefault((e.kind, e.live.device, e.live.dtype), []).append(e)
            self._buckets = [_Bucket(kind, es, init) for (kind, _, _), es in groups.items()]
        self._entries = entries
        self._all = list(group_by_device_and_dtype((e.ema, e.live) for e in entries).values())
        self._teacher_tensors = {n: e.ema for e in entries for n in e.names}
        self._modules = list(pl_module.modules())
        self._stream, self._stream_busy = None, False
        cuda_devices = {e.live.device for e in entries if e.live.device.type == "cuda"}
        if self.overlap and len(cuda_devices) == 1:
            self._stream = torch.cuda.Stream(device=next(iter(cuda_devices)))
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self._load_ema(pending)

    def _ensure_bound(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._entries is None or self._module is not pl_module:
            self._bind(trainer, pl_module, carry_over=False)

    # -- the update ------------------------------------------------------------------------------
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._last_global_step = trainer.global_step
        self._hook_mark = self._hook_count

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self._backup is not None:  # never let EMA weights leak into training
            self._swap_out()

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        self._sync_stream()

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step == self._last_global_step:  # gradient accumulation: no optimizer step on this batch
            return
        self._last_global_step = step
        stepped = not self._hooks or self._hook_count != self._hook_mark
        self._hook_mark = self._hook_count
        if not stepped:  # global_step advanced but optimizer.step() never ran: AMP skipped it (inf/NaN grads)
            self._skipped_steps += 1
            return
        self._steps += 1
        offset = self._steps - self.start_step
        if offset <= 0:
            if offset == 0 and self.start_step > 0:
                self._apply(0.0)  # reset the EMA to the live weights; the warm-up starts after this step
            return
        if offset % self.update_every:
            return
        n = self._num_updates + 1
        a = ema_decay(n, self.decay, self.warmup, self.inv_gamma, self.power)
        applied = self._apply(a)
        if applied is not False:
            self._num_updates, self._last_decay = n, a
        if not _is_log_flush_step(trainer, batch_idx):  # per-step values: only the steps Lightning hands on
            return
        device = pl_module.device
        if applied is not False:
            # torch.full launches a fill kernel: unlike logging a Python float, it never synchronises with the host.
            pl_module.log("ema/decay", torch.full((), a, device=device), on_step=True, on_epoch=False, batch_size=1)
            pl_module.log(
                "ema/updates", torch.full((), float(n), device=device), on_step=True, on_epoch=False, batch_size=1
            )
        if self.nonfinite != "ignore":
            skipped = torch.full((), float(self._skipped_nonfinite), device=device)
            if self._nonfinite_dev is not None:
                skipped = skipped + self._nonfinite_dev.to(device)
            pl_module.log("ema/skipped_nonfinite", skipped, on_step=True, on_epoch=False, batch_size=1)

    def _apply(self, decay: float) -> bool | None:
        """Update the EMA with ``decay``; return whether it was applied, or ``None`` when only the device knows."""
        weight = 1.0 - decay
        with torch.no_grad(), self._stream_context():
            finite = self._all_finite() if self.nonfinite != "ignore" else None
            if finite is None:
                for bucket in self._buckets:
                    bucket.update(weight)
                return True
            sync_free = self._sync_free
            if sync_free is None:
                sync_free = any(not host_reads_are_free(b.device) for b in self._buckets)
            if sync_free and self.nonfinite == "skip":
                for bucket in self._buckets:
                    bucket.update_where(finite, weight)
                bad = (~finite).long()
                self._nonfinite_dev = bad if self._nonfinite_dev is None else self._nonfinite_dev + bad
                return None
            if bool(finite):  # a host read: free on CPU, one sync per update on accelerators ("raise")
                for bucket in self._buckets:
                    bucket.update(weight)
                return True
        if self.nonfinite == "raise":
            raise FloatingPointError(self._nonfinite_message())
        self._skipped_nonfinite += 1
        self._warn_nonfinite()
        return False

    def _all_finite(self) -> Tensor | None:
        """Whether every tracked floating live tensor is finite, as one device bool (``None``: nothing to check)."""
        flags = [all_finite(b.live) for b in self._buckets if b.floating and b.live]
        if not flags:
            return None
        if len(flags) == 1:
            return flags[0]
        return torch.stack([f.to(flags[0].device) for f in flags]).all()

    def _nonfinite_message(self) -> str:
        assert self._entries is not None
        bad = [
            e.clean[0]
            for e in self._entries
            if e.kind != "keep" and e.live.is_floating_point() and not bool(torch.isfinite(e.live).all())
        ]
        shown = ", ".join(f"`{n}`" for n in bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        step = self._trainer.global_step if self._trainer is not None else "?"
        return (
            f"`EMATeacher(nonfinite='raise')`: the live weights are non-finite (in {shown}) after optimizer step"
            f" {step}; the EMA was not updated. Lower the learning rate, skip non-finite steps with"
            " `GradientClipping(nonfinite='skip')`, or use `EMATeacher(nonfinite='skip')` to keep the last finite EMA"
            " and go on."
        )

    def _warn_nonfinite(self) -> None:
        if self._warned_nonfinite:
            return
        self._warned_nonfinite = True
        rank_zero_warn(
            "`EMATeacher`: the live weights were non-finite (NaN/inf) at an EMA update, so the update was skipped"
            " and the EMA keeps its last finite value. Further skips are counted in `ema/skipped_nonfinite`"
            " without another warning. Check the learning rate and the loss, or skip non-finite optimizer steps"
            " with `GradientClipping(nonfinite='skip')`."
        )

    def _poll_nonfinite(self) -> None:
        """Warn about skips counted on the device (a host read: called at epoch ends, validation and saves)."""
        if self._nonfinite_dev is not None and not self._warned_nonfinite and int(self._nonfinite_dev) > 0:
            self._warn_nonfinite()

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._poll_nonfinite()

    def _stream_context(self) -> contextlib.AbstractContextManager[Any]:
        if self._stream is None:
            return contextlib.nullcontext()
        self._stream.wait_stream(torch.cuda.current_stream(self._stream.device))
        self._stream_busy = True
        return torch.cuda.stream(self._stream)

    def _sync_stream(self) -> None:
        if self._stream_busy:
            torch.cuda.current_stream(self._stream.device).wait_stream(self._stream)
            self._stream_busy = False

    # -- evaluation with the EMA weights -----------------------------------------------------------
    def _swap_in(self) -> None:
        if self._backup is not None or self._entries is None:
            return
        self._sync_stream()
        with torch.no_grad():
            self._backup = [[t.detach().clone() for t in live] for _, live in self._all]
            for ema, live in self._all:
                torch._foreach_copy_(live, ema)

    def _swap_out(self) -> None:
        if self._backup is None:
            return
        with torch.no_grad():
            for (_, live), saved in zip(self._all, self._backup):
                torch._foreach_copy_(live, saved)
        self._backup = None

    def _eval_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._poll_nonfinite()
        if not self.eval_with_ema:
            return
        self._ensure_bound(trainer, pl_module)
        if self.has_updated:
            self._swap_in()

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._eval_start(trainer, pl_module)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._swap_out()

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._eval_start(trainer, pl_module)

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._swap_out()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._swap_out()
        self._remove_hooks()

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._swap_out()
        self._sync_stream()
        self._poll_nonfinite()

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._swap_out()
        if stage == "fit":
            self._remove_hooks()

    # -- teacher ----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _teacher_mode(self) -> Iterator[None]:
        want = self.teacher_mode == "train"
        modes = [m.training for m in self._modules]
        changed = any(mode != want for mode in modes)
        if changed:
            for m in self._modules:
                m.training = want
        try:
            yield
        finally:
            if changed:
                for m, mode in zip(self._modules, modes):
                    m.training = mode

    def teacher_forward(self, x: Any) -> Tensor:
        """The model's output for ``x`` with the EMA weights, without gradients and without touching the live weights.

        It calls the module's ``forward`` through ``torch.func.functional_call`` with
        the EMA tensors, in ``teacher_mode`` (the module's own modes are restored
        afterwards). Before the first update the EMA equals the weights at fit
        start; check :attr:`has_updated` to fall back to the student instead.

        Raises:
            RuntimeError: Before fit has started, or under FSDP.
        """
        if self._entries is None or self._module is None:
            raise RuntimeError(
                "`EMATeacher.teacher_forward` is available once `trainer.fit` has started (the EMA is created at"
                " `on_fit_start`)."
            )
        if self._fsdp:
            raise RuntimeError(
                "`EMATeacher.teacher_forward` is not available under FSDP: each rank holds only a shard of the EMA, and"
                " a forward pass with it would need its own all-gathers. Use DDP for teacher-based techniques."
            )
        self._sync_stream()
        with torch.no_grad(), self._teacher_mode():
            return torch.func.functional_call(self._module, self._teacher_tensors, (x,), strict=False)

    # -- state ------------------------------------------------------------------------------------
    def _gather_fsdp(self) -> dict[str, Any]:
        """The full model state dict with the EMA weights in (collective; rank 0 gets it, other ranks ``{}``)."""
        assert self._trainer is not None
        swapped = self._backup is not None
        self._swap_in()
        try:
            return dict(self._trainer.strategy.lightning_module_state_dict())
        finally:
            if not swapped:
                self._swap_out()

    def _ema_state(self) -> dict[str, Tensor]:
        if self._entries is None:
            return dict(self._pending or {})
        self._sync_stream()
        if self._fsdp:
            full = self._gather_fsdp()
            names = {c for e in self._entries for c in e.clean}
            return {k: v for k, v in clean_state_dict(full).items() if k in names}
        return {c: e.ema.detach() for e in self._entries for c in e.clean}

    def state_dict(self) -> dict[str, Any]:
        """The counters and the EMA tensors (keys without wrapper prefixes). Under FSDP this is a collective."""
        self._poll_nonfinite()
        return {
            "version": _STATE_VERSION,
            "num_updates": self._num_updates,
            "steps": self._steps,
            "skipped_steps": self._skipped_steps,
            "skipped_nonfinite": self.skipped_nonfinite,
            "decay": self._last_decay,
            "hparams": self._hparams(),
            "ema": self._ema_state(),
        }

    def _hparams(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _HPARAMS}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        version = state_dict.get("version")
        if version != _STATE_VERSION:
            raise ValueError(f"Expected an `EMATeacher` state of version {_STATE_VERSION}, but got {version!r}.")
        self._num_updates = int(state_dict["num_updates"])
        self._steps = int(state_dict["steps"])
        self._skipped_steps = int(state_dict["skipped_steps"])
        self._skipped_nonfinite = int(state_dict.get("skipped_nonfinite", 0))
        self._nonfinite_dev = None
        self._last_decay = float(state_dict["decay"])
        saved, now = state_dict.get("hparams") or {}, self._hparams()
        changed = [f"{k}: {saved[k]!r} -> {now[k]!r}" for k in _HPARAMS if k in saved and saved[k] != now[k]]
        if changed:
            rank_zero_warn(
                "`EMATeacher`: restored the EMA and its counters from the checkpoint, but these hyperparameters"
                f" changed since it was saved: {', '.join(changed)}. The EMA goes on with the new values."
            )
        ema = dict(state_dict["ema"])
        if self._entries is None:
            self._pending = ema
        else:
            self._load_ema(ema)

    def _load_ema(self, ema: Mapping[str, Tensor]) -> None:
        assert self._entries is not None
        if not ema:
            return
        missing = [e.clean[0] for e in self._entries if not any(c in ema for c in e.clean)]
        if len(missing) == len(self._entries):
            raise ValueError(
                "The checkpointed EMA matches none of the model's parameters (checkpoint keys like"
                f" {sorted(ema)[:3]}, model keys like {[e.clean[0] for e in self._entries[:3]]}). Was it saved from"
                " another model, or with other `include`/`exclude` patterns?"
            )
        if missing:
            rank_zero_warn(
                f"`EMATeacher`: the checkpoint has no EMA for {missing}; they restart from the live weights."
            )
        if self._fsdp:
            self._load_fsdp(ema)
            return
        with torch.no_grad():
            for e in self._entries:
                key = next((c for c in e.clean if c in ema), None)
                if key is None:
                    continue
                src = ema[key]
                if src.shape != e.ema.shape:
                    raise ValueError(
                        f"The checkpointed EMA of {key!r} has shape {tuple(src.shape)}, but the model's is"
                        f" {tuple(e.ema.shape)}."
                    )
                e.ema.copy_(src)

    def _load_fsdp(self, ema: Mapping[str, Tensor]) -> None:
        """Load a full EMA state dict into the local shards (collective: every rank must call it)."""
        from torch.distributed.fsdp import FullStateDictConfig, StateDictType
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        assert self._entries is not None and self._trainer is not None
        model = self._trainer.strategy.model
        assert model is not None
        was_swapped = self._backup is not None
        self._swap_out()
        with torch.no_grad():
            backup = [[t.detach().clone() for t in live] for _, live in self._all]
            config = FullStateDictConfig(offload_to_cpu=False, rank0_only=False)
            with FSDP.state_dict_type(model, StateDictType.FULL_STATE_DICT, config):
                model.load_state_dict(dict(ema), strict=False)
            for (ema_list, live), saved in zip(self._all, backup):
                torch._foreach_copy_(ema_list, live)
                torch._foreach_copy_(live, saved)
        if was_swapped:
            self._swap_in()

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        """Find a state saved under the old key, which held ``decay``, ``warmup``, ``include`` and ``exclude``."""
        states = checkpoint.get("callbacks")
        if not isinstance(states, dict) or self.state_key in states:
            return
        name = type(self).__qualname__
        legacy: dict[str, dict[str, Any]] = {}
        for k in states:
            if isinstance(k, str) and k.startswith(name + "{'decay'"):
                with contextlib.suppress(ValueError, SyntaxError):
                    legacy[k] = dict(ast.literal_eval(k[len(name) :]))
        if not legacy:
            return
        now = self._hparams()
        exact = [k for k, hp in legacy.items() if all(now.get(h) == v for h, v in hp.items())]
        if len(legacy) == 1 and self.key is None:
            pick = next(iter(legacy))
        elif len(exact) == 1:
            pick = exact[0]
        else:
            rank_zero_warn(
                f"`EMATeacher(key={self.key!r})`: the checkpoint holds several EMA states under old keys"
                f" ({sorted(legacy)}) and none matches this callback's hyperparameters; the EMA restarts from the"
                " live weights."
            )
            return
        state = dict(states[pick])
        state.setdefault("hparams", legacy[pick])
        states[self.state_key] = state

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        """Keep the live training weights under ``"state_dict"`` even if the checkpoint is saved while swapped."""
        if self._backup is None or self._entries is None:
            return
        if self._fsdp:
            self._swap_out()
            try:
                checkpoint["state_dict"] = trainer.strategy.lightning_module_state_dict()
            finally:
                self._swap_in()
            return
        state = checkpoint.get("state_dict", {})
        saved = {id(live): t for (_, lives), ts in zip(self._all, self._backup) for live, t in zip(lives, ts)}
        for e in self._entries:
            for name in e.names:
                if name in state:
                    state[name] = saved[id(e.live)]

    # -- export -----------------------------------------------------------------------------------
    def ema_state_dict(self) -> dict[str, Tensor]:
        """The whole model ``state_dict`` with the EMA weights, keys cleaned for the bare model (see
        :func:`export_ema_state_dict`). Untracked tensors (``include``/``exclude``) hold their live values.
        Under FSDP this is a collective and only rank 0 gets the tensors.
        """
        if self._entries is None or self._module is None:
            if self._pending is None:
                raise RuntimeError("`EMATeacher.ema_state_dict` needs a fit to have started or a loaded checkpoint.")
            return dict(self._pending)
        self._sync_stream()
        if self._fsdp:
            return clean_state_dict(self._gather_fsdp())
        out = {k: v.detach().clone() for k, v in clean_state_dict(self._module.state_dict()).items()}
        for e in self._entries:
            for c in e.clean:
                if c in out:
                    out[c] = e.ema.detach().clone()
        return out


def export_ema_state_dict(
    source: EMATeacher | str | os.PathLike[str] | Mapping[str, Any],
    state_key: str | None = None,
) -> dict[str, Tensor]:
    """Export EMA weights as a plain ``state_dict`` that loads into the bare model with ``strict=True``.

    Keys lose the wrapper prefixes ``module.`` (DDP), ``_orig_mod.`` (``torch.compile``) and FSDP's. Tensors
    the EMA does not track (``include``/``exclude``) are taken from the live weights.

    Args:
        source: An :class:`EMATeacher` (after or during fit), a Lightning checkpoint path, or a loaded
            checkpoint dict. Only load checkpoints you trust (they are unpickled).
        state_key: Which ``EMATeacher`` state to export when the checkpoint holds several.

    Example:
        >>> ckpt = {"state_dict": {"_orig_mod.w": torch.zeros(2)},
        ...         "callbacks": {"EMATeacher{...}": {"version": 1, "ema": {"w": torch.ones(2)}}}}
        >>> export_ema_state_dict(ckpt)
        {'w': tensor([1., 1.])}
    """
    if isinstance(source, EMATeacher):
        return source.ema_state_dict()
    checkpoint: Mapping[str, Any]
    if isinstance(source, Mapping):
        checkpoint = source
    else:
        checkpoint = torch.load(os.fspath(source), map_location="cpu", weights_only=False)
    callbacks: Mapping[str, Any] = checkpoint.get("callbacks", {})
    keys = [k for k in callbacks if k.startswith(EMATeacher.__qualname__)]
    if state_key is not None:
        if state_key not in callbacks:
            raise KeyError(f"The checkpoint has no callback state {state_key!r}; EMATeacher states: {keys}.")
        key = state_key
    elif len(keys) == 1:
        key = keys[0]
    elif not keys:
        raise KeyError("The checkpoint holds no `EMATeacher` state; it was saved without the callback.")
    else:
        raise KeyError(f"The checkpoint holds several `EMATeacher` states; pass `state_key=` one of {keys}.")
    ema: Mapping[str, Tensor] = callbacks[key]["ema"]
    out = dict(clean_state_dict(checkpoint.get("state_dict", {})))
    for k, v in ema.items():
        out[k] = v
    return out
