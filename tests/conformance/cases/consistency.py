from __future__ import annotations

import math

import torch

from lightning_reg.augment import PatchMask
from lightning_reg.callbacks.consistency import LabelCorrection, NoisyLabelConsistency
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
        ],
        math=_consistency_math,
        requires_index=False,
        # The views are random per rank, so a 2-rank run cannot equal one process; ranks must still agree.
        ddp_matches_single=False,
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
    )
)
