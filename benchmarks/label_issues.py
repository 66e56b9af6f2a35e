"""Label issues from one training run (ELR's exported flags) vs cleanlab on 5-fold cross-validated probabilities.

Question (issue 17): can the training-time detection a user gets from **one** run with
:class:`~lightning_reg.ELR` and :class:`~lightning_reg.ResultsReport` (its cleanlab-format export
``label_issues.csv``/``pred_probs.npy``, see :mod:`lightning_reg.metrics.cleanlab_export`) find the mislabeled
training samples about as well as the standard recipe, cleanlab's ``cleanlab.filter.find_label_issues`` on
K-fold out-of-fold ``pred_probs``, for a fraction of the compute?

Setting: the data, model and optimizer of :mod:`benchmarks.noisy_labels` (a seeded Fashion-MNIST training
subset with 40 % symmetric label noise from :func:`~lightning_reg.data.inject_label_noise`, the MLP
784-512-512-10, AdamW lr 2e-3, weight decay 1e-4, cosine schedule, batch 128), 3 seeds (each draws its own
subset, noise, initialisation and order). Arms, all scored against the true noise mask (precision, recall and
F1 of the flagged set):

* **ours (one run)**: train once with ``ELR(β=0.7, λ=3)`` (the paper's symmetric-noise values, as
  :mod:`benchmarks.noisy_labels` uses; untuned) and ``ResultsReport``; call ``report.finalize`` as a user
  would and read the ``is_label_issue`` column of the ``label_issues.csv`` it writes
  (``argmax`` of ELR's normalised target ``!=`` given label; ``min_confidence=0``).
* **ours' pred_probs + cleanlab filter (one run)**: the same run's exported ``pred_probs.npy`` handed to
  ``cleanlab.filter.find_label_issues`` (the hand-over the export is for); shown for information, not part of
  the target.
* **cleanlab (5-fold CV)**: stratified 5-fold cross-validation (``StratifiedKFold``, shuffled, seeded per
  seed); each fold trains the same model with the same optimizer and epoch budget with plain cross-entropy on
  the other 4 folds and predicts the held-out fold; ``find_label_issues(labels, pred_probs)`` with cleanlab's
  defaults (``filter_by="prune_by_noise_rate"``; ``n_jobs=1`` on this shared machine).

Compute: ours trains E epochs over N samples; cleanlab trains 5 × E epochs over 4N/5 samples (5× the epochs,
4× the sample gradients). Wall seconds cover training plus detection (ours: ``finalize``, which also runs
the test set once; cleanlab: the out-of-fold predictions and ``find_label_issues``).

Target (ours, stated before measuring): **F1 within 2 points of cleanlab's, or better, at ≤ 1/3 of its
compute** (training epochs and measured wall seconds). Judged on the mean over seeds, with each seed reported.

Nothing here was tuned on these seeds: ELR's values and the suite sizes were fixed before the first run, and
no other setting was tried.

Run: ``python -m benchmarks.label_issues [quick|full]`` or
``python -m benchmarks run --suite quick --only label_issues``. Needs cleanlab:
``pip install lightning-reg[cleanlab]``.
"""

from __future__ import annotations

import csv
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.common import fit, load_note, make_data, markdown_table, mean_std, suite_config, torch_threads
from benchmarks.noisy_labels import BATCH_SIZE, HIDDEN, LR, MODEL_DESC, SETTINGS, WEIGHT_DECAY
from lightning_reg.callbacks.elr import ELR
from lightning_reg.callbacks.report import ResultsReport
from lightning_reg.data import IndexedDataset
from lightning_reg.models import MLPClassifier

__all__ = ["SUITES", "run"]

