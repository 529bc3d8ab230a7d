# Everything a fresh machine needs: `make test`, `make demo`, `make bench` create or refresh .venv
# (idempotent: a stamp tracks requirements.txt and pyproject.toml) and install gridtrain editable.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.gridtrain-installed
# One thread per rank on CPU: ranks share two cores here.
RUN_ENV := OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false

# The GPU check runs with the node's own Python (no .venv there); its missing wheels come from
# GPU_WHEELS, written by `make gpu-wheels` on a machine that reaches the package registry.
GPU_WHEELS ?= gpu-wheels

# llama.cpp itself reads gridtrain's GGUF files in the tests: llama-cpp-python compiled from source
# (PyPI ships only its source; ~4 min on 2 cores, measured), once per machine. The wheel is kept
# outside .venv, so a rebuilt .venv installs it in seconds. Portable CPU build: no -march=native
# (a cached wheel may run on another CPU), no OpenMP, no server, tools or multimodal library.
LLAMACPP_VERSION := 0.3.36
LLAMACPP_WHEELS ?= $(HOME)/.cache/gridtrain/wheels
LLAMACPP_CMAKE := -DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF -DGGML_OPENMP=OFF -DLLAMA_OPENSSL=OFF \
	-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF
LLAMACPP_WHEEL = $(wildcard $(LLAMACPP_WHEELS)/llama_cpp_python-$(LLAMACPP_VERSION)-*.whl)

.PHONY: venv slurm llamacpp test demo bench gpu-check gpu-wheels clean

venv: $(STAMP)

# The last step builds DeepSpeed's CPU communication op now (20-60 s, into .venv/torch_extensions)
# rather than silently in the first training run (see parallel/deepspeed_compat.py).
$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	$(BIN)/python -c "from gridtrain.parallel.deepspeed_compat import prepare_shm_comm_op as p; p(2, print)"
	touch $@

# The Slurm tests start real daemons (munged, slurmctld, two slurmd): Debian's packages, installed
# as root when missing (CI runs `make test` as root on a fresh clone); quick when already there.
# Where installing is impossible the Slurm tests skip and say why.
slurm:
	@command -v slurmctld >/dev/null && command -v munged >/dev/null || \
		(apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge) || \
		echo "make: could not install slurm-wlm and munge; the Slurm tests will be skipped"

# Built into a .partial folder and moved into the cache whole: an interrupted build leaves no wheel.
llamacpp: venv
	@$(BIN)/python -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$(LLAMACPP_VERSION)')" 2>/dev/null || { \
	  test -n "$(LLAMACPP_WHEEL)" || { \
	    echo "make: compiling llama.cpp (llama-cpp-python $(LLAMACPP_VERSION)), once per machine: ~4 min on 2 cores"; \
	    rm -rf $(LLAMACPP_WHEELS).partial && mkdir -p $(LLAMACPP_WHEELS).partial && \
	    CMAKE_ARGS="$(LLAMACPP_CMAKE)" CMAKE_BUILD_PARALLEL_LEVEL=2 $(BIN)/pip wheel -q --no-deps \
	      -w $(LLAMACPP_WHEELS).partial llama-cpp-python==$(LLAMACPP_VERSION) && \
	    mv $(LLAMACPP_WHEELS).partial/llama_cpp_python-*.whl $(LLAMACPP_WHEELS)/ && rm -rf $(LLAMACPP_WHEELS).partial; } && \
	  $(BIN)/pip install -q --no-deps $(LLAMACPP_WHEELS)/llama_cpp_python-$(LLAMACPP_VERSION)-*.whl; }

test: venv slurm llamacpp
	$(RUN_ENV) $(BIN)/python -m pytest -q -rs -n 2 --dist loadfile --durations=15 tests

demo: venv
	$(RUN_ENV) $(BIN)/gridtrain demo

bench: venv
	$(RUN_ENV) $(BIN)/python -m bench

gpu-check:
	GPU_WHEELS=$(GPU_WHEELS) $(PYTHON) bench/gpu_check.py

gpu-wheels: venv
	rm -rf $(GPU_WHEELS).partial
	$(BIN)/python bench/gpu_wheels.py build $(GPU_WHEELS).partial
	rm -rf $(GPU_WHEELS) && mv $(GPU_WHEELS).partial $(GPU_WHEELS)

clean:
	rm -rf $(VENV) runs demo $(GPU_WHEELS)
