#!/usr/bin/env bash
# The whole test suite, as CI runs it: setup, lint, format check, type check, tests (with doctests,
# the conformance suite, YAML recipes and notebooks).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=${PYTHON:-python3}
"$PY" -m ruff check .
"$PY" -m ruff format --check .
"$PY" -m mypy lightning_reg
"$PY" -m pytest -n 2 --dist loadfile -q "$@"
