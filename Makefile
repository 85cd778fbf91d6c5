# Shipyard: `make demo` (set-up + the flagship job) and `make test` (set-up + the test suite).
PYTHON ?= python3
VENV ?= .venv
# CPU build by default (lies on disk here). GPU machines: make setup TORCH_SPEC="torch==2.13.0" \
#   TORCH_INDEX="--index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
# laplace-torch, the reference the Laplace tests compare against: installed without its declared
# torchvision (whose wheel here does not load against the CPU torch; laplace-torch never imports it)
LAPLACE_TORCH := laplace-torch==0.3 asdfghjkl==0.1a4 backpack-for-pytorch==1.7.1 \
  curvlinops-for-pytorch==3.0.1 einconv==0.1.0 unfoldNd==0.2.3 linear_operator==0.6.1 \
  torchmetrics==1.9.0 lightning-utilities==0.15.3
BIN := $(VENV)/bin
STAMP := $(VENV)/.shipyard-installed

.PHONY: setup demo test test-fast bench bench-quick check clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)" $(TORCH_INDEX)
	$(BIN)/pip install --quiet -e ".[test]"
	$(BIN)/pip install --quiet --no-deps $(LAPLACE_TORCH)
	$(BIN)/python -c "import torch, ray, mlflow, deepspeed; print('torch', torch.__version__, '| ray', ray.__version__, '| mlflow', mlflow.__version__)"
	touch $(STAMP)

# The flagship: LayerSkip pretraining on 2 Ray workers, then its per-layer exit table and a
# self-speculative vs autoregressive comparison; ends with where the MLflow run and checkpoint are.
demo: setup
	$(BIN)/shipyard run jobs/layerskip/stdlib-code.yaml --report

check: setup
	$(BIN)/shipyard check 'jobs/**/*.yaml'

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

# The reference nequip-allegro (benchmarks/allegro_scaling.py runs it through
# benchmarks/allegro_reference.py) lives in its own environment: it pulls lightning and hydra.
REF_VENV := .venv-ref
$(REF_VENV)/.installed: $(STAMP)
	test -x $(REF_VENV)/bin/python || $(BIN)/python -m venv $(REF_VENV)
	$(REF_VENV)/bin/pip install --quiet "$(TORCH_SPEC)" $(TORCH_INDEX)
	printf '$(TORCH_SPEC)\ne3nn==0.6.0\n' > $(REF_VENV)/constraints.txt
	$(REF_VENV)/bin/pip install --quiet -c $(REF_VENV)/constraints.txt nequip-allegro==0.8.3
	touch $@

# Benchmarks want an otherwise idle machine; each writes benchmarks/results/<name>.json.
bench: setup $(REF_VENV)/.installed
	$(BIN)/pip install --quiet --no-deps "minGRU-pytorch==0.2.1" "neuraloperator==2.0.0" \
	  "tensorly==0.10.0" "tensorly-torch==0.5.0"
	$(BIN)/python benchmarks/minrnn_scan.py
	$(BIN)/python benchmarks/platform_overhead.py
	$(BIN)/python benchmarks/allegro_scaling.py
	$(BIN)/python benchmarks/report.py

bench-quick: setup $(REF_VENV)/.installed
	$(BIN)/pip install --quiet --no-deps "minGRU-pytorch==0.2.1" "neuraloperator==2.0.0" \
	  "tensorly==0.10.0" "tensorly-torch==0.5.0"
	$(BIN)/python benchmarks/minrnn_scan.py --quick
	$(BIN)/python benchmarks/platform_overhead.py --quick
	$(BIN)/python benchmarks/allegro_scaling.py --quick
	$(BIN)/python benchmarks/report.py

clean:
	rm -rf .shipyard