TITLE = "Label issues: one training run (ELR's export) vs cleanlab on 5-fold cross-validation"
SETTING = SETTINGS["sym-40"]
SUITES: dict[str, dict[str, Any]] = {
    # ~4-6 min on 2 busy cores: 3 seeds × (1 run of 3,000 + 5 folds of 2,400 images) × 15 epochs.
    "quick": {"train_size": 3000, "epochs": 15, "folds": 5, "seeds": [0, 1, 2]},
    "full": {"train_size": 10000, "epochs": 30, "folds": 5, "seeds": [0, 1, 2, 3, 4]},
}
NUM_CLASSES = 10
F1_MARGIN = 0.02  # the target: ours' F1 >= cleanlab's - 2 points
COMPUTE_RATIO = 1 / 3  # ... at <= 1/3 of cleanlab's compute

OURS, OURS_CL, CLEANLAB = "ours (one run)", "ours' pred_probs + cleanlab filter (one run)", "cleanlab (5-fold CV)"


def _require_cleanlab() -> Any:
    """Import ``cleanlab.filter`` lazily (the dry run and the other benchmarks do not need it)."""
    try:
        import cleanlab.filter
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ModuleNotFoundError(
            "benchmarks/label_issues.py compares against cleanlab, which is not installed:"
            " `pip install lightning-reg[cleanlab]`."
        ) from err
    return cleanlab.filter


class _NoisyData(L.LightningDataModule):
    """The benchmark's tensors as a datamodule, with the noise bookkeeping ``ResultsReport`` reads."""

    def __init__(self, data: dict[str, Any]) -> None:
        super().__init__()
        self.data = data
        self.train_dataset = data["train"].dataset  # an IndexedDataset over a TensorDataset
        self.given_labels = data["given_labels"]
        self.true_labels = data["true_labels"]
        self.noise_mask = data["noise_mask"]

    def train_dataloader(self) -> DataLoader:
        return self.data["train"]

    def test_dataloader(self) -> DataLoader:
        return self.data["test"]


def _model(seed: int) -> MLPClassifier:
    torch.manual_seed(seed)  # the same initialization for every arm and fold of a seed
    return MLPClassifier(hidden=HIDDEN, optimizer="adamw", lr=LR, weight_decay=WEIGHT_DECAY, lr_schedule="cosine")


def _scores(flags: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """Precision, recall and F1 of the flagged set against the true noise mask."""
    flags, mask = flags.bool(), mask.bool()
    tp = int((flags & mask).sum())
    precision = tp / max(int(flags.sum()), 1)
    recall = tp / max(int(mask.sum()), 1)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "flagged": int(flags.sum())}


