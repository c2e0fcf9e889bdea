# The two front doors: `make demo` and `make test`. Everything else is a helper of theirs.
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test lint tools bench clean

$(BIN)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

demo: $(BIN)/.installed
	$(BIN)/zenmux-exporter demo

tools:
	bash scripts/install-tools.sh

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/mypy --strict

test: $(BIN)/.installed tools lint
	$(BIN)/pytest -q

bench: $(BIN)/.installed tools
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
