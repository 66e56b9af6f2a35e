"""torchmetrics-based metrics: calibration, memorization and label-noise detection."""

__all__: list[str] = []
