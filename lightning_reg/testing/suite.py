"""The conformance checks as parametrized pytest tests: :func:`conformance_tests`."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import torch
from lightning.pytorch import Callback

from lightning_reg.testing import checks as _checks
from lightning_reg.testing.registry import Case, CasesLike, as_cases, default_companions, load_cases

__all__ = ["ALL_TESTS", "CORE_TESTS", "LAYOUT_TESTS", "conformance_tests"]

#: The classification checks (our ``tests/conformance/test_conformance.py``).
CORE_TESTS = (
    "test_math",
    "test_trains_and_logs_finite",
    "test_resume_is_exact",
    "test_ddp_two_process_cpu",
    "test_bf16_mixed_matches_fp32",
    "test_16_mixed_on_gpu",
    "test_yaml_class_path_alone",
    "test_yaml_every_documented_argument",
    "test_all_regularizers_compose_train_and_resume",
    "test_bad_arguments_raise_clearly",
    "test_missing_index_is_a_clear_error",
    "test_nan_logits_raise_without_corrupting_state",
    "test_wrong_label_range_is_a_clear_error",
)
#: The dense/token layout checks and "no state change outside training" (our ``test_layouts.py``).
LAYOUT_TESTS = (
    "test_every_case_declares_valid_layouts",
    "test_dense_math",
    "test_trains_on_layout",
    "test_resume_mid_epoch_is_exact_on_layout",
    "test_ddp_two_process_cpu_on_layout",
    "test_bf16_mixed_on_layout",
    "test_unsupported_layout_is_a_clear_error",
    "test_no_state_change_outside_training",
)
ALL_TESTS = CORE_TESTS + LAYOUT_TESTS

_DTYPES = ([torch.float32, torch.float16, torch.bfloat16], ["fp32", "fp16", "bf16"])
_DENSE_DTYPES = ([torch.float32, torch.bfloat16], ["fp32", "bf16"])


def _import_pytest() -> Any:
    try:
        import pytest
    except ImportError as err:  # pragma: no cover - pytest is in the dev extra
        raise ImportError(
            "`lightning_reg.testing.conformance_tests` builds pytest tests and needs pytest: `pip install pytest`"
            " (or `pip install 'lightning-reg[dev]'`). The checks themselves (`lightning_reg.testing.checks`) do not."
        ) from err
    return pytest


def _infer_ref(cases: object, frame: FrameType | None) -> str | None:
    """``"module:attribute"`` of the caller's global that holds ``cases``, if there is one."""
    if frame is None:
        return None
    module = frame.f_globals.get("__name__")
    if not module or module == "__main__":
        return None
    for attribute, value in frame.f_globals.items():
        if value is cases:
            return f"{module}:{attribute}"
    return None


def _select(selection: str | Iterable[str]) -> tuple[str, ...]:
    groups = {"all": ALL_TESTS, "core": CORE_TESTS, "layouts": LAYOUT_TESTS}
    if isinstance(selection, str):
        if selection not in groups:
            raise ValueError(
                f"Expected argument `checks` to be one of {list(groups)} or test names, but got {selection!r}."
            )
        return groups[selection]
    names = tuple(selection)
    unknown = [n for n in names if n not in ALL_TESTS]
    if unknown:
        raise ValueError(f"Expected argument `checks` to name tests of {list(ALL_TESTS)}, but got {unknown}.")
    return names


