# The two front doors: `make demo` and `make test`. Everything else is a helper of theirs.
VENV ?= .venv
BIN := $(VENV)/bin
# The previous majors of openai/anthropic/google-genai (httpx-based) cannot share .venv with the current ones.
SDK_PREV ?= .venv-sdk-prev
# zenmux-emit-js, the Node package; its tests' SDKs (current and previous majors) are pinned by its package-lock.json.
JS := zenmux-emit-js

.PHONY: demo test lint tools js bench clean

$(BIN)/.installed: pyproject.toml zenmux-emit/pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ./zenmux-emit -e '.[dev]'
	touch $@

$(SDK_PREV)/.installed: tests/sdk-prev-requirements.txt zenmux-emit/pyproject.toml
	python3 -m venv $(SDK_PREV)
	$(SDK_PREV)/bin/python -m pip install -q --upgrade pip
	$(SDK_PREV)/bin/python -m pip install -q -r tests/sdk-prev-requirements.txt -e ./zenmux-emit
	touch $@

# npm comes with Node from `make tools`; an order-only prerequisite, so that it does not force a reinstall.
$(JS)/node_modules/.installed: $(JS)/package.json $(JS)/package-lock.json | tools
	cd $(JS) && npm ci --no-audit --no-fund
	touch $@

js: $(JS)/node_modules/.installed

demo: $(BIN)/.installed
	$(BIN)/zenmux-exporter demo

tools:
	bash scripts/install-tools.sh

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/mypy --strict

test: $(BIN)/.installed $(SDK_PREV)/.installed tools js lint
	$(BIN)/pytest -q

# Every workload on this checkout and on BENCH_AGAINST (the previous release by default) side by side, with their
# ratio: `make bench BENCH_AGAINST=<rev>` compares with another revision, `make bench BENCH_AGAINST=` runs this
# checkout alone.
BENCH_AGAINST ?= 14996f1
bench: $(BIN)/.installed tools
	$(BIN)/python -m bench $(if $(BENCH_AGAINST),--against $(BENCH_AGAINST))

clean:
	rm -rf $(VENV) $(SDK_PREV) $(JS)/node_modules .mypy_cache .pytest_cache .ruff_cache
