"""Per-step overhead of each callback in a real Lightning loop, against a hand-written PyTorch loop.

For every technique we time, side by side in one process on the same batches:

* ``L_base``: the Lightning step of a small CNN with the ``RegularizedModule`` mixin and no callback;
* ``L_cb``: the same with the technique's callback;
* ``H_base``: the same model and optimizer in a plain PyTorch loop (forward, CE, backward, step);
* ``H_cb``: the same method written by hand in that loop (our yardstick for the method's inherent cost,
  including any extra forward pass it needs).

The method's inherent cost is ``H_cb / H_base - 1``; the Lightning callback's cost is ``L_cb / L_base - 1``.
The difference between the two is the **bookkeeping overhead** (target: ≤ 5 % of the step for each
callback, ≤ 10 % for all six composed). Step times are medians of the time between
``on_train_batch_start`` and ``on_train_batch_end`` (the Lightning loop's own between-batch work is
the same with or without our callbacks and is excluded from both).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback
from torch.utils.data import DataLoader

from benchmarks.common import fashion_mnist, load_note, markdown_table
from lightning_reg.models import SmallCNN

BATCH, N_TRAIN = 128, 128 * 60


class _Start(Callback):
    def __init__(self, times: list[float]) -> None:
        self.times = times

    def on_train_batch_start(self, *args: Any) -> None:
        self.times.append(-time.perf_counter())


class _End(Callback):
    def __init__(self, times: list[float]) -> None:
        self.times = times

    def on_train_batch_end(self, *args: Any) -> None:
        self.times[-1] += time.perf_counter()


def _model() -> SmallCNN:
    torch.manual_seed(0)
    return SmallCNN(channels=[16, 32], lr=0.05, lr_schedule="constant", weight_decay=0.0, dropout=0.1)


def _loader() -> DataLoader:
    from lightning_reg.data import IndexedDataset

    x, y = fashion_mnist("train")
    ds = IndexedDataset(torch.utils.data.TensorDataset(x[:N_TRAIN], y[:N_TRAIN]))
    return DataLoader(ds, batch_size=BATCH, shuffle=False)


def lightning_step_time(callbacks: list[Callback], steps: int, warmup: int) -> float:
    times: list[float] = []
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps + warmup,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[_Start(times), *callbacks, _End(times)],
    )
    trainer.fit(_model(), train_dataloaders=_loader())
    return statistics.median(times[warmup:])


# -- hand-written yardsticks ---------------------------------------------------------------------
def _patch_mask(x: torch.Tensor, patch: int = 4, ratio: float = 0.5) -> torch.Tensor:
    b, _, h, w = x.shape
    keep = (torch.rand(b, 1, h // patch, w // patch) >= ratio).to(x.dtype)
    return x * keep.repeat_interleave(patch, 2).repeat_interleave(patch, 3)


def hand_step_time(method: str, steps: int, warmup: int) -> float:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    params = [p for p in model.parameters()]
    ema = [p.detach().clone() for p in params]
    n, c = N_TRAIN, 10
    pskd_table = torch.zeros(n, c)
    elr_table = torch.zeros(n, c)
    dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    methods = set(method.split("+")) if method != "all" else {"ls", "ema", "dropout", "clip", "pskd", "elr", "cons"}
    times = []
    batches = list(_loader())
    for step in range(steps + warmup):
        x, y, idx = batches[step % len(batches)]
        t0 = time.perf_counter()
        if "dropout" in methods:
            rate = 0.1 * max(0.0, 1 - step / 100)
            for m in dropouts:
                m.p = rate
        logits = model(x)
        if "pskd" in methods:
            q = F.one_hot(y, c).float()
            prev = pskd_table[idx]
            q = 0.6 * q + 0.4 * prev if step > 0 else q
            pskd_table[idx] = logits.detach().softmax(-1)
            loss = -(q * logits.log_softmax(-1)).sum(-1).mean()
        else:
            loss = F.cross_entropy(logits, y, label_smoothing=0.1 if "ls" in methods else 0.0)
        if "elr" in methods:
            p = logits.softmax(-1).clamp(1e-4, 1 - 1e-4)
            pd = p.detach()
            elr_table[idx] = 0.7 * elr_table[idx] + 0.3 * pd / pd.sum(1, keepdim=True)
            loss = loss + 3.0 * (1 - (elr_table[idx] * p).sum(1)).log().mean()
        if "cons" in methods:
            q = (logits.detach() / 0.4).softmax(-1)
            mask = (q.max(1).values >= 0.8).float()
            student = model(_patch_mask(x)).log_softmax(-1)
            kl = (q * (q.clamp_min(1e-8).log() - student)).sum(1)
            loss = loss + (mask * kl).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if "clip" in methods:
            torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        opt.step()
        if "ema" in methods:
            with torch.no_grad():
                torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - 0.999)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[warmup:])


def _arms() -> dict[str, tuple[str, Callable[[], list[Callback]], str]]:
    """name -> (hand-written method key, callback factory, note)."""
    from lightning_reg import (
        ELR,
        PSKD,
        EarlyDropout,
        EMATeacher,
        GradientClipping,
        LabelSmoothing,
        NoisyLabelConsistency,
    )

    return {
        "LabelSmoothing": ("ls", lambda: [LabelSmoothing(0.1)], ""),
        "EMATeacher": ("ema", lambda: [EMATeacher(decay=0.999, eval_with_ema=False)], ""),
        "EarlyDropout": ("dropout", lambda: [EarlyDropout(p=0.1, cutoff_steps=100)], ""),
        "GradientClipping": ("clip", lambda: [GradientClipping()], ""),
        "PSKD": ("pskd", lambda: [PSKD(alpha_T=0.8, schedule_unit="step")], ""),
        "ELR": ("elr", lambda: [ELR(beta=0.7, lam=3.0)], ""),
        "NoisyLabelConsistency": (
            "cons",
            lambda: [NoisyLabelConsistency(teacher="self")],
            "includes the method's own extra forward on the masked view",
        ),
        "all six": (
            "all",
            lambda: [
                EarlyDropout(p=0.1, cutoff_steps=100),
                EMATeacher(decay=0.999, eval_with_ema=False),
                PSKD(alpha_T=0.8, schedule_unit="step"),
                GradientClipping(),
                ELR(beta=0.7, lam=3.0),
                NoisyLabelConsistency(teacher="self"),
            ],
            "includes the consistency extra forward in both columns",
        ),
    }


def run(suite: str = "quick") -> dict[str, Any]:
    steps, warmup, rounds = (60, 5, 3) if suite == "quick" else (120, 10, 5)
    arms = _arms()
    old_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: steadier step times on a shared 2-core machine
    rows, records = [], []
    base_l: list[float] = []
    base_h: list[float] = []
    per: dict[str, tuple[list[float], list[float]]] = {k: ([], []) for k in arms}
    for _ in range(rounds):  # interleave arms so machine noise hits all of them alike
        base_l.append(lightning_step_time([], steps, warmup))
        base_h.append(hand_step_time("none", steps, warmup))
        for name, (key, factory, _) in arms.items():
            per[name][0].append(lightning_step_time(factory(), steps, warmup))
            per[name][1].append(hand_step_time(key, steps, warmup))
    torch.set_num_threads(old_threads)
    lb, hb = statistics.median(base_l), statistics.median(base_h)
    for name, (lt, ht) in per.items():
        l_cb, h_cb = statistics.median(lt), statistics.median(ht)
        lightning_cost, inherent = l_cb / lb - 1, h_cb / hb - 1
        bookkeeping = lightning_cost - inherent
        target = 0.10 if name == "all six" else 0.05
        records.append({"name": name, "bookkeeping": bookkeeping, "target": target})
        rows.append(
            (
                name,
                f"{l_cb * 1e3:.2f}",
                f"{h_cb * 1e3:.2f}",
                f"{lightning_cost * 100:+.1f} %",
                f"{inherent * 100:+.1f} %",
                f"{bookkeeping * 100:+.1f} %",
                "yes" if bookkeeping <= target else "no",
                arms[name][2],
            )
        )
    header = [
        "callback",
        "Lightning ms/step",
        "hand-written ms/step",
        "callback cost vs no callback",
        "method's inherent cost (hand)",
        "bookkeeping overhead",
        "within target",
        "note",
    ]
    md = (
        f"Small CNN (SmallCNN channels [16, 32]), batch {BATCH}, Fashion-MNIST, CPU. Baselines: Lightning "
        f"{lb * 1e3:.2f} ms/step, plain PyTorch {hb * 1e3:.2f} ms/step; medians of {steps} steps × {rounds} "
        "interleaved rounds, 1 torch thread.\n\n"
        + markdown_table(header, rows)
        + "\n\nBookkeeping overhead = (Lightning with callback / Lightning without − 1) − (hand-written method /"
        " plain loop − 1): the cost our callbacks add beyond the method's own arithmetic. Targets: ≤ 5 % each,"
        " ≤ 10 % for all six composed. On a 2-core CPU, differences of a few percent are within run-to-run noise. "
        + load_note()
    )
    singles = [r for r in records if r["name"] != "all six"]
    worst = max(singles, key=lambda r: r["bookkeeping"])
    over = [r["name"] for r in singles if r["bookkeeping"] > r["target"]]
    composed = next(r for r in records if r["name"] == "all six")
    claims = [
        {
            "technique": "every callback (overhead)",
            "claim": "(issue target) bookkeeping ≤ 5 % of the step for each callback",
            "measured": f"worst {worst['name']} {100 * worst['bookkeeping']:+.1f} %"
            + (f"; over target: {', '.join(over)}" if over else ""),
            "verdict": "yes" if not over else "no",
        },
        {
            "technique": "all six composed (overhead)",
            "claim": "(issue target) bookkeeping ≤ 10 % of the step, excluding the inherent extra forwards",
            "measured": f"{100 * composed['bookkeeping']:+.1f} %",
            "verdict": "yes" if composed["bookkeeping"] <= composed["target"] else "no",
        },
    ]
    return {"title": "Overhead per training step", "markdown": md, "rows": records, "claims": claims}


if __name__ == "__main__":
    from rich.console import Console
    from rich.markdown import Markdown

    Console().print(Markdown(run("quick")["markdown"]))
