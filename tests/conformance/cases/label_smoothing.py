from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F

from lightning_reg import LabelSmoothing
from lightning_reg.core.protocol import soft_cross_entropy
from lightning_reg.core.schedules import Linear
from lightning_reg.functional import label_smoothing_targets
from tests.conformance.registry import Case, register
from tests.helpers import make_model


def _math(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 5, generator=g).to(dtype)
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    q = label_smoothing_targets(F.one_hot(y, 5).float(), 0.1)
    # Hand-computed target: 0.9 + 0.02 on the label, 0.02 elsewhere.
    assert torch.allclose(q[0], torch.tensor([0.92, 0.02, 0.02, 0.02, 0.02]))
    ours = soft_cross_entropy(logits, q)
    ref = F.cross_entropy(logits.float(), y, label_smoothing=0.1)
    # Both upcast the same low-precision logits to fp32, so they agree to fp32 rounding in every dtype.
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-6)


def _formula(logits: torch.Tensor, y: torch.Tensor, eps: float, class_dim: int) -> torch.Tensor:
    """-1/|V| sum_{valid i} sum_c [(1 - eps) 1[c = y_i] + eps / C] log softmax(z_i)_c, element by element in fp64."""
    z = logits.double().movedim(class_dim, -1).reshape(-1, logits.shape[class_dim])
    labels = y.reshape(-1)
    c = z.shape[1]
    total, count = torch.zeros((), dtype=torch.float64), 0
    for i in range(z.shape[0]):
        if int(labels[i]) == -100:
            continue
        logp = torch.log_softmax(z[i], dim=0)
        q = torch.full((c,), eps / c, dtype=torch.float64)
        q[int(labels[i])] += 1.0 - eps
        total = total - (q * logp).sum()
        count += 1
    return total / max(count, 1)


def _dense_math(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    for layout, shape, class_dim in (("dense", (3, 5, 4, 4), 1), ("tokens", (3, 6, 5), -1)):
        logits = torch.randn(*shape, generator=g).to(dtype)
        label_shape = tuple(s for d, s in enumerate(shape) if d != class_dim % len(shape))
        y = torch.randint(0, 5, label_shape, generator=g)
        y[0] = -100  # an image (sequence) without any label
        y[1, :2] = -100  # void pixels / padding
        valid = y != -100
        # The functional core: the ignored elements' rows stay zero.
        hot = F.one_hot(y.clamp_min(0), 5).float() * valid.unsqueeze(-1)
        hot = hot.movedim(-1, 1) if class_dim == 1 else hot
        q = label_smoothing_targets(hot, 0.1, dim=class_dim, valid=valid)
        assert float(q.movedim(class_dim, -1)[~valid].abs().sum()) == 0.0
        torch.testing.assert_close(q.sum(class_dim), valid.float())
        ref = _formula(logits, y, 0.1, class_dim)
        ours = soft_cross_entropy(logits, q, dim=class_dim, valid=valid)
        torch.testing.assert_close(ours.double(), ref, atol=1e-5, rtol=1e-5)
        # The callback in the pipeline: F.cross_entropy's own label smoothing with ignore_index, and no
        # gradient at all for the image without labels.
        model = make_model(layout, num_classes=5)
        model.trainer = L.Trainer(callbacks=[LabelSmoothing(0.1)], logger=False, enable_progress_bar=False)
        leaf = logits.detach().clone().requires_grad_(True)
        loss = model.regularized_loss(leaf, y, log=False)
        ce_logits = leaf.float() if class_dim == 1 else leaf.float().movedim(-1, 1)
        expected = F.cross_entropy(ce_logits, y, ignore_index=-100, label_smoothing=0.1)
        torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(loss.double(), ref, atol=1e-5, rtol=1e-5)
        loss.backward()
        assert leaf.grad is not None and torch.count_nonzero(leaf.grad[0]) == 0
        grad_rows = leaf.grad.movedim(class_dim, -1)[1, :2]
        assert torch.count_nonzero(grad_rows) == 0  # void pixels / padding get no gradient either


register(
    Case(
        name="label_smoothing",
        factory=lambda: LabelSmoothing(0.1),
        class_path="lightning_reg.LabelSmoothing",
        full_init_args={"smoothing": 0.2, "schedule": "linear"},
        bad_args=[
            ({"smoothing": 1.5}, ValueError, "Expected argument `smoothing` to be a float in [0, 1)"),
            ({"smoothing": "a"}, TypeError, "Expected argument `smoothing`"),
            ({"schedule": "nope"}, ValueError, "Expected argument `schedule` to be one of"),
        ],
        math=_math,
        layouts=("dense", "tokens"),
        dense_math=_dense_math,
    )
)

__all__ = ["Linear"]
