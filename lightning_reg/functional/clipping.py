r"""Gradient clipping rules: global p-norm, value, component-wise, unit-wise adaptive (AGC) and percentile thresholds.

Every function works in place on a list of gradient tensors with multi-tensor
(``torch._foreach_*``) kernels, one call per ``(device, dtype)`` bucket, and
never synchronises with the host. Norms are accumulated in fp32 whatever the
gradient dtype, so fp16 gradients cannot overflow the norm.

Papers:

* Norm clipping: Pascanu, Mikolov & Bengio, *On the difficulty of training
  Recurrent Neural Networks*, https://arxiv.org/abs/1211.5063.
* Component-wise clipping: Yang & Ma, *Improving Stability of Fine-Tuning
  Pretrained Language Models via Component-Wise Gradient Norm Clipping*,
  https://arxiv.org/abs/2210.10325.
* Adaptive (unit-wise) clipping: Brock, De, Smith & Simonyan,
  *High-Performance Large-Scale Image Recognition Without Normalization*,
  https://arxiv.org/abs/2102.06171.

Sharded gradients (FSDP) are supported by the norm-based rules through an
``all_reduce(tensor, op)`` callable (``op`` is ``"sum"`` or ``"max"``): each
rank reduces its local shard to :math:`\sum |g|^p` (or :math:`\max |g|`), the
callable combines the ranks, and every rank derives the same coefficient.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = [
    "AllReduce",
    "TensorBuckets",
    "adaptive_clip_grad_",
    "agc_coef",
    "clip_coef",
    "clip_grad_norm_",
    "clip_grad_norm_per_tensor_",
    "clip_grad_value_",
    "percentile_threshold",
    "scale_",
    "scale_units_",
    "segment_norms",
    "tensor_norms",
    "total_norm",
    "unitwise_norms",
]

#: ``all_reduce(tensor, op)`` with ``op`` in ``{"sum", "max"}``: the reduction across ranks (returns the result).
AllReduce = Callable[[Tensor, str], Tensor]

_FP32 = torch.float32
#: Added to the norm before dividing, exactly as ``torch.nn.utils.clip_grad_norm_`` does.
NORM_EPS = 1e-6


class TensorBuckets:
    """Positions of a tensor list grouped by ``(device, dtype)``; build once per parameter set and reuse.

    Args:
        tensors: The tensors (e.g. gradients) to group.

    Example:
        >>> b = TensorBuckets([torch.zeros(2), torch.zeros(3, dtype=torch.float16), torch.zeros(1)])
        >>> b.groups
        [[0, 2], [1]]
    """

    def __init__(self, tensors: Sequence[Tensor]) -> None:
        groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for i, t in enumerate(tensors):
            groups.setdefault((t.device, t.dtype), []).append(i)
        self.groups: list[list[int]] = list(groups.values())
        self.devices: list[torch.device] = [d for d, _ in groups]
        self.size = len(tensors)
        order = [i for g in self.groups for i in g]
        #: ``True`` when concatenating the buckets already gives list order (the common single-bucket case).
        self.in_order = order == list(range(self.size))
        self._inverse_cpu = torch.empty(0, dtype=torch.long)
        if not self.in_order:
            self._inverse_cpu = torch.argsort(torch.tensor(order, dtype=torch.long))
        self._index_cpu = [torch.tensor(g, dtype=torch.long) for g in self.groups]
        self._on: dict[tuple[str, torch.device], list[Tensor] | Tensor] = {}

    def split(self, tensors: Sequence[Tensor]) -> list[list[Tensor]]:
        """The tensors of each bucket (lists of references, no copies)."""
        if len(self.groups) == 1:
            return [list(tensors)]
        return [[tensors[i] for i in g] for g in self.groups]

    def inverse(self, device: torch.device) -> Tensor:
        """Permutation taking concatenated-bucket order back to list order (cached per device)."""
        key = ("inverse", device)
        if key not in self._on:
            self._on[key] = self._inverse_cpu.to(device)
        return self._on[key]  # type: ignore[return-value]

    def index(self, device: torch.device) -> list[Tensor]:
        """Each bucket's positions as a long tensor on ``device`` (cached)."""
        key = ("index", device)
        if key not in self._on:
            self._on[key] = [i.to(device) for i in self._index_cpu]
        return self._on[key]  # type: ignore[return-value]


