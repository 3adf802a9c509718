# The two commands of the README's quick start, plus helpers.
# Each target creates .venv and installs what it needs on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run simulate test lint typecheck bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -c 'import sys; sys.exit("smsbot needs Python >= 3.11") if sys.version_info < (3, 11) else None'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# Check and test the example rules, show a simulated conversation, then start the
# callback server on SQLite (./smsbot.db) with the console sender.
run: $(STAMP)
	$(BIN)/smsbot rules check rules
	$(BIN)/smsbot rules test rules
	$(BIN)/smsbot simulate --rules rules --sign "Acme Shop" hi 1 MENU 2 TD MENU START
	$(BIN)/smsbot db upgrade
	$(BIN)/smsbot serve

simulate: $(STAMP)
	$(BIN)/smsbot simulate --rules rules --sign "Acme Shop" hi 1 MENU 2 TD MENU START

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy --strict bot

# Two workers: the suite is mostly waiting on servers and databases, and takes half the time on two cores.
test: lint typecheck
	$(BIN)/pytest -n 2

bench: $(STAMP)
	$(BIN)/python bench/bench_rules.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
