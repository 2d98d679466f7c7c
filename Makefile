# The README's commands. Everything installs into .venv from constraints.txt.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt
DEMO ?= opt_ml

.PHONY: install test lint run bench clean

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) -e '.[train,serve,dev]'
	touch $@

install: $(VENV)/.installed ## create .venv with everything the project needs

lint: install ## formatting, lint and strict typing
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

test: lint ## the whole test suite (what CI runs)
	$(VENV)/bin/pytest

run: install ## train a demo model if there is none, then serve it on :8080 (DATA=dataset or model.tar.gz)
	$(PY) -m container.quickstart $(DATA) --opt-ml $(DEMO)

bench: install ## training throughput against a torchvision-reference loop -> docs/benchmarks.md
	$(PY) -m bench.train_throughput

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache .mypy_cache .ruff_cache