def _inf_norms(tensors: list[Tensor]) -> list[Tensor]:
    """``max |t|`` per tensor; NaN propagates. ``aminmax`` is ~6x faster than ``vector_norm(inf)`` on CPU."""
    if tensors[0].device.type != "cpu":
        return list(torch._foreach_norm(tensors, math.inf, dtype=_FP32))
    out = []
    for t in tensors:
        if t.numel() == 0:
            out.append(torch.zeros((), dtype=_FP32))
            continue
        lo, hi = torch.aminmax(t)
        out.append(torch.maximum(hi.float(), -lo.float()))
    return out


def tensor_norms(tensors: Sequence[Tensor], norm_type: float = 2.0, buckets: TensorBuckets | None = None) -> Tensor:
    r"""The p-norm of each tensor, :math:`\|g_i\|_p`, as one fp32 vector on the first tensor's device.

    One multi-tensor reduction per ``(device, dtype)`` bucket; no host sync.

    Args:
        tensors: The tensors.
        norm_type: ``p`` (any positive float or ``inf``).
        buckets: Cached :class:`TensorBuckets` of ``tensors`` (built on the fly if omitted).

    Example:
        >>> tensor_norms([torch.tensor([3.0, 4.0]), torch.tensor([-2.0])])
        tensor([5., 2.])
    """
    if len(tensors) == 0:
        return torch.zeros(0, dtype=_FP32)
    buckets = buckets if buckets is not None else TensorBuckets(tensors)
    device = tensors[0].device
    p = float(norm_type)
    parts: list[Tensor] = []
    for ts in buckets.split(tensors):
        norms = _inf_norms(ts) if math.isinf(p) else torch._foreach_norm(ts, p, dtype=_FP32)
        parts.append(torch.stack(list(norms)).to(device))
    out = parts[0] if len(parts) == 1 else torch.cat(parts)
    return out if buckets.in_order else out[buckets.inverse(device)]


def _powsum(norms: Tensor, p: float) -> Tensor:
    """``Σ n^p`` (or ``max n`` for ``p = inf``) of a vector of norms; 0 for an empty vector."""
    if norms.numel() == 0:
        return torch.zeros((), dtype=_FP32, device=norms.device)
    if math.isinf(p):
        return norms.amax()
    return norms.square().sum() if p == 2.0 else norms.pow(p).sum()


def _root(powsum: Tensor, p: float) -> Tensor:
    if math.isinf(p):
        return powsum
    return powsum.sqrt() if p == 2.0 else powsum.pow(1.0 / p)


def total_norm(norms: Tensor, norm_type: float = 2.0, all_reduce: AllReduce | None = None) -> Tensor:
    r"""The norm of the concatenation of all tensors, from their per-tensor norms.

    .. math:: \|g\|_p = \Big(\sum_i \|g_i\|_p^{\,p}\Big)^{1/p}, \qquad \|g\|_\infty = \max_i \|g_i\|_\infty

    With ``all_reduce`` (sharded gradients) the local :math:`\sum_i \|g_i\|^p` is
    summed (or maxed for ``p = inf``) across ranks before the root.

    Example:
        >>> total_norm(torch.tensor([3.0, 4.0]))
        tensor(5.)
    """
    p = float(norm_type)
    if all_reduce is None:
        if norms.numel() == 0:
            return torch.zeros((), dtype=_FP32, device=norms.device)
        return torch.linalg.vector_norm(norms, p)  # the same reduction as torch.nn.utils.clip_grad_norm_
    return _root(all_reduce(_powsum(norms, p), "max" if math.isinf(p) else "sum"), p)


def segment_norms(norms: Tensor, segment: Tensor, num_segments: int, norm_type: float = 2.0) -> Tensor:
    r"""Combine element norms into the norms of segments (e.g. tensors into modules or threshold groups).

    .. math:: N_s = \Big(\sum_{i:\,\mathrm{seg}(i)=s} n_i^{\,p}\Big)^{1/p}

    Args:
        norms: ``(n,)`` non-negative norms.
        segment: ``(n,)`` long tensor, the segment of each entry, in ``[0, num_segments)``.
        num_segments: The number of segments.
        norm_type: ``p``.

    Returns:
        ``(num_segments,)`` norms (0 for an empty segment).

    Example:
        >>> segment_norms(torch.tensor([3.0, 1.0, 4.0]), torch.tensor([0, 1, 0]), 2)
        tensor([5., 1.])
    """
    p = float(norm_type)
    out = torch.zeros(num_segments, dtype=_FP32, device=norms.device)
    if math.isinf(p):
        return out.scatter_reduce_(0, segment, norms.float(), "amax", include_self=True)
    powered = norms.float().square() if p == 2.0 else norms.float().pow(p)
    return _root(out.index_add_(0, segment, powered), p)


