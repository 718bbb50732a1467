# Entry points. `make demo` and `make test` work on a fresh clone: both install first.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
DEMO_OUT ?= demo_out

.PHONY: install demo test test-fast bench clean

install: $(STAMP)

# torch/torchvision resolve to the builds on this machine's disk (see README); the `reference`
# extra installs cellpose 4.2.1.1, which the tests and benchmarks compare against.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,reference]'
	touch $(STAMP)

demo: install
	$(BIN)/python scripts/demo.py --out $(DEMO_OUT)

test: install
	$(BIN)/pytest

test-fast: install
	$(BIN)/pytest -m "not slow"

bench: install
	$(BIN)/python -m benchmarks.bench_flows

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache .hypothesis
