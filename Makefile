# The README's commands. Everything installs into .venv from constraints.txt.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt
DEMO ?= opt_ml
TS_VENV ?= /tmp/ts
# pytest-xdist workers: one more than the CPUs, at most 5 (tests/conftest.py pins each to a CPU):
# the extra one runs while another waits on docker, a server or a sleeping client. With 2 CPUs
# (AMD EPYC, containers not yet pinned) pytest took 656 s with 3 workers, 771-845 s with 2 and
# 759 s with 4.
TEST_WORKERS ?= $(shell n=$$(nproc); echo $$(( n + 1 < 5 ? n + 1 : 5 )))
# test-fast waits on no docker: one worker a CPU (2 CPUs: 140-145 s, against 149-150 s with 3).
FAST_WORKERS ?= $(shell n=$$(nproc); echo $$(( n < 5 ? n : 5 )))

.PHONY: install test test-fast lint run bench bench-serve bench-soak bench-multi-model bench-image container-deps clean

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) -e '.[train,serve,launch,dev]'
	touch $@

install: $(VENV)/.installed ## create .venv with everything the project needs

lint: install ## formatting, lint and strict typing
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

container-deps: ## a docker engine, the base image and the host's CA certificates for the image build
	docker/engine.sh
	docker/base-image.sh byoc-base:bookworm
	cp /usr/local/share/ca-certificates/*.crt docker/ca/ 2>/dev/null || true

# The tests' temporary folders go in RAM (/dev/shm) when it has 12 GiB free: the suite writes and
# fsyncs checkpoints, models and datasets there (360 MB a training job), each deleted when its test
# passes, the rest when the run passes (at most 5.4 GB at once). On the disk, a run's CPUs sat
# 298 CPU-s of 1628 waiting on it; in RAM, 85 of 1362 (2-core AMD EPYC). PYTEST_DEBUG_TEMPROOT= keeps
# them in /tmp.
test test-fast: export PYTEST_DEBUG_TEMPROOT ?= $(shell [ "$$(df --output=avail -k /dev/shm 2>/dev/null | tail -1)" -ge 12582912 ] 2>/dev/null && echo /dev/shm)

# Python writes its bytecode caches (__pycache__: git and docker leave them out) even where
# PYTHONDONTWRITEBYTECODE is set, so that the pytest workers and each `train`, `serve` and `launch`
# process the tests start do not all compile the project's modules again (collecting the tests:
# 15.9 -> 11.2 CPU-s a worker, 2-core AMD EPYC).
test test-fast: export PYTHONDONTWRITEBYTECODE :=

# The engine `make test` starts keeps its containers on the last CPU (docker/engine.sh).
test: export ENGINE_CPUS ?= $(shell echo $$(( $$(nproc) - 1 )))
test: lint container-deps ## the whole test suite (what CI runs)
	$(VENV)/bin/pytest -n $(TEST_WORKERS)

test-fast: lint ## the tests that need no docker engine, no moto server and no training job of their own
	$(VENV)/bin/pytest -n $(FAST_WORKERS) -m "not docker and not aws and not slow"

run: install ## train a demo model if there is none, then serve it on :8080 (DATA=dataset or model.tar.gz)
	$(PY) -m container.quickstart $(DATA) --opt-ml $(DEMO)

bench: install ## training throughput against a torchvision-reference loop -> docs/benchmarks.md
	$(PY) -m bench.train_throughput

$(TS_VENV)/bin/torchserve: # TorchServe pins its own dependencies: a venv of its own, for bench-serve
	python3 -m venv $(TS_VENV)
	$(TS_VENV)/bin/python -m pip install --quiet torchserve==0.12.0 torch-model-archiver==0.12.0 \
		torch==2.14.1 torchvision==0.29.1 pyyaml==6.0.4 captum==0.9.0

bench-serve: install $(TS_VENV)/bin/torchserve ## serving throughput against a naive server and TorchServe (needs wrk, java) -> docs/benchmarks.md
	$(PY) -m bench.serve_load --torchserve-venv $(TS_VENV)

bench-soak: install ## our server for 10 minutes under valid, oversized and hostile requests: RSS, /ping, no 500 -> docs/benchmarks.md
	$(PY) -m bench.serve_soak

bench-multi-model: install ## a multi-model endpoint: load time and memory of 8 models, req/s with 2 and 8 hot against one model -> docs/benchmarks.md
	$(PY) -m bench.multi_model

bench-image: install container-deps ## image sizes (CUDA; CPU computed) and cold start to a 200 /ping -> docs/image.md
	$(PY) -m bench.image

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache .mypy_cache .ruff_cache
