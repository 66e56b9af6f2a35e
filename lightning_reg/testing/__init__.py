"""``lightning_reg.testing``: the conformance kit, for your own regularization callbacks.

The checks every ``lightning_reg`` callback passes, for any callback: describe one small valid configuration
of it as a :class:`Case`, and :func:`conformance_tests` gives you parametrized pytest tests that check

* the functional core against your reference, in fp32, fp16 and bf16 (and on dense elements);
* that it trains with finite logged metrics;
* exact resume, mid-epoch and at an epoch boundary (weights and every callback's ``state_dict``);
* 2-process DDP (gloo on CPU): both ranks agree, and equal one process on the same global batches;
* ``bf16-mixed`` against fp32 within a stated tolerance (``16-mixed`` on a CUDA GPU where there is one);
* YAML through ``LightningCLI``, with ``class_path`` alone and with every documented argument;
* composition with the other cases and with ``lightning_reg``'s own callbacks (train and resume);
* no state change outside training (sanity-check and validation steps running the pipeline);
* bad input: bad arguments, a loader without indices, NaN logits, labels out of range;
* dense ``(B, C, H, W)`` and token ``(B, T, C)`` outputs with ignored elements, or a clear refusal.

Write a test module::

    # tests/test_my_callbacks.py
    from lightning_reg.testing import Case, conformance_tests
    from mypkg import ConfidencePenalty

    CASES = [
        Case(
            name="confidence_penalty",
            factory=lambda: ConfidencePenalty(beta=0.1),
            class_path="mypkg.ConfidencePenalty",
            full_init_args={"beta": 0.2},
            bad_args=[({"beta": -1.0}, ValueError, "Expected argument `beta`")],
            math=check_my_math,  # (dtype) -> None, asserts against a reference
        )
    ]
    globals().update(conformance_tests(CASES))

and run ``pytest tests/test_my_callbacks.py`` (``-n 2 --dist loadfile`` with pytest-xdist). The DDP check
runs your case in a child process (``python -m lightning_reg.testing.ddp_worker CASES CASE OUT_DIR``),
which imports the cases by the import path ``"tests.test_my_callbacks:CASES"``, found from the calling
module (or pass ``import_path=``).

:func:`conformance_tests` needs pytest (it is imported when called); everything else here, including the
checks as plain functions (:mod:`lightning_reg.testing.checks`), the tiny models and data, needs only
``lightning_reg``'s own dependencies. See ``docs/testing.md`` for the whole guide.

Example:
    >>> from lightning_reg import LabelSmoothing
    >>> case = Case(name="ls", factory=lambda: LabelSmoothing(0.1), class_path="lightning_reg.LabelSmoothing")
    >>> sorted(conformance_tests([case], checks=["test_trains_and_logs_finite", "test_bad_arguments_raise_clearly"]))
    ['test_bad_arguments_raise_clearly', 'test_trains_and_logs_finite']
"""

from lightning_reg.testing import checks
from lightning_reg.testing.data import (
    ListBatchSampler,
    interleaved_rank_batches,
    make_dataset,
    make_layout_dataset,
    make_loader,
)
from lightning_reg.testing.models import IMAGE_SHAPE, LAYOUTS, NUM_CLASSES, TinyNet, TinySegNet, TinyTagger, make_model
from lightning_reg.testing.registry import Case, CasesLike, as_cases, default_companions, load_cases
from lightning_reg.testing.suite import ALL_TESTS, CORE_TESTS, LAYOUT_TESTS, conformance_tests
from lightning_reg.testing.training import (
    StepSeed,
    assert_state_equal,
    fit,
    free_port,
    run_ddp_script,
    trainer_kwargs,
)

__all__ = [
    "ALL_TESTS",
    "CORE_TESTS",
    "IMAGE_SHAPE",
    "LAYOUTS",
    "LAYOUT_TESTS",
    "NUM_CLASSES",
    "Case",
    "CasesLike",
    "ListBatchSampler",
    "StepSeed",
    "TinyNet",
    "TinySegNet",
    "TinyTagger",
    "as_cases",
    "assert_state_equal",
    "checks",
    "conformance_tests",
    "default_companions",
    "fit",
    "free_port",
    "interleaved_rank_batches",
    "load_cases",
    "make_dataset",
    "make_layout_dataset",
    "make_loader",
    "make_model",
    "run_ddp_script",
    "trainer_kwargs",
]
