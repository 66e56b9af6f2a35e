"""Execute every notebook in fast mode (tiny budgets) so they cannot go stale; committed files carry no outputs."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

from tests.helpers import have_fashion_mnist  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def _builder():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("_nb_build", ROOT / "notebooks" / "_build.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_five_notebooks_exist_and_match_the_generator() -> None:
    names = [p.name for p in NOTEBOOKS]
    assert names == sorted(_builder().NOTEBOOKS), names
    assert _builder().main(check=True) == 0, "run `python notebooks/_build.py`"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_committed_notebook_has_no_outputs(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: outputs not stripped"


@pytest.mark.skipif(not have_fashion_mnist(), reason="Fashion-MNIST IDX files not installed")
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_in_fast_mode(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIGHTNING_REG_NB_FAST", "1")
    monkeypatch.setenv("LIGHTNING_REG_NB_OUT", str(tmp_path))
    monkeypatch.setenv("LIGHTNING_REG_SUMMARY", "0")
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "2"))
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    )
    client.execute()
    images = [
        out
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.outputs
        if out.get("output_type") in ("display_data", "execute_result") and "image/png" in out.get("data", {})
    ]
    assert images, f"{path.name} produced no plot"
