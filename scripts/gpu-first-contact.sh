#!/usr/bin/env bash
# First contact with a CUDA GPU, in one call that fits ten minutes. Each phase runs under its own
# time limit and writes its result and log into OUT_DIR, so a phase that fails or runs long does
# not cost the others:
#   1. bench.gpu_first_contact: the base-shaped stand-in (real tokenizer, configs and generation
#      settings, random weights) trained 50 steps at 768 px, batch 8, bf16, then asked for boxes on
#      64 frames, against a seed-style loop (batch 1, fp32, processor every step) in the same run;
#   2. bench.memory: step memory per sample of base and large, each LoRA preset, checkpointing
#      off and on, bf16 autocast;
#   3. bench.fit_gpu: the large stand-in trained with the defaults on a card capped at 24 GiB
#      (speed.micro_batch=auto must find a micro-batch that fits);
#   4. `loomlens demo` on the GPU (the main job end to end, 30 s of training);
#   5. the tests of the model, data, inference, training, evaluation and prediction with CUDA
#      present (in parallel where pytest-xdist is installed).
#   scripts/gpu-first-contact.sh [OUT_DIR]
# Rehearse on a CPU first: `python -m bench.gpu_first_contact --small`, `python -m bench.fit_gpu
# --small`, `python -m bench.memory`. Needs loomlens importable (installed, or PYTHONPATH=src) and
# ../shared/florence2. Then put the tables into docs/benchmarks.md and docs/training.md.
set -uo pipefail
out=${1:-runs/bench/gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:-}:$(pwd):$(pwd)/src"
python3 -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA GPU visible to torch: run this on a GPU machine")' || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.txt" 2>&1
python3 -c 'import torch, transformers, peft; print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__)' >> "$out/gpu.txt"
phase() {  # phase NAME SECONDS COMMAND...: run it under a time limit, log to OUT_DIR/NAME.log
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  echo "$name: exit $? after $((SECONDS - start)) s" | tee -a "$out/phases.txt"
}
phase first_contact 120 python3 -m bench.gpu_first_contact --out "$out/gpu_first_contact.json"
phase memory 120 python3 -m bench.memory --shape base --shape large --preset seed --preset attention \
  --preset language --preset all-linear --batch 1 --batch 8 --out "$out/memory.json"
phase fit_24gib 90 python3 -m bench.fit_gpu --shape large --gib 24 --out "$out/fit_gpu.json"
phase demo 90 python3 -m loomlens.cli demo --out "$out/demo" --time-budget 30 --device cuda
parallel=$(python3 -c 'import xdist' 2>/dev/null && echo "-n 8")
phase tests 170 python3 -m pytest -q -rfE -p no:cacheprovider ${parallel:-} tests/model tests/data tests/infer \
  tests/train tests/evaluate tests/predict
