# The two commands of the README. Each installs what it needs first (idempotent).
PYTHON ?= python3

.PHONY: install test bench

install:
	PYTHON=$(PYTHON) bash scripts/install.sh

test: install
	$(PYTHON) -m pytest -q tests

bench: install
	$(PYTHON) -m marginkit bench
