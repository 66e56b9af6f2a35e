#!/usr/bin/env bash
# The GPU check (issue 15), in one call of at most ~8 minutes on one GPU:
#   1. setup: wheels carried in .whl/ (if any) go to /tmp/site; the repo is used in place (PYTHONPATH), since
#      `pip install -e .` cannot resolve dependencies without a network; missing packages are listed, then exit 3;
#   2. tests: `pytest tests -m gpu` (16-mixed with a skipping GradScaler, FSDP EMA and clipping, CUDA tables,
#      EMA overlap, skipped steps with CUDA optimizers);
#   3. benchmarks on CUDA: EMA, clipping, overhead, and the costs of issue 15's fixes (quick sizes);
#   4. report: markdown with the GPU's name and every part's exit code, to $OUT/gpu_results.md when OUT is set
#      and, on a GPU, to benchmarks/GPU_RESULTS.md (plus the pytest log to $OUT/pytest_gpu.log).
# Each part's exit code is recorded and the next part runs anyway. Without CUDA the GPU parts are skipped with a
# message (the gpu tests are still collected, and must skip cleanly). Time limits per part, in seconds, can be
# changed with GPU_CHECK_TESTS_S, GPU_CHECK_EMA_S, GPU_CHECK_CLIPPING_S, GPU_CHECK_OVERHEAD_S, GPU_CHECK_FIXES_S.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
ROOT=$(pwd)
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 LIGHTNING_REG_SUMMARY=0
PARTS=$(mktemp -d /tmp/gpu_check.XXXXXX)
STATUS=""
record() { STATUS="$STATUS $1=$2"; echo "== $1: exit code $2"; }

# -- 1. setup ------------------------------------------------------------------------------------------------
echo "== setup ($(date -u +%H:%M:%S))"
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}" || echo "warning: installing .whl/*.whl failed" >&2
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
MISSING=$("$PY" - <<'EOF'
import importlib
missing = []
for name in ("torch", "lightning", "torchmetrics", "rich", "pytest", "numpy"):
    try:
        importlib.import_module(name)
    except Exception as err:  # noqa: BLE001 - report anything that stops the import
        missing.append(f"{name} ({type(err).__name__}: {err})")
print("; ".join(missing))
EOF
)
if [ -n "$MISSING" ] || ! "$PY" -c "import lightning_reg" >/dev/null 2>&1; then
  echo "error: cannot run the GPU check; missing Python packages: ${MISSING:-none}" >&2
  "$PY" -c "import lightning_reg" 2>&1 | tail -3 >&2
  echo "Carry them as wheels in .whl/ (see the device notes) or install them, then run this script again." >&2
  exit 3
fi
"$PY" - <<'EOF'
import lightning, torch, torchmetrics
print(f"python {__import__('platform').python_version()}, torch {torch.__version__}, lightning {lightning.__version__},"
      f" torchmetrics {torchmetrics.__version__}")
major, minor = (int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
if (major, minor) < (2, 13):
    print(f"note: pyproject.toml asks for torch>=2.13; this is {torch.__version__} (the check runs anyway)")
print("CUDA:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "not available")
EOF
record setup 0
HAVE_CUDA=0
"$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" && HAVE_CUDA=1

# -- 2. the gpu-marked tests ---------------------------------------------------------------------------------
echo "== pytest -m gpu ($(date -u +%H:%M:%S))"
[ "$HAVE_CUDA" = 1 ] || echo "no CUDA device: the gpu tests must all skip cleanly"
timeout "${GPU_CHECK_TESTS_S:-240}" "$PY" -m pytest tests -m gpu -q -ra -p no:cacheprovider \
  --continue-on-collection-errors 2>&1 | tee "$PARTS/pytest.log"
record tests "${PIPESTATUS[0]}"

# -- 3. benchmarks on CUDA -----------------------------------------------------------------------------------
for part in ema clipping overhead fixes; do
  if [ "$HAVE_CUDA" != 1 ]; then
    echo "== $part: skipped (no CUDA device)"
    record "$part" skipped
    continue
  fi
  var="GPU_CHECK_$(echo "$part" | tr '[:lower:]' '[:upper:]')_S"
  case $part in overhead) default=120 ;; *) default=45 ;; esac
  echo "== benchmark $part on cuda, at most ${!var:-$default} s ($(date -u +%H:%M:%S))"
  timeout "${!var:-$default}" "$PY" -m benchmarks.gpu_results part "$part" --device cuda --dir "$PARTS" 2>&1 \
    | tail -60
  record "$part" "${PIPESTATUS[0]}"
done

# -- 4. the report -------------------------------------------------------------------------------------------
echo "== report ($(date -u +%H:%M:%S))"
# benchmarks/GPU_RESULTS.md is only written by a run on a GPU, so a run without one never replaces real figures.
REPORT=benchmarks/GPU_RESULTS.md
[ "$HAVE_CUDA" = 1 ] || REPORT="$PARTS/gpu_results.md"
ARGS=(--dir "$PARTS" --out "$REPORT")
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT"
  ARGS=(--dir "$PARTS" --out "$OUT/gpu_results.md")
  [ "$HAVE_CUDA" = 1 ] && ARGS+=(--copy "$REPORT")
  cp "$PARTS/pytest.log" "$OUT/pytest_gpu.log" 2>/dev/null || true
fi
"$PY" -m benchmarks.gpu_results assemble "${ARGS[@]}" --status "${STATUS# }"
record report "$?"
echo "== summary:$STATUS"
FAILED=0
for item in $STATUS; do
  case ${item#*=} in 0 | skipped) ;; *) FAILED=1 ;; esac
done
exit "$FAILED"
