# One command sets everything up and runs: `make simulate` (the default federation)
# or `make test` (the test suite, what CI runs). Setup installs exactly what uv.lock
# lists (every package, pinned and hashed) into .venv/, once.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
UV := .uv/bin/uv
ARGS ?=
# Use the machine's Python; never download one.
export UV_PYTHON_DOWNLOADS := never

.PHONY: setup lock check-lock simulate central compare privacy-sweep test test-e2e test-all bench clean

setup: $(VENV)/.installed

# uv itself, hash-checked, in a folder of its own (uv sync keeps .venv exactly as the lock says).
$(UV): requirements-uv.txt
	test -x .uv/bin/python || $(PYTHON) -m venv .uv
	.uv/bin/python -m pip install --quiet --require-hashes -r requirements-uv.txt
	touch $@

$(VENV)/.installed: pyproject.toml uv.lock $(UV)
	$(UV) sync --locked --python $(PYTHON)
	touch $@

# The lock must say what pyproject.toml asks for; fails if someone changed one without the other.
check-lock: $(UV)
	$(UV) lock --check

# Move the lock on purpose: newest versions pyproject.toml allows. Review, test, commit uv.lock.
lock: $(UV)
	$(UV) lock --upgrade

simulate: setup
	$(BIN)/fedspeaker simulate $(ARGS)

central: setup
	$(BIN)/fedspeaker central $(ARGS)

compare: setup
	$(BIN)/fedspeaker compare $(ARGS)

privacy-sweep: setup
	$(BIN)/fedspeaker privacy-sweep $(ARGS)

# make test: everything but the launches of whole federations and deployments (minutes);
# make test-e2e: those (marker e2e); CI runs both (.ci/run), make test-all too.
test: check-lock setup
	$(BIN)/python -m pytest -q --durations=15 -m "not e2e" $(ARGS)

test-e2e: setup
	$(BIN)/python -m pytest -q --durations=15 -m e2e $(ARGS)

test-all: test test-e2e

bench: setup
	$(BIN)/python -m simulations.benchmark $(ARGS)
	$(BIN)/python -m simulations.dp_overhead
	$(BIN)/python -m simulations.footprint

clean:
	rm -rf $(VENV) .uv runs .pytest_cache
