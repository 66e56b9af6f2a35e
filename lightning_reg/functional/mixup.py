"""Mixup (Zhang et al., ICLR 2018): convex combinations of pairs of inputs and of their targets.

Paper: *mixup: Beyond Empirical Risk Minimization*, https://arxiv.org/abs/1710.09412.
ELR+ (https://arxiv.org/abs/2007.00151, Appendix) uses it with ``α = 1`` and
``λ = max(λ, 1 - λ)``, so each mixed sample stays dominated by its own input.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["mixup_lambda", "mixup_permutation", "mixup_tensors"]


def mixup_lambda(alpha: float, max_lam: bool = False, generator: torch.Generator | None = None) -> float:
    r"""Draw the mixing weight :math:`\lambda \sim \mathrm{Beta}(\alpha, \alpha)` (on the CPU, as a Python float).

    .. math:: \lambda \sim \mathrm{Beta}(\alpha, \alpha), \qquad
        \lambda \leftarrow \max(\lambda, 1 - \lambda) \ \text{(optional, ELR+)}

    It is drawn from two Gamma variates of torch's CPU generator, so it is
    reproducible under ``torch.manual_seed`` and costs no device sync.

    Args:
        alpha: The Beta concentration ``α > 0``.
        max_lam: Return ``max(λ, 1 - λ)``.
        generator: An optional CPU generator (default: torch's global one).

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> lam = mixup_lambda(1.0, max_lam=True, generator=g)
        >>> 0.5 <= lam <= 1.0
        True
    """
    a = torch.full((2,), float(alpha), dtype=torch.float64)
    g = torch._standard_gamma(a, generator=generator) if generator is not None else torch._standard_gamma(a)
    lam = float(g[0] / (g[0] + g[1]))
    return max(lam, 1.0 - lam) if max_lam else lam


def mixup_permutation(
    batch_size: int, device: torch.device | str | None = None, *, labeled: int | Tensor | None = None
) -> Tensor:
    """The partner of each sample: a random permutation of the batch (torch's global RNG).

    With ``labeled``, only the labeled rows are permuted (among themselves) and every unlabeled row
    is its own partner, so a mixed labeled sample never takes a share of a sample without a label:

    * an ``int`` ``n``: the first ``n`` rows are labeled (a semi-supervised batch; no device work);
    * a ``(B,)`` boolean mask: labeled rows anywhere in the batch (one random key per row and two
      stable sorts on the device, no host sync).

    Example:
        >>> _ = torch.manual_seed(0)
        >>> sorted(mixup_permutation(4).tolist())
        [0, 1, 2, 3]
        >>> mixup_permutation(5, labeled=2)[2:].tolist()
        [2, 3, 4]
        >>> p = mixup_permutation(5, labeled=torch.tensor([True, False, True, True, False]))
        >>> p[[1, 4]].tolist(), sorted(p[[0, 2, 3]].tolist())
        ([1, 4], [0, 2, 3])
    """
    if labeled is None:
        return torch.randperm(batch_size, device=device)
    if isinstance(labeled, int):
        n = min(max(labeled, 0), batch_size)
        return torch.cat([torch.randperm(n, device=device), torch.arange(n, batch_size, device=device)])
    mask = labeled.to(device=device, dtype=torch.bool)
    # Labeled rows get random keys in [0, 1), unlabeled rows the key 2: sorting puts the labeled rows first in a
    # random order and the unlabeled ones after, in their order; the stable sort of the mask lists the same slots.
    keys = torch.where(mask, torch.rand(batch_size, device=mask.device), torch.full((), 2.0, device=mask.device))
    shuffled = torch.sort(keys, stable=True).indices
    slots = torch.sort((~mask).to(torch.uint8), stable=True).indices
    return torch.empty_like(shuffled).scatter_(0, slots, shuffled)


def mixup_tensors(x: Tensor, perm: Tensor, lam: float | Tensor) -> Tensor:
    r"""Mix a batch with its permutation: inputs or targets alike.

    .. math:: \tilde x_i = \lambda\, x_i + (1 - \lambda)\, x_{\pi(i)}

    Args:
        x: ``(B, ...)`` inputs, or ``(B, C)`` soft targets (one-hot labels for plain mixup).
        perm: ``(B,)`` the permutation :math:`\pi`.
        lam: :math:`\lambda`.

    Returns:
        The mixed tensor, same shape and dtype as ``x``.

    Example:
        >>> y = torch.eye(3)
        >>> mixup_tensors(y, torch.tensor([1, 2, 0]), 0.7)
        tensor([[0.7000, 0.3000, 0.0000],
                [0.0000, 0.7000, 0.3000],
                [0.3000, 0.0000, 0.7000]])
    """
    partner = x.index_select(0, perm.to(x.device))
    return lam * x + (1.0 - lam) * partner
