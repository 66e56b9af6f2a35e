"""The ``lightning-reg`` CLI: every recipe in ``configs/`` instantiates and runs, and bad YAML fails clearly."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from lightning_reg.cli import LightningRegCLI, cli_main
from tests.helpers import have_fashion_mnist

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


needs_data = pytest.mark.skipif(not have_fashion_mnist(), reason="Fashion-MNIST IDX files not installed")


def _callback_paths(config: Path) -> list[str]:
    cfg = yaml.safe_load(config.read_text())
    return [entry["class_path"] for entry in cfg.get("trainer", {}).get("callbacks", [])]


def test_every_recipe_is_tested() -> None:
    names = {c.name for c in CONFIGS}
    assert "noisy_fashion_mnist.yaml" in names
    assert len(CONFIGS) >= 10


@needs_data
@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_recipe_runs_fast_dev_run(config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cli = cli_main(["fit", "--config", str(config), "--trainer.fast_dev_run=true", "--data.init_args.train_subset=300"])
    assert cli.trainer.state.finished
    assert cli.trainer.global_step == 1
    # Every callback of the recipe was built from its class_path.
    built = {f"{type(cb).__module__}.{type(cb).__name__}" for cb in cli.trainer.callbacks}
    for path in _callback_paths(config):
        name = path.rpartition(".")[2]
        assert any(b.endswith("." + name) for b in built), f"{path} not instantiated"
    # Recipes with a ResultsReport ran the final test and wrote the report.
    reports = [cb for cb in cli.trainer.callbacks if type(cb).__name__ == "ResultsReport"]
    if reports:
        results = reports[0].results
        assert 0.0 <= results["test_acc"] <= 1.0
        saved = json.loads((tmp_path / "results.json").read_text())
        assert saved["results"]["test_acc"] == pytest.approx(results["test_acc"])


@needs_data
def test_main_job_has_all_six_regularizers_and_the_report() -> None:
    names = {p.rpartition(".")[2] for p in _callback_paths(ROOT / "configs" / "noisy_fashion_mnist.yaml")}
    assert {"EMATeacher", "EarlyDropout", "PSKD", "GradientClipping", "ELR", "NoisyLabelConsistency"} <= names
    assert {"RichProgressBar", "ResultsReport"} <= names
    cfg = yaml.safe_load((ROOT / "configs" / "noisy_fashion_mnist.yaml").read_text())
    assert cfg["data"]["init_args"]["noise_type"] == "symmetric"
    assert cfg["data"]["init_args"]["noise_rate"] == 0.4


def _write(tmp_path: Path, cfg: dict[str, Any]) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _expect_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str], cfg: dict[str, Any], *needles: str) -> str:
    with pytest.raises(SystemExit) as info:
        cli_main(["fit", "--config", str(_write(tmp_path, cfg))])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "usage:" in err and "error:" in err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err[-2000:]
    return err


def _callbacks(*entries: dict[str, Any]) -> dict[str, Any]:
    return {"trainer": {"callbacks": list(entries)}}


def test_unknown_callback_argument_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _callbacks({"class_path": "lightning_reg.ELR", "init_args": {"betta": 0.7}})
    _expect_usage_error(tmp_path, capsys, cfg, "betta", "not accepted")


def test_out_of_range_value_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _callbacks({"class_path": "lightning_reg.ELR", "init_args": {"beta": 1.5}})
    _expect_usage_error(tmp_path, capsys, cfg, "Expected argument `beta` to be a float in [0, 1), but got 1.5.")
    cfg = {"data": {"init_args": {"noise_rate": 2.0}}}
    _expect_usage_error(tmp_path, capsys, cfg, "Expected argument `noise_rate` to be a float in [0, 1]")


def test_bad_schedule_name_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _callbacks({"class_path": "lightning_reg.LabelSmoothing", "init_args": {"schedule": "cosinus"}})
    _expect_usage_error(tmp_path, capsys, cfg, "Expected argument `schedule` to be one of")


def test_conflicting_regularizers_are_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # PS-KD stores the student's prediction per sample; mixup's mixed inputs would corrupt it.
    cfg = _callbacks({"class_path": "lightning_reg.PSKD"}, {"class_path": "lightning_reg.Mixup"})
    _expect_usage_error(tmp_path, capsys, cfg, "Conflicting regularizers `PSKD` and `Mixup`")
    # Two stateful callbacks of one type: Lightning's own check, reported the same way.
    cfg = _callbacks({"class_path": "lightning_reg.PSKD"}, {"class_path": "lightning_reg.PSKD"})
    _expect_usage_error(tmp_path, capsys, cfg, "more than one stateful callback of type `PSKD`")


def test_schedules_are_configurable_from_yaml(tmp_path: Path) -> None:
    cfg = _callbacks(
        {
            "class_path": "lightning_reg.LabelSmoothing",
            "init_args": {
                "smoothing": 0.2,
                "schedule": {
                    "class_path": "lightning_reg.core.schedules.Linear",
                    "init_args": {"start": 1.0, "end": 0.0},
                },
            },
        },
        {"class_path": "lightning_reg.ELR", "init_args": {"lam_schedule": "sigmoid_rampup"}},
    )
    cli = LightningRegCLI(args=["--config", str(_write(tmp_path, cfg))], run=False)
    ls = next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "LabelSmoothing")
    assert ls.current_smoothing(0, 10) == pytest.approx(0.2) and ls.current_smoothing(10, 10) == 0.0
    elr = next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "ELR")
    assert type(elr.lam_schedule).__name__ == "SigmoidRampUp"


def test_defaults_are_small_cnn_on_fashion_mnist() -> None:
    cli = LightningRegCLI(args=[], run=False)
    assert type(cli.model).__name__ == "SmallCNN"
    assert type(cli.datamodule).__name__ == "FashionMNISTDataModule"


def test_own_model_and_synthetic_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``model.class_path`` may name any user ``RegularizedModule``; the report works without Fashion-MNIST."""
    monkeypatch.chdir(tmp_path)
    cfg = {
        "trainer": {
            "max_epochs": 2,
            "logger": False,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "callbacks": [
                {"class_path": "lightning_reg.ELR"},
                {"class_path": "lightning_reg.ResultsReport", "init_args": {"print_table": False}},
            ],
        },
        "model": {"class_path": "tests.helpers.TinyNet", "init_args": {"num_classes": 4}},
        "data": {
            "class_path": "lightning_reg.data.datamodules.SyntheticDataModule",
            "init_args": {"num_train": 64, "num_test": 32, "num_classes": 4, "shape": [1, 8, 8], "noise_rate": 0.25},
        },
    }
    cli = cli_main(["fit", "--config", str(_write(tmp_path, cfg))])
    results = cli.trainer.callbacks[1].results
    assert results["noise_rate"] == 0.25 and "memorization" in results and results["detection_source"] == "ELR targets"
    assert 0.0 <= results["test_acc"] <= 1.0 and "test_ece" in results  # TinyNet has no test_step: evaluated directly
    assert (tmp_path / "suspected_labels.csv").exists() and (tmp_path / "test_accuracy.png").exists()


@pytest.mark.skipif(shutil.which("lightning-reg") is None, reason="console script not installed")
def test_console_script_reports_bad_yaml_without_traceback(tmp_path: Path) -> None:
    cfg = _callbacks({"class_path": "lightning_reg.EMATeacher", "init_args": {"decay": 2.0}})
    env = {**os.environ, "LIGHTNING_REG_SUMMARY": "0"}
    proc = subprocess.run(
        ["lightning-reg", "fit", "--config", str(_write(tmp_path, cfg))],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 2
    assert (
        "error: invalid configuration: Expected argument `decay` to be a float in [0, 1], but got 2.0." in proc.stderr
    )
    assert "Traceback" not in proc.stderr
