# The commands the README names. `make run` and `make test` do all set-up themselves.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO ?= demo

.PHONY: install run test proto bench lint clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

install: $(BIN)/.installed

# Mirror $(DEMO)/source into $(DEMO)/mirror continuously, dashboard on http://127.0.0.1:9465/
run: $(BIN)/.installed
	mkdir -p $(DEMO)/source $(DEMO)/mirror
	$(BIN)/replicator mirror $(DEMO)/source $(DEMO)/mirror --http 127.0.0.1:9465 --state-dir $(DEMO)/state

test: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/mypy replicator
	$(BIN)/python -m pytest

proto: $(BIN)/.installed
	$(BIN)/python -m grpc_tools.protoc -I protos --python_out=. --pyi_out=. --grpc_python_out=. \
		protos/replicator/v1/replicator.proto

bench: $(BIN)/.installed
	$(BIN)/python benchmarks/run.py

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/mypy replicator

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache .mypy_cache
