"""The README's examples run: the quickstart YAML through the CLI and the Python quickstart, on tiny budgets."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from lightning_reg.cli import cli_main
from tests.helpers import have_fashion_mnist

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


needs_data = pytest.mark.skipif(not have_fashion_mnist(), reason="Fashion-MNIST IDX files not installed")


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def test_readme_opens_with_the_two_commands_and_ci_runs_the_test_command() -> None:
    bash = _blocks("bash")
    assert bash[0].strip() == "bash scripts/setup.sh && lightning-reg fit --config configs/noisy_fashion_mnist.yaml"
    assert bash[1].strip() == "bash scripts/test.sh"
    assert (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1] == "bash scripts/test.sh"
    assert README.index("## Two commands") < README.index("## Quickstart")


def test_readme_has_no_unfilled_placeholders() -> None:
    assert "PLACEHOLDER" not in README
    for name in re.findall(r"<!-- results:(\w+):start -->", README):
        body = README.split(f"<!-- results:{name}:start -->", 1)[1].split(f"<!-- results:{name}:end -->", 1)[0]
        assert body.strip(), f"README block `{name}` is empty: run `python -m benchmarks run --sync-readme`"


@needs_data
def test_readme_yaml_quickstart_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = yaml.safe_load(_blocks("yaml")[0])
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    args = ["fit", "--config", "cfg.yaml", "--trainer.fast_dev_run=true", "--data.init_args.train_subset=256"]
    cli = cli_main([*args, "--trainer.enable_progress_bar=false"])
    assert cli.trainer.state.finished and cli.trainer.global_step == 1
    names = {type(cb).__name__ for cb in cli.trainer.callbacks}
    assert {"EMATeacher", "PSKD", "ELR", "NoisyLabelConsistency"} <= names


@needs_data
def test_readme_python_quickstart_runs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    code = _blocks("python")[0]
    assert "trainer.fit(" in code
    # Shrink the budget: one step, a small subset, no progress bar or logs.
    code = code.replace("max_epochs=8,", "max_epochs=1, fast_dev_run=True, enable_progress_bar=False, logger=False,")
    code = code.replace("train_subset=12000", "train_subset=256")
    namespace: dict[str, object] = {}
    exec(compile(code, "README.md", "exec"), namespace)
    trainer = namespace["trainer"]
    assert trainer.state.finished and trainer.global_step == 1  # type: ignore[attr-defined]
    assert len(trainer.callbacks) >= 6  # type: ignore[attr-defined]
