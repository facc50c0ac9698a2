# memzoo: the two commands a fresh machine needs (only Python >= 3.11 required).
#   make quickstart   set up, train the quickstart config on the embedded data, evaluate it
#   make test         set up, lint, run the test suite (default tier, < 15 min on 2 cores)
#   make test-full    the slow tier (what `make test` leaves out): kernel export matrix,
#                     libtpu compiles, multi-process runs; CI runs both
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?= -n 2 --dist loadgroup
# The suite compiles hundreds of tiny programs: cheaper XLA CPU compiles, same fp32 semantics.
# The classic (non-thunk) CPU runtime without the new fusion emitters compiles the memories'
# scans about 2x faster (default tier 20.6 -> 9.7 min on 2 cores). jax marks the first flag
# deprecated, so a jax that no longer knows either flag falls back to the base set (the check
# runs once per `make test`, ~2 s).
BASE_XLA_FLAGS := --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true
FAST_XLA_FLAGS := --xla_cpu_use_thunk_runtime=false --xla_cpu_use_fusion_emitters=false
TEST_XLA_FLAGS ?= $(shell XLA_FLAGS="$(BASE_XLA_FLAGS) $(FAST_XLA_FLAGS)" JAX_PLATFORMS=cpu \
	$(BIN)/python -c "import jax.numpy as n; n.zeros(1).block_until_ready()" >/dev/null 2>&1 \
	&& echo "$(BASE_XLA_FLAGS) $(FAST_XLA_FLAGS)" || echo "$(BASE_XLA_FLAGS)")

.PHONY: install quickstart test test-full test-tpu-compile tpu-tools lint format clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

quickstart: $(STAMP)
	$(BIN)/memzoo train configs/train/quickstart.yaml $(ARGS)
	$(BIN)/memzoo eval runs/quickstart

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	JAX_PLATFORMS=cpu XLA_FLAGS="$(TEST_XLA_FLAGS)" $(BIN)/pytest $(PYTEST_ARGS) \
		-m "not slow and not tpu_compile" tests

# the tests `make test` leaves out (marked slow or tpu_compile); CI runs both tiers
test-full: tpu-tools
	JAX_PLATFORMS=cpu XLA_FLAGS="$(TEST_XLA_FLAGS)" MEMZOO_LIBTPU_DIR=$(LIBTPU_DIR) \
		$(BIN)/pytest $(PYTEST_ARGS) -m "slow or tpu_compile" tests

# libtpu matching the installed jax, in its own directory (not on the default path, so jax on a
# machine without TPUs still starts on CPU): ahead-of-time TPU compiles from this host.
LIBTPU_DIR := $(VENV)/libtpu
$(LIBTPU_DIR)/.installed: $(STAMP)
	$(BIN)/python -m pip install --quiet --no-deps --target $(LIBTPU_DIR) \
		"$$($(BIN)/python -c 'from pallas_kernels.aot import libtpu_requirement as r; print(r())')"
	@touch $@

tpu-tools: $(LIBTPU_DIR)/.installed

# compile every TPU kernel (forward and backward) for v5e and v6e with libtpu, on this CPU host
test-tpu-compile: tpu-tools
	JAX_PLATFORMS=cpu MEMZOO_LIBTPU_DIR=$(LIBTPU_DIR) $(BIN)/pytest $(PYTEST_ARGS) -m tpu_compile tests

lint: $(STAMP)
	$(BIN)/ruff check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
