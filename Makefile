# Two commands set up a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# What each command needs, installed once per venv: `make run` only what serving needs (no
# torch, no test or lint tools); `make test` adds the `dev`, `torch` and `llama` extras.
RUN_STAMP  := $(VENV)/.installed-run
TEST_STAMP := $(VENV)/.installed-test

.PHONY: run test chaos test-fast bench bench-full bench-openai lint clean llama-server gpu-wheels gpu-check

# torch for the built-in engine and its tests. Empty (the default): pip picks a version from
# the `torch` extra, PyPI's build (CUDA on Linux x86_64, a few GB). Installed first when set:
#   CPU only:        make test TORCH="torch --index-url https://download.pytorch.org/whl/cpu"
#   a CUDA build:    make test TORCH="torch --index-url https://download.pytorch.org/whl/cu128"
#   a wheel at hand: make test TORCH=torch==2.13.0   (from pip's find-links or cache)
# A torch already in the venv is kept (`torch>=2.3` is satisfied).
TORCH  ?=

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(RUN_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	touch $(RUN_STAMP)

$(TEST_STAMP): $(RUN_STAMP) pyproject.toml
	$(if $(strip $(TORCH)),$(BIN)/python -m pip install -q $(TORCH))
	$(BIN)/python -m pip install -q -e '.[dev,torch,llama]'
	touch $(TEST_STAMP)

# A real llama.cpp server for the tests (tests/support/llama_build.py): built once per venv and
# pinned version from llama-cpp-python's sdist into $(VENV)/llama.cpp/<version>/; about 10
# minutes on 2 cores the first time, nothing after.
llama-server: $(TEST_STAMP)
	$(BIN)/python -m tests.support.llama_build

run: $(RUN_STAMP)
	$(BIN)/orchd serve $(ARGS)

test: $(TEST_STAMP) llama-server
	$(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

# Issue 12's chaos suite, long form: every process type killed and paused mid-stream, three
# rounds of 32 tasks each; prints one line of figures per case (~10 min).
chaos: $(TEST_STAMP) llama-server
	$(BIN)/python -m pytest -q -s -p no:cacheprovider -m chaos tests/chaos $(PYTEST_ARGS)

test-fast: $(TEST_STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/unit

# The benchmark harness (perf/README.md) also needs the `bench` extra (matplotlib, tqdm).
BENCH_STAMP := $(VENV)/.installed-bench

$(BENCH_STAMP): $(TEST_STAMP) pyproject.toml
	$(BIN)/python -m pip install -q -e '.[dev,torch,llama,bench]'
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(BIN)/python -m perf.bench --profile quick $(ARGS)

bench-full: $(BENCH_STAMP)
	$(BIN)/python -m perf.bench --profile full $(ARGS)

# Issue 11: orchd's OpenAI routes against its native stream and against a LiteLLM proxy
# (~2 min; the first run also creates perf/.venv-litellm from PyPI, a few minutes more).
bench-openai: $(BENCH_STAMP)
	$(BIN)/python -m perf.bench --profile quick --only openai $(ARGS)

# The GPU-host check (perf/gpu_check.py). `make gpu-wheels` runs beforehand, where there is a
# network: what a GPU host (Python 3.12 with torch, transformers, nvidia-ml-py,
# prometheus-client, numpy, uvloop) lacks, as cp312 manylinux wheels in $(GPU_WHEELS).
# `make gpu-check` runs there, with no venv and no network; OUT names the results folder.
GPU_WHEELS ?= .gpu-wheels
GPU_PY     ?= 3.12
GPU_REQS   := uvicorn>=0.30 httptools>=0.6 starlette>=0.37 posix_ipc>=1.1 pyzmq>=25 \
              psutil>=5.9 msgspec>=0.18 httpx>=0.27 pytest>=8 pytest-timeout>=2.3 \
              pyyaml>=6 jsonschema>=4.20
OUT        ?= gpu-check-results

gpu-wheels:
	rm -rf $(GPU_WHEELS) && mkdir -p $(GPU_WHEELS)
	$(PYTHON) -m pip download -q --dest $(GPU_WHEELS) --only-binary=:all: \
	  --python-version $(GPU_PY) --implementation cp --abi cp$(subst .,,$(GPU_PY)) \
	  --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
	  --platform manylinux_2_34_x86_64 $(foreach r,$(GPU_REQS),'$(r)')
	@size=$$(du -sm $(GPU_WHEELS) | cut -f1); echo "$(GPU_WHEELS): $$(ls $(GPU_WHEELS) | wc -l) wheels, $$size MiB"; \
	  test $$size -lt 64 || { echo "$(GPU_WHEELS) is over 64 MiB" >&2; exit 1; }

gpu-check:
	perf/gpu_check.sh $(ARGS) $(OUT)

lint: $(TEST_STAMP)
	$(BIN)/ruff check orchd engine_procs ipc tests perf
	$(BIN)/ruff format --check orchd engine_procs ipc tests perf
	$(BIN)/mypy

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
