"""The ``lightning-reg`` CLI: every recipe in ``configs/`` instantiates and runs, and bad YAML fails clearly."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from lightning_reg.cli import LightningRegCLI, cli_main
from tests.helpers import TinyNet, have_fashion_mnist

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


#: The recipe of benchmarks/composition.py that the main job runs (the recommended one in RESULTS.md).
MAIN_JOB_RECIPE = "recipe: ELR + EMA weights + label smoothing"

needs_data = pytest.mark.skipif(not have_fashion_mnist(), reason="Fashion-MNIST IDX files not installed")


def _callback_paths(config: Path) -> list[str]:
    cfg = yaml.safe_load(config.read_text())
    return [entry["class_path"] for entry in cfg.get("trainer", {}).get("callbacks", [])]


def test_every_recipe_is_tested() -> None:
    names = {c.name for c in CONFIGS}
    assert "noisy_fashion_mnist.yaml" in names
    assert len(CONFIGS) >= 10


#: How each recipe datamodule takes a small training set for the smoke run (default: `train_subset`).
SMALL_DATA_ARGS = {
    "lightning_reg.data.SemiSupervisedDataModule": ["--data.init_args.num_unlabeled=300"],
    "lightning_reg.data.segmentation.SegmentationDataModule": [
        "--data.init_args.num_train=64",
        "--data.init_args.num_val=16",
        "--data.init_args.num_test=16",
    ],
}


def _small_data_args(config: Path) -> list[str]:
    data = yaml.safe_load(config.read_text()).get("data", {}).get("class_path", "")
    return SMALL_DATA_ARGS.get(data, ["--data.init_args.train_subset=300"])


@needs_data
@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_recipe_runs_fast_dev_run(config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cli = cli_main(["fit", "--config", str(config), "--trainer.fast_dev_run=true", *_small_data_args(config)])
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
        key = "test_mIoU" if "test_mIoU" in results else "test_acc"  # segmentation recipes report mIoU
        assert 0.0 <= results[key] <= 1.0
        saved = json.loads((tmp_path / "results.json").read_text())
        assert saved["results"][key] == pytest.approx(results[key])


@needs_data
def test_main_job_runs_the_recommended_recipe_and_the_showcase_all_six() -> None:
    from benchmarks.composition import RECIPES

    names = {p.rpartition(".")[2] for p in _callback_paths(ROOT / "configs" / "noisy_fashion_mnist.yaml")}
    recipe = {type(cb).__name__ for cb in RECIPES[MAIN_JOB_RECIPE][0](8)}
    assert names - {"RichProgressBar", "ResultsReport"} == recipe  # exactly the benchmarked recipe
    assert {"RichProgressBar", "ResultsReport"} <= names
    six = {p.rpartition(".")[2] for p in _callback_paths(ROOT / "configs" / "all_six_fashion_mnist.yaml")}
    assert {"EMATeacher", "EarlyDropout", "PSKD", "GradientClipping", "ELR", "NoisyLabelConsistency"} <= six
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


# -- issue 15: misuse found by the new-user trial ----------------------------------------------------------------
def _tiny_run(*callbacks: dict[str, Any], **trainer: Any) -> dict[str, Any]:
    """A seconds-long fit config: TinyNet on a tiny synthetic datamodule, no logger, no checkpoints."""
    return {
        "trainer": {
            "max_epochs": 1,
            "logger": False,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "callbacks": list(callbacks),
            **trainer,
        },
        "model": {"class_path": "tests.helpers.TinyNet"},
        "data": {
            "class_path": "lightning_reg.data.datamodules.SyntheticDataModule",
            "init_args": {"num_train": 32, "num_test": 16, "num_classes": 4, "shape": [1, 8, 8]},
        },
    }


def test_setup_errors_are_one_error_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Our configuration errors raised in `setup` (after the classes are built) end like argument errors."""
    cfg = _tiny_run({"class_path": "lightning_reg.NoisyLabelConsistency", "init_args": {"teacher": "ema"}})
    err = _expect_usage_error(
        tmp_path, capsys, cfg, "error: invalid configuration: `NoisyLabelConsistency(teacher='ema')`"
    )
    assert "Add `EMATeacher(decay=0.999)`" in err and len(err.splitlines()) <= 5, err
    cfg = _tiny_run({"class_path": "lightning_reg.GradientClipping"}, gradient_clip_val=1.0)
    _expect_usage_error(tmp_path, capsys, cfg, "error: invalid configuration: `GradientClipping` clips the gradients")


class BrokenNet(TinyNet):
    """A model whose own code fails during training (not a configuration error)."""

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        raise ValueError("a bug in the user's training_step")


def test_crashes_inside_training_keep_their_traceback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the CLI saves config.yaml in the working directory: keep it out of the repository
    cfg = _tiny_run()
    cfg["model"] = {"class_path": "tests.test_cli.BrokenNet"}
    with pytest.raises(ValueError, match="a bug in the user's training_step"):
        cli_main(["fit", "--config", str(_write(tmp_path, cfg))])


def test_literal_typo_is_a_short_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _callbacks({"class_path": "lightning_reg.GradientClipping", "init_args": {"rule": "nrom"}})
    err = _expect_usage_error(
        tmp_path,
        capsys,
        cfg,
        "error: invalid configuration: Expected argument `rule` of `lightning_reg.GradientClipping` to be one of"
        " ['norm', 'value', 'component', 'agc', 'auto'], but got 'nrom'. Did you mean 'norm'?",
    )
    assert "Union subtypes" not in err and len(err.splitlines()) <= 5, err
    # From the command line too, and for the datamodule's own Literal arguments.
    with pytest.raises(SystemExit):
        cli_main(["fit", "--data.init_args.noise_type=symetric"])
    err = capsys.readouterr().err
    assert (
        "Expected argument `noise_type` of `lightning_reg.data.datamodules.FashionMNISTDataModule` to be one of"
        " ['symmetric', 'asymmetric', 'pairflip'], but got 'symetric'. Did you mean 'symmetric'?" in err
    ), err
    assert len(err.splitlines()) <= 5, err
    # A value of the wrong type: the argument, its class and the type, in one line.
    with pytest.raises(SystemExit):
        cli_main(["fit", "--model.init_args.lr=abc"])
    err = capsys.readouterr().err
    assert "Expected argument `lr` of `lightning_reg.models.SmallCNN` to be a float, but got 'abc'." in err, err
    assert len(err.splitlines()) <= 5, err


MY_MODULE = '''
from tests.helpers import TinyNet


class MyNet(TinyNet):
    """A user's model, in a file next to their config."""
'''


def test_console_script_imports_from_the_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`lightning-reg fit` finds `my_module.MyNet` in the working directory, as `python -m` would."""
    (tmp_path / "my_module.py").write_text(MY_MODULE)
    cfg = _tiny_run()
    cfg["model"] = {"class_path": "my_module.MyNet"}
    config = _write(tmp_path, cfg)
    monkeypatch.chdir(tmp_path)
    here = {"", ".", str(tmp_path), os.getcwd()}
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in here])
    monkeypatch.delitem(sys.modules, "my_module", raising=False)
    from lightning_reg.cli import main

    try:
        main(["fit", "--config", str(config), "--trainer.fast_dev_run=true"])
    finally:
        sys.modules.pop("my_module", None)
    assert sys.path[0] == str(tmp_path)
