"""Gradient clipping throughput: every rule vs ``torch.nn.utils.clip_grad_norm_``, timm's AGC and the memory bound.

Two gradient sets, side by side in one process: ResNet-50's 161 parameter
tensors (25.6M parameters) and a ViT-S/16-like transformer (152 tensors,
22.1M). Each method runs on the same tensors, interleaved round by round, and
we report the median time per call. Clipping coefficients are kept at 1 (a huge
threshold) so repeated in-place calls cannot drift into denormals; every kernel
still runs, since none of the implementations branches on the values.

The bandwidth bound is the time of the memory traffic a rule cannot avoid,
measured on one contiguous buffer of the same size: one read of the gradients
(the norm) plus one read-and-write (the scale), and for AGC one more read (the
weights). Run ``python -m benchmarks.clipping [quick|full] [--device cuda]``; on a GPU each timed call ends
with ``torch.cuda.synchronize()``.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from benchmarks.common import load_note, markdown_table, rich_table, torch_threads
from lightning_reg.callbacks.clipping import GradientClipping
from lightning_reg.functional.clipping import TensorBuckets, adaptive_clip_grad_, clip_grad_norm_

__all__ = ["resnet50_shapes", "run", "vit_small_shapes"]

CPU = torch.device("cpu")  #: the default device of the timed tensors

HUGE = 1e9  # a threshold that never clips: coefficient 1, same kernels


def resnet50_shapes() -> list[tuple[str, tuple[int, ...]]]:
    """torchvision's ResNet-50 parameters (names and shapes): 161 tensors, 25,557,032 parameters."""
    out: list[tuple[str, tuple[int, ...]]] = [
        ("conv1.weight", (64, 3, 7, 7)),
        ("bn1.weight", (64,)),
        ("bn1.bias", (64,)),
    ]
    inp = 64
    for li, (planes, blocks) in enumerate([(64, 3), (128, 4), (256, 6), (512, 3)], start=1):
        for b in range(blocks):
            p = f"layer{li}.{b}"
            width = planes * 4
            out += [
                (f"{p}.conv1.weight", (planes, inp, 1, 1)),
                (f"{p}.bn1.weight", (planes,)),
                (f"{p}.bn1.bias", (planes,)),
            ]
            out += [(f"{p}.conv2.weight", (planes, planes, 3, 3)), (f"{p}.bn2.weight", (planes,))]
            out += [(f"{p}.bn2.bias", (planes,)), (f"{p}.conv3.weight", (width, planes, 1, 1))]
            out += [(f"{p}.bn3.weight", (width,)), (f"{p}.bn3.bias", (width,))]
            if b == 0:
                out += [(f"{p}.downsample.0.weight", (width, inp, 1, 1))]
                out += [(f"{p}.downsample.1.weight", (width,)), (f"{p}.downsample.1.bias", (width,))]
            inp = width
    out += [("fc.weight", (1000, 2048)), ("fc.bias", (1000,))]
    return out


def vit_small_shapes(
    depth: int = 12, dim: int = 384, mlp: int = 1536, classes: int = 1000
) -> list[tuple[str, tuple[int, ...]]]:
    """A ViT-S/16-like transformer (timm naming): 152 tensors, 22.05M parameters."""
    out: list[tuple[str, tuple[int, ...]]] = [
        ("cls_token", (1, 1, dim)),
        ("pos_embed", (1, 197, dim)),
        ("patch_embed.proj.weight", (dim, 3, 16, 16)),
        ("patch_embed.proj.bias", (dim,)),
    ]
    for b in range(depth):
        p = f"blocks.{b}"
        out += [(f"{p}.norm1.weight", (dim,)), (f"{p}.norm1.bias", (dim,))]
        out += [(f"{p}.attn.qkv.weight", (3 * dim, dim)), (f"{p}.attn.qkv.bias", (3 * dim,))]
        out += [(f"{p}.attn.proj.weight", (dim, dim)), (f"{p}.attn.proj.bias", (dim,))]
        out += [(f"{p}.norm2.weight", (dim,)), (f"{p}.norm2.bias", (dim,))]
        out += [(f"{p}.mlp.fc1.weight", (mlp, dim)), (f"{p}.mlp.fc1.bias", (mlp,))]
        out += [(f"{p}.mlp.fc2.weight", (dim, mlp)), (f"{p}.mlp.fc2.bias", (dim,))]
    out += [("norm.weight", (dim,)), ("norm.bias", (dim,)), ("head.weight", (classes, dim)), ("head.bias", (classes,))]
    return out