def run_ours(data: dict[str, Any], epochs: int, seed: int) -> dict[str, Any]:
    """One run with ELR and ResultsReport; the flags and ``pred_probs`` as a user reads them from the export."""
    import numpy as np

    n = len(data["given_labels"])
    dm = _NoisyData(data)
    model = _model(seed)
    elr = ELR(beta=SETTING.elr_beta, lam=SETTING.elr_lam)
    with tempfile.TemporaryDirectory() as tmp:
        report = ResultsReport(output_dir=tmp, epoch_eval=False, plot=False, print_table=False)
        t0 = time.perf_counter()
        trainer, fit_seconds = fit(model, data["train"], [elr, report], epochs=epochs, seed=seed)
        results = report.finalize(trainer, model, dm)
        seconds = time.perf_counter() - t0
        flags = torch.zeros(n, dtype=torch.bool)
        pred_probs = torch.zeros(n, NUM_CLASSES)
        with open(Path(tmp) / "label_issues.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        index = torch.tensor([int(r["index"]) for r in rows])
        flags[index] = torch.tensor([r["is_label_issue"] == "True" for r in rows])
        given = torch.tensor([int(r["given_label"]) for r in rows])
        if not torch.equal(given, data["given_labels"][index]):
            raise RuntimeError("label_issues.csv's given_label column is not the training labels")
        pred_probs[index] = torch.from_numpy(np.load(Path(tmp) / "pred_probs.npy"))
    scores = _scores(flags, data["noise_mask"])
    if abs(scores["f1"] - results.get("detection_f1", scores["f1"])) > 1e-4:  # the CSV agrees with the report
        raise RuntimeError(f"label_issues.csv's F1 {scores['f1']:.4f} != the report's {results['detection_f1']:.4f}")
    return {
        **scores,
        "seconds": seconds,
        "fit_seconds": fit_seconds,
        "epochs": epochs,
        "sample_passes": epochs * n,
        "rows": len(rows),
        "pred_probs": pred_probs,
        "test_acc": results.get("test_acc", float("nan")),
    }


@torch.no_grad()
def _probs(model: torch.nn.Module, x: torch.Tensor, batch: int = 2000) -> torch.Tensor:
    was = model.training
    model.eval()
    out = torch.cat([model(x[i : i + batch]).float().softmax(-1) for i in range(0, len(x), batch)])
    model.train(was)
    return out


def run_cleanlab(data: dict[str, Any], epochs: int, seed: int, folds: int) -> dict[str, Any]:
    """K-fold out-of-fold ``pred_probs`` (each fold: same model, optimizer, epochs; plain CE), then cleanlab."""
    from sklearn.model_selection import StratifiedKFold

    filters = _require_cleanlab()
    x, y = data["train_x"], data["given_labels"]
    n = len(y)
    oof = torch.full((n, NUM_CLASSES), float("nan"))
    t0, passes, fit_seconds = time.perf_counter(), 0, 0.0
    split = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    for k, (tr, te) in enumerate(split.split(torch.zeros(n, 1).numpy(), y.numpy())):
        tr_t, te_t = torch.from_numpy(tr), torch.from_numpy(te)
        gen = torch.Generator().manual_seed(100 * seed + k)
        loader = DataLoader(
            IndexedDataset(TensorDataset(x[tr_t], y[tr_t])), batch_size=BATCH_SIZE, shuffle=True, generator=gen
        )
        model = _model(seed)
        _, s = fit(model, loader, [], epochs=epochs, seed=seed)
        fit_seconds += s
        oof[te_t] = _probs(model, x[te_t])
        passes += epochs * len(tr)
    if not torch.isfinite(oof).all():
        raise RuntimeError("some samples got no out-of-fold prediction")
    flags = filters.find_label_issues(labels=y.numpy(), pred_probs=oof.numpy(), n_jobs=1)
    seconds = time.perf_counter() - t0
    return {
        **_scores(torch.from_numpy(flags), data["noise_mask"]),
        "seconds": seconds,
        "fit_seconds": fit_seconds,
        "epochs": folds * epochs,
        "sample_passes": passes,
    }


def run(suite: str = "quick", threads: int = 1) -> dict[str, Any]:
    """Run the benchmark; returns ``{"title", "markdown", "rows", "claims"}``.

    Args:
        suite: ``"quick"`` (about 5 minutes on 2 busy cores) or ``"full"``.
        threads: torch CPU threads while it runs (1 is fastest on a shared machine).
    """
    cfg = suite_config(suite, SUITES)
    filters = _require_cleanlab()  # fail before any training
    import cleanlab

    t0, cpu0 = time.perf_counter(), time.process_time()
    per: dict[str, list[dict[str, Any]]] = {OURS: [], OURS_CL: [], CLEANLAB: []}
    realised: list[float] = []
    with torch_threads(threads):
        for seed in cfg["seeds"]:
            data = make_data(cfg["train_size"], SETTING.noise_type, SETTING.rate, seed=seed, batch_size=BATCH_SIZE)
            realised.append(float(data["noise_mask"].float().mean()))
            ours = run_ours(data, cfg["epochs"], seed)
            t1 = time.perf_counter()
            flags = filters.find_label_issues(
                labels=data["given_labels"].numpy(), pred_probs=ours["pred_probs"].numpy(), n_jobs=1
            )
            hybrid = {
                **_scores(torch.from_numpy(flags), data["noise_mask"]),
                "seconds": ours["seconds"] + time.perf_counter() - t1,
                "fit_seconds": ours["fit_seconds"],
                "epochs": ours["epochs"],
                "sample_passes": ours["sample_passes"],
            }
            cl = run_cleanlab(data, cfg["epochs"], seed, cfg["folds"])
            for name, out in ((OURS, ours), (OURS_CL, hybrid), (CLEANLAB, cl)):
                per[name].append({k: v for k, v in out.items() if k != "pred_probs"})
            print(
                f"seed {seed}: F1 ours {100 * ours['f1']:.1f} ({ours['seconds']:.0f} s),"
                f" ours+filter {100 * hybrid['f1']:.1f}, cleanlab {100 * cl['f1']:.1f} ({cl['seconds']:.0f} s)",
                flush=True,
            )
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - cpu0
    n = cfg["train_size"]

    def col(name: str, key: str) -> list[float]:
        return [float(r[key]) for r in per[name]]

    details = {
        OURS: "ELR β=0.7, λ=3 → `label_issues.csv` `is_label_issue`",
        OURS_CL: "the same run's `pred_probs.npy` → `find_label_issues`",
        CLEANLAB: f"{cfg['folds']}-fold out-of-fold CE `pred_probs` → `find_label_issues`",
    }
    runs = {OURS: 1, OURS_CL: 1, CLEANLAB: cfg["folds"]}
    rows = []
    for name in per:
        rows.append(
            [
                name,
                details[name],
                runs[name],
                f"{statistics.fmean(col(name, 'epochs')):.0f}",
                f"{statistics.fmean(col(name, 'sample_passes')) / n:.0f}",
                mean_std(col(name, "fit_seconds"), digits=1),
                mean_std(col(name, "seconds"), digits=1),
                mean_std(col(name, "precision"), scale=100, digits=1),
                mean_std(col(name, "recall"), scale=100, digits=1),
                mean_std(col(name, "f1"), scale=100, digits=1),
                f"{statistics.fmean(col(name, 'flagged')):.0f}",
            ]
        )
    header = [
        "method",
        "detector",
        "training runs",
        "training epochs",
        "sample passes (× N)",
        "fit s",
        "fit + detect s",
        "precision",
        "recall",
        "F1",
        "flagged",
    ]
    seed_rows, holds_per_seed = [], []
    for i, seed in enumerate(cfg["seeds"]):
        o, c = per[OURS][i], per[CLEANLAB][i]
        gap = o["f1"] - c["f1"]
        wall = o["seconds"] / c["seconds"]
        epochs_ratio = o["epochs"] / c["epochs"]
        ok = gap >= -F1_MARGIN and epochs_ratio <= COMPUTE_RATIO and wall <= COMPUTE_RATIO
        holds_per_seed.append(ok)
        seed_rows.append(
            [
                seed,
                f"{100 * realised[i]:.1f}",
                f"{100 * o['f1']:.1f}",
                f"{100 * per[OURS_CL][i]['f1']:.1f}",
                f"{100 * c['f1']:.1f}",
                f"{100 * gap:+.1f}",
                f"1/{c['epochs'] / o['epochs']:.0f}",
                f"{wall:.2f}",
                "yes" if ok else "no",
            ]
        )
    seed_header = [
        "seed",
        "noise %",
        "F1 ours",
        "F1 ours + filter",
        "F1 cleanlab",
        "F1 gap (ours − cleanlab)",
        "epochs ratio",
        "wall ratio",
        "target holds",
    ]
    m = statistics.fmean
    gap = m(col(OURS, "f1")) - m(col(CLEANLAB, "f1"))
    wall = m(col(OURS, "seconds")) / m(col(CLEANLAB, "seconds"))
    epochs_ratio = m(col(OURS, "epochs")) / m(col(CLEANLAB, "epochs"))
    holds = gap >= -F1_MARGIN and epochs_ratio <= COMPUTE_RATIO and wall <= COMPUTE_RATIO
    claim = {
        "technique": "Label issues: ELR one run vs cleanlab 5-fold CV (sym. 40 %)",
        "claim": "ours (target, not a paper's): F1 within 2 points of cleanlab's, or better, at ≤ 1/3 of its compute",
        "measured": f"F1 {100 * m(col(OURS, 'f1')):.1f} vs {100 * m(col(CLEANLAB, 'f1')):.1f} ({100 * gap:+.1f}"
        f" points; precision {100 * m(col(OURS, 'precision')):.1f} vs {100 * m(col(CLEANLAB, 'precision')):.1f},"
        f" recall {100 * m(col(OURS, 'recall')):.1f} vs {100 * m(col(CLEANLAB, 'recall')):.1f}) with"
        f" {m(col(OURS, 'epochs')):.0f} vs {m(col(CLEANLAB, 'epochs')):.0f} training epochs (wall ratio"
        f" {wall:.2f}); holds on {sum(holds_per_seed)}/{len(holds_per_seed)} seeds",
        "verdict": "yes" if holds else "no",
    }
    reading = (
        f"Reading: ours flags from one run of {cfg['epochs']} epochs; cleanlab needs {cfg['folds']} runs"
        f" ({m(col(CLEANLAB, 'epochs')):.0f} epochs, {cfg['folds'] - 1}× the sample gradients). Mean F1 gap"
        f" {100 * gap:+.1f} points (target ≥ −{100 * F1_MARGIN:.0f}), epochs ratio 1/{1 / epochs_ratio:.0f} and wall"
        f" ratio {wall:.2f} (target ≤ 1/3): the target {'holds' if holds else 'does not hold'} on the mean, and on"
        f" {sum(holds_per_seed)} of {len(holds_per_seed)} seeds. Caveats: ELR's targets are in-sample (a running"
        " average of the predictions made while training on those very samples), cleanlab's probabilities are"
        " out-of-sample; the fold models train on 4/5 of the data with plain cross-entropy, as cleanlab's recipe"
        " does with the user's own model. A small MLP on a CPU budget, so the comparison is of the methods at this"
        " scale, not of their best-reported numbers."
    )
    markdown = "\n\n".join(
        [
            f"Setting: {MODEL_DESC}, on {n:,} Fashion-MNIST training images with {SETTING.title} label noise"
            f" (realised {100 * m(realised):.1f} %), {cfg['epochs']} epochs per training run; seeds {cfg['seeds']}"
            f" (each draws its own subset, noise, initialisation and order; every arm and fold of a seed starts"
            f" from the same initialisation); {threads} torch thread(s); cleanlab {cleanlab.__version__}."
            " Precision, recall and F1 (%) of the flagged samples against the true noise mask, mean ± std over"
            " seeds; *sample passes* count the training samples seen, in units of the training-set size N; *fit s*"
            " is the time in `trainer.fit`, *fit + detect s* adds the detection (ours: `ResultsReport.finalize`,"
            " which also tests on the 10,000 test images and writes the files; cleanlab: the out-of-fold"
            " predictions and `find_label_issues`) and is what the wall ratio compares.",
            markdown_table(header, rows),
            "Per seed:",
            markdown_table(seed_header, seed_rows),
            reading,
            load_note(),
            f"_(measured in {seconds:.0f} s wall, {cpu_seconds:.0f} s of CPU time; fit times on a shared CPU are"
            " noisy)_",
        ]
    )
    return {
        "title": TITLE,
        "markdown": markdown,
        "rows": [dict(zip(header, r)) for r in rows],
        "seeds": [dict(zip(seed_header, r)) for r in seed_rows],
        "claims": [claim],
    }


if __name__ == "__main__":
    result = run(sys.argv[1] if len(sys.argv) > 1 else "quick")
    print(result["title"] + "\n\n" + result["markdown"])
