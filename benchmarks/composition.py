"""All six techniques composed vs each one alone, and EMA weights vs live weights, on noisy Fashion-MNIST.

Two questions, answered from the same runs (side by side, same seeds, data and noise):

* **Composition.** Listing all six callbacks (early dropout, EMA teacher, PS-KD, gradient
  clipping, ELR, consistency with the EMA teacher) in one ``Trainer`` must train, and should end
  at least as well as the best single technique. No paper claims this for these six; it is the
  package's promise that they compose, so we measure it.
* **EMA vs live weights** (Polyak averaging; Mean Teacher, Tarvainen & Valpola 2017): the EMA
  weights evaluate at least as well as the live ones and are more stable from epoch to epoch.
  Both are evaluated on the test set after every epoch of the ``EMATeacher`` arm (and of the
  composed arm), so the comparison is within one run.

Setting: the MLP and data of :mod:`benchmarks.noisy_labels` (40 % symmetric noise), with
``nn.Dropout`` modules of rate 0 that :class:`~lightning_reg.EarlyDropout` drives.

Run: ``python -m benchmarks.composition [quick|full]`` or
``python -m benchmarks run --suite quick --only composition``.
"""

from __future__ import annotations

import itertools
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from lightning.pytorch import Callback
from torch.utils.data import DataLoader

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
from benchmarks.noisy_labels import BATCH_SIZE, HIDDEN, LR, WEIGHT_DECAY, _consistency
from lightning_reg.models import MLPClassifier

__all__ = ["ARMS", "SUITES", "run"]

SUITES: dict[str, dict[str, Any]] = {
    "quick": {"train_size": 3000, "epochs": 15, "seeds": [0, 1]},
    "full": {"train_size": 10000, "epochs": 30, "seeds": [0, 1, 2]},
}
OPT: dict[str, Any] = {"weight_decay": WEIGHT_DECAY, "lr_schedule": "cosine"}
EMA_DECAY = 0.99  # ~100-step horizon: ~3 epochs of 32 steps here


def _early_dropout(epochs: int) -> Callback:
    from lightning_reg import EarlyDropout

    return EarlyDropout(p=0.1, schedule="linear", cutoff_epochs=max(1.0, epochs / 4))


def _ema() -> Callback:
    from lightning_reg import EMATeacher

    return EMATeacher(decay=EMA_DECAY, eval_with_ema=False)


def _pskd() -> Callback:
    from lightning_reg import PSKD

    return PSKD(alpha_T=0.8)


def _clip() -> Callback:
    from lightning_reg import GradientClipping

    return GradientClipping(max_norm=1.0, rule="norm")


def _elr() -> Callback:
    from lightning_reg import ELR

    return ELR(beta=0.7, lam=3.0)


def _all_six(epochs: int) -> list[Callback]:
    return [_early_dropout(epochs), _ema(), _pskd(), _clip(), _elr(), _consistency("ema")]


#: name -> (callbacks factory taking the epoch count, arguments shown in the table)
ARMS: dict[str, tuple[Callable[[int], list[Callback]], str]] = {
    "CE": (lambda e: [], "–"),
    "EarlyDropout": (lambda e: [_early_dropout(e)], "p=0.1, linear to 0 over the first quarter"),
    "EMATeacher": (lambda e: [_ema()], f"decay {EMA_DECAY}, mean-teacher warm-up"),
    "PSKD": (lambda e: [_pskd()], "α_T=0.8, linear"),
    "GradientClipping": (lambda e: [_clip()], "norm ≤ 1"),
    "ELR": (lambda e: [_elr()], "β=0.7, λ=3"),
    "NoisyLabelConsistency": (lambda e: [_consistency("self")], "self, τ=0.4, thr 0.8, flip + patch mask"),
    "NoisyLabelConsistency + EMATeacher": (
        lambda e: [_consistency("ema"), _ema()],
        f"the same with the EMA teacher (decay {EMA_DECAY})",
    ),
    "all six": (_all_six, "all of the above; consistency uses the EMA teacher"),
}


