"""torchmetrics-based metrics: memorization and label-noise detection; label issues in cleanlab's format."""

from lightning_reg.metrics.cleanlab_export import LabelIssues, label_issues_from_targets, save_npy, write_label_issues
from lightning_reg.metrics.noise import LabelNoiseMetrics, label_noise_scores, suspected_mislabeled, write_suspected_csv

__all__ = [
    "LabelIssues",
    "LabelNoiseMetrics",
    "label_issues_from_targets",
    "label_noise_scores",
    "save_npy",
    "suspected_mislabeled",
    "write_label_issues",
    "write_suspected_csv",
]
