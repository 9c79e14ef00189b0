# The two commands of the README: `make quickstart` and `make test` set everything up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: install quickstart test test-all bench clean

install: $(STAMP)

# the venv is rebuilt when the dependencies change
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

quickstart: install
	$(BIN)/wysiwyc quickstart --workdir runs/quickstart

test: install
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python tests/bench/bench_loader.py

clean:
	rm -rf runs .pytest_cache
