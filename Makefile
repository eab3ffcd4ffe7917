# Two commands: `make run` sets up and starts voicebot; `make test` sets up and runs the tests.
# Set-up is incremental: Debian packages and pip packages are installed only when missing,
# prompts re-render only when their text changed, intent models retrain only when packs changed.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
VB := $(BIN)/voicebot
ARGS ?=

.PHONY: run test setup system-deps venv prompts intents lint clean demo

run: setup
	$(VB) serve $(ARGS)

demo: setup
	$(VB) simulate --press 3 --press 1 --press 2 $(ARGS)

test: setup
	$(BIN)/python -m pytest -q $(ARGS)
	$(BIN)/ruff check voicebot tests benchmarks

setup: system-deps venv prompts intents

system-deps:
	@./scripts/install-system-deps

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Reinstall when the package metadata changes.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[ko,test]'
	touch $@

venv: $(VENV)/.installed

prompts: venv
	$(VB) prompts build

intents: venv
	$(VB) intents train

lint: venv
	$(BIN)/ruff check voicebot tests benchmarks

clean:
	rm -rf $(VENV) audio/prompts models/intents
