"""`lightning_reg.testing`, the public conformance kit: its API, that it catches broken callbacks, and the
third-party example of docs/testing.md run through it exactly as an author would run it."""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import lightning_reg.testing as kit
from lightning_reg import LabelSmoothing, LossRegularizer, StepContext
from lightning_reg.testing import Case, checks, conformance_tests

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "testing.md"


# -- the docs example -------------------------------------------------------------------------------------------
def _doc_files() -> dict[str, str]:
    """The code blocks of docs/testing.md marked ``<!-- file: NAME -->``."""
    return dict(re.findall(r"<!-- file: (\S+) -->\s*```python\n(.*?)```", DOC.read_text(), flags=re.S))


@pytest.fixture
def example(tmp_path: Path) -> Path:
    """The docs example written out as an author's project: a package module and its test module."""
    files = _doc_files()
    assert set(files) == {"my_callbacks.py", "test_my_callbacks.py"}, sorted(files)
    for name, code in files.items():
        (tmp_path / name).write_text(code)
    (tmp_path / "pytest.ini").write_text("[pytest]\naddopts = -p no:cacheprovider\n")
    return tmp_path


def _pytest(example: Path, *args: str, timeout: float = 600) -> tuple[set[str], str]:
    """Run pytest on the example in a fresh process; return the ids that passed, and the output."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:xdist", "test_my_callbacks.py", *args],
        cwd=example,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    return set(re.findall(r"^PASSED test_my_callbacks\.py::(\S+)", out, flags=re.M)), out


FAST = [
    "test_math[confidence_penalty-fp32]",
    "test_math[confidence_penalty-fp16]",
    "test_math[confidence_penalty-bf16]",
    "test_dense_math[confidence_penalty-fp32]",
    "test_dense_math[confidence_penalty-bf16]",
    "test_trains_and_logs_finite[confidence_penalty]",
    "test_resume_is_exact[confidence_penalty-mid_epoch]",
    "test_resume_is_exact[confidence_penalty-epoch_boundary]",
    "test_yaml_class_path_alone[confidence_penalty]",
    "test_yaml_every_documented_argument[confidence_penalty]",
    "test_bad_arguments_raise_clearly[confidence_penalty]",
    "test_nan_logits_raise_without_corrupting_state[confidence_penalty]",
    "test_wrong_label_range_is_a_clear_error[confidence_penalty]",
    "test_no_state_change_outside_training[confidence_penalty]",
]


def test_docs_example_passes_training_resume_yaml_bad_input_and_outside_training_checks(example: Path) -> None:
    passed, _ = _pytest(
        example, "-k", "math or trains_and or resume_is or yaml or bad or nan or label_range or no_state"
    )
    assert passed == set(FAST)


@pytest.mark.slow
def test_docs_example_passes_every_check(example: Path) -> None:
    """All of them, DDP included (the worker imports the author's cases by the path inferred from their module)."""
    passed, out = _pytest(example)
    assert "26 passed, 2 skipped" in out, out[-3000:]
    assert set(FAST) <= passed
    assert {
        "test_all_regularizers_compose_train_and_resume",
        "test_ddp_two_process_cpu[confidence_penalty]",
        "test_bf16_mixed_on_layout[confidence_penalty-tokens]",
        "test_ddp_two_process_cpu_on_layout[confidence_penalty-dense]",
        "test_resume_mid_epoch_is_exact_on_layout[confidence_penalty-dense]",
    } <= passed


def test_docs_show_the_expected_result() -> None:
    text = DOC.read_text()
    assert "26 passed, 2 skipped" in text
    assert "globals().update(conformance_tests(CASES))" in _doc_files()["test_my_callbacks.py"]


# -- the API ----------------------------------------------------------------------------------------------------
def test_import_works_without_pytest(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every module of the kit imports without pytest; only `conformance_tests` asks for it."""
    import lightning_reg

    monkeypatch.setattr(lightning_reg, "testing", kit)
    for name in [m for m in sys.modules if m == "lightning_reg.testing" or m.startswith("lightning_reg.testing.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "pytest", None)
    fresh = importlib.import_module("lightning_reg.testing")
    for module in ("checks", "data", "ddp_worker", "models", "registry", "suite", "training"):
        importlib.import_module(f"lightning_reg.testing.{module}")
    assert fresh is not kit and callable(fresh.checks.check_resume)
    with pytest.raises(ImportError, match="needs pytest"):
        fresh.conformance_tests([])


def _ls_math(dtype: torch.dtype) -> None:
    from lightning_reg.functional import label_smoothing_targets

    one_hot = torch.eye(3, dtype=dtype).float()
    torch.testing.assert_close(label_smoothing_targets(one_hot, 0.1), one_hot * 0.9 + 0.1 / 3)


_CASES = [
    Case(
        name="ls",
        factory=lambda: LabelSmoothing(0.1),
        class_path="lightning_reg.LabelSmoothing",
        bad_args=[({"smoothing": 1.5}, ValueError, "Expected argument `smoothing`")],
        math=_ls_math,
    )
]


def _ids(fn: Any) -> list[Any]:
    return [(m.args[0], list(m.args[1])) for m in fn.pytestmark if m.name == "parametrize"]


def test_conformance_tests_selects_parametrizes_and_leaves_out_empty_tests() -> None:
    core = conformance_tests(_CASES, checks="core")
    assert list(core) == list(kit.CORE_TESTS)
    assert _ids(core["test_resume_is_exact"]) == [("name", ["ls"]), ("where", ["mid_epoch", "epoch_boundary"])]
    layouts = conformance_tests(_CASES, checks="layouts")
    # No layouts listed, no dense math: only the declarations, the refusals and the outside-training check.
    assert list(layouts) == [
        "test_every_case_declares_valid_layouts",
        "test_unsupported_layout_is_a_clear_error",
        "test_no_state_change_outside_training",
    ]
    assert _ids(layouts["test_unsupported_layout_is_a_clear_error"])[0][1] == [("ls", "dense"), ("ls", "tokens")]
    assert list(conformance_tests(_CASES, checks=["test_math"])) == ["test_math"]
    with pytest.raises(ValueError, match="Expected argument `checks` to name tests of"):
        conformance_tests(_CASES, checks=["test_nope"])
    with pytest.raises(ValueError, match="Expected argument `checks` to be one of"):
        conformance_tests(_CASES, checks="some")
    with pytest.raises(ValueError, match="Expected unique case names, but got 'ls' twice"):
        conformance_tests([*_CASES, *_CASES])
    gpu = conformance_tests(_CASES, checks=["test_16_mixed_on_gpu"], gpu_mark="gpu")["test_16_mixed_on_gpu"]
    assert "gpu" in {m.name for m in gpu.pytestmark}


def test_cases_load_from_an_import_path_in_every_form() -> None:
    assert list(kit.load_cases("tests.test_testing_kit:_CASES")) == ["ls"]
    assert kit.load_cases("tests.conformance.registry:load_all")["label_smoothing"].class_path == (
        "lightning_reg.LabelSmoothing"
    )
    assert list(kit.as_cases({"ls": _CASES[0]})) == ["ls"]
    with pytest.raises(ValueError, match="Expected the mapping key to be the case's name"):
        kit.as_cases({"other": _CASES[0]})
    with pytest.raises(ValueError, match="import path 'module:attribute'"):
        kit.load_cases("tests.test_testing_kit")
    with pytest.raises(TypeError, match="Expected conformance cases of type"):
        kit.as_cases([LabelSmoothing(0.1)])  # type: ignore[list-item]


def test_ddp_test_without_an_import_path_fails_clearly(tmp_path: Path) -> None:
    inline = conformance_tests([_CASES[0]], checks=["test_ddp_two_process_cpu"])  # no module global holds the list
    with pytest.raises(pytest.fail.Exception, match="import_path="):
        inline["test_ddp_two_process_cpu"]("ls", tmp_path)


def test_our_suite_and_helpers_use_the_kit() -> None:
    import tests.helpers as helpers
    from tests.conformance import registry

    assert registry.Case is Case
    for name in ("TinyNet", "TinySegNet", "TinyTagger", "make_layout_dataset", "make_loader", "StepSeed", "fit"):
        assert getattr(helpers, name) is getattr(kit, name), name
    assert helpers.assert_state_equal is kit.assert_state_equal
    assert helpers.trainer_kwargs is kit.trainer_kwargs


# -- the kit catches broken callbacks ---------------------------------------------------------------------------
class _Leaky(LossRegularizer):
    """A loss term whose weight grows with every call; ``forget`` leaves it out of the checkpoint, ``leak`` counts
    validation calls too."""

    name = "leaky"
    layouts = frozenset({"classification", "dense"})
    needs_labels = False

    def __init__(self, forget: bool = False, leak: bool = False) -> None:
        super().__init__()
        self.forget, self.leak, self.calls = forget, leak, 0

    def loss_term(self, ctx: StepContext) -> torch.Tensor | None:
        if ctx.training or self.leak:
            self.calls += 1
        return 0.01 * self.calls * ctx.logits.float().pow(2).mean()

    def state_dict(self) -> dict[str, Any]:
        return {} if self.forget else {"calls": self.calls}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.calls = state_dict.get("calls", 0)


def _leaky_case(**kwargs: Any) -> Case:
    return Case(name="leaky", factory=lambda: _Leaky(**kwargs), class_path="tests.test_testing_kit._Leaky")


def test_the_kit_passes_a_correct_callback_and_catches_broken_ones(tmp_path: Path) -> None:
    checks.check_resume(_leaky_case(), tmp_path / "ok")
    checks.check_no_state_change_outside_training(_leaky_case())
    with pytest.raises(AssertionError, match="model"):
        checks.check_resume(_leaky_case(forget=True), tmp_path / "forgets")
    with pytest.raises(AssertionError, match="state with validation vs without"):
        checks.check_no_state_change_outside_training(_leaky_case(leak=True))
    silent = Case(
        name="silent",
        factory=lambda: LabelSmoothing(0.1),
        class_path="lightning_reg.LabelSmoothing",
        bad_args=[({"smoothing": 0.5}, ValueError, "Expected")],
    )
    with pytest.raises(AssertionError, match=r"did not raise ValueError"):
        checks.check_bad_arguments(silent)
