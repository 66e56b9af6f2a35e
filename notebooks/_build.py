"""Generate the example notebooks (outputs stripped) from the cells below.

Run ``python notebooks/_build.py`` after editing; ``tests/test_notebooks.py``
executes every notebook in fast mode (``LIGHTNING_REG_NB_FAST=1``: tiny
budgets) and checks that the committed files match this script.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

SETUP = """\
import os
import warnings
from pathlib import Path

import lightning as L
import matplotlib.pyplot as plt
import torch

# Fast mode (the test suite): tiny budgets that only check the notebook still runs.
FAST = os.environ.get("LIGHTNING_REG_NB_FAST", "0") == "1"
OUT = Path(os.environ.get("LIGHTNING_REG_NB_OUT", "outputs/notebooks"))
os.environ.setdefault("LIGHTNING_REG_SUMMARY", "0")  # the fit-start summary table is for the CLI
warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*Total length of.*")
torch.set_num_threads(min(2, os.cpu_count() or 1))
print("fast mode" if FAST else "full mode", "- outputs in", OUT)"""

RUN = '''\
from lightning_reg import ResultsReport


def run(name, callbacks, model, datamodule, epochs, seed=0, **trainer_kwargs):
    """Fit with a ResultsReport, run its final test, return (trainer, report, results)."""
    L.seed_everything(seed, verbose=False)
    report = ResultsReport(output_dir=str(OUT / name), print_table=False)
    kwargs = dict(
        accelerator="cpu", devices=1, max_epochs=epochs, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )
    kwargs.update(trainer_kwargs)
    trainer = L.Trainer(callbacks=[*callbacks, report], **kwargs)
    trainer.fit(model, datamodule=datamodule)
    results = report.finalize(trainer, model, datamodule)
    return trainer, report, results


def curve(report, key):
    rows = [r for r in report.history if key in r]
    return [r["epoch"] + 1 for r in rows], [r[key] for r in rows]'''


def quickstart() -> list:
    return [
        new_markdown_cell(
            "# Quickstart\n\n"
            "`lightning-reg` packages training regularizers as Lightning callbacks. Modules that use the "
            "`RegularizedModule` mixin (the built-in `SmallCNN` and `MLPClassifier`, or your own) get a "
            "`training_step` that runs every loss-side technique; weight- and gradient-space techniques work "
            "with any `LightningModule`.\n\n"
            "This notebook trains a small CNN on Fashion-MNIST with label smoothing and an EMA of the weights, "
            "plots test accuracy per epoch, and then runs the main job's YAML recipe from Python with a small "
            "budget. Set `LIGHTNING_REG_NB_FAST=1` for a smoke-test budget."
        ),
        new_code_cell(SETUP),
        new_markdown_cell(
            "## Data\n\n`FashionMNISTDataModule` reads the IDX files offline (an explicit `root`, "
            "`$FASHION_MNIST_ROOT`, Debian's `/usr/share/datasets/fashion-mnist`, or the cache; "
            "`download=True` fetches them). Training batches are `(x, y, index)`."
        ),
        new_code_cell(
            "from lightning_reg.data.datamodules import FashionMNISTDataModule\n\n"
            "dm = FashionMNISTDataModule(train_subset=600 if FAST else 12000, test_subset=1000 if FAST else None,\n"
            "                            val_split=0.1, batch_size=128)\n"
            "dm.setup('fit')\n"
            "x, y, index = next(iter(dm.train_dataloader()))\n"
            "print(dm.describe(), x.shape, y[:8].tolist(), index[:8].tolist())\n"
            "fig, axes = plt.subplots(1, 8, figsize=(10, 1.6))\n"
            "for ax, img, label in zip(axes, x, y):\n"
            "    ax.imshow(img[0], cmap='gray'); ax.set_title(dm.classes[label], fontsize=7); ax.axis('off')\n"
            "plt.show()"
        ),
        new_markdown_cell(
            "## Train with two regularizers\n\nList them as callbacks. `ResultsReport` records test "
            "accuracy per epoch (live and EMA weights) and runs the final test."
        ),
        new_code_cell(RUN),
        new_code_cell(
            "from lightning_reg import EMATeacher, LabelSmoothing\n"
            "from lightning_reg.models import SmallCNN\n\n"
            "EPOCHS = 1 if FAST else 8\n"
            "trainer, report, results = run(\n"
            "    'quickstart', [LabelSmoothing(smoothing=0.1), EMATeacher(decay=0.99)],\n"
            "    SmallCNN(lr=0.05), dm, EPOCHS, limit_train_batches=3 if FAST else None,\n"
            ")\n"
            "print({k: round(v, 4) for k, v in results.items() if k.startswith('test_') and isinstance(v, float)})"
        ),
        new_code_cell(
            "ep, live = curve(report, 'test_acc')\n"
            "ep_ema, ema = curve(report, 'test_acc_ema')\n"
            "plt.figure(figsize=(5, 3.5))\n"
            "plt.plot(ep, live, 'o-', label='live weights')\n"
            "if ema:\n"
            "    plt.plot(ep_ema, ema, 's--', label='EMA weights')\n"
            "plt.xlabel('epoch'); plt.ylabel('test accuracy'); plt.legend(); plt.grid(alpha=0.3)\n"
            "plt.title('Quickstart: label smoothing + EMA')\n"
            "plt.show()"
        ),
        new_markdown_cell(
            "## The main job from Python\n\n"
            "`lightning-reg fit --config configs/noisy_fashion_mnist.yaml` is the same as calling `cli_main` with "
            "those arguments. Command-line overrides shrink the budget here. The run prints the results table "
            "and writes `results.json`, `test_accuracy.png` and `suspected_labels.csv` into its folder."
        ),
        new_code_cell(
            "from lightning_reg.cli import cli_main\n\n"
            "config = Path('..') / 'configs' / 'noisy_fashion_mnist.yaml'\n"
            "if not config.exists():\n"
            "    config = Path('configs') / 'noisy_fashion_mnist.yaml'\n"
            "overrides = ['--data.init_args.train_subset=600', '--data.init_args.test_subset=500',\n"
            "             '--trainer.max_epochs=1', '--trainer.limit_train_batches=3'] \\\n"
            "    if FAST else ['--data.init_args.train_subset=3000', '--trainer.max_epochs=3']\n"
            "cli = cli_main(['fit', '--config', str(config), f'--trainer.logger.init_args.save_dir={OUT}', *overrides])"
        ),
        new_code_cell(
            "from IPython.display import Image, display\n\n"
            "report = next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == 'ResultsReport')\n"
            "print(report.results['files'])\n"
            "display(Image(filename=report.results['files']['plot']))"
        ),
    ]


def noisy_labels() -> list:
    return [
        new_markdown_cell(
            "# Noisy labels: ELR and consistency\n\n"
            "With 40 % of the training labels flipped at random, a network first learns the clean signal "
            "(*early learning*) and later memorizes the wrong labels. We compare plain cross-entropy, ELR "
            "(Liu et al., NeurIPS 2020) and ELR + masked-image consistency to an EMA teacher, and track:\n\n"
            "* **test accuracy** per epoch;\n"
            "* the **memorization rate**: the fraction of mislabeled training samples the model predicts with "
            "their wrong given label;\n"
            "* the **detection quality** of ELR's targets: `argmax(target) != given label` flags a sample as "
            "mislabeled; precision, recall and F1 against the true noise mask."
        ),
        new_code_cell(SETUP),
        new_code_cell(RUN),
        new_code_cell(
            "from lightning_reg import ELR, EMATeacher, NoisyLabelConsistency\n"
            "from lightning_reg.augment import PatchMask\n"
            "from lightning_reg.data.datamodules import FashionMNISTDataModule\n"
            "from lightning_reg.models import SmallCNN\n\n"
            "EPOCHS = 2 if FAST else 12\n"
            "LIMIT = dict(limit_train_batches=3, limit_val_batches=1) if FAST else {}\n\n"
            "def data():\n"
            "    return FashionMNISTDataModule(\n"
            "        noise_type='symmetric', noise_rate=0.4, train_subset=600 if FAST else 10000,\n"
            "        test_subset=500 if FAST else None, val_split=0.1, batch_size=128,\n"
            "    )\n\n"
            "setups = {\n"
            "    'cross-entropy': lambda: [],\n"
            "    'ELR': lambda: [ELR(beta=0.7, lam=3.0)],\n"
            "    'ELR + consistency': lambda: [\n"
            "        EMATeacher(decay=0.99),\n"
            "        ELR(beta=0.7, lam=3.0),\n"
            "        NoisyLabelConsistency(teacher='ema', augmentation=PatchMask(patch_size=4), rampup_epochs=2),\n"
            "    ],\n"
            "}\n"
            "runs = {}\n"
            "for name, make in setups.items():\n"
            "    dm = data()\n"
            "    _, report, results = run(name.replace(' ', '_'), make(), SmallCNN(lr=0.05), dm, EPOCHS, **LIMIT)\n"
            "    runs[name] = (report, results)\n"
            "    nan = float('nan')\n"
            "    print(f\"{name:18s} test acc {results['test_acc']:.4f}\"\n"
            "          f\"  memorization {results.get('memorization', nan):.4f}\"\n"
            "          f\"  detection F1 {results.get('detection_f1', nan):.4f} ({results.get('detection_source')})\")"
        ),
        new_markdown_cell(
            "## Memorization curves\n\nCross-entropy's memorization rate climbs with the epochs; "
            "ELR holds it down, which is what keeps its test accuracy from decaying."
        ),
        new_code_cell(
            "fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))\n"
            "for name, (report, _) in runs.items():\n"
            "    ax1.plot(*curve(report, 'test_acc'), 'o-', label=name)\n"
            "    ax2.plot(*curve(report, 'memorization'), 'o-', label=name)\n"
            "ax1.set(xlabel='epoch', ylabel='test accuracy', title='Test accuracy (40 % symmetric noise)')\n"
            "ax2.set(xlabel='epoch', ylabel='fraction of mislabeled samples', ylim=(0, 1),\n"
            "        title='Memorization of the wrong labels')\n"
            "for ax in (ax1, ax2):\n"
            "    ax.grid(alpha=0.3); ax.legend()\n"
            "plt.show()"
        ),
        new_markdown_cell(
            "## Detection quality\n\nELR's temporal-ensemble targets flag mislabeled samples during "
            "training, with no cross-validation. The F1 per epoch and the final precision/recall:"
        ),
        new_code_cell(
            "fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))\n"
            "names = [n for n in runs if n != 'cross-entropy']\n"
            "for name in names:\n"
            "    ax1.plot(*curve(runs[name][0], 'detection_f1'), 'o-', label=name)\n"
            "ax1.set(xlabel='epoch', ylabel='F1', ylim=(0, 1), title='Noisy-label detection F1 (ELR targets)')\n"
            "ax1.grid(alpha=0.3); ax1.legend()\n"
            "width = 0.25\n"
            "for i, key in enumerate(['detection_precision', 'detection_recall', 'detection_f1']):\n"
            "    values = [runs[n][1].get(key, 0.0) for n in names]\n"
            "    ax2.bar([j + i * width for j in range(len(names))], values, width, label=key.split('_')[1])\n"
            "ax2.set_xticks([j + width for j in range(len(names))], names)\n"
            "ax2.set(ylim=(0, 1), title='Final detection scores'); ax2.legend()\n"
            "plt.show()"
        ),
        new_markdown_cell("The suspected mislabeled samples, most confident first (`suspected_labels.csv`):"),
        new_code_cell(
            "import csv\n\n"
            "path = runs['ELR'][1]['files']['suspected_labels']\n"
            "with open(path) as fh:\n"
            "    rows = list(csv.DictReader(fh))\n"
            "print(len(rows), 'suspects in', path)\n"
            "for row in rows[:8]:\n"
            "    print(row)"
        ),
    ]


def calibration() -> list:
    return [
        new_markdown_cell(
            "# Calibration: PS-KD vs label smoothing\n\n"
            "PS-KD (Kim et al., ICCV 2021) trains on `(1 - α_t)·onehot(y) + α_t·P_prev`, the model's own "
            "predictions from the previous epoch, and reports much lower expected calibration error (ECE). "
            "Label smoothing is the classic alternative. We train cross-entropy, label smoothing (ε = 0.1) and "
            "PS-KD (α_T = 0.8) on clean Fashion-MNIST and draw reliability diagrams of the test predictions."
        ),
        new_code_cell(SETUP),
        new_code_cell(RUN),
        new_code_cell(
            "from lightning_reg import PSKD, LabelSmoothing\n"
            "from lightning_reg.data.datamodules import FashionMNISTDataModule\n"
            "from lightning_reg.models import SmallCNN\n\n"
            "EPOCHS = 2 if FAST else 10\n"
            "LIMIT = dict(limit_train_batches=3, limit_val_batches=1) if FAST else {}\n"
            "setups = {\n"
            "    'cross-entropy': [],\n"
            "    'label smoothing 0.1': [LabelSmoothing(0.1)],\n"
            "    'PS-KD 0.8': [PSKD(alpha_T=0.8)],\n"
            "}\n"
            "models, results = {}, {}\n"
            "for name, callbacks in setups.items():\n"
            "    dm = FashionMNISTDataModule(train_subset=600 if FAST else 15000, test_subset=500 if FAST else None,\n"
            "                                val_split=0.1, batch_size=128)\n"
            "    model = SmallCNN(lr=0.05)\n"
            "    _, _, res = run(name.replace(' ', '_'), callbacks, model, dm, EPOCHS, **LIMIT)\n"
            "    models[name], results[name] = (model, dm), res\n"
            "    print(f\"{name:22s} test acc {res['test_acc']:.4f}  ECE {res['test_ece']:.4f}\")"
        ),
        new_code_cell(
            "@torch.no_grad()\n"
            "def test_probs(model, dm):\n"
            "    model.eval()\n"
            "    probs, labels = [], []\n"
            "    for x, y in dm.test_dataloader():\n"
            "        probs.append(model(x).softmax(-1)); labels.append(y)\n"
            "    return torch.cat(probs), torch.cat(labels)\n\n"
            "def reliability(probs, labels, bins=15):\n"
            "    conf, pred = probs.max(-1)\n"
            "    correct = (pred == labels).float()\n"
            "    edges = torch.linspace(0, 1, bins + 1)\n"
            "    idx = torch.bucketize(conf, edges[1:-1], right=True)\n"
            "    count = torch.bincount(idx, minlength=bins).float()\n"
            "    acc = torch.bincount(idx, weights=correct, minlength=bins) / count.clamp_min(1)\n"
            "    mean_conf = torch.bincount(idx, weights=conf, minlength=bins) / count.clamp_min(1)\n"
            "    ece = float((count / count.sum() * (acc - mean_conf).abs()).sum())\n"
            "    return edges, acc, mean_conf, count, ece"
        ),
        new_code_cell(
            "fig, axes = plt.subplots(1, len(models), figsize=(4 * len(models), 4), sharey=True)\n"
            "for ax, (name, (model, dm)) in zip(axes, models.items()):\n"
            "    edges, acc, conf, count, ece = reliability(*test_probs(model, dm))\n"
            "    centers = (edges[:-1] + edges[1:]) / 2\n"
            "    keep = count > 0\n"
            "    ax.bar(centers[keep], acc[keep], width=1 / len(centers), edgecolor='k', alpha=0.7, label='accuracy')\n"
            "    ax.plot([0, 1], [0, 1], 'k--', label='perfect calibration')\n"
            "    ax.plot(conf[keep], acc[keep], 'r.', label='bin mean confidence')\n"
            "    ax.set(title=f'{name}\\nECE {ece:.4f}', xlabel='confidence', xlim=(0, 1), ylim=(0, 1))\n"
            "axes[0].set_ylabel('accuracy'); axes[0].legend(loc='upper left', fontsize=8)\n"
            "plt.tight_layout(); plt.show()"
        ),
        new_code_cell(
            "names = list(results)\n"
            "fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))\n"
            "ax1.bar(names, [results[n]['test_ece'] for n in names])\n"
            "ax1.set_title('test ECE (15 bins; lower is better)')\n"
            "ax2.bar(names, [results[n]['test_acc'] for n in names])\n"
            "ax2.set_title('test accuracy')\n"
            "ax2.set_ylim(min(results[n]['test_acc'] for n in names) - 0.05, 1)\n"
            "plt.tight_layout(); plt.show()"
        ),
    ]


def ema_dropout() -> list:
    return [
        new_markdown_cell(
            "# EMA weights and early dropout\n\n"
            "* **EMATeacher** keeps an exponential moving average of the weights (Mean Teacher). Its test accuracy "
            "is usually higher and steadier than the live weights'.\n"
            "* **EarlyDropout** (Liu et al., ICML 2023) applies dropout only at the start of training. The claim: "
            "an *underfitting* model reaches a lower final training loss than without dropout.\n\n"
            "We train a narrow MLP (underfitting) without dropout, with standard dropout and with early dropout, "
            "each with an EMA of its weights, and plot accuracy and loss curves."
        ),
        new_code_cell(SETUP),
        new_code_cell(RUN),
        new_code_cell(
            "from lightning_reg import DropoutSchedule, EarlyDropout, EMATeacher\n"
            "from lightning_reg.data.datamodules import FashionMNISTDataModule\n"
            "from lightning_reg.models import MLPClassifier\n\n"
            "EPOCHS = 2 if FAST else 12\n"
            "CUTOFF = max(1, EPOCHS // 6)  # the paper: 50 of 300 epochs\n"
            "LIMIT = dict(limit_train_batches=4, limit_val_batches=1) if FAST else {}\n"
            "setups = {\n"
            "    'no dropout': lambda: [],\n"
            "    'standard dropout 0.1': lambda: [DropoutSchedule(p=0.1, mode='standard', schedule='constant')],\n"
            "    'early dropout 0.1': lambda: [EarlyDropout(p=0.1, schedule='linear', cutoff_epochs=CUTOFF)],\n"
            "}\n"
            "runs = {}\n"
            "for name, make in setups.items():\n"
            "    dm = FashionMNISTDataModule(train_subset=600 if FAST else None, test_subset=500 if FAST else None,\n"
            "                                val_split=0.05, batch_size=128)\n"
            "    model = MLPClassifier(hidden=[64], dropout=0.0, lr=0.05, weight_decay=0.0)  # underfits\n"
            "    callbacks = [*make(), EMATeacher(decay=0.995)]\n"
            "    _, report, results = run(name.replace(' ', '_'), callbacks, model, dm, EPOCHS, **LIMIT)\n"
            "    runs[name] = (report, results)\n"
            "    nan = float('nan')\n"
            "    print(f\"{name:22s} final train loss {report.history[-1].get('train/loss_epoch', nan):.4f}\"\n"
            "          f\"  test acc live {results['test_acc']:.4f}  EMA {results.get('test_acc_ema', nan):.4f}\")"
        ),
        new_code_cell(
            "fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 3.8))\n"
            "for i, (name, (report, _)) in enumerate(runs.items()):\n"
            "    ax1.plot(*curve(report, 'test_acc'), 'o-', color=f'C{i}', label=f'{name} (live)')\n"
            "    ax1.plot(*curve(report, 'test_acc_ema'), 's--', color=f'C{i}', label=f'{name} (EMA)')\n"
            "    ax2.plot(*curve(report, 'train/loss_epoch'), 'o-', color=f'C{i}', label=name)\n"
            "    ax3.plot(*curve(report, 'dropout/rate'), 'o-', color=f'C{i}', label=name)\n"
            "ax1.set(xlabel='epoch', ylabel='test accuracy', title='Test accuracy: live vs EMA weights')\n"
            "ax2.set(xlabel='epoch', ylabel='training loss', title='Training loss (epoch mean)')\n"
            "ax3.set(xlabel='epoch', ylabel='dropout rate', title='Dropout rate at epoch end')\n"
            "for ax in (ax1, ax2, ax3):\n"
            "    ax.grid(alpha=0.3); ax.legend(fontsize=7)\n"
            "plt.show()"
        ),
    ]


def clipping() -> list:
    return [
        new_markdown_cell(
            "# Gradient clipping telemetry\n\n"
            "`GradientClipping` clips *unscaled* gradients in `on_before_optimizer_step` with the rule you pick "
            "(`norm`, `value`, `component`, `agc`, `auto`) and logs the pre-clip norm, the post-clip norm, the "
            "clip coefficient and the fraction of steps clipped. Here we record those per step for three rules "
            "and plot the gradient-norm history and the clip fraction."
        ),
        new_code_cell(SETUP),
        new_code_cell(
            "from lightning.pytorch import Callback\n\n"
            "from lightning_reg import GradientClipping\n"
            "from lightning_reg.data.datamodules import FashionMNISTDataModule\n"
            "from lightning_reg.models import SmallCNN\n\n\n"
            "class Telemetry(Callback):\n"
            '    """Collect the clipping metrics after every step (log_every_n_steps=1)."""\n\n'
            "    def __init__(self):\n"
            "        self.rows = []\n\n"
            "    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):\n"
            "        m = trainer.callback_metrics\n"
            "        row = {k: float(v) for k, v in m.items() if k.startswith('grad/') and v.numel() == 1}\n"
            "        row['step'] = trainer.global_step\n"
            "        self.rows.append(row)\n\n\n"
            "STEPS = 6 if FAST else 300\n"
            "rules = {\n"
            "    'norm (c = 1)': GradientClipping(rule='norm', max_norm=1.0, log_module_norms_every_n_steps=1),\n"
            "    'auto (10th percentile)': GradientClipping(rule='auto', percentile=10.0),\n"
            "    'agc (λ = 0.01)': GradientClipping(rule='agc', clip_factor=0.01, agc_exclude=['head']),\n"
            "}\n"
            "telemetry = {}\n"
            "for name, clip in rules.items():\n"
            "    L.seed_everything(0, verbose=False)\n"
            "    dm = FashionMNISTDataModule(train_subset=1000 if FAST else 20000, batch_size=64)\n"
            "    rec = Telemetry()\n"
            "    trainer = L.Trainer(accelerator='cpu', max_steps=STEPS, logger=False, enable_checkpointing=False,\n"
            "                        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,\n"
            "                        limit_val_batches=0, callbacks=[clip, rec])\n"
            "    trainer.fit(SmallCNN(lr=0.1, lr_schedule='constant'), datamodule=dm)\n"
            "    telemetry[name] = rec.rows\n"
            "    print(f\"{name:24s} clipped on {rec.rows[-1]['grad/clipped_frac']:.0%} of steps\")"
        ),
        new_code_cell(
            "fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 3.8))\n"
            "for i, (name, rows) in enumerate(telemetry.items()):\n"
            "    steps = [r['step'] for r in rows]\n"
            "    pre, post = [r['grad/norm_pre'] for r in rows], [r['grad/norm_post'] for r in rows]\n"
            "    ax1.plot(steps, pre, color=f'C{i}', alpha=0.8, label=f'{name}: before')\n"
            "    ax1.plot(steps, post, '--', color=f'C{i}', alpha=0.8, label=f'{name}: after')\n"
            "    ax2.plot(steps, [r['grad/clip_coef'] for r in rows], color=f'C{i}', label=name)\n"
            "    ax3.plot(steps, [r['grad/clipped_frac'] for r in rows], color=f'C{i}', label=name)\n"
            "ax1.set(xlabel='step', ylabel='gradient L2 norm', yscale='log', title='Gradient-norm history')\n"
            "ax2.set(xlabel='step', ylabel='norm after / before', title='Clip coefficient')\n"
            "ax3.set(xlabel='step', ylabel='fraction', ylim=(0, 1.05), title='Fraction of steps clipped so far')\n"
            "for ax in (ax1, ax2, ax3):\n"
            "    ax.grid(alpha=0.3); ax.legend(fontsize=7)\n"
            "plt.show()"
        ),
        new_markdown_cell("Per-module pre-clip norms (`log_module_norms_every_n_steps`), for the `norm` rule:"),
        new_code_cell(
            "rows = telemetry['norm (c = 1)']\n"
            "keys = sorted({k for r in rows for k in r if k.startswith('grad/norm_pre/')})\n"
            "plt.figure(figsize=(6, 3.8))\n"
            "for k in keys:\n"
            "    pts = [(r['step'], r[k]) for r in rows if k in r]\n"
            "    plt.plot(*zip(*pts), label=k.removeprefix('grad/norm_pre/'))\n"
            "plt.yscale('log'); plt.xlabel('step'); plt.ylabel('pre-clip norm'); plt.legend(fontsize=7)\n"
            "plt.title('Per-module gradient norms'); plt.grid(alpha=0.3); plt.show()"
        ),
    ]


NOTEBOOKS = {
    "01_quickstart.ipynb": quickstart,
    "02_noisy_labels.ipynb": noisy_labels,
    "03_calibration.ipynb": calibration,
    "04_ema_early_dropout.ipynb": ema_dropout,
    "05_clipping_telemetry.ipynb": clipping,
}


def build(name: str) -> nbformat.NotebookNode:
    """The notebook ``name`` with empty outputs."""
    nb = new_notebook(cells=NOTEBOOKS[name]())
    nb.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": "python3"}
    nb.metadata["language_info"] = {"name": "python"}
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"cell-{i}"
    return nb


def main(check: bool = False) -> int:
    stale = []
    for name in NOTEBOOKS:
        text = nbformat.writes(build(name)) + "\n"
        path = HERE / name
        if check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
    if stale:
        print("stale notebooks (run python notebooks/_build.py):", ", ".join(stale))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(check="--check" in sys.argv))
