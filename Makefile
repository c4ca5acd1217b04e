# Everything installs from this repo's own files into .venv; only python3.11 (or python3 >= 3.11) is needed.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck pytest soak bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[server,test]'
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
	$(BIN)/pytest -q

# Long randomized runs (1,000+ examples per property and state machine), kept out of CI's time budget.
soak: $(STAMP)
	HYPOTHESIS_PROFILE=soak $(BIN)/pytest -q --timeout 7200

bench: $(STAMP)
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) demo .mypy_cache .ruff_cache .pytest_cache .hypothesis
