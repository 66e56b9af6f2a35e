"""The benchmark suite's command line: ``--help`` and a dry run (the full run is not for CI)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "benchmarks", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def test_help() -> None:
    proc = _run("run", "--help")
    assert proc.returncode == 0, proc.stderr
    assert "--suite" in proc.stdout and "quick" in proc.stdout


def test_dry_run_imports_every_benchmark(tmp_path: Path) -> None:
    proc = _run("run", "--suite", "quick", "--dry-run", "--output", str(tmp_path / "R.md"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "plan" in proc.stdout and "overhead" in proc.stdout
    assert not (tmp_path / "R.md").exists()


def test_results_writer_builds_the_claims_table(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT))
    from benchmarks.__main__ import write_results

    out = tmp_path / "R.md"
    write_results(
        [
            {
                "name": "x",
                "title": "X",
                "markdown": "| a |\n|---|\n| 1 |",
                "claims": [{"technique": "T", "claim": "c", "measured": "m", "verdict": "yes"}],
            }
        ],
        "quick",
        60.0,
        out,
    )
    text = out.read_text()
    assert "| T | c | m | yes |" in text and "## X" in text and "torch" in text


def test_sync_readme_fills_only_marked_blocks(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT))
    from benchmarks.__main__ import sync_readme

    readme = tmp_path / "README.md"
    readme.write_text(
        "intro\n<!-- results:claims:start -->\nstale claims\n<!-- results:claims:end -->\nmiddle\n"
        "<!-- results:x:start -->\nstale x\n<!-- results:x:end -->\n<!-- results:y:start -->\nkeep\n"
        "<!-- results:y:end -->\nend\n"
    )
    results = [
        {
            "name": "x",
            "title": "X",
            "markdown": "| a |\n|---|\n| 1 |",
            "claims": [{"technique": "T", "claim": "c", "measured": "m", "verdict": "yes"}],
        }
    ]
    assert sync_readme(results, readme) == ["claims", "x"]
    text = readme.read_text()
    assert "| T | c | m | yes |" in text and "| 1 |" in text and "stale" not in text
    assert "keep" in text and text.startswith("intro\n") and text.endswith("end\n")


def test_partial_sync_keeps_the_claims_table(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT))
    from benchmarks.__main__ import sync_readme

    readme = tmp_path / "README.md"
    readme.write_text("<!-- results:claims:start -->\nall claims\n<!-- results:claims:end -->\n")
    result = {"name": "x", "title": "X", "markdown": "m", "claims": [{"claim": "c", "measured": "m"}]}
    assert sync_readme([result], readme, claims=False) == []
    assert "all claims" in readme.read_text()


def test_merge_replaces_a_section_and_its_claims_and_keeps_the_rest(tmp_path: Path) -> None:
    from benchmarks.__main__ import merge_results, write_results

    def result(value: str, verdict: str) -> dict[str, Any]:
        claim = {"technique": "T", "claim": "c", "measured": value, "verdict": verdict}
        return {
            "name": "n",
            "title": "New",
            "command": "cmd",
            "markdown": f"| x |\n|---|\n| {value} |",
            "claims": [claim],
        }

    path = tmp_path / "RESULTS.md"
    old = {
        "name": "o",
        "title": "Old",
        "command": "old",
        "markdown": "kept",
        "claims": [{"technique": "O", "claim": "k", "measured": "1", "verdict": "yes"}],
    }
    write_results([old], "quick", 1.0, path)
    merge_results([result("first", "no")], "quick", path)
    merge_results([result("second", "yes")], "quick", path)
    text = path.read_text()
    assert "| O | k | 1 | yes |" in text and "kept" in text  # earlier measurements stay
    assert "| T | c | second | yes |" in text and "first" not in text  # the re-run replaces its claim and section
    assert text.count("## New") == 1 and text.count("## Old") == 1
