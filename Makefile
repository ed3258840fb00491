# One command sets everything up and runs: `make simulate` (the default federation)
# or `make test` (the test suite, what CI runs). Setup happens once, into .venv/.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
ARGS ?=

.PHONY: setup simulate central compare privacy-sweep test test-fast bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

simulate: setup
	$(BIN)/fedspeaker simulate $(ARGS)

central: setup
	$(BIN)/fedspeaker central $(ARGS)

compare: setup
	$(BIN)/fedspeaker compare $(ARGS)

privacy-sweep: setup
	$(BIN)/fedspeaker privacy-sweep $(ARGS)

test: setup
	$(BIN)/python -m pytest -q $(ARGS)

test-fast: setup
	$(BIN)/python -m pytest -q -m "not e2e" $(ARGS)

bench: setup
	$(BIN)/python -m simulations.benchmark $(ARGS)
	$(BIN)/python -m simulations.dp_overhead
	$(BIN)/python -m simulations.footprint

clean:
	rm -rf $(VENV) runs .pytest_cache
