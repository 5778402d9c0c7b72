# The README's commands. `make run`: install and run the service on its embedded defaults.
# `make test`: install everything the tests need and run them.
VENV ?= .venv
STATE_DIR ?= $(CURDIR)/state
PYTEST_ARGS ?=

.PHONY: setup setup-test run test lint bench realenv-up realenv-down

setup:
	scripts/setup.sh

setup-test:
	scripts/setup.sh --test

run: setup
	$(VENV)/bin/vmsched serve --state-dir $(STATE_DIR)

test: setup-test
	$(VENV)/bin/ruff check scheduler drivers tests benchmarks
	$(VENV)/bin/pytest $(PYTEST_ARGS)

lint: setup-test
	$(VENV)/bin/ruff check scheduler drivers tests benchmarks

realenv-up: setup-test
	$(VENV)/bin/python -m tests.realenv up

realenv-down:
	$(VENV)/bin/python -m tests.realenv down
