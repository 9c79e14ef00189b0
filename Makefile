# The two commands of the README: `make quickstart` and `make test` set everything up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
DEV_STAMP := $(VENV)/.dev-stamp
# checkov (the infra/ and k8s/ scanner of the tests) pins boto3==1.35, older than the project needs:
# it lives in a venv of its own inside .venv, found there by tests/unit/test_infra.py
CHECKOV_VERSION := 3.3.30
CHECKOV := $(VENV)/tools/checkov/bin/checkov

.PHONY: install quickstart test test-slow lint lock bench clean

# Python writes the bytecode of what it imports (into .venv and the __pycache__ folders git ignores): with
# PYTHONDONTWRITEBYTECODE set, as some shells and CI images do, every process (the CLI, each Ray worker and
# test subprocess) compiled its ~3,600 modules from source again: 7-8 s of CPU a start instead of 3.5 s
unexport PYTHONDONTWRITEBYTECODE

install: $(STAMP)

# the venv is rebuilt when the dependencies change, with the versions of requirements.lock (the ones the
# tests passed with); --no-compile: Python writes the bytecode of what is imported on first use instead of
# compiling every installed module up front (a shorter install)
$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-compile -c requirements.lock -e .
	touch $(STAMP)

# the dev extra (test servers, peers, linters) on top: what `make test` needs and the quickstart does not
$(DEV_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-compile -c requirements.lock -e '.[dev]'
	touch $(DEV_STAMP)

$(CHECKOV): Makefile
	test -x $(VENV)/tools/checkov/bin/python || $(PYTHON) -m venv $(VENV)/tools/checkov
	$(VENV)/tools/checkov/bin/python -m pip install --quiet --disable-pip-version-check 'checkov==$(CHECKOV_VERSION)'
	touch $(CHECKOV)

# QUICKSTART_ARGS: overrides for every stage, e.g. trainer.cpu_amp=off (a CPU without native bf16, as measured)
QUICKSTART_ARGS ?=
quickstart: install
	$(BIN)/wysiwyc quickstart --workdir runs/quickstart $(QUICKSTART_ARGS)

# the suite runs in TEST_WORKERS processes (pytest-xdist), a test module at a time each (its module fixtures
# built once): the end-to-end module first (the longest, tests/conftest.py FIRST_MODULE), then the modules with
# the most tests (the long ones, with few tests, spread among the short ones: measured faster than all long
# ones first, which then slow each other); each process has its own servers and Ray
TEST_WORKERS ?= 2
XDIST := -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

# lint and format first (seconds), then the suite without the slow tier (a fresh clone on 2 cores, 2026-12-08:
# 13 min 3 s in all, install included; the suite 11 min 5 s)
test: $(DEV_STAMP) $(CHECKOV) lint
	$(BIN)/python -m pytest -q -m "not slow" $(XDIST)

# the slow tier: behaviours that truly need minutes (kills and resumes, outages, the secrets check); CI runs it
# after `make test`. In one process: its tests wait for checkpoints within deadlines, and two at once slowed
# each other past them (a fresh clone, 2 cores: 17 min in two processes and a missed deadline). 7 min 17 s, 2026-12-08
test-slow: $(DEV_STAMP) $(CHECKOV)
	$(BIN)/python -m pytest -q -m slow

lint: $(DEV_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# after a change of the dependencies: the versions now installed become the lock (then run make test)
lock:
	$(PYTHON) -m venv $(VENV)/tools/lock
	$(VENV)/tools/lock/bin/python -m pip install --quiet --disable-pip-version-check '.[dev]'
	{ sed -n '1,2p' requirements.lock; $(VENV)/tools/lock/bin/python -m pip freeze --exclude wysiwyc | sort -f; } \
		> requirements.lock.new && mv requirements.lock.new requirements.lock
	rm -rf $(VENV)/tools/lock

bench: $(DEV_STAMP)
	$(BIN)/python tests/bench/bench_loader.py

clean:
	rm -rf runs .pytest_cache