def clip_coef(norm: Tensor, max_norm: float | Tensor, eps: float = NORM_EPS) -> Tensor:
    r"""The clipping coefficient :math:`\min\big(1,\ c / (\|g\| + 10^{-6})\big)` (torch's exact formula).

    Example:
        >>> clip_coef(torch.tensor([0.5, 4.0]), 2.0)
        tensor([1.0000, 0.5000])
    """
    return (max_norm / (norm + eps)).clamp(max=1.0)


def scale_(tensors: Sequence[Tensor], coef: Tensor, buckets: TensorBuckets | None = None) -> None:
    """Multiply tensors in place by a scalar coefficient or by one coefficient per tensor.

    Args:
        tensors: The tensors to scale.
        coef: A 0-d tensor (one factor for all) or an ``(n,)`` tensor (one factor per tensor).
        buckets: Cached :class:`TensorBuckets` of ``tensors``.

    Example:
        >>> ts = [torch.ones(2), torch.ones(1)]
        >>> scale_(ts, torch.tensor([0.5, 2.0]))
        >>> ts
        [tensor([0.5000, 0.5000]), tensor([2.])]
    """
    if len(tensors) == 0:
        return
    buckets = buckets if buckets is not None else TensorBuckets(tensors)
    per_tensor = coef.dim() > 0
    index = buckets.index(coef.device) if per_tensor and len(buckets.groups) > 1 else None
    for k, (ts, device) in enumerate(zip(buckets.split(tensors), buckets.devices)):
        if not per_tensor:
            torch._foreach_mul_(ts, coef.to(device))
            continue
        c = coef if index is None else coef.index_select(0, index[k])
        torch._foreach_mul_(ts, list(c.to(device).unbind(0)))


def clip_grad_norm_(
    grads: Sequence[Tensor],
    max_norm: float,
    norm_type: float = 2.0,
    *,
    all_reduce: AllReduce | None = None,
    buckets: TensorBuckets | None = None,
) -> Tensor:
    r"""Global norm clipping (Pascanu et al., 2013), in place.

    .. math:: g \leftarrow g \cdot \min\Big(1, \frac{c}{\|g\|_p + 10^{-6}}\Big)

    where :math:`\|g\|_p` is the norm over *all* tensors together. It matches
    ``torch.nn.utils.clip_grad_norm_(..., foreach=True)``, computes the norm in
    fp32, and supports sharded gradients through ``all_reduce``.
    Paper: https://arxiv.org/abs/1211.5063.

    Args:
        grads: The gradient tensors, modified in place.
        max_norm: The threshold ``c``.
        norm_type: ``p`` (any positive float or ``inf``).
        all_reduce: Reduction across ranks for sharded gradients (see :data:`AllReduce`).
        buckets: Cached :class:`TensorBuckets` of ``grads``.

    Returns:
        The total norm before clipping (a 0-d fp32 tensor).

    Example:
        >>> g = [torch.tensor([3.0, 0.0]), torch.tensor([4.0])]
        >>> clip_grad_norm_(g, 1.0)
        tensor(5.)
        >>> g
        [tensor([0.6000, 0.0000]), tensor([0.8000])]
    """
    norms = tensor_norms(grads, norm_type, buckets)
    total = total_norm(norms, norm_type, all_reduce)
    scale_(grads, clip_coef(total, max_norm), buckets)
    return total


def clip_grad_value_(
    grads: Sequence[Tensor], clip_value: float | Sequence[float], buckets: TensorBuckets | None = None
) -> None:
    r"""Value clipping, in place: :math:`g \leftarrow \mathrm{clamp}(g, -c, c)`.

    Args:
        grads: The gradient tensors, modified in place.
        clip_value: ``c``, one for all tensors or one per tensor.
        buckets: Cached :class:`TensorBuckets` of ``grads``.

    Example:
        >>> g = [torch.tensor([-3.0, 0.5, 2.0])]
        >>> clip_grad_value_(g, 1.0)
        >>> g
        [tensor([-1.0000,  0.5000,  1.0000])]
    """
    if len(grads) == 0:
        return
    buckets = buckets if buckets is not None else TensorBuckets(grads)
    values = [float(clip_value)] * len(grads) if isinstance(clip_value, (int, float)) else list(clip_value)
    for idx, ts, device in zip(buckets.groups, buckets.split(grads), buckets.devices):
        cs = [values[i] for i in idx]
        if device.type == "cpu":
            # On CPU one fused clamp per tensor reads and writes once; the two foreach clamps would pass twice.
            for t, c in zip(ts, cs):
                t.clamp_(-c, c)
        elif all(c == cs[0] for c in cs):
            torch._foreach_clamp_min_(ts, -cs[0])
            torch._foreach_clamp_max_(ts, cs[0])
        else:
            torch._foreach_clamp_min_(ts, [-c for c in cs])
            torch._foreach_clamp_max_(ts, cs)