def _timm_agc() -> tuple[Callable[..., None], str]:
    """timm's ``adaptive_clip_grad``, loaded from its single file (``import timm`` needs torchvision)."""
    spec = importlib.util.find_spec("timm")
    path = Path(spec.origin).parent / "utils" / "agc.py" if spec is not None and spec.origin else None
    if path is not None and path.exists():
        mod_spec = importlib.util.spec_from_file_location("_timm_agc", path)
        assert mod_spec is not None and mod_spec.loader is not None
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
        return module.adaptive_clip_grad, "timm `adaptive_clip_grad`"

    def loop_agc(parameters: list[Tensor], clip_factor: float = 0.01, eps: float = 1e-3) -> None:
        # timm's per-parameter loop, re-implemented minimally (timm is not installed).
        for p in parameters:
            if p.grad is None:
                continue
            dims = tuple(range(1, p.dim())) if p.dim() > 1 else None
            w_norm = p.detach().norm(dim=dims, keepdim=True) if dims else p.detach().norm()
            g_norm = p.grad.norm(dim=dims, keepdim=True) if dims else p.grad.norm()
            max_norm = w_norm.clamp(min=eps) * clip_factor
            clipped = p.grad * (max_norm / g_norm.clamp(min=1e-6))
            p.grad.copy_(torch.where(g_norm < max_norm, p.grad, clipped))

    return loop_agc, "per-parameter loop (timm's algorithm, re-implemented: timm not installed)"


def _params(
    shapes: list[tuple[str, tuple[int, ...]]], seed: int = 0, device: torch.device = CPU
) -> tuple[list[nn.Parameter], list[str]]:
    g = torch.Generator().manual_seed(seed)
    params, names = [], []
    for name, shape in shapes:
        p = nn.Parameter((torch.randn(shape, generator=g) * 0.05).to(device))
        p.grad = (torch.randn(shape, generator=g) * 1e-3).to(device)
        params.append(p)
        names.append(name)
    return params, names


def _interleaved(
    methods: dict[str, Callable[[], Any]], rounds: int, warmup: int = 2, sync: Callable[[], None] | None = None
) -> dict[str, float]:
    """Median seconds per method, timing one call of each per round so load spikes hit all alike."""
    for fn in methods.values():
        for _ in range(warmup):
            fn()
    if sync is not None:
        sync()
    times: dict[str, list[float]] = {k: [] for k in methods}
    for _ in range(rounds):
        for name, fn in methods.items():
            t0 = time.perf_counter()
            fn()
            if sync is not None:  # on a GPU: the time of the work, not of queueing it
                sync()
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def _bench_set(
    label: str,
    shapes: list[tuple[str, tuple[int, ...]]],
    rounds: int,
    timm_agc: Callable[..., None],
    device: torch.device = CPU,
) -> dict[str, Any]:
    params, names = _params(shapes, device=device)
    grads: list[Tensor] = [p.grad for p in params if p.grad is not None]
    assert len(grads) == len(params)
    numel = sum(p.numel() for p in params)
    buckets = TensorBuckets(grads)
    buf = torch.randn(numel, device=device) * 1e-3
    cbs = {
        rule: GradientClipping(max_norm=HUGE, rule=rule, clip_factor=HUGE)  # type: ignore[arg-type]
        for rule in ("norm", "value", "component", "agc", "auto")
    }
    cb_ignore = GradientClipping(max_norm=HUGE, nonfinite="ignore")
    cb_tele = GradientClipping(max_norm=HUGE)

    def ours(cb: GradientClipping, **kw: Any) -> Callable[[], Any]:
        return lambda: cb.clip_(params, names, key=label, telemetry=False, **kw)

    methods: dict[str, Callable[[], Any]] = {
        "bound: read (norm)": lambda: torch.linalg.vector_norm(buf),
        "bound: read+write (scale)": lambda: buf.mul_(1.0),
        "torch clip_grad_norm_(foreach=True)": lambda: torch.nn.utils.clip_grad_norm_(params, HUGE, foreach=True),
        "ours clip_grad_norm_ (functional)": lambda: clip_grad_norm_(grads, HUGE, buckets=buckets),
        "GradientClipping norm": ours(cbs["norm"]),
        "GradientClipping norm, nonfinite=ignore": ours(cb_ignore),
        "GradientClipping norm + telemetry": lambda: cb_tele.clip_(params, names, key=label, telemetry=True),
        "GradientClipping value": ours(cbs["value"]),
        "GradientClipping component": ours(cbs["component"]),
        "GradientClipping auto": ours(cbs["auto"]),
        "timm adaptive_clip_grad (all params)": lambda: timm_agc(params, clip_factor=HUGE),
        "ours adaptive_clip_grad_ (functional, all params)": lambda: adaptive_clip_grad_(params, grads, HUGE),
        "GradientClipping agc (head excluded)": ours(cbs["agc"]),
    }
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None
    t = _interleaved(methods, rounds, sync=sync)
    read, rw = t["bound: read (norm)"], t["bound: read+write (scale)"]
    bound = {"norm": read + rw, "agc": 2 * read + rw}
    torch_t = t["torch clip_grad_norm_(foreach=True)"]
    timm_t = t["timm adaptive_clip_grad (all params)"]
    rows = []
    for name, sec in t.items():
        if name.startswith("bound"):
            continue
        is_agc = "agc" in name.lower() or "adaptive" in name
        b = bound["agc"] if is_agc else bound["norm"]
        rows.append(
            {
                "set": label,
                "method": name,
                "ms": sec * 1e3,
                "vs_torch": sec / torch_t,
                "vs_timm": (timm_t / sec) if is_agc else None,
                "vs_bound": sec / b,
            }
        )
    return {
        "label": label,
        "tensors": len(params),
        "params": numel,
        "read_ms": read * 1e3,
        "rw_ms": rw * 1e3,
        "bound_ms": {k: v * 1e3 for k, v in bound.items()},
        "rows": rows,
    }


