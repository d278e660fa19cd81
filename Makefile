# The two commands of the README: `make finetune` (the main job) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
export VENV

.PHONY: setup finetune test test-all coverage bench bench-quick bench-main

setup:
	@bash scripts/setup.sh

# The same entry a pip user has: `lorax-jax finetune`. Its set-up installs only what it needs.
finetune:
	@bash scripts/setup.sh finetune
	$(VENV)/bin/lorax-jax finetune $(ARGS)

# The tiers (tests/conftest.py says which test is in which): `make test` the fast tier, every module
# exercised, PEFT parity on tiny models included; `make test-all` the whole suite with hypothesis' CI
# profile and the slowest tests listed (CI runs it: .ci/run). Both spread the tests over the CPUs
# (pytest-xdist): on 2 cores the whole suite ran in 43 min against 73 min of test time.
# pytest exits 5 when it collected no tests: a broken checkout, not a pass.
PYTEST = $(PY) -m pytest -q -p no:cacheprovider -n auto
NO_TESTS = if [ $$rc -eq 5 ]; then echo "make: pytest collected no tests (is tests/ there?)" >&2; fi; exit $$rc

test: setup
	@$(PYTEST) -m "not slow" $(ARGS); rc=$$?; $(NO_TESTS)

test-all: setup
	@HYPOTHESIS_PROFILE=ci $(PYTEST) --durations=25 $(ARGS); rc=$$?; $(NO_TESTS)

# The fast tier's line coverage of lorax_jax/ (at least 85%).
coverage: setup
	@$(PYTEST) -m "not slow" --cov=lorax_jax --cov-report=term:skip-covered --cov-fail-under=85 $(ARGS); rc=$$?; \
	  $(NO_TESTS)

bench: setup
	$(PY) -m bench.run $(ARGS)

bench-quick: setup
	$(PY) -m bench.run --quick $(ARGS)

bench-main: setup
	$(PY) -m bench.main $(ARGS)
