# Two commands set up a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test test-fast bench bench-full bench-openai lint clean

# torch for the built-in engine's tests: 2.13.0 is the CPU build this machine keeps on disk
# (pip takes it from there); on a GPU host, `make TORCH=torch` gets PyPI's CUDA build.
TORCH  ?= torch==2.13.0

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q '$(TORCH)'
	$(BIN)/python -m pip install -q -e '.[dev,torch]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/orchd serve $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/unit

# The benchmark harness (perf/README.md) also needs the `bench` extra (matplotlib, tqdm).
BENCH_STAMP := $(VENV)/.installed-bench

$(BENCH_STAMP): $(STAMP) pyproject.toml
	$(BIN)/python -m pip install -q -e '.[dev,torch,bench]'
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(BIN)/python -m perf.bench --profile quick $(ARGS)

bench-full: $(BENCH_STAMP)
	$(BIN)/python -m perf.bench --profile full $(ARGS)

# Issue 11: orchd's OpenAI routes against its native stream and against a LiteLLM proxy
# (~2 min; the first run also creates perf/.venv-litellm from PyPI, a few minutes more).
bench-openai: $(BENCH_STAMP)
	$(BIN)/python -m perf.bench --profile quick --only openai $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check orchd engine_procs ipc tests perf
	$(BIN)/ruff format --check orchd engine_procs ipc tests perf
	$(BIN)/mypy

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
