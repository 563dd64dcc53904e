# align2: the two commands are `make serve` and `make test`; both set up first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Every install comes from a lock: exact versions and hashes of every package (see
# scripts/lock.py). CPU machines use requirements/cpu.txt; the Dockerfile uses cuda.txt.
LOCK := requirements/cpu.txt
SETUP_STAMP := $(VENV)/.align2-setup
SERVE_ARGS ?=
PYTEST_ARGS ?=

.PHONY: setup lock models serve test lint format protos docs bench-score bench-align bench-select \
	fuzz load soak clean

setup: $(SETUP_STAMP)

$(SETUP_STAMP): $(LOCK) pyproject.toml package-lock.json Makefile
	@# A fresh venv each time the lock or recipe changes: exactly the locked set, no leftovers.
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --no-deps --require-hashes -r $(LOCK)
	@# align2 itself, editable; its build backend (hatchling) is in the lock.
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	@# buf (contract lint) and the Node.js gRPC client of the contract tests, from their lock.
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

# Rewrite the locks from today's registries (on purpose, not on every setup): then run
# `make test`, which reinstalls from the new lock, before committing it.
lock:
	$(PYTHON) scripts/lock.py

# Build the embedded default models (cached, deterministic; a no-op when present).
models: setup
	$(BIN)/align2 build-models

serve: models
	$(BIN)/align2 serve $(SERVE_ARGS)

test: setup
	$(BIN)/pytest -q $(PYTEST_ARGS)

lint: setup
	node_modules/.bin/buf lint protos
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

bench-select: setup
	$(BIN)/python bench/online_selection.py

# The long forms of the wire fuzzer, the load and fault tests and the soak, whose short
# forms run in `make test`; they print their figures (docs/operating.md keeps the latest).
# The fuzzer draws a new seed each run and prints it: ALIGN2_FUZZ_SEED=N replays that run.
FUZZ_EXAMPLES ?= 10000
LOAD_ROUNDS ?= 10
SOAK_SECONDS ?= 600
LONG_PYTEST := $(BIN)/pytest -q -s -p no:cacheprovider --timeout=0

fuzz: setup
	ALIGN2_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(LONG_PYTEST) tests/integration/test_wire_fuzz.py

load: setup
	ALIGN2_LOAD_ROUNDS=$(LOAD_ROUNDS) $(LONG_PYTEST) \
		tests/integration/test_load_faults.py tests/integration/test_process_faults.py

soak: setup
	ALIGN2_SOAK_SECONDS=$(SOAK_SECONDS) $(LONG_PYTEST) tests/integration/test_soak.py

clean:
	rm -rf $(VENV) node_modules .pytest_cache .mypy_cache .ruff_cache
