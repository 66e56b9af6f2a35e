"""torchmetrics-based metrics: memorization and label-noise detection."""

from lightning_reg.metrics.noise import LabelNoiseMetrics, label_noise_scores, suspected_mislabeled, write_suspected_csv

__all__ = ["LabelNoiseMetrics", "label_noise_scores", "suspected_mislabeled", "write_suspected_csv"]
