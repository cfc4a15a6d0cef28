# Every target works on a fresh clone: the venv is created (or refreshed when pyproject.toml changes) on demand.
#   make test                      the test suite CI runs (our tests + PEFT's generic tuner suite against SSF)
#   make demo                      the end-to-end SSF story, offline on CPU
#   make docs                      refresh README.md's generated tables from benchmarks/results/ and the demo run
#   make test VENV=.venv-min CONSTRAINTS=.ci/constraints-min.txt   the same tests at the lowest supported versions
PY ?= python3
VENV ?= .venv
CONSTRAINTS ?=
EXTRAS ?= dev
BIN = $(VENV)/bin
STAMP = $(VENV)/.installed
PIP_CONSTRAINTS = $(if $(CONSTRAINTS),-c $(CONSTRAINTS),)

.PHONY: install test test-own test-peft lint demo docs clean

$(STAMP): pyproject.toml Makefile $(CONSTRAINTS)
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[$(EXTRAS)]" $(PIP_CONSTRAINTS)
	@touch $@

install: $(STAMP)

# both suites run even when the first fails (a failure in ours must not hide PEFT's results); fails if either failed
test: $(STAMP)
	@status=0; $(MAKE) --no-print-directory test-own || status=1; \
	$(MAKE) --no-print-directory test-peft || status=1; exit $$status

test-own: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

test-peft: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python tests/peft_suite/run.py -q

lint: $(STAMP)
	$(BIN)/ruff check .

# `make demo` as a first command installs only what the demo needs (peft-ssf[demo]), with its own stamp
DEMO_STAMP = $(VENV)/.installed-demo
$(DEMO_STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[demo]"
	@touch $@

demo: $(DEMO_STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/peft-ssf demo --overwrite

# the only command that rewrites README.md's generated blocks (from benchmarks/results/ and the last full demo run)
docs: $(STAMP)
	$(BIN)/python -m benchmarks.docs $(if $(wildcard ssf-demo-output/results.json),--demo ssf-demo-output,)

clean:
	rm -rf $(VENV) .venv-min build *.egg-info .pytest_cache ssf-demo-output .peft-suite
