"""PS-KD on Fashion-MNIST: accuracy and calibration vs CE and label smoothing, plus the scale report.

Part 1 (the paper's claim, *PS-KD lowers ECE clearly and keeps or raises accuracy*): a model is trained with
plain CE, ``LabelSmoothing(0.1)`` and ``PSKD(0.8)`` on the same data, seeds and budget; test accuracy and
15-bin ECE (torchmetrics ``multiclass_calibration_error``, L1) are reported as mean ± std over seeds. The
same runs with ``PSKD(0.8)`` storing its table in bf16, and in bf16 with top-3 sparse rows, give the
accuracy/ECE cost of compact storage.

Part 2 (scale):

* the table's memory for ImageNet-1k (N = 1,281,167, C = 1000) in every storage mode
  (``PerSampleTable.estimate_nbytes``, no allocation);
* the per-step cost of PS-KD's table work (read the batch's rows, build the soft target, write the new
  predictions) next to a plain-torch training step of a small CNN, timed round-robin in one process; and
  the reference implementation's per-row Python write loop (what it runs under DDP) as a yardstick.

Run: ``python -m benchmarks.pskd`` (quick) or ``python -m benchmarks.pskd full``.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.common import (
    evaluate,
    fit,
    make_data,
    markdown_table,
    mean_std,
    rich_table,
    suite_config,
    torch_threads,
)
from lightning_reg.callbacks.label_smoothing import LabelSmoothing
from lightning_reg.callbacks.pskd import PSKD
from lightning_reg.core.table import PerSampleTable
from lightning_reg.functional.pskd import pskd_soft_targets
from lightning_reg.models import MLPClassifier, SmallCNN

__all__ = ["SUITES", "memory_rows", "overhead_rows", "run"]

IMAGENET_N, IMAGENET_C = 1_281_167, 1000

#: The budget of each suite. The quick suite overfits a 5k-sample subset with a wide MLP (no weight decay),
#: so plain CE ends over-confident, as the paper's 300-epoch CIFAR baselines do.
SUITES: dict[str, dict[str, Any]] = {
    "quick": {
        "train_size": 5000,
        "epochs": 12,
        "seeds": [0, 1, 2],
        "model": "mlp",
        "batch_size": 128,
        "timing_repeat": 15,
    },
    "full": {
        "train_size": None,
        "epochs": 30,
        "seeds": [0, 1, 2, 3, 4],
        "model": "cnn",
        "batch_size": 128,
        "timing_repeat": 40,
    },
}

#: (label, factory of the callbacks). ``None`` storage means the PS-KD default (fp32, dense).
METHODS: list[tuple[str, Callable[[], list[Any]]]] = [
    ("CE", lambda: []),
    ("LabelSmoothing(0.1)", lambda: [LabelSmoothing(0.1)]),
    ("PSKD(0.8)", lambda: [PSKD(alpha_T=0.8)]),
    ("PSKD(0.8), bf16 table", lambda: [PSKD(alpha_T=0.8, table_dtype="bfloat16")]),
    ("PSKD(0.8), bf16 top-3 table", lambda: [PSKD(alpha_T=0.8, table_dtype="bfloat16", topk=3)]),
]


def _model(kind: str) -> torch.nn.Module:
    if kind == "mlp":
        return MLPClassifier(hidden=[512], lr=0.1, weight_decay=0.0)
    return SmallCNN(channels=[16, 32], lr=0.05, weight_decay=5e-4)


def accuracy_rows(cfg: dict[str, Any]) -> tuple[list[list[str]], dict[str, dict[str, list[float]]]]:
    """Train every method on every seed; returns the table rows and the raw per-seed results."""
    raw: dict[str, dict[str, list[float]]] = {m: {"acc": [], "ece": [], "nll": [], "sec": []} for m, _ in METHODS}
    for seed in cfg["seeds"]:
        data = make_data(train_size=cfg["train_size"], seed=seed, batch_size=cfg["batch_size"])
        for label, make_callbacks in METHODS:
            torch.manual_seed(seed)
            model = _model(cfg["model"])
            _, sec = fit(model, data["train"], make_callbacks(), epochs=cfg["epochs"], seed=seed)
            res = evaluate(model, data["test"])
            for k in ("acc", "ece", "nll"):
                raw[label][k].append(res[k])
            raw[label]["sec"].append(sec)
    rows = [
        [
            label,
            mean_std(r["acc"], 2, 100.0),
            mean_std(r["ece"], 2, 100.0),
            mean_std(r["nll"], 3),
            f"{statistics.fmean(r['sec']):.1f}",
        ]
        for label, r in raw.items()
    ]
    return rows, raw


def memory_rows(n: int = IMAGENET_N, c: int = IMAGENET_C) -> list[list[str]]:
    """The table's bytes in each storage mode, and the share of the fp32 dense footprint."""
    modes: list[tuple[str, str, int | None]] = [
        ("fp32 dense (the reference)", "float32", None),
        ("fp16 dense", "float16", None),
        ("bf16 dense", "bfloat16", None),
        ("fp32 top-10", "float32", 10),
        ("bf16 top-20", "bfloat16", 20),
        ("bf16 top-10", "bfloat16", 10),
        ("bf16 top-5", "bfloat16", 5),
    ]
    base = PerSampleTable.estimate_nbytes(n, c, "float32")
    rows = []
    for label, dtype, k in modes:
        nbytes = PerSampleTable.estimate_nbytes(n, c, dtype, k)
        arg = f'table_dtype="{dtype}"' + (f", topk={k}" if k else "")
        rows.append([label, arg, f"{nbytes / 2**30:.3f}", f"{100 * nbytes / base:.1f} %"])
    return rows


