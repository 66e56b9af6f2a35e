from __future__ import annotations

import itertools
import math
from types import SimpleNamespace

import torch

from lightning_reg import EMATeacher
from lightning_reg.augment import PatchMask, RandomFlip
from lightning_reg.callbacks.consistency import LabelCorrection, NoisyLabelConsistency
from lightning_reg.core.protocol import StepContext
from lightning_reg.functional.consistency import (
    adele_multiscale_consistency,
    class_agreement_counts,
    class_iou,
    confidence_mask,
    consistency_loss,
    early_learning_curve,
    early_learning_end_epoch,
    sharpen,
)
from lightning_reg.functional.pseudo_label import confidence_quality
from tests.conformance.registry import Case, register


def _consistency_math(dtype: torch.dtype) -> None:
    # Hand-computed: p = softmax(z) = (1/2, 1/2) and (0.9, 0.1); q = (1, 0) and (0.9, 0.1); mask (1, 0).
    z = torch.log(torch.tensor([[0.5, 0.5], [0.9, 0.1]])).to(dtype)
    q = torch.tensor([[1.0, 0.0], [0.9, 0.1]])
    m = confidence_mask(q, 0.95)
    assert m.tolist() == [1.0, 0.0]
    kl = consistency_loss(z, q, m, "kl")
    # KL((1,0) || (1/2,1/2)) = log 2; the masked sample counts in the mean: (log 2 + 0) / 2.
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(kl, torch.tensor(math.log(2) / 2), atol=tol, rtol=0)
    # Softmax MSE: mean_c (q - p)^2 = ((1/2)^2 + (1/2)^2) / 2 = 1/4, halved by the mean over two samples.
    torch.testing.assert_close(consistency_loss(z, q, m, "mse"), torch.tensor(0.125), atol=tol, rtol=0)
    # Sharpening with tau equals softmax(z / tau), computed in fp32 from the dtype's probabilities.
    p = torch.softmax(z.float(), -1)
    torch.testing.assert_close(sharpen(p, 0.4), torch.softmax(z.float() / 0.4, -1), atol=1e-5, rtol=0)
    # The gradient w.r.t. the logits is m_i (p_i - q_i) / B for KL.
    zz = z.clone().requires_grad_()
    consistency_loss(zz, q, m, "kl").backward()
    assert zz.grad is not None
    expected = m.unsqueeze(1) * (p - q) / 2
    torch.testing.assert_close(zz.grad.float(), expected.to(dtype).float(), atol=tol, rtol=0)
    # ADELE's form: views (0.9, 0.1) and (0.7, 0.3) average to p̄ = (0.8, 0.2), kept at threshold 0.75;
    # views (0.6, 0.4) and (0.4, 0.6) average to (0.5, 0.5), masked. Σ_s KL(p_s || p̄), mean over both samples.
    z1 = torch.log(torch.tensor([[0.9, 0.1], [0.6, 0.4]])).to(dtype)
    z2 = torch.log(torch.tensor([[0.7, 0.3], [0.4, 0.6]])).to(dtype)
    p1, p2 = torch.softmax(z1.float(), -1)[0], torch.softmax(z2.float(), -1)[0]
    mean = (p1 + p2) / 2
    kl = (p1 * (p1 / mean).log()).sum() + (p2 * (p2 / mean).log()).sum()
    got = adele_multiscale_consistency([z1, z2], threshold=0.75)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, kl / 2, atol=1e-6, rtol=0)


def _label_correction_math(dtype: torch.dtype) -> None:
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 5.0]]).to(dtype)
    labels = torch.tensor([0, 1, 0, 1])
    counts = class_agreement_counts(logits.float().argmax(-1), labels, 3)
    # class 0: TP 1, predicted 1, given 2 -> IoU 1/2; class 1: TP 1, predicted 2, given 2 -> 1/3; class 2: 0/1 -> 0.
    assert counts.tolist() == [[1, 1, 0], [1, 2, 1], [2, 2, 0]]
    torch.testing.assert_close(class_iou(counts), torch.tensor([0.5, 1 / 3, 0.0]))
    # ADELE's rule on f = 1 - exp(-x): slope ratio exp(-(e - 1)) falls below 1 - 0.9 first at e = 4.
    one = torch.ones((), dtype=torch.float64)
    assert int(early_learning_end_epoch(one, one, one, r=0.9)) == 4
    x = torch.arange(1, 4, dtype=torch.float64)
    torch.testing.assert_close(early_learning_curve(x, one, one, one), 1 - torch.exp(-x))


