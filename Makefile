# Two commands from a fresh clone:
#   make quickstart   install into .venv (first time), then run `tunefarm quickstart`
#   make test         install into .venv (first time), then run the default test suite
# `make install` installs every role and the test tools (EXTRAS=test); one role only, e.g. a laptop:
#   make install EXTRAS=client   (or pip install '.[client]'; roles: client, agent, host, test; see pyproject.toml)
PYTHON ?= python3
EXTRAS ?= test
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.tunefarm-installed-$(EXTRAS)

.PHONY: install quickstart test test-fast test-all

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[$(EXTRAS)]'
	touch $(STAMP)

quickstart: $(STAMP)
	$(BIN)/tunefarm quickstart

# The default suite: real trackers, agents and tiny models on loopback (27-42 min on 2 cores in recent sessions).
test: $(STAMP)
	$(BIN)/python -m pytest -q -ra --durations=15 tests

# The inner loop: unit tests only (marked `fast` in tests/conftest.py), no tuning; about a minute on 2 cores.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -ra -m fast --timeout 120 --durations=5 tests

# Also the slow tests (marked `slow`), e.g. a real ResNet tuning run.
test-all: $(STAMP)
	$(BIN)/python -m pytest -q -ra -m "slow or not slow" tests