def clip_grad_norm_per_tensor_(
    grads: Sequence[Tensor],
    max_norm: float | Tensor,
    norm_type: float = 2.0,
    *,
    all_reduce: AllReduce | None = None,
    buckets: TensorBuckets | None = None,
) -> Tensor:
    r"""Component-wise norm clipping (Yang & Ma, 2022), in place: each tensor is clipped by its own norm.

    .. math:: g_i \leftarrow g_i \cdot \min\Big(1, \frac{c_i}{\|g_i\|_p + 10^{-6}}\Big)\quad\text{for every tensor } i

    Paper: https://arxiv.org/abs/2210.10325. With ``all_reduce`` each tensor's
    :math:`\|g_i\|^p` is summed across the ranks holding its shards.

    Args:
        grads: The gradient tensors, modified in place.
        max_norm: ``c`` for all tensors, or an ``(n,)`` tensor with one threshold per tensor.
        norm_type: ``p``.
        all_reduce: Reduction across ranks for sharded gradients.
        buckets: Cached :class:`TensorBuckets` of ``grads``.

    Returns:
        The ``(n,)`` per-tensor norms before clipping.

    Example:
        >>> g = [torch.tensor([3.0, 4.0]), torch.tensor([0.5])]
        >>> clip_grad_norm_per_tensor_(g, 1.0)
        tensor([5.0000, 0.5000])
        >>> g
        [tensor([0.6000, 0.8000]), tensor([0.5000])]
    """
    p = float(norm_type)
    norms = tensor_norms(grads, p, buckets)
    if all_reduce is not None:
        norms = _root(all_reduce(norms if math.isinf(p) else norms.pow(p), "max" if math.isinf(p) else "sum"), p)
    if isinstance(max_norm, Tensor):
        max_norm = max_norm.to(norms.device)
    scale_(grads, clip_coef(norms, max_norm), buckets)
    return norms


def _unit_shape(t: Tensor) -> tuple[int, ...]:
    """Broadcast shape of a tensor's unit-wise coefficients: ``(out, 1, ..., 1)``, or ``()`` for ≤1-D tensors."""
    return (t.shape[0],) + (1,) * (t.dim() - 1) if t.dim() > 1 else ()


def unitwise_norms(tensors: Sequence[Tensor], norm_type: float = 2.0) -> Tensor:
    r"""Unit-wise norms, concatenated: one per output row/filter of each ≥2-D tensor, one per ≤1-D tensor.

    A unit of a ``(out, in, ...)`` weight is the slice ``W[j]`` feeding output
    ``j`` (PyTorch's layout for ``Linear`` and ``ConvNd``); biases and gains are
    one unit each, as in the NFNets reference. Each ≥2-D tensor is reduced over
    all its units in one kernel; the ≤1-D tensors share one multi-tensor kernel.

    Example:
        >>> unitwise_norms([torch.tensor([[3.0, 4.0], [0.0, 1.0]]), torch.tensor([1.0, 0.0])])
        tensor([5., 1., 1.])
    """
    if len(tensors) == 0:
        return torch.zeros(0, dtype=_FP32)
    p = float(norm_type)
    device = tensors[0].device
    pieces: list[Tensor | None] = [None] * len(tensors)
    flat = [i for i, t in enumerate(tensors) if t.dim() <= 1]
    if flat:
        norms = tensor_norms([tensors[i] for i in flat], p)
        for k, i in enumerate(flat):
            pieces[i] = norms[k : k + 1]
    for i, t in enumerate(tensors):
        if t.dim() > 1:
            dims = tuple(range(1, t.dim()))
            pieces[i] = torch.linalg.vector_norm(t, p, dim=dims, dtype=_FP32).to(device)
    return torch.cat(pieces)  # type: ignore[arg-type]


