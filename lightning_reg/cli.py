"""The ``lightning-reg`` console script: Lightning's ``LightningCLI`` with the project's defaults.

Subcommands are Lightning's: ``fit``, ``validate``, ``test`` and ``predict``.
Every regularizer is a ``trainer.callbacks`` entry named by ``class_path``, the
model and data are any ``LightningModule``/``LightningDataModule`` named by
``class_path`` (default: :class:`~lightning_reg.models.SmallCNN` on
:class:`~lightning_reg.data.datamodules.FashionMNISTDataModule`).

What it adds to ``LightningCLI``:

* **Clear configuration errors.** An argument a constructor rejects (a value
  out of range, an unknown schedule name), two regularizers that conflict, a
  ``Trainer`` misconfiguration (e.g. two stateful callbacks of one type), or
  a configuration error that a ``lightning_reg`` callback or datamodule raises
  when the run sets up (a ``ValueError``, ``TypeError`` or ``RuntimeError``
  raised by ``lightning_reg`` inside Lightning's ``setup`` hooks: e.g.
  ``NoisyLabelConsistency(teacher='ema')`` without an ``EMATeacher``, or
  ``GradientClipping`` together with ``trainer.gradient_clip_val``) end the
  program with a one-line usage, ``error: invalid configuration: ...`` and exit
  status 2, not a traceback. Errors raised later, inside training, keep their
  traceback. A value outside a ``Literal``'s choices (``rule: nrom``) is
  reported in one line with the argument, the value, the allowed values and
  the closest match, instead of jsonargparse's dump of every union member.
  Unknown arguments are rejected by jsonargparse while parsing. Set
  ``JSONARGPARSE_DEBUG=1`` to get the traceback instead.
* **Your own modules.** The console script puts the working directory first
  on ``sys.path``, as ``python -m`` does, so ``model.class_path:
  my_module.MyNet`` finds ``./my_module.py``.
* **The final report.** After ``fit``, if a
  :class:`~lightning_reg.callbacks.report.ResultsReport` is among the
  callbacks, it tests the last (or best) weights, live and EMA, prints the
  results table and writes its files into the run's folder.
* ``save_config_kwargs={"overwrite": True}``, so re-running a recipe in the
  same folder does not fail.

Example:
    .. code-block:: bash

        lightning-reg fit --config configs/noisy_fashion_mnist.yaml
        lightning-reg fit --config configs/elr_sym40.yaml --trainer.max_epochs=5 --data.train_subset=5000
        lightning-reg fit --print_config          # the full default configuration

From Python (e.g. a notebook), :func:`main` takes the arguments as a list::

    >>> from lightning_reg.cli import cli_main
    >>> cli = cli_main(["fit", "--config", "configs/noisy_fashion_mnist.yaml"])  # doctest: +SKIP
    >>> cli.trainer.callbacks  # doctest: +SKIP
"""

from __future__ import annotations

import ast
import difflib
import os
import re
import sys
import traceback
from pathlib import Path
from typing import Any, NoReturn

from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI

from lightning_reg.core.protocol import check_pipeline

__all__ = ["LightningRegCLI", "RegArgumentParser", "cli_main", "main"]

DEFAULT_MODEL = "lightning_reg.models.SmallCNN"
DEFAULT_DATA = "lightning_reg.data.datamodules.FashionMNISTDataModule"

_PACKAGE_DIR = Path(__file__).resolve().parent
_VALUE_ERROR = re.compile(
    r'Parser key "(?P<key>[^"]+)":\s*\n\s*Expected an? (?P<expected>.*)\. Got value: (?P<value>.*)'
)
_UNION_DUMP = "Does not validate against any of the Union subtypes"
_CLASS_PATH = re.compile(r"Problem with given class_path '(?P<path>[^']+)'")


