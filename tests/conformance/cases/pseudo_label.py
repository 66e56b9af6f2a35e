from __future__ import annotations

import math

import torch

from lightning_reg.augment import GaussianNoise, PatchMask
from lightning_reg.callbacks.pseudo_label import PseudoLabel
from lightning_reg.functional.pseudo_label import (
    align_distribution,
    confidence_quality,
    pseudo_label_loss,
    pseudo_label_targets,
)
from tests.conformance.registry import Case, register


def _tol(dtype: torch.dtype) -> float:
    return 1e-6 if dtype == torch.float32 else 1e-2


def _math(dtype: torch.dtype) -> None:
    # Hand-computed FixMatch: student p = (1/2, 1/2), (0.9, 0.1), (0.2, 0.8); teacher q with max 0.97, 0.6, 0.99.
    z = torch.log(torch.tensor([[0.5, 0.5], [0.9, 0.1], [0.2, 0.8]])).to(dtype)
    q = torch.tensor([[0.97, 0.03], [0.6, 0.4], [0.01, 0.99]])
    targets, mask = pseudo_label_targets(q, 0.95)
    assert targets.tolist() == [0, 0, 1] and mask.tolist() == [True, False, True]
    # (1/μB) Σ m CE: the masked sample counts in the denominator: (log 2 + 0 - log 0.8) / 3.
    loss = pseudo_label_loss(z, targets, mask)
    torch.testing.assert_close(loss, torch.tensor((math.log(2) - math.log(0.8)) / 3), atol=_tol(dtype), rtol=0)
    # The gradient with respect to the logits is m (softmax(z) - onehot(argmax q)) / μB.
    zz = z.clone().requires_grad_()
    pseudo_label_loss(zz, targets, mask).backward()
    assert zz.grad is not None
    p = torch.softmax(z.float(), -1)
    expected = mask[:, None].float() * (p - torch.nn.functional.one_hot(targets, 2)) / 3
    torch.testing.assert_close(zz.grad.float(), expected, atol=_tol(dtype), rtol=0)
    # Soft labels: q^(1/T) normalised; T = 0.5 squares: (0.6², 0.4²) / 0.52.
    soft, _ = pseudo_label_targets(q.to(dtype), 0.95, soft=True, temperature=0.5)
    torch.testing.assert_close(soft[1], torch.tensor([0.36, 0.16]) / 0.52, atol=_tol(dtype), rtol=0)
    # Distribution alignment: (1/2, 1/2) · (1/2, 1/2) / (3/4, 1/4) -> (1/4, 3/4).
    aligned = align_distribution(
        torch.tensor([[0.5, 0.5]]).to(dtype), torch.tensor([0.5, 0.5]), torch.tensor([0.75, 0.25])
    )
    torch.testing.assert_close(aligned, torch.tensor([[0.25, 0.75]]), atol=1e-5, rtol=0)


def _dense_math(dtype: torch.dtype) -> None:
    # One 1x2 image and one 1x2 image whose second pixel is ignored; 2 classes, classes along dim 1.
    p_student = torch.tensor([[[[0.5, 0.9]], [[0.5, 0.1]]], [[[0.2, 0.7]], [[0.8, 0.3]]]])  # (2, 2, 1, 2)
    z = torch.log(p_student).to(dtype)
    q = torch.tensor([[[[0.97, 0.6]], [[0.03, 0.4]]], [[[0.01, 0.5]], [[0.99, 0.5]]]])
    valid = torch.tensor([[[True, True]], [[True, False]]])
    targets, mask = pseudo_label_targets(q, 0.95, dim=1)
    assert targets.tolist() == [[[0, 0]], [[1, 0]]] and mask.tolist() == [[[True, False]], [[True, False]]]
    # Masked FixMatch per pixel, mean over the 3 valid pixels: (log 2 + 0 - log 0.8) / 3.
    loss = pseudo_label_loss(z, targets, mask, dim=1, valid=valid)
    torch.testing.assert_close(loss, torch.tensor((math.log(2) - math.log(0.8)) / 3), atol=_tol(dtype), rtol=0)
    # MIC's quality weight: image 0 has 1 of 2 confident pixels, image 1 has 1 of 1 valid pixel; no masking:
    # (1/2 (log 2 - log 0.9) + 1 (-log 0.8)) / 3.
    w = confidence_quality(mask, valid)
    assert w.tolist() == [0.5, 1.0]
    loss_q = pseudo_label_loss(z, targets, w.view(2, 1, 1), dim=1, valid=valid)
    ref = (0.5 * (math.log(2) - math.log(0.9)) - math.log(0.8)) / 3
    torch.testing.assert_close(loss_q, torch.tensor(ref), atol=_tol(dtype), rtol=0)


