from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lightning_reg.callbacks.cutmix import CutMix
from lightning_reg.core.protocol import soft_cross_entropy
from lightning_reg.functional.cutmix import cutmix_area_lambda, cutmix_box, paste_box
from lightning_reg.functional.mixup import mixup_tensors
from tests.conformance.registry import Case, register


def _naive_paste(x: torch.Tensor, perm: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    """Pixel by pixel: inside the box the partner's value, outside the sample's own."""
    y0, y1, x0, x1 = box[0].tolist()
    out = x.clone()
    for i in range(x.shape[0]):
        for h in range(x.shape[-2]):
            for w in range(x.shape[-1]):
                if y0 <= h < y1 and x0 <= w < x1:
                    out[i, ..., h, w] = x[int(perm[i]), ..., h, w]
    return out


def _math(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    # The box: CutMix's rand_bbox (cut ratio sqrt(1 - lam), centre uniform, edges clipped), kept share lam'.
    lam = 0.6
    box = cutmix_box(lam, (7, 9), generator=g)
    g_ref = torch.Generator().manual_seed(0)
    cy, cx = int(torch.randint(7, (1,), generator=g_ref)), int(torch.randint(9, (1,), generator=g_ref))
    ch, cw = int(7 * math.sqrt(1 - lam)), int(9 * math.sqrt(1 - lam))
    ref_box = [max(cy - ch // 2, 0), min(cy + ch // 2, 7), max(cx - cw // 2, 0), min(cx + cw // 2, 9)]
    assert box.tolist() == [ref_box]
    kept = float(cutmix_area_lambda(box, (7, 9))[0])
    assert kept == 1 - (ref_box[1] - ref_box[0]) * (ref_box[3] - ref_box[2]) / 63
    # The pasted input is an exact copy of one of the two images, pixel by pixel, in every dtype.
    x = torch.randn(5, 3, 7, 9, generator=g).to(dtype)
    perm = torch.tensor([3, 0, 4, 1, 2])
    big = torch.tensor([[1, 6, 2, 8]])
    pasted = paste_box(x, perm, big)
    assert pasted.dtype == dtype and torch.equal(pasted, _naive_paste(x, perm, big))
    # Classification target: lam' q_i + (1 - lam') q_perm(i); soft CE on it is the lam'-weighted sum of hard CEs.
    kept_big = float(cutmix_area_lambda(big, (7, 9))[0])
    assert kept_big == 1 - 5 * 6 / 63
    y = torch.tensor([0, 1, 2, 3, 0])
    logits = torch.randn(5, 4, generator=g).to(dtype)
    target = mixup_tensors(F.one_hot(y, 4).float(), perm, kept_big)
    ours = soft_cross_entropy(logits, target)
    expected = kept_big * F.cross_entropy(logits.float(), y) + (1 - kept_big) * F.cross_entropy(logits.float(), y[perm])
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


def _dense_math(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(1)
    b, c, h, w = 4, 3, 6, 5
    x = torch.randn(b, 2, h, w, generator=g).to(dtype)
    y = torch.randint(0, c, (b, h, w), generator=g)
    y[0, :2] = -100  # void pixels
    y[3] = -100  # an unlabeled image
    perm = torch.tensor([3, 2, 0, 1])
    box = torch.tensor([[1, 5, 0, 3]])
    assert torch.equal(paste_box(x, perm, box), _naive_paste(x, perm, box))
    pasted = paste_box(y, perm, box)
    assert torch.equal(pasted, _naive_paste(y, perm, box))
    assert bool((pasted[0, 1:5, 0:3] == -100).all())  # the unlabeled partner's box has no label
    # A soft target (one-hot, zero rows where ignored) pasted with the same box, and the base loss on it.
    hot = F.one_hot(y.clamp_min(0), c).movedim(-1, 1).float() * (y != -100).unsqueeze(1)
    hot_pasted = paste_box(hot, perm, box)
    assert torch.equal(hot_pasted, _naive_paste(hot, perm, box))
    logits = torch.randn(b, c, h, w, generator=g).to(dtype)
    ours = soft_cross_entropy(logits, hot_pasted, dim=1, valid=pasted != -100)
    ref = F.cross_entropy(logits.float(), pasted, ignore_index=-100)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    # BCP: the unlabeled image takes the teacher's labels before pasting; a naive per-pixel reference.
    teacher = torch.randint(0, c, (b, h, w), generator=g)
    unlabeled = torch.tensor([False, False, False, True])
    mixed = paste_box(torch.where(unlabeled.view(-1, 1, 1), teacher, y), perm, box)
    y0, y1, x0, x1 = box[0].tolist()
    for i in range(b):
        for r in range(h):
            for s in range(w):
                src = int(perm[i]) if (y0 <= r < y1 and x0 <= s < x1) else i
                want = teacher[src, r, s] if bool(unlabeled[src]) else y[src, r, s]
                assert int(mixed[i, r, s]) == int(want)


register(
    Case(
        name="cutmix",
        factory=lambda: CutMix(alpha=1.0),
        # Until the lead exports it as `lightning_reg.CutMix`.
        class_path="lightning_reg.callbacks.CutMix",
        full_init_args={"alpha": 0.4, "pseudo_labels": "teacher"},
        bad_args=[
            ({"alpha": 0.0}, ValueError, "Expected argument `alpha` to be a float in (0, inf), but got 0.0."),
            ({"alpha": "a"}, TypeError, "Expected argument `alpha`"),
            (
                {"pseudo_labels": "ema"},
                ValueError,
                "Expected argument `pseudo_labels` to be one of ['none', 'teacher']",
            ),
        ],
        math=_math,
        dense_math=_dense_math,
        layouts=("dense",),
        refuses={"tokens": "does not support channels_last (token) outputs"},
        # Each rank pastes within its own batch, so a DDP run cannot equal one process on the joint batch;
        # ranks still agree.
        ddp_matches_single=False,
        # Like mixup, pasting changes what per-sample techniques would record; composed deliberately.
        composable=False,
    )
)
