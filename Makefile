# The README's two commands: `make demo` and `make test`. Both set everything up on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export OMP_NUM_THREADS ?= 2
export TOKENIZERS_PARALLELISM ?= false
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1

.PHONY: venv test test-fast demo bench clean slurm-deps browser-deps

venv: $(STAMP)

# The tested CPU set is pinned in constraints/cpu.txt (pyproject.toml states ranges). torch is
# installed first, with pip: the CPU wheel lies on disk where only pip looks; any other torch
# downloads gigabytes. The rest goes in with uv, which keeps that torch (it satisfies the pin)
# and installs the other ~100 packages in seconds where pip takes over a minute; pip is the
# fallback where uv cannot be had. --compile-bytecode: as pip does, so that the test processes
# that start at once do not each compile the same modules on first import.
$(STAMP): pyproject.toml constraints/cpu.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints/cpu.txt torch
	( $(PY) -m pip install -q -c constraints/cpu.txt uv && $(VENV)/bin/uv pip install -q --compile-bytecode --python $(PY) -c constraints/cpu.txt -e ".[dev]" ) \
		|| $(PY) -m pip install -q -c constraints/cpu.txt -e ".[dev]"
	$(PY) -c "import torch; assert torch.__version__.split('+')[0] == '2.13.0', torch.__version__"
	touch $(STAMP)

# The Slurm tests start a real single-node Slurm (tests/test_slurm.py calls slurm/local/start.sh
# and stop.sh); slurm-deps installs slurm-wlm, munge and shellcheck via apt when missing.
# Two workers (pytest-xdist, one test module per worker at a time, in the order tests/conftest.py
# sets: the real-Slurm modules first, since they spend most of their time waiting and the other
# worker's tests run meanwhile). One torch thread per worker on 2 cores.
test: venv slurm-deps browser-deps
	OMP_NUM_THREADS=1 $(PY) -m pytest -n 2 --dist loadscope --no-loadscope-reorder --durations=15 tests

# Everything but the tests marked slow (real Slurm, torchrun ranks, Megatron, demo-sized training):
# a few minutes on 2 cores. `make test` still runs them all.
test-fast: venv slurm-deps browser-deps
	$(PY) -m pytest -m "not slow" tests

slurm-deps:
	@slurm/local/install-deps.sh

# The arena's browser test drives Debian's chromium with Playwright; browser-deps installs it via apt when missing.
browser-deps:
	@tests/install-browser.sh

demo: venv
	$(PY) -m hebtron.demo

bench: venv
	$(PY) bench/model_throughput.py
	$(PY) bench/packing.py

clean:
	rm -rf $(VENV) runs .pytest_cache
