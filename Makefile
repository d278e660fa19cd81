# The two commands of the README: `make finetune` (the main job) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
export VENV

.PHONY: setup finetune test bench bench-quick bench-main

setup:
	@bash scripts/setup.sh

# The same entry a pip user has: `lorax-jax finetune`. Its set-up installs only what it needs.
finetune:
	@bash scripts/setup.sh finetune
	$(VENV)/bin/lorax-jax finetune $(ARGS)

# pytest exits 5 when it collected no tests: a broken checkout, not a pass.
test: setup
	@$(PY) -m pytest -q -p no:cacheprovider $(ARGS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests (is tests/ there?)" >&2; fi; exit $$rc

bench: setup
	$(PY) -m bench.run $(ARGS)

bench-quick: setup
	$(PY) -m bench.run --quick $(ARGS)

bench-main: setup
	$(PY) -m bench.main $(ARGS)
