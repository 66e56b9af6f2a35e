"""``ResultsReport``: per-epoch test curves during fit, then a final test and a rich results table.

The callback does two things:

1. **During fit** (global rank zero, after each training epoch, with the
   model in eval mode and no gradients) it evaluates the live weights and,
   when an :class:`~lightning_reg.EMATeacher` is present, the EMA weights
   (through its ``teacher_forward``) on the first ``epoch_eval_samples`` test
   samples. If the datamodule injected label noise (it has a ``noise_mask``,
   as :class:`~lightning_reg.data.datamodules.FashionMNISTDataModule` does),
   it also measures the **memorization rate** on a fixed random subset of the
   training set, and, with an :class:`~lightning_reg.ELR` present, the
   noisy-label detection scores of ELR's targets. Everything goes into
   :attr:`history` (checkpointed, so it survives a resume) and into the
   logger as ``report/*`` metrics. These per-epoch curves use the **first
   ``epoch_eval_samples`` test images** (2,000 by default; ``None``: all), so
   they can differ from the final table, which uses the whole test set; the
   plot's title says how many images the curve used and marks the final
   whole-set accuracy.
2. **After fit** (:meth:`finalize`; the ``lightning-reg`` CLI calls it
   automatically; from Python call it after ``trainer.fit``) it runs
   ``trainer.test`` on the last (or best) weights, live and, with an
   ``EMATeacher``, EMA; measures memorization and detection on the whole
   training set; prints a ``rich`` results table; and writes into the run's
   folder (``output_dir``, else the logger's ``log_dir``, else
   ``default_root_dir``):

   ========================  =================================================================
   ``results.json``           the final metrics and the per-epoch history
   ``test_accuracy.png``      test accuracy per epoch (live and EMA); memorization when known
   ``suspected_labels.csv``   suspected mislabeled training samples: ``index, given_label,
                              suggested_label, confidence`` (+ class names), most confident first:
                              from ELR's targets when an ``ELR`` is present, else from the
                              model's predictions (see "What the CSV needs" below)
   ``label_issues.csv``       the same detection in cleanlab's format, one row per training
                              sample: ``index, is_label_issue, label_score, given_label,
                              predicted_label`` (see :mod:`lightning_reg.metrics.cleanlab_export`)
   ``pred_probs.npy``         ``(N, C)`` rows summing to 1 (ELR's normalised targets, else the
                              model's probabilities), row ``i`` for CSV row ``i``: cleanlab's
                              ``pred_probs``, e.g. ``cleanlab.filter.find_label_issues(labels,
                              np.load("pred_probs.npy"))``
   ========================  =================================================================

**Test metrics.** With a ``test_step``, the table shows every metric it logs,
for the live and the EMA weights, under the name it was logged with; only our
own convention ``test/<name>`` is stored as ``test_<name>`` in :attr:`results`
(``test/acc`` → ``test_acc``, ``test/mIoU`` → ``test_mIoU``; the EMA value is
``test_<name>_ema``). A name without the ``test/`` prefix (``test_acc``,
``my_score``) is kept as it is. A model without a ``test_step`` is evaluated
directly: accuracy and 15-bin ECE.

**Classification-only parts.** The report's own measurements (the per-epoch
accuracy curves, the direct evaluation, memorization, detection and the CSV
from the model's predictions) need ``(B, C)`` logits and ``(B,)`` labels. With
other outputs (e.g. segmentation logits ``(B, C, H, W)``) they are skipped,
and the table shows what ``test_step`` logs.

**What the CSV needs.** ``suspected_labels.csv`` needs the labels training
saw, from either

* an :class:`~lightning_reg.ELR` callback (its targets and the labels it
  stored per sample; nothing is needed from the datamodule), or
* a datamodule with ``given_labels`` (``(N,)``, in training-index order) and a
  ``train_dataset`` wrapping a ``TensorDataset`` (an
  :class:`~lightning_reg.data.IndexedDataset` over one, as the built-in
  :class:`~lightning_reg.data.datamodules.NoisyDataModule` has); the model's
  predictions on those images then give the suspects. With a ``noise_mask``
  (and ``true_labels``) as well, the memorization and detection scores are
  measured too.

Without either, no CSV is written and :meth:`finalize` warns with the fix
(pass ``write_csv=False`` to silence it).

Definitions (see :mod:`lightning_reg.metrics.noise`): the **memorization
rate** is the fraction of truly mislabeled training samples on which the model
(eval mode) predicts the wrong given label; the **detection** scores treat
``argmax(target) != given label`` as a noisy-label detector and compare it
with the true noise mask (precision, recall, F1).

Example:
    >>> import lightning as L
    >>> report = ResultsReport(output_dir="runs/demo")
    >>> trainer = L.Trainer(callbacks=[report], logger=False)  # then: trainer.fit(model, dm)
    >>> # results = report.finalize(trainer, model, dm)

YAML::

    trainer:
      callbacks:
        - class_path: lightning_reg.ResultsReport
          init_args: {ckpt: last, epoch_eval_samples: 2000}
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor

from lightning_reg.core.protocol import find_teacher, unpack_batch
from lightning_reg.core.validation import check_bool, check_choice, check_float, check_optional_int

__all__ = ["ResultsReport"]


class ResultsReport(Callback):
    """Per-epoch test accuracy and noise diagnostics, then the final test, results table and files.

    Args:
        output_dir: Where to write the files; ``None`` uses the logger's ``log_dir``
            (else the trainer's ``default_root_dir``).
        ckpt: Weights to test after fit: ``"last"`` (the weights at the end of fit) or
            ``"best"`` (the ``ModelCheckpoint``'s best checkpoint; falls back to the last weights
            when there is none). With ``"best"`` Lightning restores every callback's state
            from that checkpoint too, so EMA weights and ELR targets match the tested weights.
        test_after_fit: Whether the CLI runs :meth:`finalize` after ``fit``.
        epoch_eval: Evaluate after every training epoch (the curves); ``False`` skips it.
        epoch_eval_samples: Test samples (the first ones) and training samples (a fixed random
            subset) used per epoch; ``None`` uses all. The final test always uses the whole test set;
            the plot's title says how many test images the curve used.
        write_csv: Write ``suspected_labels.csv``. It needs an ``ELR`` callback or a datamodule with
            ``given_labels`` and a tensor ``train_dataset`` (see the module docs); without either,
            :meth:`finalize` warns.
        min_confidence: Minimum confidence of a suspected label in the CSV, in ``[0, 1]``.
        write_label_issues: With ``write_csv``, also write ``label_issues.csv`` and ``pred_probs.npy``
            in cleanlab's format (``N × C`` floats: 2.4 MB for 60,000 samples and 10 classes).
        plot: Write ``test_accuracy.png``.
        print_table: Print the rich results table (global rank zero).

    Logged metrics (per epoch, global rank zero):

    =============================  ====================================================
    ``report/test_acc``             live weights, on the first ``epoch_eval_samples`` test samples
    ``report/test_acc_ema``         EMA weights (with an ``EMATeacher`` that has updated)
    ``report/memorization``         memorization rate on a training subset (noise known)
    ``report/detection_f1``         ELR-target detection F1 (``ELR`` present, noise known)
    =============================  ====================================================

    Attributes:
        history: One dict per epoch: ``epoch``, ``step``, the values above, and every scalar
            in ``trainer.callback_metrics`` (e.g. ``train/loss_epoch``, ``val/acc``).
        results: The final metrics after :meth:`finalize`.
    """

    version = 1

    def __init__(
        self,
        output_dir: str | None = None,
        ckpt: Literal["last", "best"] = "last",
        test_after_fit: bool = True,
        epoch_eval: bool = True,
        epoch_eval_samples: int | None = 2000,
        write_csv: bool = True,
        min_confidence: float = 0.0,
        plot: bool = True,
        print_table: bool = True,
        write_label_issues: bool = True,
    ) -> None:
        super().__init__()
        if output_dir is not None and not isinstance(output_dir, (str, os.PathLike)):
            raise TypeError(f"Expected argument `output_dir` to be a path or None, but got {output_dir!r}.")
        self.output_dir = None if output_dir is None else str(output_dir)
        self.ckpt = check_choice("ckpt", ckpt, ["last", "best"])
        self.test_after_fit = check_bool("test_after_fit", test_after_fit)
        self.epoch_eval = check_bool("epoch_eval", epoch_eval)
        self.epoch_eval_samples = check_optional_int("epoch_eval_samples", epoch_eval_samples, low=1)
        self.write_csv = check_bool("write_csv", write_csv)
        self.min_confidence = check_float("min_confidence", min_confidence, 0.0, 1.0)
        self.plot = check_bool("plot", plot)
        self.print_table = check_bool("print_table", print_table)
        self.write_label_issues = check_bool("write_label_issues", write_label_issues)
        self.history: list[dict[str, Any]] = []
        self.results: dict[str, Any] = {}
        self._fit_start: float | None = None
        self._fit_seconds: float | None = None
        self._test_x: Tensor | None = None
        self._test_y: Tensor | None = None
        self._test_total: int | None = None
        self._train_sel: Tensor | None = None
        self._suspects: Any = None
        self._label_issues: Any = None
        self._no_csv_reason: str | None = None
        self._metric_names: dict[str, str] = {}
        self._told_dense = False

    # -- during fit --------------------------------------------------------------------------------
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._fit_start = time.perf_counter()
        self._test_x = self._test_y = self._train_sel = None
        self._test_total = None

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._fit_start is not None:
            self._fit_seconds = time.perf_counter() - self._fit_start

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.epoch_eval or trainer.sanity_checking:
            return
        row: dict[str, Any] = {"epoch": int(trainer.current_epoch), "step": int(trainer.global_step)}
        logged: dict[str, float] = {}
        if trainer.is_global_zero:
            logged = self._epoch_metrics(trainer, pl_module)
            row.update(logged)
            for key, value in trainer.callback_metrics.items():
                if isinstance(value, Tensor) and value.numel() == 1:
                    row[key] = float(value)
        self.history.append(row)
        if logged and trainer.logger is not None:
            trainer.logger.log_metrics({f"report/{k}": v for k, v in logged.items()}, step=trainer.global_step)

    def _epoch_metrics(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, float]:
        out: dict[str, float] = {}
        test = self._epoch_test_tensors(trainer, self._eval_limit(trainer))
        device = pl_module.device
        if test is not None:
            x, y = test
            probs = self._classify(trainer, pl_module, pl_module, x, y, device)
            if probs is not None:
                out["test_acc"] = _accuracy(probs, y)
                teacher = _updated_teacher(trainer)
                if teacher is not None:
                    probs = self._classify(trainer, pl_module, teacher.teacher_forward, x, y, device)
                    if probs is not None:
                        out["test_acc_ema"] = _accuracy(probs, y)
        noise = _noise_info(trainer)
        if noise is not None and bool(noise[2].any()):
            train_x, given, mask = noise
            if self._train_sel is None:
                n = len(given)
                limit = self._eval_limit(trainer)
                k = n if limit is None else min(n, limit)
                self._train_sel = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:k]
            sel = self._train_sel
            probs = self._classify(trainer, pl_module, pl_module, train_x[sel], given[sel], device)
            noisy = mask[sel]
            if probs is not None and bool(noisy.any()):
                preds = probs.argmax(-1)
                out["memorization"] = float((preds[noisy] == given[sel][noisy]).float().mean())
            elr = _find_elr(trainer)
            if elr is not None:
                with contextlib.suppress(RuntimeError, KeyError):  # no targets yet
                    out["detection_f1"] = float(elr.diagnostics(noise_mask=mask)["f1"])
        return out

    def _eval_limit(self, trainer: Trainer) -> int | None:
        """``epoch_eval_samples``, capped at 256 under ``fast_dev_run`` (a smoke test)."""
        if getattr(trainer, "fast_dev_run", False):
            return 256 if self.epoch_eval_samples is None else min(self.epoch_eval_samples, 256)
        return self.epoch_eval_samples

    def _epoch_test_tensors(self, trainer: Trainer, limit: int | None) -> tuple[Tensor, Tensor] | None:
        if self._test_x is None:
            loader = _test_loader(trainer)
            test = _gather_test_tensors(loader, limit)
            if test is None:
                return None
            self._test_x, self._test_y = test
            self._test_total = _dataset_size(loader)
        assert self._test_y is not None
        return self._test_x, self._test_y

    def _classify(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        fn: Callable[[Tensor], Tensor],
        x: Tensor,
        y: Tensor,
        device: torch.device,
    ) -> Tensor | None:
        """``(N, C)`` probabilities of ``fn`` on ``x``, or ``None`` (said once) when the outputs are not ``(B, C)``."""
        probs = self._predict(trainer, pl_module, fn, x, device) if y.dim() == 1 else None
        if probs is None and not self._told_dense:
            self._told_dense = True
            rank_zero_info(
                "`ResultsReport`: the labels or outputs are not `(B,)` and `(B, C)` (e.g. dense predictions), so its"
                " own accuracy curves, ECE, memorization and suspected labels are skipped; the results table shows"
                " the metrics the module logs in `test_step`."
            )
        return probs

    @staticmethod
    @torch.no_grad()
    def _predict(
        trainer: Trainer,
        pl_module: LightningModule,
        fn: Callable[[Tensor], Tensor],
        x: Tensor,
        device: torch.device,
        batch_size: int = 1000,
    ) -> Tensor | None:
        """Softmax of ``fn`` over ``x`` in eval mode, or ``None`` if its outputs are not ``(B, C)`` logits.

        Restores the module's train/eval mode.
        """
        was_training = pl_module.training
        pl_module.eval()
        try:
            out = []
            with trainer.precision_plugin.forward_context():
                for start in range(0, len(x), batch_size):
                    logits = fn(x[start : start + batch_size].to(device))
                    if not isinstance(logits, Tensor) or logits.dim() != 2:
                        return None
                    out.append(logits.float().softmax(-1).cpu())
        finally:
            pl_module.train(was_training)
        return torch.cat(out) if out else torch.zeros(0, 0)

    # -- after fit ---------------------------------------------------------------------------------
    def finalize(
        self, trainer: Trainer, model: LightningModule | None = None, datamodule: Any = None
    ) -> dict[str, Any]:
        """Test the last (or best) weights, live and EMA; print the results table; write the files.

        Args:
            trainer: The trainer that ran ``fit``.
            model: The model (default: ``trainer.lightning_module``).
            datamodule: The datamodule (default: ``_datamodule(trainer)``); it needs a ``test_dataloader``.

        Returns:
            The final metrics (also in :attr:`results` and ``results.json``).
        """
        model = model if model is not None else trainer.lightning_module
        datamodule = datamodule if datamodule is not None else _datamodule(trainer)
        ckpt_path = self._ckpt_path(trainer)
        history = list(self.history)  # trainer.test(ckpt_path=...) restores callback states
        results: dict[str, Any] = {"weights": "best" if ckpt_path else "last", "checkpoint": ckpt_path}
        ema = _find_ema(trainer)
        self._metric_names = {}
        live = self._test(trainer, model, datamodule, ckpt_path, ema, use_ema=False)
        results.update({f"{k}": v for k, v in live.items()})
        if ema is not None and _has_updated(ema):
            ema_metrics = self._test(trainer, model, datamodule, ckpt_path, ema, use_ema=True)
            results.update({f"{k}_ema": v for k, v in ema_metrics.items()})
        results["test_metrics"] = dict(self._metric_names)
        self.history = history
        test_total = self._test_total
        if test_total is None:
            test_total = _dataset_size(_test_loader(trainer, datamodule))
        if test_total is not None:
            results["test_samples"] = test_total
        if self._test_y is not None:
            results["epoch_eval_test_samples"] = len(self._test_y)
        self._suspects, self._label_issues, self._no_csv_reason = None, None, None
        if trainer.is_global_zero:
            results.update(self._final_noise(trainer, model, datamodule))
        if self._fit_seconds is not None:
            results["fit_seconds"] = round(self._fit_seconds, 1)
        results["epochs"] = int(trainer.current_epoch)
        self.results = results
        self._write_outputs(trainer, results, datamodule)
        return results

    def _ckpt_path(self, trainer: Trainer) -> str | None:
        if self.ckpt != "best":
            return None
        cb = trainer.checkpoint_callback
        path = getattr(cb, "best_model_path", "") or ""
        return path if path and os.path.exists(path) else None

    def _test(
        self, trainer: Trainer, model: LightningModule, datamodule: Any, ckpt_path: str | None, ema: Any, use_ema: bool
    ) -> dict[str, float]:
        if not is_overridden("test_step", model):  # a user model without `test_step`: evaluate it directly
            return self._direct_test(trainer, model, datamodule, ema, use_ema)
        previous = getattr(ema, "eval_with_ema", None) if ema is not None else None
        if ema is not None and previous is not None:
            ema.eval_with_ema = use_ema
        try:
            out = trainer.test(model, datamodule=datamodule, ckpt_path=ckpt_path, verbose=False)
        finally:
            if ema is not None and previous is not None:
                ema.eval_with_ema = previous
        metrics = out[0] if out else {}
        renamed = {}
        for name, value in metrics.items():
            key = _result_key(name, metrics)
            renamed[key] = float(value)
            self._metric_names.setdefault(key, name)
        return renamed

    def _direct_test(
        self, trainer: Trainer, model: LightningModule, datamodule: Any, ema: Any, use_ema: bool
    ) -> dict[str, float]:
        """Accuracy and 15-bin ECE over the whole test set, for classifiers without a ``test_step``."""
        from torchmetrics.functional.classification import multiclass_calibration_error

        test = _gather_test_tensors(_test_loader(trainer, datamodule))
        if test is None:
            return {}
        x, y = test
        fn = ema.teacher_forward if use_ema else model
        probs = self._classify(trainer, model, fn, x, y, model.device)
        if probs is None:
            return {}
        ece = multiclass_calibration_error(probs, y, num_classes=probs.shape[1], n_bins=15, norm="l1")
        self._metric_names.update({"test_acc": "test_acc", "test_ece": "test_ece"})
        return {"test_acc": _accuracy(probs, y), "test_ece": float(ece)}

    def _final_noise(self, trainer: Trainer, model: LightningModule, datamodule: Any) -> dict[str, Any]:
        """Memorization, detection and the suspects, from ELR's targets or the model's training predictions."""
        from lightning_reg.metrics.cleanlab_export import label_issues_from_targets
        from lightning_reg.metrics.noise import label_noise_scores, suspected_mislabeled

        out: dict[str, Any] = {}
        noise = _noise_info(trainer, datamodule)
        probs: Tensor | None = None
        mask: Tensor | None = None
        if noise is not None:
            train_x, given, mask = noise
            out["train_samples"] = len(given)
            out["noise_rate"] = float(mask.float().mean())
            probs = self._classify(trainer, model, model, train_x, given, model.device)
            if probs is not None and bool(mask.any()):
                preds = probs.argmax(-1)
                out["memorization"] = float((preds[mask] == given[mask]).float().mean())
                true = _true_labels(trainer, datamodule)
                if true is not None:
                    out["noisy_fit_true"] = float((preds[mask] == true[mask]).float().mean())
        known = mask if mask is not None and bool(mask.any()) else None
        elr = _find_elr(trainer)
        scores: dict[str, float] = {}
        if elr is not None:
            try:
                seen = elr.seen
                scores = elr.diagnostics(noise_mask=known if known is not None and len(known) == len(seen) else None)
            except RuntimeError:  # no targets yet
                elr = None
        if elr is not None:
            out["detection_source"] = "ELR targets"
            self._suspects = elr.suspected_labels(self.min_confidence)
            if self.write_csv and self.write_label_issues:
                self._label_issues = label_issues_from_targets(
                    elr.targets, elr.given_labels.clamp_min(0), elr.seen, self.min_confidence
                )
        elif noise is not None and probs is not None:
            out["detection_source"] = "model predictions"
            scores = {k: float(v) for k, v in label_noise_scores(probs, noise[1], known).items()}
            self._suspects = suspected_mislabeled(probs, noise[1], min_confidence=self.min_confidence)
            if self.write_csv and self.write_label_issues:
                self._label_issues = label_issues_from_targets(probs, noise[1], min_confidence=self.min_confidence)
        elif noise is not None:
            self._no_csv_reason = "the model's outputs are not `(B, C)` logits, so no per-sample label is suspected"
        else:
            self._no_csv_reason = (
                "it needs the labels training saw: add `ELR()` to the callbacks (it stores them with its targets),"
                " or give the datamodule `given_labels` ((N,) in training-index order) and a `train_dataset` over a"
                " `TensorDataset` (as `lightning_reg.data.datamodules.NoisyDataModule` has)"
            )
        for key in ("precision", "recall", "f1", "disagreement"):
            if key in scores:
                out[f"detection_{key}"] = float(scores[key])
        return out

    # -- outputs -----------------------------------------------------------------------------------
    def resolve_output_dir(self, trainer: Trainer) -> Path:
        """The folder the files go to (see ``output_dir``)."""
        if self.output_dir is not None:
            return Path(self.output_dir)
        log_dir = trainer.log_dir if trainer.loggers else None
        return Path(log_dir or trainer.default_root_dir)

    @rank_zero_only
    def _write_outputs(self, trainer: Trainer, results: dict[str, Any], datamodule: Any) -> None:
        out_dir = self.resolve_output_dir(trainer)
        out_dir.mkdir(parents=True, exist_ok=True)
        files: dict[str, str] = {}
        suspects = self._suspects
        if self.write_csv and suspects is not None:
            from lightning_reg.metrics.noise import write_suspected_csv

            names = list(getattr(datamodule, "classes", ()) or ()) or None
            path = out_dir / "suspected_labels.csv"
            results["suspected_labels"] = write_suspected_csv(path, suspects, names)
            files["suspected_labels"] = str(path)
            if self._label_issues is not None:
                from lightning_reg.metrics.cleanlab_export import write_label_issues

                path, npy = out_dir / "label_issues.csv", out_dir / "pred_probs.npy"
                results["label_issues"] = write_label_issues(path, self._label_issues, npy)
                files["label_issues"], files["pred_probs"] = str(path), str(npy)
        elif self.write_csv:
            rank_zero_warn(
                f"`ResultsReport` wrote no `suspected_labels.csv`: {self._no_csv_reason or 'no labels to suspect'}."
                " Pass `ResultsReport(write_csv=False)` to silence this."
            )
        if self.plot and self.history:
            path = out_dir / "test_accuracy.png"
            if self._plot(path, results):
                files["plot"] = str(path)
        results["files"] = files
        path = out_dir / "results.json"
        files["results"] = str(path)
        path.write_text(json.dumps({"results": results, "history": self.history}, indent=2, default=str))
        if self.print_table:
            from rich.console import Console

            console = Console()
            console.print(self.results_table(results))
            console.print(f"Wrote {', '.join(Path(f).name for f in files.values())} to {out_dir}", soft_wrap=True)

    def _plot(self, path: Path, results: dict[str, Any]) -> bool:
        fig = self.figure(results)
        if fig is None:
            return False
        fig.savefig(path, dpi=110)
        return True

    def figure(self, results: dict[str, Any] | None = None) -> Any:
        """The ``matplotlib`` figure of ``test_accuracy.png`` (``None`` without matplotlib or an accuracy curve).

        The title says which test images the per-epoch curve used (the first ``epoch_eval_samples``);
        the final accuracy on the whole test set, from ``results``, is marked at the last epoch.

        Args:
            results: The final metrics (default: :attr:`results`).
        """
        results = self.results if results is None else results
        try:
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure
        except ImportError:  # pragma: no cover - matplotlib is optional at runtime
            return None
        epochs = [r["epoch"] + 1 for r in self.history if "test_acc" in r]
        if not epochs:
            return None
        has_mem = any("memorization" in r for r in self.history)
        # The Agg canvas directly: no pyplot state; the caller's backend (e.g. a notebook's) is untouched.
        fig = Figure(figsize=(10 if has_mem else 5.5, 3.8))
        FigureCanvasAgg(fig)
        axes = fig.subplots(1, 2 if has_mem else 1, squeeze=False)
        ax = axes[0][0]
        ax.plot(epochs, [r["test_acc"] for r in self.history if "test_acc" in r], "o-", label="live weights")
        ema_rows = [r for r in self.history if "test_acc_ema" in r]
        if ema_rows:
            ax.plot([r["epoch"] + 1 for r in ema_rows], [r["test_acc_ema"] for r in ema_rows], "s--", label="EMA")
        used, total = results.get("epoch_eval_test_samples"), results.get("test_samples")
        total_text = f"{total:,}" if total is not None else "?"
        # The final accuracy on the whole test set (only an accuracy: `test/acc`, `test_acc` or the direct one).
        accuracy = results.get("test_metrics", {}).get("test_acc") in ("test/acc", "test_acc")
        for key, marker, color, name in (("test_acc", "*", "C0", "live"), ("test_acc_ema", "P", "C1", "EMA")):
            if accuracy and isinstance(results.get(key), (int, float)):
                label = f"final {name}, all {total_text} images"
                ax.plot([epochs[-1]], [results[key]], marker, color=color, markersize=11, label=label)
        ax.set_xlabel("epoch")
        ax.set_ylabel("test accuracy")
        if used is not None and total is not None and used < total:
            subset = f"first {used:,} of {total:,} test images"
        elif used is not None:
            subset = f"all {used:,} test images"
        else:
            subset = ""
        ax.set_title("Test accuracy per epoch" + (f"\n({subset})" if subset else ""), fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        if has_mem:
            ax2 = axes[0][1]
            rows = [r for r in self.history if "memorization" in r]
            ax2.plot([r["epoch"] + 1 for r in rows], [r["memorization"] for r in rows], "o-", color="C3")
            ax2.set_xlabel("epoch")
            ax2.set_ylabel("fraction of noisy samples")
            ax2.set_title("Memorization of the wrong labels")
            ax2.set_ylim(0, 1)
            ax2.grid(alpha=0.3)
        fig.tight_layout()
        return fig

    @staticmethod
    def results_table(results: dict[str, Any]) -> Any:
        """The ``rich`` table of :meth:`finalize`'s results (fits an 80-column terminal)."""
        from rich.table import Table

        weights = results.get("weights", "last")
        table = Table(title=f"lightning-reg results ({weights} weights)", title_justify="left")
        table.add_column("metric")
        table.add_column("live", justify="right")
        table.add_column("EMA", justify="right")

        def fmt(key: str, percent: bool) -> str:
            v = results.get(key)
            if not isinstance(v, (int, float)) or not math.isfinite(float(v)):
                return "—"
            return f"{100 * float(v):.2f} %" if percent and 0.0 <= float(v) <= 1.0 else f"{float(v):.4f}"

        names = results.get("test_metrics")
        if not isinstance(names, dict):  # results from before `test_metrics` was recorded
            names = {k: k for k in results if k.startswith("test_") and not k.endswith("_ema") and k != "test_samples"}
        has_ema = any(f"{k}_ema" in results for k in names)
        known = {"test_acc": "test accuracy", "test_ece": "test ECE (15 bins)", "test_loss": "test loss"}
        order = [k for k in known if k in names] + [k for k in names if k not in known]
        for key in order:
            label = known.get(key, str(names[key]))
            table.add_row(label, fmt(key, key == "test_acc"), fmt(f"{key}_ema", key == "test_acc") if has_ema else "")
        if not order:
            table.add_row("test metrics", "none logged", "")
        if "noise_rate" in results:
            table.add_row("label noise (train)", fmt("noise_rate", True), "")
        if "memorization" in results:
            table.add_row("memorization rate", fmt("memorization", True), "")
        if "detection_f1" in results:
            table.add_row("noisy-label detection F1", fmt("detection_f1", True), "")
            table.add_row(
                "  precision / recall",
                f"{fmt('detection_precision', True)} / {fmt('detection_recall', True)}",
                "",
            )
            table.add_row("  detected from", str(results.get("detection_source", "")), "")
        if "suspected_labels" in results:
            table.add_row("suspected labels (CSV rows)", str(results["suspected_labels"]), "")
        if "fit_seconds" in results:
            table.add_row("fit time", f"{results['fit_seconds']:.0f} s", "")
        return table

    # -- state -------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"version": self.version, "history": [dict(r) for r in self.history]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("version") != self.version:
            raise ValueError(
                f"Expected a `ResultsReport` state of version {self.version}, but got {state_dict.get('version')!r}."
            )
        self.history = [dict(r) for r in state_dict.get("history", [])]


# -- helpers -----------------------------------------------------------------------------------------
def _callbacks(trainer: Trainer) -> Iterable[Callback]:
    return list(getattr(trainer, "callbacks", []) or [])


def _datamodule(trainer: Trainer) -> Any:
    return getattr(trainer, "datamodule", None)


def _find_ema(trainer: Trainer) -> Any:
    """The first callback that provides ``teacher_forward`` and an ``eval_with_ema`` switch (an EMA teacher)."""
    for cb in _callbacks(trainer):
        if hasattr(cb, "teacher_forward") and hasattr(cb, "eval_with_ema"):
            return cb
    return None


def _has_updated(teacher: Any) -> bool:
    flag = getattr(teacher, "has_updated", None)
    return True if flag is None else bool(flag)


def _updated_teacher(trainer: Trainer) -> Any:
    teacher = _find_ema(trainer) or find_teacher(trainer)
    return teacher if teacher is not None and _has_updated(teacher) else None


def _find_elr(trainer: Trainer) -> Any:
    for cb in _callbacks(trainer):
        if type(cb).__name__ == "ELR" and hasattr(cb, "diagnostics"):
            return cb
    return None


def _test_loader(trainer: Trainer, datamodule: Any = None) -> Any:
    dm = datamodule if datamodule is not None else _datamodule(trainer)
    if dm is None or not hasattr(dm, "test_dataloader"):
        return None
    try:
        dm.setup("test")
        return dm.test_dataloader()
    except (RuntimeError, NotImplementedError, AttributeError, TypeError):
        return None


def _result_key(name: str, logged: Mapping[str, Any]) -> str:
    """The :attr:`ResultsReport.results` key of a logged test metric: ``test/<x>`` → ``test_<x>``, else ``name``."""
    if name.startswith("test/"):
        key = "test_" + name[len("test/") :]
        return name if key in logged else key
    return name


def _dataset_size(loader: Any) -> int | None:
    """The number of samples of a loader's dataset, when it has a length."""
    try:
        return len(loader.dataset)
    except (AttributeError, TypeError):
        return None


def _gather_test_tensors(loader: Any, limit: int | None = None) -> tuple[Tensor, Tensor] | None:
    """The first ``limit`` (all if ``None``) ``(x, y)`` of a loader's batches, concatenated; ``None`` if empty.

    Batches are read with :func:`~lightning_reg.core.protocol.unpack_batch`; ``None`` for another form.
    """
    if loader is None:
        return None
    xs, ys, total = [], [], 0
    for batch in loader:
        try:
            x, y, _ = unpack_batch(batch)
        except ValueError:
            return None
        if not isinstance(x, Tensor) or not isinstance(y, Tensor):
            return None
        xs.append(x)
        ys.append(y)
        total += len(y)
        if limit is not None and total >= limit:
            break
    if not xs:
        return None
    k = total if limit is None else min(total, limit)
    return torch.cat(xs)[:k], torch.cat(ys)[:k]


def _noise_info(trainer: Trainer, datamodule: Any = None) -> tuple[Tensor, Tensor, Tensor] | None:
    """``(train images, given labels, noise mask)`` from a datamodule that records its label noise."""
    dm = datamodule if datamodule is not None else _datamodule(trainer)
    mask = getattr(dm, "noise_mask", None)
    given = getattr(dm, "given_labels", None)
    ds = getattr(dm, "train_dataset", None)
    base = getattr(ds, "dataset", None)
    tensors = getattr(base, "tensors", None)
    if mask is None or given is None or tensors is None:
        return None
    return tensors[0], given, mask.bool()


def _true_labels(trainer: Trainer, datamodule: Any = None) -> Tensor | None:
    dm = datamodule if datamodule is not None else _datamodule(trainer)
    return getattr(dm, "true_labels", None)


def _accuracy(probs: Tensor, y: Tensor) -> float:
    return float((probs.argmax(-1) == y).float().mean()) if len(y) else float("nan")
