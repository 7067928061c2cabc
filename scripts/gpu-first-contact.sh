#!/usr/bin/env bash
# First contact with a CUDA GPU: the base-shaped stand-in of Florence-2 (real tokenizer, configs and
# generation settings, random weights) trained 50 steps at 768 px, batch 8, bf16, then asked for
# boxes on 64 frames, against a seed-style loop (batch 1, fp32, processor every step) in the same run.
#   scripts/gpu-first-contact.sh [OUT_DIR]
# A CPU-sized rehearsal (--small) runs first, so a broken setup fails in seconds, not after the
# model is built. Needs loomlens importable (installed, or PYTHONPATH=src) and ../shared/florence2.
# Paste OUT_DIR/gpu_first_contact.md into docs/benchmarks.md ("First contact on a GPU").
set -euo pipefail
out=${1:-runs/bench}
export PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:-}:$(pwd):$(pwd)/src"
python3 -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA GPU visible to torch: run this on a GPU machine")'
python3 -m bench.gpu_first_contact --small --out "$out/gpu_first_contact.rehearsal.json"
python3 -m bench.gpu_first_contact --out "$out/gpu_first_contact.json"
cat "$out/gpu_first_contact.md"
