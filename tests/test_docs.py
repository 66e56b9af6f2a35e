"""Cheap checks of the documentation; the strict site build itself runs in scripts/test.sh (`mkdocs build --strict`).

The README stays a front page (at most 15 KB) whose technique table links to a method card for every technique,
its relative links resolve, the site's navigation lists exactly the pages in docs/, the measured blocks in the
docs are filled, and the docs hooks (link rewriting, the docstring converter) and the benchmarks' sync into the
docs do what the site relies on.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = (ROOT / "README.md").read_text()
MAX_README_BYTES = 15 * 1024


def _load(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"_docs_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _mkdocs_config() -> dict[str, Any]:
    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!ENV", lambda loader, node: None)  # mkdocs' environment tag
    return yaml.load((ROOT / "mkdocs.yml").read_text(), Loader=Loader)


def _nav_files(nav: Any) -> list[str]:
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, list):
        return [f for item in nav for f in _nav_files(item)]
    if isinstance(nav, dict):
        return [f for value in nav.values() for f in _nav_files(value)]
    return []


def _relative_links(text: str) -> list[str]:
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    return [link for link in links if "://" not in link and not link.startswith(("#", "mailto:"))]


def test_readme_is_a_front_page_of_at_most_15_kb() -> None:
    size = len(README.encode())
    assert size <= MAX_README_BYTES, f"README.md is {size} bytes; move detail into docs/ (limit {MAX_README_BYTES})"


def test_every_technique_in_the_readme_table_links_to_an_existing_method_card() -> None:
    table = README.split("## Techniques", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| technique")]
    assert len(rows) >= 10
    linked = set()
    for row in rows:
        cards = re.findall(r"\]\((docs/methods/[\w-]+\.md)\)", row)
        assert cards, f"no method card linked in: {row}"
        for card in cards:
            assert (ROOT / card).is_file(), card
            linked.add(card)
    cards = {f"docs/methods/{p.name}" for p in (DOCS / "methods").glob("*.md") if p.name != "index.md"}
    assert cards <= linked, f"method cards missing from the README table: {sorted(cards - linked)}"


@pytest.mark.parametrize("card", sorted((DOCS / "methods").glob("*.md")), ids=lambda p: p.stem)
def test_method_cards_follow_the_template(card: Path) -> None:
    if card.name == "index.md":
        return
    text = card.read_text()
    for heading in ("## How to use", "## Suggested hyperparameters", "## Technical details", "## Evidence"):
        assert heading in text, f"{card.name} lacks {heading!r}"
    assert "## Citation" in text and "arxiv.org" in text
    assert "benchmarks/RESULTS.md" in text.split("## Evidence", 1)[1] or "](" in text.split("## Evidence", 1)[1]
    assert "Until the lead exports" not in text


def test_readme_relative_links_resolve() -> None:
    for link in _relative_links(README):
        path = link.split("#", 1)[0]
        assert (ROOT / path).exists(), f"README links to a missing file: {link}"


def test_mkdocs_nav_lists_exactly_the_pages_in_docs() -> None:
    config = _mkdocs_config()
    assert config["strict"] is True and config["theme"]["font"] is False  # strict, and no web fonts (offline)
    nav = _nav_files(config["nav"])
    for page in nav:
        if page.startswith("notebooks/"):  # mounted from notebooks/ by docs/hooks/mount.py
            assert (ROOT / page).is_file(), page
        else:
            assert (DOCS / page).is_file(), page
    pages = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md") if "hooks" not in p.parts}
    assert pages == {p for p in nav if p.endswith(".md")}, "every docs page is in the nav, and only those"
    notebooks = {f"notebooks/{p.name}" for p in (ROOT / "notebooks").glob("*.ipynb")}
    assert notebooks == {p for p in nav if p.endswith(".ipynb")}, "every notebook is in the nav"


def test_benchmarks_and_changelog_pages_include_the_files_instead_of_copying_them() -> None:
    assert '--8<-- "benchmarks/RESULTS.md"' in (DOCS / "benchmarks.md").read_text()
    assert '--8<-- "CHANGELOG.md"' in (DOCS / "changelog.md").read_text()


def test_measured_blocks_in_the_docs_are_filled_and_name_a_benchmark() -> None:
    sys.path.insert(0, str(ROOT))
    from benchmarks.__main__ import BENCHMARKS

    found = set()
    for page in [ROOT / "README.md", *DOCS.rglob("*.md")]:
        text = page.read_text()
        for name in re.findall(r"<!-- results:([\w#]+):start -->", text):
            found.add(name)
            bench = name.split("#", 1)[0]  # NAME#K: the K-th table of benchmark NAME
            assert bench == "claims" or bench in BENCHMARKS, f"{page.name}: unknown benchmark block {name!r}"
            body = text.split(f"<!-- results:{name}:start -->", 1)[1].split(f"<!-- results:{name}:end -->", 1)[0]
            assert body.strip(), f"{page.name}: block {name!r} is empty; run `python -m benchmarks run --sync-docs`"
    assert {"claims", "ema", "clipping", "early_dropout", "pskd", "noisy_labels", "composition", "overhead"} <= found
    assert {"dense", "semi_supervised", "label_issues", "composition#1"} <= found


def test_sync_docs_fills_docs_pages_with_plots_relative_to_each_page(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT))
    from benchmarks.__main__ import HERE, sync_docs

    (tmp_path / "docs" / "methods").mkdir(parents=True)
    (tmp_path / "README.md").write_text("<!-- results:claims:start -->\nold\n<!-- results:claims:end -->\n")
    card = tmp_path / "docs" / "methods" / "x.md"
    card.write_text("# X\n<!-- results:x:start -->\nold\n<!-- results:x:end -->\nend\n")
    (tmp_path / "docs" / "other.md").write_text("no blocks\n")
    result = {
        "name": "x",
        "title": "X",
        "markdown": "| a |\n|---|\n| 1 |",
        "plots": [str(HERE / "plots" / "x_plot.png")],
        "claims": [{"technique": "T", "claim": "c", "measured": "m", "verdict": "yes"}],
    }
    # The pages live in tmp_path, the plots in the real benchmarks/ folder: links are relative to each page.
    assert sync_docs([result], tmp_path) == {"README.md": ["claims"], "docs/methods/x.md": ["x"]}
    text = card.read_text()
    assert "| 1 |" in text and "old" not in text and text.endswith("end\n")
    plot = re.search(r"!\[x_plot\]\(([^)]+)\)", text)
    assert plot and (card.parent / plot.group(1)).resolve() == HERE / "plots" / "x_plot.png"
    assert "| T | c | m | yes |" in (tmp_path / "README.md").read_text()
    assert sync_docs([result], tmp_path, claims=False) == {"docs/methods/x.md": ["x"]}  # a partial run


def test_mount_hook_points_repository_links_at_their_site_pages() -> None:
    pytest.importorskip("mkdocs")
    mount = _load(DOCS / "hooks" / "mount.py")
    page = "methods/elr.md"
    md = (
        "[r](../../benchmarks/RESULTS.md#elr) ![p](../../benchmarks/plots/a.png) [c](../../CHANGELOG.md)"
        " [n](../../notebooks/02_noisy_labels.ipynb) [g](../guides/cli.md#x) [y](../../configs/a.yaml)"
        " [w](https://arxiv.org/abs/1)"
    )
    assert mount.rewrite_links(md, page) == (
        "[r](../benchmarks.md#elr) ![p](../plots/a.png) [c](../changelog.md)"
        " [n](../notebooks/02_noisy_labels.ipynb) [g](../guides/cli.md#x) [y](../../configs/a.yaml)"
        " [w](https://arxiv.org/abs/1)"
    )
    assert mount.rewrite_links("[r](../benchmarks/RESULTS.md)", "index.md") == "[r](benchmarks.md)"
    # Every link that the docs make to a repository file outside docs/ is one the hook can serve.
    for page_path in DOCS.rglob("*.md"):
        src = page_path.relative_to(DOCS).as_posix()
        for link in _relative_links(mount.rewrite_links(page_path.read_text(), src)):
            target = (page_path.parent / link.split("#", 1)[0]).resolve()
            assert DOCS in target.parents or target == DOCS, f"{src} links outside the site: {link}"


def test_docstring_converter_turns_rest_into_markdown() -> None:
    pytest.importorskip("griffe")
    rst = _load(DOCS / "hooks" / "griffe_rst.py")
    text = "\n".join(
        [
            "Uses :class:`~lightning_reg.EMATeacher` and :func:`torch.lerp`, :math:`a + b`.",
            "",
            ".. math:: q = (1 - a) y",
            "",
            "Args:",
            "    a, b: Two numbers.",
            "",
            "Logged metrics:",
            "",
            "=============  ==========",
            "``ema/decay``  the decay",
            "``ema/n``      the count of",
            "               updates",
            "=============  ==========",
            "",
            "Example:",
            "    >>> 1 + 1",
            "    2",
            "",
            "YAML::",
            "",
            "    trainer: {}",
        ]
    )
    out = rst.rst_to_markdown(text)
    assert "[`EMATeacher`][lightning_reg.EMATeacher]" in out and "`torch.lerp`" in out and "`a + b`" in out
    assert "```latex\nq = (1 - a) y\n```" in out
    assert "    a: Two numbers.\n    b: Two numbers." in out
    assert "| ``ema/decay`` | the decay |" in out and "| ``ema/n`` | the count of updates |" in out
    assert "Examples:\n    >>> 1 + 1" in out
    assert "YAML:\n\n```yaml\ntrainer: {}\n```" in out
    # A target that exists but is not rendered becomes code; one that does not exist stays a (failing) reference.
    assert rst.rst_to_markdown(":data:`lightning_reg.X`", lambda t: (t, False)) == "`lightning_reg.X`"
    assert (
        rst.rst_to_markdown(":class:`lightning_reg.Nope`", lambda t: None)
        == "[`lightning_reg.Nope`][lightning_reg.Nope]"
    )
