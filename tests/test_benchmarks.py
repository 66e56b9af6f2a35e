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


def test_merge_drops_a_benchmarks_earlier_claims_when_their_text_changes(tmp_path: Path) -> None:
    from benchmarks.__main__ import RETIRED_CLAIMS, merge_results, write_results

    path = tmp_path / "RESULTS.md"
    retired = next(iter(RETIRED_CLAIMS))
    old = {
        "name": "n",
        "title": "New",
        "command": "cmd",
        "markdown": "old",
        "claims": [
            {"technique": "T", "claim": "target 5 %", "measured": "1", "verdict": "yes"},
            {"technique": retired, "claim": "r", "measured": "2", "verdict": "no"},
        ],
    }
    write_results([old], "quick", 1.0, path)
    claim = {"technique": "T", "claim": "target 2 %", "measured": "3", "verdict": "no"}
    new = dict(old, markdown="new", claims=[claim])
    merge_results([new], "quick", path)
    text = path.read_text()
    assert "| T | target 2 % | 3 | no |" in text
    assert "target 5 %" not in text and retired not in text


def test_sync_docs_from_the_results_file(tmp_path: Path) -> None:
    from benchmarks.__main__ import HERE, RETIRED_CLAIMS, main, write_results

    results = [
        {
            "name": "dense",
            "title": "Dense",
            "command": "python -m benchmarks run --suite quick --only dense",
            "markdown": "| a |\n|---|\n| 1 |\n\n![dense](plots/dense.png)",
            "claims": [
                {"technique": "ADELE", "claim": "c", "measured": "m", "verdict": "yes"},
                {"technique": next(iter(RETIRED_CLAIMS)), "claim": "r", "measured": "m", "verdict": "no"},
            ],
        }
    ]
    path = tmp_path / "RESULTS.md"
    write_results(results, "quick", 1.0, path)
    root = tmp_path / "repo"
    (root / "docs" / "guides").mkdir(parents=True)
    (root / "README.md").write_text("# R\n<!-- results:claims:start -->\nold\n<!-- results:claims:end -->\ntail\n")
    page = root / "docs" / "guides" / "seg.md"
    page.write_text("x\n<!-- results:dense:start -->\n<!-- results:dense:end -->\ny\n")
    from benchmarks.__main__ import sync_docs_from_file

    assert sync_docs_from_file(path, root) == {"README.md": ["claims"], "docs/guides/seg.md": ["dense"]}
    readme = (root / "README.md").read_text()
    assert "| ADELE | c | m | yes |" in readme and "\nold\n" not in readme and "tail" in readme
    assert next(iter(RETIRED_CLAIMS)) not in readme
    body = page.read_text()
    assert "| 1 |" in body and body.startswith("x\n") and body.endswith("y\n")
    assert "plots/dense.png" in body and "](plots/" not in body  # the plot link is relative to the page
    assert (page.parent / body.split("![dense](")[1].split(")")[0]).resolve() == (HERE / "plots" / "dense.png")
    page.write_text("x\n<!-- results:dense#1:start -->\n<!-- results:dense#1:end -->\ny\n")
    sync_docs_from_file(path, root)
    table = "| a |\n|---|\n| 1 |"
    assert page.read_text() == f"x\n<!-- results:dense#1:start -->\n{table}\n<!-- results:dense#1:end -->\ny\n"
    page.write_text("x\n<!-- results:dense:start -->\n<!-- results:dense:end -->\ny\n")
    assert main(["sync-docs", "--results", str(path), "--root", str(root)]) == 0  # the command does the same
    assert "| 1 |" in page.read_text()


def test_sync_readme_after_a_run_also_fills_single_table_blocks(tmp_path: Path) -> None:
    from benchmarks.__main__ import sync_readme

    page = tmp_path / "README.md"
    page.write_text("<!-- results:dense#2:start -->\n<!-- results:dense#2:end -->\n")
    result = {"name": "dense", "markdown": "| a |\n|---|\n| 1 |\n\ntext\n\n| b |\n|---|\n| 2 |"}
    assert sync_readme([result], page, claims=False) == ["dense#2"]
    assert page.read_text() == "<!-- results:dense#2:start -->\n| b |\n|---|\n| 2 |\n<!-- results:dense#2:end -->\n"