def naive_dense_term(
    z: torch.Tensor, q: torch.Tensor, weight: torch.Tensor, counted: torch.Tensor, divergence: str
) -> float:
    """(1/|E|) Σ_{e ∈ E} w_e D(q_e || softmax(z_e)) on (B, C, H, W), written from the formula in float64 Python."""
    b, c, h, w = z.shape
    total, n = 0.0, 0
    for i in range(b):
        for r in range(h):
            for s in range(w):
                if not bool(counted[i, r, s]):
                    continue
                zz = [float(z[i, k, r, s]) for k in range(c)]
                e = [math.exp(v - max(zz)) for v in zz]
                p = [v / sum(e) for v in e]
                qq = [float(q[i, k, r, s]) for k in range(c)]
                if divergence == "kl":
                    d = sum(a * (math.log(a) - math.log(pb)) for a, pb in zip(qq, p) if a > 0)
                else:
                    d = sum((a - pb) ** 2 for a, pb in zip(qq, p)) / c
                total += float(weight[i, r, s]) * d
                n += 1
    return total / max(n, 1)


def _dense_labels(g: torch.Generator) -> torch.Tensor:
    """(3, 3, 4) labels of 4 classes: void pixels, and image 2 without any label (an unlabeled image)."""
    labels = torch.randint(0, 4, (3, 3, 4), generator=g)
    labels[torch.rand(3, 3, 4, generator=g) < 0.25] = -100
    labels[2] = -100
    return labels


