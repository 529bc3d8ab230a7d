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

.PHONY: venv slurm test demo bench gpu-check gpu-wheels clean

venv: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	touch $@

# The Slurm tests start real daemons (munged, slurmctld, two slurmd): Debian's packages, installed
# as root when missing (CI runs `make test` as root on a fresh clone); quick when already there.
# Where installing is impossible the Slurm tests skip and say why.
slurm:
	@command -v slurmctld >/dev/null && command -v munged >/dev/null || \
		(apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge) || \
		echo "make: could not install slurm-wlm and munge; the Slurm tests will be skipped"

test: venv slurm
	$(RUN_ENV) $(BIN)/python -m pytest -q -rs tests

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
