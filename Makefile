# One command each: the virtual environment is made and filled on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# torch wheels that lie on the development machine's disk; override on other machines.
TORCH  ?= torch==2.14.1 torchvision==0.29.1
STAMP  := $(VENV)/.installed
PYTEST := $(BIN)/python -m pytest

.PHONY: demo test test-slow lint bench-profile bench-partition bench-schedule bench-pipeline clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch, torchvision" 2>/dev/null || $(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[dev,vision,hf,viz,demo]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m tspipe_fx.cli.demo

test: $(STAMP)
	$(PYTEST) -q -m "not slow"

test-slow: $(STAMP)
	$(PYTEST) -q -m slow

lint: $(STAMP)
	$(BIN)/ruff check tspipe_fx tests benchmarks examples
	$(BIN)/ruff format --check tspipe_fx
	$(BIN)/mypy

bench-profile: $(STAMP)
	$(BIN)/python benchmarks/profile/run.py

bench-schedule: $(STAMP)
	$(BIN)/python benchmarks/schedule/run.py simulate
	$(BIN)/python benchmarks/schedule/run.py overhead

bench-pipeline: $(STAMP)
	$(BIN)/python benchmarks/cpu_pipeline/run.py

bench-partition: $(STAMP)
	$(BIN)/pip install -q -e ".[bench]"
	$(BIN)/python benchmarks/partition/run.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
