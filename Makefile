# The README's commands. `make run` and `make test` each work from a fresh clone: they create .venv,
# install torch 2.13.0 first (so pip never resolves a multi-GB CUDA build), then the package.
PY        ?= python3
VENV      ?= .venv
BIN       := $(VENV)/bin
TORCH_VER ?= 2.13.0
NVCC      ?= nvcc
CUDA_ARCHS ?= 80 90
CUDA_SRCS := $(shell find csrc -name '*.cu' 2>/dev/null)

.PHONY: setup run tune test build-ext check-cuda bench clean

$(BIN)/raydistill: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==$(TORCH_VER)
	$(BIN)/pip install -q -e ".[dev,optuna]"
	touch $@

setup: $(BIN)/raydistill

# The main job (see README).
run: setup
	$(BIN)/raydistill build-ext
	$(BIN)/raydistill distill

# The default Ray Tune search (tune_configs/mnist1d_search.yaml): Pareto front under ./runs.
tune: setup
	$(BIN)/raydistill build-ext
	$(BIN)/raydistill tune

# The test suite: build the extension once, then pytest.
test: setup
	$(BIN)/raydistill build-ext
	$(BIN)/python -m pytest -q tests

build-ext: setup
	$(BIN)/raydistill build-ext

# Compile-check every CUDA kernel for each arch with ptxas resource usage (no GPU needed).
check-cuda:
	@set -e; for src in $(CUDA_SRCS); do for a in $(CUDA_ARCHS); do \
	  echo "== nvcc sm_$$a $$src"; \
	  $(NVCC) -std=c++17 -O3 -c $$src -o /tmp/raydistill_check_sm$$a.o \
	    -gencode arch=compute_$$a,code=sm_$$a -Xptxas -v -Icsrc 2>&1; \
	done; done

bench: setup
	$(BIN)/python benchmarks/bench_kd_loss.py
	$(BIN)/python benchmarks/bench_spmm.py
	$(BIN)/python benchmarks/bench_distill_throughput.py

clean:
	rm -rf $(VENV) build *.egg-info
