r"""Small modules that the regularization callbacks drive: :class:`DropPath` (stochastic depth).

Stochastic depth (Huang et al., *Deep Networks with Stochastic Depth*, ECCV 2016,
https://arxiv.org/abs/1603.09382) drops a whole residual branch per sample. For
a branch output ``x`` of sample ``i`` and drop probability ``p``:

.. math:: \operatorname{drop\_path}(x)_i = \frac{m_i}{1 - p}\, x_i, \qquad m_i \sim \operatorname{Bernoulli}(1 - p)

so the expectation is unchanged; at evaluation it is the identity. Use it on
the residual branch: ``x = x + self.drop_path(self.block(x))``.
:class:`~lightning_reg.callbacks.dropout.DropoutSchedule` recognises it (and
timm's ``DropPath``) by its ``drop_prob`` attribute.
"""

from __future__ import annotations

from torch import Tensor, nn

from lightning_reg.core.validation import check_bool, check_float

__all__ = ["DropPath", "drop_path"]


def drop_path(x: Tensor, drop_prob: float = 0.0, training: bool = False, scale_by_keep: bool = True) -> Tensor:
    """Zero whole samples of ``x`` with probability ``drop_prob`` (stochastic depth).

    Args:
        x: ``(B, ...)`` tensor; one Bernoulli draw per sample (first dimension).
        drop_prob: The probability of dropping a sample's branch, in ``[0, 1]``.
        training: Identity unless ``True``.
        scale_by_keep: Divide the kept samples by ``1 - drop_prob`` (keeps the expectation).

    Example:
        >>> import torch
        >>> _ = torch.manual_seed(0)
        >>> drop_path(torch.ones(4, 2), 0.5, training=True)
        tensor([[0., 0.],
                [0., 0.],
                [2., 2.],
                [0., 0.]])
        >>> drop_path(torch.ones(2, 2), 0.5, training=False)
        tensor([[1., 1.],
                [1., 1.]])
    """
    if drop_prob == 0.0 or not training:
        return x
    keep = 1.0 - drop_prob
    mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
    if keep > 0.0 and scale_by_keep:
        mask.div_(keep)
    return x * mask


class DropPath(nn.Module):
    """Stochastic depth per sample, for residual branches (see :func:`drop_path`).

    Args:
        drop_prob: The drop probability in ``[0, 1]``; a dropout schedule may change it during training.
        scale_by_keep: Divide kept samples by ``1 - drop_prob``.

    Example:
        >>> import torch
        >>> block = nn.Linear(8, 8)
        >>> dp = DropPath(0.1)
        >>> x = torch.randn(4, 8)
        >>> y = x + dp(block(x))  # residual branch dropped for ~10% of the samples in training
        >>> dp
        DropPath(drop_prob=0.1)
    """

    def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True) -> None:
        super().__init__()
        self.drop_prob = check_float("drop_prob", drop_prob, 0.0, 1.0)
        self.scale_by_keep = check_bool("scale_by_keep", scale_by_keep)

    def forward(self, x: Tensor) -> Tensor:
        return drop_path(x, self.drop_prob, self.training, self.scale_by_keep)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:g}" + ("" if self.scale_by_keep else ", scale_by_keep=False")