def adaptive_clip_grad_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    clip_factor: float | Tensor = 0.01,
    eps: float = 1e-3,
    norm_type: float = 2.0,
) -> Tensor:
    r"""Adaptive gradient clipping (AGC, Brock et al., 2021), unit-wise and in place.

    For every unit :math:`i` (output row or filter, see :func:`unitwise_norms`):

    .. math:: G_i \leftarrow G_i \cdot \min\Big(1,\ \lambda\,\frac{\max(\|W_i\|, \epsilon)}{\max(\|G_i\|, 10^{-6})}\Big)

    with :math:`\lambda = 0.01` and :math:`\epsilon = 10^{-3}` by default. Paper:
    https://arxiv.org/abs/2102.06171 (the final classifier layer is usually not
    clipped: leave its parameters out of ``params``). The unit norms are batched
    per tensor and the multiply is one in-place multi-tensor kernel per bucket;
    nothing gradient-sized is allocated.

    Args:
        params: The parameters ``W``.
        grads: Their gradients ``G``, modified in place.
        clip_factor: ``λ``, one for all tensors or an ``(n,)`` tensor with one per tensor.
        eps: ``ε``, the floor on the weight norm (lets zero-initialised units move).
        norm_type: ``p`` of the unit norms.

    Returns:
        The total norm of ``grads`` before clipping (0-d fp32).

    Example:
        >>> w = [torch.tensor([[3.0, 4.0], [0.0, 0.0]])]
        >>> g = [torch.tensor([[0.3, 0.4], [1.0, 0.0]])]
        >>> adaptive_clip_grad_(w, g, clip_factor=0.02)
        tensor(1.1180)
        >>> g  # row 0: 0.02·5/0.5 = 0.2; row 1: 0.02·1e-3/1 = 2e-5
        [tensor([[6.0000e-02, 8.0000e-02],
                 [2.0000e-05, 0.0000e+00]])]
    """
    p = float(norm_type)
    g_norms = unitwise_norms(grads, p)
    if g_norms.numel() == 0:
        return torch.zeros((), dtype=_FP32)
    w_norms = unitwise_norms(params, p)
    lam = clip_factor
    counts = [g.shape[0] if g.dim() > 1 else 1 for g in grads]
    if isinstance(lam, Tensor) and lam.dim() > 0:
        lam = lam.to(g_norms.device).repeat_interleave(
            torch.tensor(counts, device=g_norms.device), output_size=g_norms.numel()
        )
    coef = agc_coef(w_norms, g_norms, lam, eps)
    scale_units_(grads, coef, counts)
    return torch.linalg.vector_norm(g_norms, p)


def agc_coef(w_norms: Tensor, g_norms: Tensor, clip_factor: float | Tensor, eps: float = 1e-3) -> Tensor:
    r"""AGC's unit coefficients :math:`\min(1, \lambda \max(\|W_i\|, \epsilon) / \max(\|G_i\|, 10^{-6}))`.

    Example:
        >>> agc_coef(torch.tensor([5.0, 0.0]), torch.tensor([0.5, 1.0]), 0.02)
        tensor([2.0000e-01, 2.0000e-05])
    """
    return (w_norms.clamp(min=eps) * clip_factor / g_norms.clamp(min=NORM_EPS)).clamp(max=1.0)


def scale_units_(
    tensors: Sequence[Tensor], coef: Tensor, counts: Sequence[int], buckets: TensorBuckets | None = None
) -> None:
    """Multiply each unit of each tensor by its coefficient, in place (one multi-tensor kernel per bucket).

    Args:
        tensors: The tensors.
        coef: The concatenated unit coefficients (``sum(counts)`` entries).
        counts: The number of units of each tensor (``shape[0]`` for ≥2-D tensors, else 1).
        buckets: Cached :class:`TensorBuckets` of ``tensors``.

    Example:
        >>> t = [torch.ones(2, 2), torch.ones(3)]
        >>> scale_units_(t, torch.tensor([0.5, 1.0, 2.0]), [2, 1])
        >>> t[0], t[1]
        (tensor([[0.5000, 0.5000],
                [1.0000, 1.0000]]), tensor([2., 2., 2.]))
    """
    if len(tensors) == 0:
        return
    views = [c.view(_unit_shape(t)) for c, t in zip(torch.split(coef, list(counts)), tensors)]
    buckets = buckets if buckets is not None else TensorBuckets(tensors)
    for idx, ts, device in zip(buckets.groups, buckets.split(tensors), buckets.devices):
        torch._foreach_mul_(ts, [views[i].to(device) for i in idx])


def percentile_threshold(history: Tensor, q: float) -> Tensor:
    r"""The ``q``-th percentile of a history of gradient norms, ignoring NaN (empty) slots.

    Pascanu et al. advise choosing the threshold from the norms observed in
    training; AutoClip (https://arxiv.org/abs/2007.14469) takes a percentile of
    that history. An empty history gives ``inf`` (no clipping). No host sync.

    Example:
        >>> h = torch.tensor([1.0, 2.0, 3.0, 4.0, float("nan")])
        >>> percentile_threshold(h, 50.0)
        tensor(2.5000)
        >>> percentile_threshold(torch.full((3,), float("nan")), 10.0)
        tensor(inf)
    """
    thr = torch.nanquantile(history.float(), q / 100.0)
    return thr.nan_to_num(nan=math.inf)
