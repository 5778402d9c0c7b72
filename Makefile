# The README's commands. `make run`: install and run the service on its embedded defaults (with the
# demo: this machine's libvirt, a tiny VM backed up hourly; `make run DEMO=0` skips it).
# `make test`: install everything the tests need and run them.
VENV ?= .venv
STATE_DIR ?= $(CURDIR)/state
DEMO ?= 1
PYTEST_ARGS ?=
LOCK_ARGS ?=

.PHONY: setup setup-test lock run test lint bench realenv-up realenv-down

setup:
	scripts/setup.sh

setup-test:
	scripts/setup.sh --test

# Refresh requirements*.txt from pyproject.toml's ranges (README: "Dependencies are locked").
lock:
	scripts/lock $(LOCK_ARGS)

run: setup
ifneq ($(DEMO),0)
	-scripts/local-libvirt up
endif
	$(VENV)/bin/vmsched serve --state-dir $(STATE_DIR)$(if $(filter 0,$(DEMO)), --no-demo)

test: setup-test
	$(VENV)/bin/ruff check scheduler drivers tests benchmarks
	$(VENV)/bin/mypy
	$(VENV)/bin/pytest $(PYTEST_ARGS)

lint: setup-test
	$(VENV)/bin/ruff check scheduler drivers tests benchmarks
	$(VENV)/bin/mypy

realenv-up: setup-test
	$(VENV)/bin/python -m tests.realenv up

realenv-down:
	$(VENV)/bin/python -m tests.realenv down
