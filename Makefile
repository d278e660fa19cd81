# The two commands of the README: `make finetune` (the main job) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
export VENV

.PHONY: setup finetune test bench bench-quick bench-main

setup:
	bash scripts/setup.sh

finetune: setup
	$(PY) examples/finetune.py $(ARGS)

test: setup
	$(PY) -m pytest -q -p no:cacheprovider

bench: setup
	$(PY) -m bench.run $(ARGS)

bench-quick: setup
	$(PY) -m bench.run --quick $(ARGS)

bench-main: setup
	$(PY) -m bench.main $(ARGS)
