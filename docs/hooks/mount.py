"""MkDocs hook: serve repository files that live outside ``docs/``, and keep links to them working.

Mounted into the site:

* ``notebooks/*.ipynb`` as pages ``notebooks/<name>/`` (mkdocs-jupyter renders them, and executes them unless
  ``LIGHTNING_REG_DOCS_EXECUTE=false``);
* ``benchmarks/plots/*.png`` as ``plots/<name>.png``, where the included ``benchmarks/RESULTS.md``
  (``docs/benchmarks.md``) finds them.

Pages link to repository files by their path in the repository (``../../benchmarks/RESULTS.md#...``,
``../../notebooks/02_noisy_labels.ipynb``), so the same Markdown works on GitHub. For the site, such links are
rewritten to the page that shows the file (``benchmarks.md``, ``changelog.md``, the mounted notebooks and
plots). A link to any other file outside ``docs/`` is left alone, and the strict build reports it.

The notebooks run in their fast mode (``LIGHTNING_REG_NB_FAST=1``: tiny budgets) unless the environment sets
it, write their files to a temporary folder unless ``LIGHTNING_REG_NB_OUT`` is set, and print no fit-start
summary.
"""

from __future__ import annotations

import os
import posixpath
import re
import tempfile
from pathlib import Path
from typing import Any

from mkdocs.plugins import event_priority
from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
#: Folders mounted into the site: (folder in the repository, glob, folder in the site).
MOUNTS = [("notebooks", "*.ipynb", "notebooks"), ("benchmarks/plots", "*.png", "plots")]
#: Repository files shown by a page of the site: (file in the repository, page).
PAGES = {"benchmarks/RESULTS.md": "benchmarks.md", "CHANGELOG.md": "changelog.md"}

_LINK = re.compile(r"(\]\()([^)\s#]+)(#[^)\s]*)?(\))")


def on_config(config: Any) -> Any:
    os.environ.setdefault("LIGHTNING_REG_NB_FAST", "1")
    os.environ.setdefault("LIGHTNING_REG_SUMMARY", "0")
    if "LIGHTNING_REG_NB_OUT" not in os.environ:
        os.environ["LIGHTNING_REG_NB_OUT"] = tempfile.mkdtemp(prefix="lightning-reg-docs-")
    return config


@event_priority(100)  # before mkdocs-jupyter's on_files, so it turns the mounted notebooks into pages
def on_files(files: Files, config: Any) -> Files:
    for folder, pattern, dest in MOUNTS:
        assert folder == dest or folder.endswith("/" + dest), (folder, dest)
        src_dir = ROOT / folder[: len(folder) - len(dest)]  # so that src_dir / dest / name is the file
        for path in sorted((ROOT / folder).glob(pattern)):
            uri = f"{dest}/{path.name}"
            if files.get_file_from_path(uri) is None:
                files.append(File(uri, str(src_dir), config["site_dir"], config["use_directory_urls"]))
    return files


def site_path(repo_path: str) -> str | None:
    """Where the repository file ``repo_path`` (POSIX, relative to the root) is in the site, or ``None``."""
    if repo_path in PAGES:
        return PAGES[repo_path]
    for folder, _, dest in MOUNTS:
        if repo_path.startswith(folder + "/"):
            return dest + repo_path[len(folder) :]
    return None


def rewrite_links(markdown: str, src_uri: str) -> str:
    """Point the links of page ``src_uri`` (relative to ``docs/``) at repository files to their site pages."""
    page_dir = posixpath.dirname(src_uri)

    def fix(match: re.Match[str]) -> str:
        target = match.group(2)
        if "://" in target or target.startswith(("/", "mailto:")):
            return match.group(0)
        repo = posixpath.normpath(posixpath.join("docs", page_dir, target))
        if repo.startswith("docs/") or repo.startswith(".."):
            return match.group(0)
        dest = site_path(repo)
        if dest is None:
            return match.group(0)
        rel = posixpath.relpath(dest, page_dir or ".")
        return f"{match.group(1)}{rel}{match.group(3) or ''}{match.group(4)}"

    return _LINK.sub(fix, markdown)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    if not page.file.src_uri.endswith(".md"):
        return markdown
    return rewrite_links(markdown, page.file.src_uri)
