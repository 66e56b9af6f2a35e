"""Label-noise diagnostics scored against a known synthetic noise mask (hand-computed values)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lightning_reg.data import inject_label_noise
from lightning_reg.metrics.noise import (
    LabelNoiseMetrics,
    label_noise_scores,
    suspected_mislabeled,
    write_suspected_csv,
)

C = 4


def _setup() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """20 samples, 30 % symmetric noise (6 noisy), and soft targets that flag a designed set.

    Flagged = 4 of the 6 noisy samples (true positives) + 1 clean sample (false positive);
    2 noisy samples are missed (false negatives).
    """
    true = torch.arange(20) % C
    noisy = inject_label_noise(true, C, "symmetric", rate=0.3, seed=0)
    mask, given = noisy.noise_mask, noisy.labels
    noisy_idx = torch.nonzero(mask).flatten()
    clean_idx = torch.nonzero(~mask).flatten()
    assert noisy_idx.numel() == 6
    # A target that agrees with the given label everywhere ...
    target_class = given.clone()
    # ... except on 4 noisy samples (it recovers the true label) and on 1 clean sample (a false alarm).
    target_class[noisy_idx[:4]] = true[noisy_idx[:4]]
    target_class[clean_idx[0]] = (given[clean_idx[0]] + 1) % C
    soft = 0.6 * F.one_hot(target_class, C).float() + 0.1  # rows sum to 1, argmax = target_class
    # Model predictions: memorize 3 of the 6 noisy samples (predict the wrong given label).
    preds = true.clone()
    preds[noisy_idx[:3]] = given[noisy_idx[:3]]
    return soft, given, mask, preds, noisy_idx


def test_scores_match_hand_computed_values() -> None:
    soft, given, mask, preds, _ = _setup()
    s = label_noise_scores(soft, given, mask, preds)
    # TP = 4, FP = 1, FN = 2  ->  precision 4/5, recall 4/6, F1 = 2PR / (P + R) = 8/11.
    assert s["precision"].item() == pytest.approx(0.8)
    assert s["recall"].item() == pytest.approx(4 / 6)
    assert s["f1"].item() == pytest.approx(8 / 11)
    assert s["disagreement"].item() == pytest.approx(5 / 20)
    assert s["noise_rate"].item() == pytest.approx(6 / 20)
    assert s["memorization"].item() == pytest.approx(3 / 6)
    # Scores (N, C) predictions like class ids.
    s2 = label_noise_scores(soft, given, mask, F.one_hot(preds, C).float())
    assert s2["memorization"].item() == pytest.approx(0.5)


def test_keys_without_mask_and_empty_denominators() -> None:
    soft, given, _, _, _ = _setup()
    assert set(label_noise_scores(soft, given)) == {"disagreement"}
    # Nothing flagged and nothing noisy: precision/recall/F1 are 0, not NaN.
    s = label_noise_scores(F.one_hot(given, C).float(), given, torch.zeros(20, dtype=torch.bool))
    assert s["precision"].item() == 0.0 and s["recall"].item() == 0.0 and s["f1"].item() == 0.0


def test_metric_accumulates_batches_like_the_function() -> None:
    soft, given, mask, preds, _ = _setup()
    metric = LabelNoiseMetrics()
    for chunk in torch.arange(20).split(7):
        metric.update(soft[chunk], given[chunk], mask[chunk], preds[chunk])
    got = metric.compute()
    ref = label_noise_scores(soft, given, mask, preds)
    assert set(got) == set(ref)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k])
    metric.reset()
    metric.update(soft, given)
    assert set(metric.compute()) == {"disagreement"}


def test_shape_errors_are_clear() -> None:
    soft, given, mask, _, _ = _setup()
    with pytest.raises(ValueError, match="Expected `noise_mask` with 20 rows"):
        label_noise_scores(soft, given, mask[:5])
    with pytest.raises(ValueError, match=r"shape \(N, C\)"):
        label_noise_scores(soft[0], given)


def test_suspects_and_csv(tmp_path: Path) -> None:
    soft, given, _, _, _ = _setup()
    conf = torch.linspace(0.5, 0.9, 20)
    scaled = soft * 0.5  # an un-normalised target (ELR's early rows sum below one) ...
    scaled[torch.arange(20), soft.argmax(1)] += conf  # ... with per-sample confidence
    suspects = suspected_mislabeled(scaled, given)
    flagged = torch.nonzero(soft.argmax(1) != given).flatten()
    assert sorted(suspects.index.tolist()) == flagged.tolist()
    assert suspects.confidence.tolist() == sorted(suspects.confidence.tolist(), reverse=True)
    row0 = int(suspects.index[0])
    expected_conf = float(scaled[row0].max() / scaled[row0].sum())
    assert float(suspects.confidence[0]) == pytest.approx(expected_conf)
    assert torch.equal(suspects.suggested_label, scaled[suspects.index].argmax(1))
    # min_confidence and the seen mask filter rows.
    assert len(suspected_mislabeled(scaled, given, min_confidence=0.99).index) == 0
    seen = torch.ones(20, dtype=torch.bool)
    seen[row0] = False
    assert row0 not in suspected_mislabeled(scaled, given, seen=seen).index.tolist()
    path = tmp_path / "suspects.csv"
    n = write_suspected_csv(path, suspects, class_names=["a", "b", "c", "d"])
    rows = list(csv.DictReader(path.open()))
    assert n == len(rows) == 5
    assert list(rows[0]) == ["index", "given_label", "suggested_label", "confidence", "given_name", "suggested_name"]
    assert int(rows[0]["index"]) == row0 and rows[0]["suggested_name"] == "abcd"[int(rows[0]["suggested_label"])]
    with pytest.raises(ValueError, match="Expected argument `min_confidence`"):
        suspected_mislabeled(scaled, given, min_confidence=2.0)


def test_csv_names_labels_without_a_name(tmp_path: Path) -> None:
    # A model with more outputs than the datamodule has class names: the extra labels are written as numbers.
    soft = torch.tensor([[0.1, 0.0, 0.9], [0.8, 0.1, 0.1]])
    suspects = suspected_mislabeled(soft, torch.tensor([0, 1]))
    path = tmp_path / "s.csv"
    assert write_suspected_csv(path, suspects, class_names=["a", "b"]) == 2
    rows = {r["index"]: r for r in csv.DictReader(path.open())}
    assert (rows["0"]["given_name"], rows["0"]["suggested_name"]) == ("a", "2")
    assert (rows["1"]["given_name"], rows["1"]["suggested_name"]) == ("b", "a")


def test_dense_scores_count_elements_and_skip_ignored_ones() -> None:
    """Per-pixel detection and memorization equal the classification scores on the flattened valid pixels."""
    g = torch.Generator().manual_seed(3)
    scores = torch.rand(3, 4, 5, 6, generator=g)  # (N, C, H, W)
    given = torch.randint(0, 4, (3, 5, 6), generator=g)
    given[0, :2] = -100  # void pixels
    given[2] = -100  # an unlabeled image
    noisy = torch.rand(3, 5, 6, generator=g) < 0.3
    pred = torch.randint(0, 4, (3, 5, 6), generator=g)
    dense = label_noise_scores(scores, given, noisy, pred)
    keep = given.reshape(-1) != -100
    flat = label_noise_scores(
        scores.movedim(1, -1).reshape(-1, 4)[keep],
        given.reshape(-1)[keep],
        noisy.reshape(-1)[keep],
        pred.reshape(-1)[keep],
    )
    assert dense.keys() == flat.keys()
    for k in dense:
        torch.testing.assert_close(dense[k], flat[k])


def test_dense_metric_per_class_iou_matches_torchmetrics() -> None:
    from torchmetrics.classification import MulticlassJaccardIndex

    g = torch.Generator().manual_seed(4)
    scores = torch.rand(4, 3, 6, 6, generator=g)
    given = torch.randint(0, 3, (4, 6, 6), generator=g)
    given[1, 3:] = -100
    metric = LabelNoiseMetrics(num_classes=3)
    metric.update(scores[:2], given[:2], predictions=scores[:2])
    metric.update(scores[2:], given[2:], predictions=scores[2:])
    out = metric.compute()
    ref = MulticlassJaccardIndex(num_classes=3, average=None, ignore_index=-100)(scores.argmax(1), given)
    torch.testing.assert_close(out["iou_given"], ref)
    torch.testing.assert_close(out["miou_given"], ref.mean())


def test_metric_argument_errors() -> None:
    with pytest.raises(ValueError, match=r"Expected argument `num_classes` to be an int in \[1, inf\) or None"):
        LabelNoiseMetrics(num_classes=0)
    with pytest.raises(TypeError, match="Expected argument `ignore_index` to be an int"):
        LabelNoiseMetrics(ignore_index=1.5)  # type: ignore[arg-type]
