#!/usr/bin/env bash
# One-time, idempotent setup on a fresh machine: the CPU build of torch, the package with its dev
# and docs extras, and (where apt is available) Debian's Fashion-MNIST files for the offline main job.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# A pinned torch takes the CPU wheel from local disk; an unpinned one would pull a multi-GB CUDA build.
TORCH_SPEC=${LIGHTNING_REG_TORCH:-torch==2.13.0}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  "$PY" -m pip install -q "$TORCH_SPEC"
fi
if ! "$PY" -c "import lightning_reg, pytest, ruff, mypy, nbclient, matplotlib, scipy" >/dev/null 2>&1 \
   || ! "$PY" -c "import mkdocs, material, mkdocstrings_handlers.python, mkdocs_jupyter" >/dev/null 2>&1 \
   || ! command -v lightning-reg >/dev/null 2>&1; then
  "$PY" -m pip install -q -e ".[dev,docs]"
fi
DATA=/usr/share/datasets/fashion-mnist
if [ ! -f "$DATA/train-images-idx3-ubyte.gz" ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 \
    || echo "note: could not install Debian's dataset-fashion-mnist; the main job will look elsewhere" >&2
fi
