# The README's commands. Everything installs into .venv from constraints.txt.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt
DEMO ?= opt_ml

.PHONY: install test lint unit run bench clean

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

run: install ## train the demo model on the generated sample dataset under ./opt_ml
	test -d $(DEMO)/input/data || $(PY) -m container.sample_data $(DEMO) --opt-ml \
		--hp epochs=5 --hp batch_size=8 --hp lr=0.02 --hp warmup_epochs=0.5 \
		--hp image_size=64 --hp pretrained=false
	SAGEMAKER_BASE_DIR=$(DEMO) $(PY) train

bench: install ## training throughput against a torchvision-reference loop -> docs/benchmarks.md
	$(PY) -m bench.train_throughput

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache .mypy_cache .ruff_cache