register(
    Case(
        name="pseudo_label",
        # The tiny datasets are (almost) fully labeled: pseudo-label every sample with a low threshold so the term,
        # the weak view's no-grad forward, the strong view's forward and distribution alignment's state all run.
        factory=lambda: PseudoLabel(
            threshold=0.3,
            on="all",
            weak_augmentation=GaussianNoise(std=0.05),
            strong_augmentation=PatchMask(patch_size=2, mask_ratio=0.5),
            distribution_alignment=True,
            da_length=4,
        ),
        class_path="lightning_reg.callbacks.pseudo_label.PseudoLabel",
        full_init_args={
            "threshold": 0.9,
            "weight": 2.0,
            "teacher": "self",
            "weak_augmentation": {"class_path": "lightning_reg.augment.WeakAugment", "init_args": {"translate": 0.2}},
            "strong_augmentation": {
                "class_path": "lightning_reg.augment.RandAugment",
                "init_args": {"num_ops": 3, "cutout": 0.3},
            },
            "on": "all",
            "soft": True,
            "temperature": 0.5,
            "distribution_alignment": True,
            "da_target": [0.25, 0.25, 0.25, 0.25],
            "da_length": 32,
            "quality_weight": True,
            "true_labels_path": "true_labels.pt",
        },
        bad_args=[
            ({"threshold": 1.5}, ValueError, "Expected argument `threshold` to be a float in [0, 1]"),
            ({"weight": -1.0}, ValueError, "Expected argument `weight` to be a float in [0, inf)"),
            ({"teacher": "swa"}, ValueError, "Expected argument `teacher` to be one of"),
            ({"weak_augmentation": "nope"}, ValueError, "Expected argument `weak_augmentation` to be one of"),
            ({"strong_augmentation": 3}, TypeError, "Expected argument `strong_augmentation` to be a str or an"),
            ({"strong_augmentation": "multiscale"}, ValueError, "to be a single-view augmentation"),
            ({"on": "labeled"}, ValueError, "Expected argument `on` to be one of"),
            ({"soft": 1}, TypeError, "Expected argument `soft` to be a bool"),
            ({"temperature": 0.0}, ValueError, "Expected argument `temperature` to be a float in (0, inf)"),
            ({"distribution_alignment": "yes"}, TypeError, "Expected argument `distribution_alignment` to be a bool"),
            ({"da_target": "model"}, ValueError, "Expected argument `da_target` to be one of"),
            ({"da_length": 0}, ValueError, "Expected argument `da_length` to be an int in [1, inf)"),
            ({"quality_weight": None}, TypeError, "Expected argument `quality_weight` to be a bool"),
            ({"true_labels_path": 3}, TypeError, "Expected argument `true_labels_path` to be a str or None"),
        ],
        math=_math,
        requires_index=False,
        # The views are random per rank, so a 2-rank run cannot equal one process; ranks must still agree
        # (distribution alignment's window is all-reduced every step).
        ddp_matches_single=False,
        layouts=("dense", "tokens"),
        dense_math=_dense_math,
    )
)
