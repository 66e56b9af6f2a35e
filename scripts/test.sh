#!/usr/bin/env bash
# The whole test suite, as CI runs it: setup, lint, format check, type check, tests (with doctests,
# the conformance suite, YAML recipes and notebooks), with the strict docs build before the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=${PYTHON:-python3}
"$PY" -m ruff check .
"$PY" -m ruff format --check .
"$PY" -m mypy lightning_reg
# The documentation site, strict: a broken link, anchor or API cross-reference, a page left out of the
# navigation, or a notebook that fails (executed in fast mode) fails the run. Output in build/site.
NO_MKDOCS_2_WARNING=1 "$PY" -m mkdocs build --strict --quiet
"$PY" -m pytest -n 2 --dist loadfile -q "$@"
