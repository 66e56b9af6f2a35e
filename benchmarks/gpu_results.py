"""The GPU check's figures: run one benchmark on a device, or assemble the parts into one markdown file.

``scripts/gpu_check.sh`` calls this module once per part, each in its own process under a time limit, then
once more to assemble what the parts wrote::

    python -m benchmarks.gpu_results part ema --device cuda --dir PARTS       # benchmarks/ema.py on the GPU
    python -m benchmarks.gpu_results part fixes --device cuda --dir PARTS     # the costs of issue 15's fixes
    python -m benchmarks.gpu_results assemble --dir PARTS --out gpu_results.md --status "tests=0 ema=0 ..."

Parts: ``ema``, ``clipping``, ``overhead`` (each benchmark's ``run("quick", device=...)``) and ``fixes``: the
per-step costs of the host-table copies (``PerSampleTable(device="cpu")`` with CUDA batches), of the EMA's
non-finite check (``EMATeacher(nonfinite=...)``) and of the one flag read per step behind
``GradientClipping(nonfinite="skip")``. A part writes ``PARTS/<name>.md``; a part that fails or times out
leaves none, and the assembled file says so next to the exit code the script recorded.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import functools
import platform
import statistics
import sys
import time
import traceback
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import markdown_table

__all__ = ["assemble", "fixes", "main", "run_part"]

PARTS = ("ema", "clipping", "overhead", "fixes")
#: (width, depth, batch) of the MLPs whose training step is timed with and without the clipping flag read.
MLPS = ((512, 4, 64), (4096, 8, 1024))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _per_call_ms(fn: Callable[[], Any], device: torch.device, calls: int = 50, rounds: int = 5) -> float:
    """Median over ``rounds`` of the time of ``calls`` back-to-back calls (one device sync at the end), per call."""
    for _ in range(3):
        fn()
    _sync(device)
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        _sync(device)
        times.append((time.perf_counter() - t0) / calls)
    return statistics.median(times) * 1e3


def _table_costs(device: torch.device) -> list[list[str]]:
    from lightning_reg.core.table import PerSampleTable

    n, c, b = 100_000, 1000, 256
    g = torch.Generator(device=device).manual_seed(0)
    rows = []
    for where in ("auto", "cpu"):
        table = PerSampleTable(num_samples=n, num_columns=c, device=where).allocate(device=device)
        idx = torch.randperm(n, device=device, generator=g)[:b]
        values = torch.softmax(torch.randn(b, c, device=device, generator=g), dim=1)

        def step(table: PerSampleTable = table, idx: torch.Tensor = idx, values: torch.Tensor = values) -> None:
            table.read(idx)
            table.write(idx, values)

        label = "on the GPU (`device='auto'`)" if where == "auto" else "in pinned host memory (`device='cpu'`)"
        rows.append([f"table {label}", f"read + write of {b} rows × {c}", f"{_per_call_ms(step, device):.3f}"])
    return rows


def _ema_costs(device: torch.device) -> list[list[str]]:
    from lightning.pytorch.strategies import SingleDeviceStrategy

    from benchmarks.ema import ParamSet, resnet50_shapes
    from lightning_reg.callbacks.ema import EMATeacher

    model = ParamSet(resnet50_shapes()).to(device)
    fake = types.SimpleNamespace(strategy=SingleDeviceStrategy(device=device))
    rows = []
    for policy, note in (
        ("ignore", "no check (the old behaviour)"),
        ("skip", "device-side check and masked update, no host sync (the default)"),
        ("raise", "check read on the host: one sync per update"),
    ):
        ema = EMATeacher(decay=0.999, warmup="none", nonfinite=policy)  # type: ignore[arg-type]
        ema._bind(fake, model, carry_over=False)  # type: ignore[arg-type]
        ms = _per_call_ms(functools.partial(ema._apply, 0.999), device)
        rows.append([f"EMATeacher(nonfinite={policy!r})", f"ResNet-50 update (25.6M fp32); {note}", f"{ms:.3f}"])
    return rows


def _train_step(net: torch.nn.Module, opt: Any, x: torch.Tensor, clip: Any, read_flag: bool) -> None:
    opt.zero_grad(set_to_none=True)
    net(x).square().mean().backward()
    out = clip.clip_(list(net.parameters()), telemetry=False)
    if read_flag and not bool(out["finite"]):  # what the hook does with nonfinite="skip": one host read per step
        return
    opt.step()


def _clip_sync_costs(device: torch.device) -> list[list[str]]:
    from lightning_reg.callbacks.clipping import GradientClipping

    rows = []
    for width, depth, batch in MLPS:
        torch.manual_seed(0)
        layers: list[torch.nn.Module] = []
        for _ in range(depth):
            layers += [torch.nn.Linear(width, width), torch.nn.ReLU()]
        net = torch.nn.Sequential(*layers).to(device)
        opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)
        x = torch.randn(batch, width, device=device)
        clip = GradientClipping(max_norm=1.0, nonfinite="ignore")

        plain = _per_call_ms(functools.partial(_train_step, net, opt, x, clip, False), device, calls=30)
        synced = _per_call_ms(functools.partial(_train_step, net, opt, x, clip, True), device, calls=30)
        label = f"MLP {depth}×{width}, batch {batch}"
        rows.append(["training step, clipping without the flag read", label, f"{plain:.3f}"])
        rows.append(["training step + one flag read (`nonfinite='skip'`)", label, f"{synced:.3f}"])
    return rows


def fixes(device: str = "cuda") -> dict[str, Any]:
    """Per-step costs of issue 15's fixes on ``device``: host tables, the EMA's check, the clipping flag read."""
    dev = torch.device(device)
    rows: list[list[str]] = []
    notes: list[str] = []
    for name, fn in (("tables", _table_costs), ("EMA", _ema_costs), ("clipping", _clip_sync_costs)):
        try:
            rows += fn(dev)
        except Exception:  # keep the other measurements
            notes.append(f"**{name} failed**:\n\n```\n{traceback.format_exc()[-2000:]}\n```")
    md = (
        "Milliseconds per call: the median over 5 rounds of 50 (30 for the training steps) back-to-back calls"
        " with one device synchronisation at the end of each round, so a host sync inside a call shows up as"
        " lost overlap.\n\n" + markdown_table(["what", "setting", "ms / call"], rows)
    )
    if notes:
        md += "\n\n" + "\n\n".join(notes)
    return {"title": "Costs of issue 15's fixes", "markdown": md}


def run_part(name: str, device: str) -> dict[str, Any]:
    """Run one part and return its ``{"title", "markdown"}``."""
    if name == "fixes":
        return fixes(device)
    import importlib

    module = importlib.import_module(f"benchmarks.{name}")
    return dict(module.run("quick", device=device))


def _device_line() -> str:
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return f"{torch.cuda.get_device_name(0)} ({props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda})"
    return "none (no CUDA device)"


def _pytest_summary(log: Path) -> list[str]:
    if not log.is_file():
        return ["_no pytest log_"]
    lines = log.read_text(errors="replace").splitlines()
    keep = [ln for ln in lines if ln.startswith(("FAILED", "ERROR"))][:40]
    tail = [ln for ln in lines[-5:] if ("passed" in ln or "failed" in ln or "error" in ln or "skipped" in ln)]
    return ["```", *keep, *tail, "```"] if keep or tail else ["_pytest printed no summary_"]


def _code(value: str) -> str:
    """An exit code as the report shows it."""
    if value == "0":
        return "0 (ok)"
    if value == "skipped":
        return "skipped (no CUDA device)"
    if value == "124":
        return "124 (timed out)"
    return f"{value} (failed)"


def assemble(parts_dir: Path, out: Path, status: str, copies: list[Path]) -> str:
    """Write the markdown report from the parts in ``parts_dir`` and the exit codes in ``status``."""
    import lightning

    codes = dict(item.split("=", 1) for item in status.split() if "=" in item)
    lines = [
        "# GPU check",
        "",
        "Written by `scripts/gpu_check.sh`; do not edit by hand.",
        "",
        f"- date: {_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- GPU: {_device_line()}",
        f"- versions: python {platform.python_version()}, torch {torch.__version__}, lightning {lightning.__version__}",
        "",
        "| part | exit code |",
        "|---|---|",
        *[f"| {k} | {_code(v)} |" for k, v in codes.items()],
        "",
        "## `pytest -m gpu`",
        "",
        *_pytest_summary(parts_dir / "pytest.log"),
        "",
    ]
    for name in PARTS:
        md = parts_dir / f"{name}.md"
        if md.is_file():
            lines += [md.read_text().strip(), ""]
        else:
            lines += [
                f"## {name}",
                "",
                f"_No figures: {_code(codes.get(name, '?'))}._",
                "",
            ]
    text = "\n".join(lines)
    for path in [out, *copies]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_results", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    part = sub.add_parser("part", help="run one part and write DIR/NAME.md")
    part.add_argument("name", choices=PARTS)
    part.add_argument("--device", default="cuda")
    part.add_argument("--dir", type=Path, required=True)
    asm = sub.add_parser("assemble", help="write the markdown report from the parts")
    asm.add_argument("--dir", type=Path, required=True)
    asm.add_argument("--out", type=Path, required=True)
    asm.add_argument("--copy", type=Path, action="append", default=[])
    asm.add_argument("--status", default="")
    args = parser.parse_args(argv)
    if args.command == "assemble":
        assemble(args.dir, args.out, args.status, args.copy)
        print(f"wrote {args.out}" + "".join(f" and {c}" for c in args.copy))
        return 0
    t0 = time.perf_counter()
    out = run_part(args.name, args.device)
    args.dir.mkdir(parents=True, exist_ok=True)
    body = f"## {out['title']} ({args.device})\n\n{out['markdown'].strip()}\n\n_({time.perf_counter() - t0:.0f} s)_\n"
    (args.dir / f"{args.name}.md").write_text(body)
    print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