class LiveAndEMAAccuracy(Callback):
    """Test accuracy of the live weights and, when an ``EMATeacher`` is present, of the EMA weights, every epoch."""

    def __init__(self, test_loader: DataLoader) -> None:
        self.test_loader = test_loader
        self.live: list[float] = []
        self.ema: list[float] = []

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from lightning_reg import EMATeacher

        self.live.append(evaluate(pl_module, self.test_loader)["acc"])
        teacher = next((cb for cb in trainer.callbacks if isinstance(cb, EMATeacher)), None)  # type: ignore[attr-defined]
        if teacher is not None:
            self.ema.append(_ema_accuracy(teacher, self.test_loader))


@torch.no_grad()
def _ema_accuracy(teacher: Any, loader: DataLoader) -> float:
    correct = total = 0
    for x, y in loader:
        correct += int((teacher.teacher_forward(x).argmax(1) == y).sum())
        total += len(y)
    return correct / total


def _jitter(curve: list[float]) -> float:
    """Epoch-to-epoch instability: mean |acc_e − acc_{e−1}| over the second half of training."""
    tail = curve[max(0, min(len(curve) // 2, len(curve) - 2)) :]
    if len(tail) < 2:
        return 0.0
    return statistics.fmean(abs(b - a) for a, b in itertools.pairwise(tail))


def run(suite: str = "quick", threads: int = 1) -> dict[str, Any]:
    """Run every arm on every seed; returns ``{"title", "markdown", "rows", "claims"}``.

    Args:
        suite: ``"quick"`` or ``"full"``.
        threads: torch CPU threads while it runs.
    """
    cfg = suite_config(suite, SUITES)
    t0 = time.perf_counter()
    live: dict[str, list[list[float]]] = {name: [] for name in ARMS}
    ema: dict[str, list[list[float]]] = {name: [] for name in ARMS}
    seconds: dict[str, list[float]] = {name: [] for name in ARMS}
    with torch_threads(threads):
        for seed in cfg["seeds"]:
            data = make_data(cfg["train_size"], "symmetric", 0.4, seed=seed, batch_size=BATCH_SIZE)
            for name, (factory, _) in ARMS.items():
                torch.manual_seed(seed)  # the same initialization for every arm of a seed (paired comparison)
                model = MLPClassifier(hidden=HIDDEN, dropout=0.0, optimizer="adamw", lr=LR, **OPT)
                rec = LiveAndEMAAccuracy(data["test"])
                _, secs = fit(model, data["train"], [*factory(cfg["epochs"]), rec], epochs=cfg["epochs"], seed=seed)
                live[name].append(rec.live)
                ema[name].append(rec.ema)
                seconds[name].append(secs)

    def final(curves: list[list[float]]) -> list[float]:
        return [c[-1] for c in curves]

    rows, table = [], []
    for name, (_, args) in ARMS.items():
        row = [
            name,
            args,
            mean_std(final(live[name]), scale=100),
            mean_std(final(ema[name]), scale=100) if ema[name][0] else "–",
            mean_std([_jitter(c) for c in live[name]], scale=100),
            mean_std([_jitter(c) for c in ema[name]], scale=100) if ema[name][0] else "–",
            f"{statistics.fmean(seconds[name]):.0f}",
        ]
        table.append(row)
        rows.append(dict(zip(HEADER, row)))

    m = statistics.fmean
    singles = [n for n in ARMS if n not in ("CE", "all six", "NoisyLabelConsistency + EMATeacher")]

    def best_acc(name: str) -> float:  # the better of live and EMA weights, as a user would deploy
        return max(m(final(live[name])), m(final(ema[name]))) if ema[name][0] else m(final(live[name]))

    best = max(singles, key=best_acc)
    composed = best_acc("all six")
    ema_gain = 100 * (m(final(ema["EMATeacher"])) - m(final(live["EMATeacher"])))
    jit_live = 100 * m([_jitter(c) for c in live["EMATeacher"]])
    jit_ema = 100 * m([_jitter(c) for c in ema["EMATeacher"]])
    claims = [
        {
            "technique": "EMATeacher (sym. 40 %)",
            "claim": "EMA weights evaluate at least as well as the live weights and are more stable across epochs",
            "measured": f"final test acc EMA {100 * m(final(ema['EMATeacher'])):.1f} vs live"
            f" {100 * m(final(live['EMATeacher'])):.1f} ({ema_gain:+.1f} points); epoch-to-epoch change"
            f" {jit_ema:.2f} vs {jit_live:.2f} points",
            "verdict": "yes" if ema_gain >= -0.2 and jit_ema < jit_live else "no",
        },
        {
            "technique": "all six composed (sym. 40 %)",
            "claim": "(ours) the six compose in one Trainer and end at least as well as the best single technique",
            "measured": f"all six {100 * composed:.1f} vs best single ({best}) {100 * best_acc(best):.1f};"
            f" CE {100 * m(final(live['CE'])):.1f}",
            "verdict": "yes" if composed >= best_acc(best) - 0.005 else "no",
        },
    ]
    cons_arms = ("CE", "NoisyLabelConsistency", "NoisyLabelConsistency + EMATeacher")
    ce, cons, cons_ema = (m(final(live[k])) for k in cons_arms)
    claims.insert(
        1,
        {
            "technique": "NoisyLabelConsistency (sym. 40 %)",
            "claim": "consistency between views beats CE under label noise; an EMA teacher's targets help further"
            " (Mean Teacher, MIC)",
            "measured": f"CE {100 * ce:.1f}, consistency (self) {100 * cons:.1f} ({100 * (cons - ce):+.1f}), with the"
            f" EMA teacher {100 * cons_ema:.1f} ({100 * (cons_ema - ce):+.1f})",
            "verdict": "yes" if cons > ce and cons_ema >= cons else ("partly" if max(cons, cons_ema) > ce else "no"),
        },
    )
    secs = time.perf_counter() - t0
    markdown = "\n\n".join(
        [
            f"Setting: MLP 784-512-512-10 with rate-0 dropout modules (AdamW lr {LR:g}, weight decay"
            f" {WEIGHT_DECAY:g}, cosine LR, batch {BATCH_SIZE}), {cfg['train_size']:,} Fashion-MNIST training images"
            f" with 40 % symmetric label noise, {cfg['epochs']} epochs, seeds {cfg['seeds']}; test accuracy (%) of the"
            " 10,000 test images after the last epoch, mean ± std over seeds. *EMA acc* evaluates the EMA weights of"
            " the same run; *epoch-to-epoch change* is the mean |acc_e − acc_(e−1)| over the second half of training"
            " (lower is more stable).",
            markdown_table(HEADER, table),
            f"Reading: the best single technique here is **{best}**; all six composed end at"
            f" {100 * composed:.1f} % (taking the better of live and EMA weights for arms that keep an EMA). The EMA"
            f" weights of the `EMATeacher` arm end {ema_gain:+.1f} points from the live weights with"
            f" {jit_ema:.2f} vs {jit_live:.2f} points of epoch-to-epoch change.",
            f"_(measured in {secs:.0f} s wall)_",
        ]
    )
    return {
        "title": "Composition of all six, and EMA vs live weights (noisy Fashion-MNIST)",
        "markdown": markdown,
        "rows": rows,
        "claims": claims,
    }


HEADER = ["method", "arguments", "final acc (live)", "final acc (EMA)", "epoch change (live)", "epoch change (EMA)"]
HEADER += ["fit s"]


if __name__ == "__main__":
    from rich.console import Console

    out = run(sys.argv[1] if len(sys.argv) > 1 else "quick")
    console = Console(width=200)
    console.print(rich_table(out["title"], HEADER, [[r[h] for h in HEADER] for r in out["rows"]]))
    for claim in out["claims"]:
        console.print(f"[bold]{claim['technique']}[/bold]: {claim['measured']} (holds: {claim['verdict']})")
