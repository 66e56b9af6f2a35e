"""The README's examples run (tiny budgets): the two commands, the quickstart YAML through the CLI, and the Python
quickstart, segmentation and semi-supervised blocks."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from lightning_reg.cli import cli_main
from lightning_reg.core.compat import harmful_combinations
from tests.helpers import have_fashion_mnist

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


needs_data = pytest.mark.skipif(not have_fashion_mnist(), reason="Fashion-MNIST IDX files not installed")


def _section(title: str) -> str:
    """The README's text from the heading ``title`` (any level) to the next heading of the same or a higher level."""
    match = re.search(rf"^(#+) {re.escape(title)}\n", README, flags=re.M)
    assert match, f"README has no heading {title!r}"
    level = len(match.group(1))
    rest = README[match.end() :]
    end = re.search(rf"^#{{1,{level}}} ", rest, flags=re.M)
    return rest[: end.start()] if end else rest


def _blocks(lang: str, text: str = README) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def _run(code: str, replacements: dict[str, str]) -> dict[str, object]:
    for old, new in replacements.items():
        assert old in code, f"the README block no longer contains {old!r}; update this test's budget"
        code = code.replace(old, new)
    namespace: dict[str, object] = {}
    exec(compile(code, "README.md", "exec"), namespace)
    return namespace


def test_readme_opens_with_the_two_commands_and_ci_runs_the_test_command() -> None:
    bash = _blocks("bash", _section("Two commands"))
    assert bash[0].strip() == "bash scripts/setup.sh && lightning-reg fit --config configs/noisy_fashion_mnist.yaml"
    assert bash[1].strip() == "bash scripts/test.sh"
    assert (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1] == "bash scripts/test.sh"
    assert README.index("## Two commands") < README.index("## Quickstart")
    assert "lightning-reg results" in _section("Two commands")  # the measured output is shown


def test_readme_says_how_to_run_the_tests_and_serve_the_docs() -> None:
    tests = "\n".join(_blocks("bash", _section("Tests")))
    for command in ("bash scripts/test.sh", "pytest -m slow", "pytest -m gpu", "bash scripts/gpu_check.sh"):
        assert command in tests
    assert (ROOT / "scripts" / "gpu_check.sh").is_file()
    assert "mkdocs serve" in "\n".join(_blocks("bash", _section("Documentation")))


def test_readme_has_no_unfilled_placeholders() -> None:
    assert "PLACEHOLDER" not in README
    for name in re.findall(r"<!-- results:([\w#]+):start -->", README):
        body = README.split(f"<!-- results:{name}:start -->", 1)[1].split(f"<!-- results:{name}:end -->", 1)[0]
        assert body.strip(), f"README block `{name}` is empty: run `python -m benchmarks run --sync-docs`"


@needs_data
def test_readme_yaml_quickstart_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = yaml.safe_load(_blocks("yaml")[0])
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    args = ["fit", "--config", "cfg.yaml", "--trainer.fast_dev_run=true", "--data.init_args.train_subset=256"]
    cli = cli_main([*args, "--trainer.enable_progress_bar=false"])
    assert cli.trainer.state.finished and cli.trainer.global_step == 1
    names = {type(cb).__name__ for cb in cli.trainer.callbacks}
    assert {"EMATeacher", "ELR", "LabelSmoothing", "GradientClipping"} <= names


@needs_data
def test_readme_python_quickstart_runs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    code = _blocks("python", _section("Quickstart"))[0]
    assert "trainer.fit(" in code
    # Shrink the budget: one step, a small subset, no progress bar or logs.
    namespace = _run(
        code,
        {
            "max_epochs=8,": "max_epochs=1, fast_dev_run=True, enable_progress_bar=False, logger=False,",
            "train_subset=12000": "train_subset=256",
        },
    )
    trainer = namespace["trainer"]
    assert trainer.state.finished and trainer.global_step == 1  # type: ignore[attr-defined]
    assert {"EMATeacher", "ELR", "LabelSmoothing"} <= {type(cb).__name__ for cb in trainer.callbacks}  # type: ignore[attr-defined]
    assert harmful_combinations(trainer) == []  # the quickstart shows a recipe that does not fight itself


@needs_data
def test_readme_segmentation_quickstart_runs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    code = _blocks("python", _section("Segmentation"))[0]
    namespace = _run(
        code,
        {
            "num_train=3000,": "num_train=16, num_val=8, num_test=8,",
            "max_epochs=6,": "max_epochs=1, fast_dev_run=True, enable_progress_bar=False, logger=False,",
        },
    )
    trainer, model = namespace["trainer"], namespace["model"]
    assert trainer.state.finished and trainer.global_step == 1  # type: ignore[attr-defined]
    assert {"EMATeacher", "ELR"} <= {type(cb).__name__ for cb in trainer.callbacks}  # type: ignore[attr-defined]
    assert "train/loss_elr" in trainer.callback_metrics  # type: ignore[attr-defined]  # ELR ran on pixels
    assert type(model).__name__ == "SmallUNet"


@needs_data
def test_readme_semi_supervised_quickstart_runs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    code = _blocks("python", _section("Semi-supervised"))[0]
    namespace = _run(
        code,
        {
            "batch_size=64)": "batch_size=8, num_unlabeled=512)",
            "max_epochs=20,": "max_epochs=1, fast_dev_run=True, enable_progress_bar=False, logger=False,",
        },
    )
    trainer = namespace["trainer"]
    assert trainer.state.finished and trainer.global_step == 1  # type: ignore[attr-defined]
    logged = trainer.callback_metrics  # type: ignore[attr-defined]
    assert {"train/loss_pseudo_label", "pseudo_label/mask_rate"} <= set(logged)
