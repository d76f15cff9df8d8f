# fedlora: the two commands a newcomer needs are `make run` and `make test`.
VENV ?= .venv
BIN := $(VENV)/bin
export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_UPDATE_CHECK := 1

.PHONY: setup run test test-slow lint format baseline clean docs

setup:
	@bash scripts/setup.sh

## Simulated federation on the embedded MiniLM + 20 Newsgroups; ends with a table and a plot.
run: setup
	$(BIN)/fedlora simulate --supernodes 10 --output-dir results/default $(ARGS)

## The default test suite (unit, property, in-process + `flwr run` simulation, loopback deployment).
test: setup
	$(BIN)/pytest $(PYTEST_ARGS)

## Slower end-to-end tests (marked `slow`).
test-slow: setup
	$(BIN)/pytest -m slow $(PYTEST_ARGS) || [ $$? -eq 5 ]  # 5: no slow test selected

lint: setup
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

## Centralised LoRA reference on pooled data with the default job's step budget.
baseline: setup
	$(BIN)/fedlora centralized $(ARGS)

clean:
	rm -rf results .pytest_cache .ruff_cache

## Regenerate docs/configuration.md from fedlora.config.RunConfig.
docs: setup
	$(BIN)/python -c "from fedlora.config import markdown_reference as m; open('docs/configuration.md','w').write(m())"
