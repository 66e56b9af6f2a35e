"""The ``lightning-reg`` console script: Lightning's ``LightningCLI`` with the project's defaults.

Subcommands are Lightning's: ``fit``, ``validate``, ``test`` and ``predict``.
Every regularizer is a ``trainer.callbacks`` entry named by ``class_path``, the
model and data are any ``LightningModule``/``LightningDataModule`` named by
``class_path`` (default: :class:`~lightning_reg.models.SmallCNN` on
:class:`~lightning_reg.data.datamodules.FashionMNISTDataModule`).

What it adds to ``LightningCLI``:

* **Clear configuration errors.** An argument a constructor rejects (a value
  out of range, an unknown schedule name), two regularizers that conflict, or
  a ``Trainer`` misconfiguration (e.g. two stateful callbacks of one type)
  end the program with jsonargparse's usage message and ``error: ...`` (exit
  status 2), not a traceback from inside a callback. Unknown arguments are
  already rejected by jsonargparse while parsing. Set ``JSONARGPARSE_DEBUG=1``
  to get the traceback instead.
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

from typing import Any

from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI

from lightning_reg.core.protocol import check_pipeline

__all__ = ["LightningRegCLI", "cli_main", "main"]

DEFAULT_MODEL = "lightning_reg.models.SmallCNN"
DEFAULT_DATA = "lightning_reg.data.datamodules.FashionMNISTDataModule"


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
    return str(err)


def cli_main(args: ArgsType = None) -> LightningRegCLI:
    """Run the CLI from Python and return it (``cli.trainer``, ``cli.model``, ``cli.datamodule``).

    Args:
        args: Command-line arguments (default ``sys.argv[1:]``), e.g. ``["fit", "--config", "x.yaml"]``.
    """
    return LightningRegCLI(args=args)


def main(args: ArgsType = None) -> None:
    """Entry point of the ``lightning-reg`` console script (see :func:`cli_main` to keep the CLI object)."""
    cli_main(args)


if __name__ == "__main__":  # pragma: no cover
    main()