def conformance_tests(
    cases: str | CasesLike,
    *,
    checks: str | Iterable[str] = "all",
    import_path: str | None = None,
    compose_with: Callable[[], Sequence[Callback]] | None = default_companions,
    gpu_mark: str | None = None,
) -> dict[str, Callable[..., None]]:
    """Parametrized pytest test functions that run the conformance checks on ``cases``.

    Put them into a test module's namespace, where pytest collects them::

        CASES = [Case(name="mine", factory=lambda: Mine(0.1), class_path="mypkg.Mine", ...)]
        globals().update(conformance_tests(CASES))

    Each test is parametrized by case name (``test_trains_and_logs_finite[mine]``); tests without any
    parameter (e.g. the layout checks when no case lists a layout) are left out.

    Args:
        cases: The cases (a list, a ``{name: Case}`` mapping or a callable returning one), or the import
            path ``"module:attribute"`` of such an object.
        checks: ``"all"``, ``"core"`` (:data:`CORE_TESTS`), ``"layouts"`` (:data:`LAYOUT_TESTS`) or an
            iterable of test names. Split them over two modules to spread them over ``pytest-xdist`` workers.
        import_path: Where the 2-process DDP worker imports the cases from, as ``"module:attribute"``. By
            default ``cases`` itself when it is a string, else the calling module's global that holds
            ``cases`` (e.g. ``"tests.test_mine:CASES"``). The DDP tests fail with a clear message if
            neither is known.
        compose_with: Builds the callbacks the cases are composed with in the composition test (one per
            class; default :func:`~lightning_reg.testing.default_companions`); ``None`` composes the
            cases alone.
        gpu_mark: A pytest mark name put on the GPU test (e.g. ``"gpu"``, if your configuration registers it).

    Returns:
        ``{test name: function}``.

    Raises:
        ImportError: Without pytest.
        ValueError: For an unknown ``checks`` selection or duplicate case names.
    """
    pytest = _import_pytest()
    selected = _select(checks)
    if isinstance(cases, str):
        registry = load_cases(cases)
        ref: str | None = import_path or cases
    else:
        registry = as_cases(cases)
        ref = import_path or _infer_ref(cases, inspect.currentframe().f_back)  # type: ignore[union-attr]
    ids = sorted(registry)
    pairs = sorted((n, layout) for n, c in registry.items() for layout in c.layouts)
    pair_ids = [f"{n}-{layout}" for n, layout in pairs]
    loss_side = sorted(n for n, c in registry.items() if c.loss_side)
    refusals = sorted(
        (n, layout) for n in loss_side for layout in _checks.DENSE_LAYOUTS if layout not in registry[n].layouts
    )
    dense_math = sorted(n for n, c in registry.items() if c.dense_math is not None)
    by_name = pytest.mark.parametrize("name", ids)
    by_pair = pytest.mark.parametrize(("name", "layout"), pairs, ids=pair_ids)

    def ddp_ref() -> str:
        if ref is None:
            pytest.fail(
                "The DDP check runs the case in a child process, which must import the cases: pass"
                " `conformance_tests(..., import_path='module:attribute')` or the cases as that string."
            )
        return ref  # type: ignore[return-value]

    def case(name: str) -> Case:
        return registry[name]

    # -- classification -------------------------------------------------------------------------------------
    def test_math(name: str, dtype: torch.dtype) -> None:
        _checks.check_math(case(name), dtype)

    def test_trains_and_logs_finite(name: str) -> None:
        _checks.check_trains(case(name))

    def test_resume_is_exact(name: str, where: str, tmp_path: Path) -> None:
        _checks.check_resume(case(name), tmp_path, where)

    def test_ddp_two_process_cpu(name: str, tmp_path: Path) -> None:
        _checks.check_ddp(case(name), ddp_ref(), tmp_path)

    def test_bf16_mixed_matches_fp32(name: str) -> None:
        _checks.check_bf16_mixed(case(name))

    def test_16_mixed_on_gpu(name: str) -> None:
        _checks.check_16_mixed_on_gpu(case(name))

    def test_yaml_class_path_alone(name: str) -> None:
        _checks.check_yaml_class_path_alone(case(name))

    def test_yaml_every_documented_argument(name: str) -> None:
        _checks.check_yaml_every_documented_argument(case(name))

    def test_all_regularizers_compose_train_and_resume(tmp_path: Path) -> None:
        _checks.check_composition(registry, tmp_path, compose_with)

    def test_bad_arguments_raise_clearly(name: str) -> None:
        _checks.check_bad_arguments(case(name))

    def test_missing_index_is_a_clear_error(name: str) -> None:
        if not case(name).requires_index:
            pytest.skip("keeps no per-sample state")
        _checks.check_missing_index(case(name))

    def test_nan_logits_raise_without_corrupting_state(name: str) -> None:
        _checks.check_nan_logits(case(name))

    def test_wrong_label_range_is_a_clear_error(name: str) -> None:
        _checks.check_wrong_label_range(case(name))

    # -- layouts --------------------------------------------------------------------------------------------
    def test_every_case_declares_valid_layouts() -> None:
        _checks.check_layout_declarations(registry)

    def test_dense_math(name: str, dtype: torch.dtype) -> None:
        _checks.check_dense_math(case(name), dtype)

    def test_trains_on_layout(name: str, layout: str) -> None:
        _checks.check_trains(case(name), layout)

    def test_resume_mid_epoch_is_exact_on_layout(name: str, layout: str, tmp_path: Path) -> None:
        _checks.check_resume(case(name), tmp_path, "mid_epoch", layout)

    def test_ddp_two_process_cpu_on_layout(name: str, layout: str, tmp_path: Path) -> None:
        _checks.check_ddp(case(name), ddp_ref(), tmp_path, layout)

    def test_bf16_mixed_on_layout(name: str, layout: str) -> None:
        _checks.check_bf16_mixed(case(name), layout)

    def test_unsupported_layout_is_a_clear_error(name: str, layout: str) -> None:
        _checks.check_refuses_layout(case(name), layout)

    def test_no_state_change_outside_training(name: str) -> None:
        _checks.check_no_state_change_outside_training(case(name))

    gpu_marks = [pytest.mark.skipif(not torch.cuda.is_available(), reason="16-mixed needs a CUDA GPU")]
    if gpu_mark is not None:
        gpu_marks.append(getattr(pytest.mark, gpu_mark))
    # name -> (function, marks applied innermost first, whether it has parameters)
    plan: dict[str, tuple[Callable[..., None], list[Any], bool]] = {
        "test_math": (test_math, [by_name, pytest.mark.parametrize("dtype", _DTYPES[0], ids=_DTYPES[1])], bool(ids)),
        "test_trains_and_logs_finite": (test_trains_and_logs_finite, [by_name], bool(ids)),
        "test_resume_is_exact": (
            test_resume_is_exact,
            [by_name, pytest.mark.parametrize("where", ["mid_epoch", "epoch_boundary"])],
            bool(ids),
        ),
        "test_ddp_two_process_cpu": (test_ddp_two_process_cpu, [by_name], bool(ids)),
        "test_bf16_mixed_matches_fp32": (test_bf16_mixed_matches_fp32, [by_name], bool(ids)),
        "test_16_mixed_on_gpu": (test_16_mixed_on_gpu, [by_name, *gpu_marks], bool(ids)),
        "test_yaml_class_path_alone": (test_yaml_class_path_alone, [by_name], bool(ids)),
        "test_yaml_every_documented_argument": (test_yaml_every_documented_argument, [by_name], bool(ids)),
        "test_all_regularizers_compose_train_and_resume": (
            test_all_regularizers_compose_train_and_resume,
            [],
            bool(ids),
        ),
        "test_bad_arguments_raise_clearly": (test_bad_arguments_raise_clearly, [by_name], bool(ids)),
        "test_missing_index_is_a_clear_error": (test_missing_index_is_a_clear_error, [by_name], bool(ids)),
        "test_nan_logits_raise_without_corrupting_state": (
            test_nan_logits_raise_without_corrupting_state,
            [by_name],
            bool(ids),
        ),
        "test_wrong_label_range_is_a_clear_error": (test_wrong_label_range_is_a_clear_error, [by_name], bool(ids)),
        "test_every_case_declares_valid_layouts": (test_every_case_declares_valid_layouts, [], bool(ids)),
        "test_dense_math": (
            test_dense_math,
            [
                pytest.mark.parametrize("name", dense_math),
                pytest.mark.parametrize("dtype", _DENSE_DTYPES[0], ids=_DENSE_DTYPES[1]),
            ],
            bool(dense_math),
        ),
        "test_trains_on_layout": (test_trains_on_layout, [by_pair], bool(pairs)),
        "test_resume_mid_epoch_is_exact_on_layout": (test_resume_mid_epoch_is_exact_on_layout, [by_pair], bool(pairs)),
        "test_ddp_two_process_cpu_on_layout": (test_ddp_two_process_cpu_on_layout, [by_pair], bool(pairs)),
        "test_bf16_mixed_on_layout": (test_bf16_mixed_on_layout, [by_pair], bool(pairs)),
        "test_unsupported_layout_is_a_clear_error": (
            test_unsupported_layout_is_a_clear_error,
            [pytest.mark.parametrize(("name", "layout"), refusals, ids=[f"{n}-{layout}" for n, layout in refusals])],
            bool(refusals),
        ),
        "test_no_state_change_outside_training": (
            test_no_state_change_outside_training,
            [pytest.mark.parametrize("name", loss_side)],
            bool(loss_side),
        ),
    }
    out: dict[str, Callable[..., None]] = {}
    for test_name in selected:
        fn, marks, has_params = plan[test_name]
        if not has_params:
            continue
        for mark in marks:
            fn = mark(fn)
        out[test_name] = fn
    return out