def run(suite: str = "quick", device: str = "cpu") -> dict[str, Any]:
    """Time every rule on both gradient sets; quick ≈ 1 min on 2 busy cores. ``device="cuda"``: on a GPU."""
    rounds = 7 if suite == "quick" else 25
    dev = torch.device(device)
    torch.set_flush_denormal(True)
    timm_agc, timm_label = _timm_agc()
    with torch_threads(1), torch.no_grad():  # one thread: stable ratios on a shared box (see the reading below)
        sets = [
            _bench_set("ResNet-50", resnet50_shapes(), rounds, timm_agc, dev),
            _bench_set("ViT-S/16-like", vit_small_shapes(), rounds, timm_agc, dev),
        ]
    rows = [r for s in sets for r in s["rows"]]

    def fmt(x: float | None, unit: str = "×") -> str:
        return "" if x is None else f"{x:.2f}{unit}"

    header = ["set", "method", "ms / call", "÷ torch clip_grad_norm_", "timm AGC ÷ this", "÷ bandwidth bound"]
    table = markdown_table(
        header,
        [
            (r["set"], r["method"], f"{r['ms']:.1f}", fmt(r["vs_torch"]), fmt(r["vs_timm"]), fmt(r["vs_bound"]))
            for r in rows
        ],
    )
    sizes = markdown_table(
        ["set", "tensors", "parameters", "read ms", "read+write ms", "bound: norm rules ms", "bound: AGC ms"],
        [
            (
                s["label"],
                s["tensors"],
                f"{s['params'] / 1e6:.2f}M",
                f"{s['read_ms']:.1f}",
                f"{s['rw_ms']:.1f}",
                f"{s['bound_ms']['norm']:.1f}",
                f"{s['bound_ms']['agc']:.1f}",
            )
            for s in sets
        ],
    )

    def pick(label: str, method: str, key: str) -> float:
        return next(r[key] for r in rows if r["set"] == label and r["method"] == method)

    norm_ratio = max(pick(s["label"], "GradientClipping norm, nonfinite=ignore", "vs_torch") for s in sets)
    norm_skip_ratio = max(pick(s["label"], "GradientClipping norm", "vs_torch") for s in sets)
    agc_speedup = min(pick(s["label"], "ours adaptive_clip_grad_ (functional, all params)", "vs_timm") for s in sets)
    timm_floor = min(pick(s["label"], "timm adaptive_clip_grad (all params)", "vs_bound") for s in sets)
    worst_bound = max(
        (r for r in rows if r["method"].startswith(("GradientClipping", "ours"))), key=lambda r: r["vs_bound"]
    )
    reading = (
        f"Single-threaded (`torch.set_num_threads(1)`), {rounds} interleaved rounds, median per call; only the"
        " side-by-side ratios are meaningful on a shared machine. Norm clipping"
        f" costs {norm_ratio:.2f}× `clip_grad_norm_(foreach=True)` at worst with `nonfinite='ignore'` (same"
        f" passes: one fp32 `_foreach_norm`, one `_foreach_mul_`), and {norm_skip_ratio:.2f}× with the default"
        " `nonfinite='skip'` (on CPU it reads one flag; on GPU it would add a masked fill instead). The callback's"
        " extra work per step (the counters, the cached plan) is tiny next to the gradient passes; telemetry steps"
        " add no pass for the norm rules (the post-clip norm is computed from the coefficients). AGC is"
        f" {agc_speedup:.1f}× faster than {timm_label} at worst: both read the weights and the gradients once for"
        " the unit norms, but timm then allocates two gradient-sized temporaries (`g * ratio` and `torch.where`)"
        " and copies back, while ours multiplies in place by the broadcast unit coefficients. The issue's 4× target"
        f" is below the memory floor on this CPU: timm runs at {timm_floor:.2f}× the AGC bound (read W, read G,"
        " read+write G), so no exact AGC can be more than that much faster. The slowest rule is"
        f" `{worst_bound['method']}` on {worst_bound['set']} at {worst_bound['vs_bound']:.2f}× the bandwidth bound"
        " (the bound streams one contiguous buffer; per-tensor kernels over 150+ tensors cannot quite reach it)."
        " `value` clamps each tensor once on CPU (two foreach clamps on GPU) after one max-abs read."
    )
    if dev.type != "cpu":
        name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else str(dev)
        reading = (
            f"Device: {name}; each timed call ends with a device synchronisation (these are the `clip_` calls"
            " alone: the hook's one flag read per step with `nonfinite='skip'` is not in them). " + reading
        )
    claims = [
        {
            "technique": "GradientClipping",
            "claim": "norm clipping ≤ 1.2× `clip_grad_norm_(foreach=True)` (our speed target)",
            "measured": f"{norm_ratio:.2f}× (nonfinite='ignore'); {norm_skip_ratio:.2f}× with 'skip'",
            "verdict": "yes" if norm_ratio <= 1.2 else "no",
        },
        {
            "technique": "GradientClipping",
            "claim": "AGC ≥ 4× faster than timm's `adaptive_clip_grad` (our speed target)",
            "measured": f"{agc_speedup:.1f}×",
            "verdict": "yes" if agc_speedup >= 4 else "no",
        },
        {
            "technique": "GradientClipping",
            "claim": "every rule ≤ 2× the read+scale bandwidth bound (our speed target)",
            "measured": f"worst {worst_bound['vs_bound']:.2f}× ({worst_bound['method']}, {worst_bound['set']})",
            "verdict": "yes" if worst_bound["vs_bound"] <= 2 else "no",
        },
    ]
    reading += " " + load_note()
    markdown = "\n\n".join(["### Gradient sets and the bandwidth bound", sizes, "### Time per call", table, reading])
    return {
        "title": "Gradient clipping: throughput of every rule",
        "markdown": markdown,
        "rows": rows,
        "claims": claims,
        "sets": [{k: v for k, v in s.items() if k != "rows"} for s in sets],
        "timm": timm_label,
    }


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.clipping", description="Gradient clipping speed.")
    parser.add_argument("suite", nargs="?", choices=["quick", "full"], default="quick")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    return parser.parse_args(argv)


if __name__ == "__main__":
    from rich.console import Console

    args = _parse(sys.argv[1:])
    out = run(args.suite, device=args.device)
    console = Console()
    console.print(
        rich_table(
            out["title"],
            ["set", "method", "ms", "÷ torch", "timm ÷ this", "÷ bound"],
            [
                (
                    r["set"],
                    r["method"],
                    f"{r['ms']:.1f}",
                    f"{r['vs_torch']:.2f}",
                    "" if r["vs_timm"] is None else f"{r['vs_timm']:.2f}",
                    f"{r['vs_bound']:.2f}",
                )
                for r in out["rows"]
            ],
        )
    )
    for c in out["claims"]:
        console.print(f"- {c['claim']}: {c['measured']} ({c['verdict']})")
    console.print(out["markdown"].split("\n\n")[-1])