def _pskd_table_step(table: PerSampleTable, index: torch.Tensor, probs: torch.Tensor, onehot: torch.Tensor) -> None:
    """What ``PSKD.refine_target`` does to the table each step: read, mix, write."""
    prev, seen = table.read(index)
    pskd_soft_targets(onehot, prev, 0.5, seen)
    table.write(index, probs)


def _reference_vectorised(store: torch.Tensor, index: torch.Tensor, probs: torch.Tensor, onehot: torch.Tensor) -> None:
    """The reference's single-process step (PS-KD-Pytorch): fancy-index read and write, nothing else."""
    prev = store[index]
    (1 - 0.5) * onehot + 0.5 * prev
    store[index] = probs


def _reference_row_loop(store: torch.Tensor, index: torch.Tensor, probs: torch.Tensor, onehot: torch.Tensor) -> None:
    """The reference's DDP step: read, then one Python assignment per row of the all-gathered batch."""
    prev = store[index]
    (1 - 0.5) * onehot + 0.5 * prev
    for j in range(len(index)):
        store[index[j]] = probs[j]


def _cnn_step(batch: int) -> Callable[[], None]:
    model = SmallCNN(channels=[16, 32])
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))

    def step() -> None:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def _round_robin(fns: dict[str, Callable[[], None]], repeat: int, warmup: int = 3) -> dict[str, float]:
    """Median seconds per call. Every round times each function once, in a fresh seeded order, so load drift and
    the cold caches after the CNN step hit them all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    names = list(fns)
    times: dict[str, list[float]] = {k: [] for k in fns}
    g = torch.Generator().manual_seed(0)
    for _ in range(repeat):
        for j in torch.randperm(len(names), generator=g).tolist():
            t0 = time.perf_counter()
            fns[names[j]]()
            times[names[j]].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


CNN_STEP = "SmallCNN([16, 32]) training step (forward, backward, SGD), batch 128"


def overhead_rows(repeat: int) -> list[list[str]]:
    """Per-step table cost next to a small-CNN training step (batch 128), timed round-robin in one process.

    ``rows`` is how many rows one step writes: the batch (128), or the all-gathered batch of 8 DDP ranks (1024),
    which is what the reference's per-row loop walks over on every rank.
    """
    g = torch.Generator().manual_seed(0)
    fns: dict[str, Callable[[], None]] = {CNN_STEP: _cnn_step(128)}
    cases: list[tuple[str, int, int, str, int | None, int]] = [
        ("60000×10", 60_000, 10, "float32", None, 128),
        ("60000×10", 60_000, 10, "bfloat16", 3, 128),
        ("100000×1000", 100_000, 1000, "float32", None, 128),
        ("100000×1000", 100_000, 1000, "bfloat16", None, 128),
        ("100000×1000", 100_000, 1000, "float32", None, 1024),
        ("1281167×1000", IMAGENET_N, 1000, "bfloat16", 10, 128),
        ("1281167×1000", IMAGENET_N, 1000, "bfloat16", 10, 1024),
    ]
    for shape, n, c, dtype, k, rows in cases:
        table = PerSampleTable(n, c, dtype=dtype, topk=k).allocate()
        index = torch.randperm(n, generator=g)[:rows]
        probs = torch.softmax(torch.randn(rows, c, generator=g), -1)
        onehot = F.one_hot(torch.randint(0, c, (rows,), generator=g), c).float()
        table.write(index, probs)
        mode = {"float32": "fp32", "bfloat16": "bf16"}[dtype] + (f" top-{k}" if k else "")
        label = f"PSKD table ({mode}), {shape}, {rows} rows"
        fns[label] = lambda t=table, i=index, p=probs, o=onehot: _pskd_table_step(t, i, p, o)
        if k is None and dtype == "float32":
            store = torch.zeros(n, c)
            ref_vec, ref_loop = (
                f"reference, 1 process (fancy index), {shape}, {rows} rows",
                f"reference, DDP path (Python row loop), {shape}, {rows} rows",
            )
            fns[ref_vec] = lambda s=store, i=index, p=probs, o=onehot: _reference_vectorised(s, i, p, o)
            fns[ref_loop] = lambda s=store, i=index, p=probs, o=onehot: _reference_row_loop(s, i, p, o)
    med = _round_robin(fns, repeat)
    step = med[CNN_STEP]
    return [
        [label, f"{sec * 1e3:.3f}", "—" if label == CNN_STEP else f"{100 * sec / step:.2f} %"]
        for label, sec in med.items()
    ]


def _diff(a: list[float], b: list[float]) -> tuple[float, float]:
    """``mean(a) - mean(b)`` and its standard error (independent seeds)."""
    var_a = statistics.variance(a) if len(a) > 1 else 0.0
    var_b = statistics.variance(b) if len(b) > 1 else 0.0
    return statistics.fmean(a) - statistics.fmean(b), (var_a / len(a) + var_b / len(b)) ** 0.5


def _not_worse(new: dict[str, list[float]], ref: dict[str, list[float]]) -> bool:
    """Neither accuracy lower nor ECE higher than ``ref`` by more than two standard errors of the difference."""
    d_acc, se_acc = _diff(new["acc"], ref["acc"])
    d_ece, se_ece = _diff(new["ece"], ref["ece"])
    return d_acc >= -2 * se_acc and d_ece <= 2 * se_ece


def run(suite: str = "quick", threads: int = 1) -> dict[str, Any]:
    """Run the benchmark; returns ``{"title", "markdown", "rows", "claims"}``.

    Args:
        suite: ``"quick"`` (about 3 minutes on 2 idle cores) or ``"full"``.
        threads: torch CPU threads while it runs (1 is fastest on a shared, loaded machine).
    """
    cfg = suite_config(suite, SUITES)
    t0 = time.perf_counter()
    with torch_threads(threads):
        acc_rows, raw = accuracy_rows(cfg)
        mem_rows = memory_rows()
        ovh_rows = overhead_rows(cfg["timing_repeat"])
    seconds = time.perf_counter() - t0

    ce, ls, pk = raw["CE"], raw["LabelSmoothing(0.1)"], raw["PSKD(0.8)"]
    d_ece, se_ece = _diff(pk["ece"], ce["ece"])
    d_acc, se_acc = _diff(pk["acc"], ce["acc"])
    ece_lower, acc_kept = d_ece < -2 * se_ece, d_acc >= -2 * se_acc
    verdict = "yes" if ece_lower and acc_kept else ("partly" if ece_lower or acc_kept else "no")
    compact_ok = {k: _not_worse(raw[k], pk) for k in ("PSKD(0.8), bf16 table", "PSKD(0.8), bf16 top-3 table")}
    fp32_bytes = PerSampleTable.estimate_nbytes(IMAGENET_N, IMAGENET_C, "float32")
    top10_share = PerSampleTable.estimate_nbytes(IMAGENET_N, IMAGENET_C, "bfloat16", 10) / fp32_bytes
    m = statistics.fmean
    model_desc = (
        "MLP 784-512-10 (SGD lr 0.1, momentum 0.9, no weight decay, cosine LR)"
        if cfg["model"] == "mlp"
        else "SmallCNN([16, 32]) (SGD lr 0.05, momentum 0.9, weight decay 5e-4, cosine LR)"
    )
    size = "all 60,000" if cfg["train_size"] is None else f"{cfg['train_size']:,}"
    reading = (
        f"PS-KD(0.8) changes test ECE by {100 * d_ece:+.2f} ± {100 * se_ece:.2f} points and accuracy by"
        f" {100 * d_acc:+.2f} ± {100 * se_acc:.2f} points against plain CE (± one standard error over seeds);"
        f" label smoothing changes them by {100 * (m(ls['ece']) - m(ce['ece'])):+.2f} and"
        f" {100 * (m(ls['acc']) - m(ce['acc'])):+.2f}. "
        + {
            "yes": "This agrees with the paper's claim: ECE clearly lower, accuracy kept"
            " (within two standard errors). ",
            "partly": "This agrees with the paper's claim only in part: "
            + (
                "ECE is clearly lower but accuracy drops by more than two standard errors. "
                if ece_lower
                else "accuracy is kept but ECE is not clearly lower. "
            ),
            "no": "This does not reproduce the paper's claim. ",
        }[verdict]
        + f"The budget is far smaller than the paper's (Fashion-MNIST, {size} training images, {cfg['epochs']}"
        f" epochs, {len(cfg['seeds'])} seeds, against 300 epochs on CIFAR-100 where CE's ECE is 11.84 %), and"
        " label smoothing, tuned for over-confident baselines, over-smooths this one. Compact storage: "
        + "; ".join(
            f"{k.split(', ', 1)[1]} is {'not measurably worse than' if ok else 'measurably worse than'} fp32"
            for k, ok in compact_ok.items()
        )
        + f" (accuracy and ECE, two standard errors); at ImageNet size a bf16 top-10 table takes"
        f" {100 * top10_share:.1f} % of the fp32 footprint. The table's per-step work is a few percent of a small-CNN"
        " CPU step or less. On the CPU the reference's plain fancy-index write is the cheapest, since ours adds a"
        " bounds check, de-duplication of DDP padding, non-finite protection and the seen mask; its DDP path, a"
        " Python loop over the gathered rows, grows with the number of rows (and on a GPU each row is a kernel"
        " launch and a host sync). The ratios were measured side by side in one process; the fit wall times"
        " (fit s/run) depend on the machine's load more than on the table."
    )
    markdown = "\n\n".join(
        [
            f"Setting: {model_desc}, trained on {size} Fashion-MNIST training images for {cfg['epochs']} epochs"
            f" (batch {cfg['batch_size']}), evaluated on the 10,000 test images; seeds {cfg['seeds']};"
            f" {threads} torch thread(s).",
            "**Accuracy and calibration** (mean ± std over seeds; ECE with 15 bins, L1)",
            markdown_table(["method", "test acc (%)", "test ECE (%)", "test NLL", "fit s/run"], acc_rows),
            "**Table memory at ImageNet-1k size** (N = 1,281,167, C = 1000; values, column indices and the seen mask)",
            markdown_table(["storage", "PSKD arguments", "GiB per rank", "of fp32"], mem_rows),
            "**Per-step cost of the table** (read + soft target + write; median over rounds, one process, CPU)",
            markdown_table(["what", "ms per step", "of the CNN step"], ovh_rows),
            reading,
            f"_(measured in {seconds:.0f} s)_",
        ]
    )
    claims = [
        {
            "technique": "PSKD",
            "claim": "lowers ECE clearly and keeps or raises accuracy (CIFAR-100 PreAct-ResNet-18: ECE 11.84 → 1.77 %)",
            "measured": f"ECE {100 * m(ce['ece']):.2f} → {100 * m(pk['ece']):.2f} %, accuracy"
            f" {100 * m(ce['acc']):.2f} → {100 * m(pk['acc']):.2f} %",
            "verdict": verdict,
        },
        {
            "technique": "PSKD table",
            "claim": "ImageNet-size table in ≤ 25 % of fp32 with no measurable accuracy/ECE loss",
            "measured": f"bf16 top-10: {100 * top10_share:.1f} % of fp32; "
            + ", ".join(f"{k.split(', ', 1)[1]}: {'no loss' if ok else 'loss'}" for k, ok in compact_ok.items()),
            "verdict": "yes" if all(compact_ok.values()) and top10_share <= 0.25 else "no",
        },
    ]
    rows = [
        *(
            {"section": "accuracy", "method": r[0], "acc": r[1], "ece": r[2], "nll": r[3], "sec": r[4]}
            for r in acc_rows
        ),
        *({"section": "memory", "storage": r[0], "args": r[1], "gib": r[2], "of_fp32": r[3]} for r in mem_rows),
        *({"section": "overhead", "what": r[0], "ms": r[1], "of_step": r[2]} for r in ovh_rows),
    ]
    return {
        "title": "PS-KD: calibration on Fashion-MNIST and the per-sample table at scale",
        "markdown": markdown,
        "rows": rows,
        "claims": claims,
    }


if __name__ == "__main__":
    from rich.console import Console

    out = run(sys.argv[1] if len(sys.argv) > 1 else "quick")
    console = Console()
    console.print(out["title"])
    sections: dict[str, list[dict[str, Any]]] = {}
    for row in out["rows"]:
        sections.setdefault(row["section"], []).append(row)
    for name, rows in sections.items():
        header = [k for k in rows[0] if k != "section"]
        console.print(rich_table(name, header, [[r[k] for k in header] for r in rows]))
    for claim in out["claims"]:
        console.print(f"[bold]{claim['technique']}[/bold]: {claim['claim']} → {claim['measured']} ({claim['verdict']})")
