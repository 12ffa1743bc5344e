# The two commands of README.md: `make run` and `make test`. Each sets up what it needs first.
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup run test lint bench clean

setup:
	@scripts/setup.sh

run: setup
	@# a development CA for the embedded default (tls.ca_cert certs/ca.crt), created once
	@test -f certs/ca.crt || $(BIN)/dnsmirror ca init --dir certs
	$(BIN)/dnsmirror serve

test:
	@scripts/setup.sh test
	$(BIN)/ruff check dnsmirror tests sim bench
	$(BIN)/mypy
	$(BIN)/pytest -q

lint: setup
	$(BIN)/ruff check dnsmirror tests sim bench
	$(BIN)/mypy

bench: setup
	@scripts/setup.sh bench
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis .ruff_cache .cache