def _consistency_dense_math(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    z = (2 * torch.randn(3, 4, 3, 4, generator=g)).to(dtype).requires_grad_()
    q = torch.softmax(2 * torch.randn(3, 4, 3, 4, generator=g), 1)
    labels = _dense_labels(g)
    # The elements that count: labelled pixels, and every pixel of the unlabeled image (ignore_void=True).
    counted = (labels != -100) | (labels == -100).flatten(1).all(1).view(-1, 1, 1)
    confident = q.amax(1) >= 0.5
    assert 0 < int(confident.sum()) < confident.numel()
    tol = dict(atol=1e-5, rtol=1e-5)
    for divergence in ("kl", "mse"):
        mask = confidence_mask(q, 0.5, dim=1)
        got = consistency_loss(z, q, mask, divergence, dim=1, valid=counted)  # type: ignore[arg-type]
        ref = naive_dense_term(z.detach(), q, confident.float(), counted, divergence)
        torch.testing.assert_close(got, torch.tensor(ref, dtype=torch.float32), **tol)  # type: ignore[arg-type]
    # MIC's quality weight: every pixel of image b weighs its share of confident counted pixels.
    share = confidence_quality(confident, counted)
    for b in range(3):
        kept = [bool(confident[b].flatten()[j]) for j in range(12) if bool(counted[b].flatten()[j])]
        assert abs(float(share[b]) - sum(kept) / len(kept)) < 1e-6
    weight = share.view(-1, 1, 1).expand(3, 3, 4)
    got = consistency_loss(z, q, weight, "kl", dim=1, valid=counted)
    torch.testing.assert_close(got, torch.tensor(naive_dense_term(z.detach(), q, weight, counted, "kl")), **tol)  # type: ignore[arg-type]
    # Void pixels of labelled images get no gradient; the (B, T, C) token layout gives the same term.
    (grad,) = torch.autograd.grad(got, z)
    assert torch.count_nonzero(grad.movedim(1, -1)[~counted]) == 0
    tokens = consistency_loss(
        z.detach().movedim(1, -1).reshape(3, 12, 4), q.movedim(1, -1).reshape(3, 12, 4), weight.reshape(3, 12),
        valid=counted.reshape(3, 12),
    )  # fmt: skip
    torch.testing.assert_close(tokens, got.detach())


def _adele_dense_math(dtype: torch.dtype) -> None:
    # ADELE's term on pixels with a flipped view undone on the output: per-image mask from the largest clipped
    # mean probability over labelled pixels, KL(p_s || p̄) summed over the views, mean over the counted pixels.
    g = torch.Generator().manual_seed(1)
    clean = (2 * torch.randn(3, 4, 3, 4, generator=g)).to(dtype)
    on_view = (2 * torch.randn(3, 4, 3, 4, generator=g)).to(dtype)
    flip = RandomFlip(p=0.5)
    torch.manual_seed(0)  # flips images 0 and 2
    (_,), (params,) = flip.views_and_params(torch.zeros(3, 1, 3, 4))
    flipped = params[0][0]
    assert bool(flipped.any()) and not bool(flipped.all())
    back = flip.invert_output(on_view, params, (3, 4))
    labels = _dense_labels(g)
    labelled = (labels != -100) | (labels == -100).flatten(1).all(1).view(-1, 1, 1)
    got = adele_multiscale_consistency([clean, back], threshold=0.4, valid=labelled, counted=labelled)
    views = [clean.double(), on_view.double()]
    total, n = 0.0, 0
    for b in range(3):
        prob = [torch.softmax(v[b], 0) for v in views]
        if bool(flipped[b]):
            prob[1] = prob[1].flip(-1)  # the view's prediction, flipped back
        mixture = ((prob[0] + prob[1]) / 2).clamp(1e-3, 1 - 1e-3)
        conf = max(float(mixture[k, r, s]) for k in range(4) for r in range(3) for s in range(4) if labelled[b, r, s])
        for r in range(3):
            for s in range(4):
                if not bool(labelled[b, r, s]):
                    continue
                n += 1
                if conf >= 0.4:
                    for p in prob:
                        total += sum(
                            float(p[k, r, s]) * math.log(float(p[k, r, s] / mixture[k, r, s])) for k in range(4)
                        )
    torch.testing.assert_close(got, torch.tensor(total / n, dtype=torch.float32), atol=1e-5, rtol=1e-5)


register(
    Case(
        name="consistency_adele_flip",
        # ADELE's form with a flipped view (its official inference also averages flips): undone on dense outputs.
        factory=lambda: NoisyLabelConsistency(form="adele", augmentation=RandomFlip(p=0.5), threshold=0.3),
        class_path="lightning_reg.callbacks.consistency.NoisyLabelConsistency",
        full_init_args={
            "form": "adele",
            "augmentation": {"class_path": "lightning_reg.augment.MultiScale", "init_args": {"scales": [0.7, 1.0]}},
            "threshold": 0.8,
            "weight": 1.0,
            "rampup": "constant",
            "rampup_epochs": 0,
            "on": "unlabeled",
            "ignore_void": False,
        },
        bad_args=[({"form": "adele", "quality_weight": True}, ValueError, "does not use `quality_weight`")],
        math=_consistency_math,
        requires_index=False,
        ddp_matches_single=False,
        composable=False,  # one NoisyLabelConsistency per trainer; the composition test has the default case
        layouts=("dense",),
        dense_math=_adele_dense_math,
        refuses={"tokens": "got (B, T, C) token logits, but its `augmentation` RandomFlip"},
    )
)

register(
    Case(
        name="consistency_mic",
        # MIC on pixels/tokens: the EMA teacher's prediction on the clean input, a masked view, the quality weight.
        factory=lambda: NoisyLabelConsistency(
            teacher="ema",
            augmentation=PatchMask(patch_size=2, mask_ratio=0.5),
            temperature=1.0,
            threshold=0.4,
            quality_weight=True,
            rampup="constant",
        ),
        class_path="lightning_reg.callbacks.consistency.NoisyLabelConsistency",
        full_init_args={
            "teacher": "ema",
            "augmentation": {"class_path": "lightning_reg.augment.PatchMask", "init_args": {"patch_size": 2}},
            "temperature": 1.0,
            "threshold": 0.968,
            "quality_weight": True,
            "rampup": "constant",
            "on": "all",
        },
        bad_args=[({"quality_weight": "yes"}, TypeError, "Expected argument `quality_weight` to be a bool")],
        math=_consistency_math,
        requires_index=False,
        extra_callbacks=lambda: [EMATeacher(decay=0.9)],
        ddp_matches_single=False,
        composable=False,
        layouts=("dense", "tokens"),
        dense_math=_consistency_dense_math,
    )
)


def _label_correction_dense_math(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(2)
    logits = (4 * torch.randn(3, 4, 3, 4, generator=g)).to(dtype)
    labels = _dense_labels(g)
    probs = torch.softmax(logits.float(), 1)
    conf, pred = probs.max(1)
    valid = labels != -100
    counts = class_agreement_counts(pred, labels, 4, valid=valid)
    # Naive per-pixel counting over labelled pixels only.
    tp, npred, ngiven = [0] * 4, [0] * 4, [0] * 4
    for i, r, s in itertools.product(range(3), range(3), range(4)):
        y = int(labels[i, r, s])
        if y == -100:
            continue
        p = int(pred[i, r, s])
        npred[p] += 1
        ngiven[y] += 1
        tp[y] += int(p == y)
    assert counts.tolist() == [tp, npred, ngiven]
    iou = [t / (a + b - t) if a + b - t > 0 else 0.0 for t, a, b in zip(tp, npred, ngiven)]
    torch.testing.assert_close(class_iou(counts), torch.tensor(iou, dtype=torch.float32))
    # The relabelling rule (ADELE's): a labelled pixel whose confident (> 0.8) prediction of a marked class
    # differs from its label takes the prediction; the step recomputes it from the current prediction.
    lc = LabelCorrection(threshold=0.8, start_epoch=0)
    trainer = SimpleNamespace(current_epoch=0, strategy=SimpleNamespace(world_size=1), global_rank=0)
    ctx = StepContext(
        module=SimpleNamespace(trainer=trainer),  # type: ignore[arg-type]
        x=None,
        labels=labels.clone(),
        given_labels=labels,
        logits=logits,
    )
    lc.refine_labels(ctx)
    expected = labels.clone()
    for i, r, s in itertools.product(range(3), range(3), range(4)):
        y, p = int(labels[i, r, s]), int(pred[i, r, s])
        if y != -100 and p != y and float(conf[i, r, s]) > 0.8:
            expected[i, r, s] = p
    assert not torch.equal(expected, labels), "the example should relabel some pixels"
    assert torch.equal(ctx.labels, expected)


register(
    Case(
        name="consistency",
        factory=lambda: NoisyLabelConsistency(
            augmentation=PatchMask(patch_size=2, mask_ratio=0.5), threshold=0.3, rampup_epochs=1.0
        ),
        class_path="lightning_reg.callbacks.consistency.NoisyLabelConsistency",
        full_init_args={
            "form": "target",
            "teacher": "self",
            "augmentation": {
                "class_path": "lightning_reg.augment.Compose",
                "init_args": {
                    "augmentations": [
                        {"class_path": "lightning_reg.augment.RandomFlip", "init_args": {"p": 0.5, "dims": [-1]}},
                        {"class_path": "lightning_reg.augment.PatchMask", "init_args": {"patch_size": 2}},
                    ]
                },
            },
            "weak_augmentation": {"class_path": "lightning_reg.augment.GaussianNoise", "init_args": {"std": 0.05}},
            "temperature": 0.5,
            "threshold": 0.7,
            "divergence": "mse",
            "weight": 2.0,
            "rampup": "linear",
            "rampup_epochs": 3,
            "on": "all",
            "quality_weight": False,
            "ignore_void": True,
        },
        bad_args=[
            ({"form": "jsd"}, ValueError, "Expected argument `form` to be one of"),
            ({"form": "adele", "teacher": "ema"}, ValueError, "`NoisyLabelConsistency(form='adele')` does not use"),
            ({"form": "adele", "temperature": 0.4}, ValueError, "does not use `temperature`"),
            ({"teacher": "swa"}, ValueError, "Expected argument `teacher` to be one of"),
            ({"augmentation": "rotate"}, ValueError, "Expected argument `augmentation` to be one of"),
            ({"augmentation": 3}, TypeError, "Expected argument `augmentation` to be a str or an `Augmentation`"),
            ({"weak_augmentation": "nope"}, ValueError, "Expected argument `weak_augmentation` to be one of"),
            ({"temperature": 0.0}, ValueError, "Expected argument `temperature` to be a float in (0, inf)"),
            ({"threshold": 1.5}, ValueError, "Expected argument `threshold` to be a float in [0, 1]"),
            ({"divergence": "js"}, ValueError, "Expected argument `divergence` to be one of"),
            ({"weight": -1.0}, ValueError, "Expected argument `weight` to be a float in [0, inf)"),
            ({"rampup": "nope"}, ValueError, "Expected argument `rampup` to be one of"),
            ({"rampup_epochs": "a"}, TypeError, "Expected argument `rampup_epochs`"),
            ({"on": "labeled"}, ValueError, "Expected argument `on` to be one of ['all', 'unlabeled']"),
            ({"quality_weight": 1}, TypeError, "Expected argument `quality_weight` to be a bool"),
            ({"ignore_void": "no"}, TypeError, "Expected argument `ignore_void` to be a bool"),
        ],
        math=_consistency_math,
        requires_index=False,
        # The views are random per rank, so a 2-rank run cannot equal one process; ranks must still agree.
        ddp_matches_single=False,
        # Patch masking keeps every pixel and token in place, so the term compares them element by element.
        layouts=("dense", "tokens"),
        dense_math=_consistency_dense_math,
    )
)

register(
    Case(
        name="label_correction",
        # start_epoch=1 makes the tiny 2-3 epoch runs write corrections (the detector needs >= 3 epochs).
        factory=lambda: LabelCorrection(threshold=0.4, start_epoch=1),
        class_path="lightning_reg.callbacks.consistency.LabelCorrection",
        full_init_args={
            "threshold": 0.7,
            "relative_change": 0.8,
            "min_epochs": 4,
            "horizon": 50,
            "start_epoch": 2,
            "source": "student",
            "num_samples": 64,
            "table_device": "cpu",
            "true_labels_path": "true_labels.pt",
        },
        bad_args=[
            ({"threshold": 1.0}, ValueError, "Expected argument `threshold` to be a float in [0, 1)"),
            ({"relative_change": 1.0}, ValueError, "Expected argument `relative_change` to be a float in (0, 1)"),
            ({"min_epochs": 1}, ValueError, "Expected argument `min_epochs` to be an int in [2, inf)"),
            ({"horizon": 1}, ValueError, "Expected argument `horizon` to be an int in [2, inf)"),
            ({"start_epoch": -1}, ValueError, "Expected argument `start_epoch` to be an int in [0, inf)"),
            ({"source": "ema"}, ValueError, "Expected argument `source` to be one of"),
            ({"num_samples": 0}, ValueError, "Expected argument `num_samples` to be an int"),
            ({"table_device": "gpu"}, ValueError, "Expected argument `table_device` to be one of"),
            ({"true_labels_path": 3}, TypeError, "Expected argument `true_labels_path` to be a str or None"),
        ],
        math=_label_correction_math,
        requires_index=True,
        ddp_matches_single=True,
        # Pixels and tokens: per-class IoU curves over labelled elements, relabelled from the current prediction.
        layouts=("dense", "tokens"),
        dense_math=_label_correction_dense_math,
    )
)
