# Everything installs from this repo's own files into .venv; only python3.11 (or python3 >= 3.11) is needed.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

CONSTRAINTS := constraints.txt

.PHONY: demo test lint typecheck pytest soak bench lock clean

# The exact versions CI tested (constraints.txt, from `make lock`); pyproject keeps lower bounds only.
$(STAMP): pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c $(CONSTRAINTS) -e '.[server,test]'
	touch $(STAMP)

# Quick start 1: the daemon with an embedded reference server, watching demo/inbox.
demo: $(STAMP)
	mkdir -p demo/inbox
	printf '[state]\ndir = "state"\n\n[[watch]]\npath = "inbox"\nsettle_seconds = 1.0\n' > demo/config.toml
	@echo "Drop files into demo/inbox; 'syncd status --config demo/config.toml' shows progress. Ctrl-C stops."
	$(BIN)/syncd run --embedded --config demo/config.toml

# Quick start 2: lint, strict types, the whole test suite.
test: lint typecheck pytest

lint: $(STAMP)
	$(BIN)/ruff check syncd tests bench
	$(BIN)/ruff format --check syncd tests bench

typecheck: $(STAMP)
	$(BIN)/mypy --strict

pytest: $(STAMP)
	$(BIN)/pytest -q --durations=15

# Long runs kept out of CI's time budget: the suite under the soak profile (1,000+ examples per property
# and state machine; the crash harness, fault soak and bad-input cases at full size), then one table.
soak: $(STAMP)
	$(BIN)/python -m bench.soak

bench: $(STAMP)
	$(BIN)/python -m bench

# Re-resolve every dependency to its newest allowed version in a scratch venv and pin the result.
lock:
	rm -rf .lock-venv
	$(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install --quiet --upgrade pip
	.lock-venv/bin/python -m pip install --quiet -e '.[server,test]'
	( echo "# Exact versions CI tests with; refresh with 'make lock'."; \
	  .lock-venv/bin/python -m pip freeze --exclude-editable --all | grep -v '^pip==' ) > $(CONSTRAINTS)
	rm -rf .lock-venv

clean:
	rm -rf $(VENV) demo .mypy_cache .ruff_cache .pytest_cache .hypothesis