class RegArgumentParser(LightningArgumentParser):
    """``LightningArgumentParser`` with short errors: a one-line usage and ``Literal`` typos in one line."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        # Nested parsers (a class's init_args) raise instead of exiting; only the message printed is shortened.
        super().error(_shorten_error(message) if self.exit_on_error else message, ex)

    def print_usage(self, file: Any = None) -> None:
        """The usage line only (the full list of options is one ``--help`` away, as the tip line says)."""
        lines = self.format_usage().rstrip("\n").splitlines()
        if len(lines) > 3:
            lines = [lines[0] + " ..."]
        self._print_message("\n".join(lines) + "\n", file)


def _shorten_error(message: str) -> str:
    """One line instead of jsonargparse's dump of every union member: the argument, its class, the problem.

    A value outside a ``Literal``'s choices names the choices and the closest one; a value of the wrong
    type names the type; any other problem of a ``class_path`` entry is its own message on one line.
    """
    match = _VALUE_ERROR.search(message)
    if match is not None:
        owners = list(_CLASS_PATH.finditer(message, 0, match.start()))
        owner = f" of `{owners[-1]['path']}`" if owners else ""
        key, value = match["key"].rpartition(".")[2], match["value"].strip()
        expected, close = _expected(match["expected"], value)
        text = f"invalid configuration: Expected argument `{key}`{owner} to be {expected}, but got {value!r}."
        return text + (f" Did you mean {close!r}?" if close else "")
    if _UNION_DUMP not in message:
        return message
    problem = _CLASS_PATH.search(message)
    if problem is None:  # e.g. a Trainer argument: its key, the types it takes and the value
        key = re.search(r'Parser key "(?P<key>[^"]+)"', message)
        types = re.search(r"Subtypes: (?P<types>.*)", message)
        value = re.search(r"Given value: (?P<value>.*)", message)
        if key is None or types is None or value is None:
            return message
        return (
            f"invalid configuration: Expected argument `{key['key']}` to be one of the types {types['types']},"
            f" but got {value['value'].strip()!r}."
        )
    lines = message[message.rfind("\n", 0, problem.start()) + 1 :].splitlines()
    indent = _indent(lines[0])
    body = lines[1:]
    body = body[: next((i for i, line in enumerate(body) if _indent(line) <= indent), len(body))]
    return f"invalid configuration: `{problem['path']}`: {' '.join(line.strip() for line in body)}"


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _expected(expected: str, value: str) -> tuple[str, str | None]:
    """``(what was expected, in words; the closest allowed value)`` from jsonargparse's ``Expected a ...``."""
    literal = re.fullmatch(r"typing\.Literal\[(?P<choices>.*)\]", expected)
    if literal is not None:
        try:
            choices = list(ast.literal_eval(f"[{literal['choices']}]"))
        except (ValueError, SyntaxError):
            return expected, None
        close = difflib.get_close_matches(value, [str(c) for c in choices], n=1)
        return f"one of {choices}", (close[0] if close else None)
    named = re.fullmatch(r"<class '(?P<name>[\w.]+)'>", expected)
    if named is not None:
        name = named["name"].rpartition(".")[2]
        return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}", None
    return f"a {expected}", None


def _is_setup_config_error(err: BaseException) -> bool:
    """Whether ``err`` was raised by ``lightning_reg`` code while Lightning ran its ``setup`` hooks."""
    if not isinstance(err, (ValueError, TypeError, RuntimeError)) or isinstance(err, MisconfigurationException):
        return False
    frames = traceback.extract_tb(err.__traceback__)
    if not frames or not any(f.name == "_call_setup_hook" for f in frames):
        return False
    return Path(frames[-1].filename).resolve().is_relative_to(_PACKAGE_DIR)


class LightningRegCLI(LightningCLI):
    """``LightningCLI`` with subclass mode for model and data, clear config errors and the final report.

    Args:
        *args: Passed to ``LightningCLI``.
        **kwargs: Passed to ``LightningCLI``; ``subclass_mode_model``,
            ``subclass_mode_data`` and ``save_config_kwargs`` default to ``True``,
            ``True`` and ``{"overwrite": True}``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("parser_class", RegArgumentParser)
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.set_defaults({"model": {"class_path": DEFAULT_MODEL}, "data": {"class_path": DEFAULT_DATA}})

    def instantiate_classes(self) -> None:
        """Instantiate everything; turn a rejected argument or a regularizer conflict into a usage error."""
        try:
            super().instantiate_classes()
            check_pipeline(self.trainer)
        except (ValueError, TypeError, RuntimeError, MisconfigurationException) as err:
            self._parser(self.subcommand).error(f"invalid configuration: {_root_message(err)}", err)

    def _run_subcommand(self, subcommand: str) -> None:
        """Run it; a configuration error raised by ``lightning_reg`` at ``setup`` becomes a usage error."""
        try:
            super()._run_subcommand(subcommand)
        except (ValueError, TypeError, RuntimeError) as err:
            if not _is_setup_config_error(err):
                raise
            self._parser(subcommand).error(f"invalid configuration: {_root_message(err)}", err)

    def after_fit(self) -> None:
        """Run the :class:`~lightning_reg.callbacks.report.ResultsReport`'s final test and report, if listed."""
        from lightning_reg.callbacks.report import ResultsReport

        for cb in self.trainer.callbacks:  # type: ignore[attr-defined]
            if isinstance(cb, ResultsReport) and cb.test_after_fit:
                cb.finalize(self.trainer, self.model, self.datamodule)


def _root_message(err: BaseException) -> str:
    """The innermost error message (jsonargparse may wrap the constructor's error)."""
    seen = set()
    while err.__cause__ is not None and id(err) not in seen:
        seen.add(id(err))
        err = err.__cause__
    return " ".join(str(err).split())


def cli_main(args: ArgsType = None) -> LightningRegCLI:
    """Run the CLI from Python and return it (``cli.trainer``, ``cli.model``, ``cli.datamodule``).

    Args:
        args: Command-line arguments (default ``sys.argv[1:]``), e.g. ``["fit", "--config", "x.yaml"]``.
    """
    return LightningRegCLI(args=args)


def main(args: ArgsType = None) -> None:
    """Entry point of the ``lightning-reg`` console script (see :func:`cli_main` to keep the CLI object).

    Like ``python -m``, it puts the working directory first on ``sys.path``, so a config's
    ``class_path: my_module.MyNet`` imports ``./my_module.py``.
    """
    _add_working_directory_to_path()
    cli_main(args)


def _add_working_directory_to_path() -> None:
    cwd = os.getcwd()
    if not any(os.path.abspath(p or os.curdir) == cwd for p in sys.path):
        sys.path.insert(0, cwd)


if __name__ == "__main__":  # pragma: no cover
    main()
