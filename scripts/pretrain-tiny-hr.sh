#!/usr/bin/env bash
# Pretrain tiny-hr (384 px: a 24 x 24 token grid; half the scenes fabric) on one CUDA GPU,
# warm-started from the shipped tiny, in one command that fits a 10-minute call:
#   scripts/pretrain-tiny-hr.sh SECONDS [ASSET_DIR] [WORK_DIR]
# e.g. scripts/pretrain-tiny-hr.sh 360 "$OUT/tiny-hr-florence2": a 20-step rehearsal (train, the
# "is it looking?" check, export, reload at 384 px) fails a broken setup within a couple of
# minutes; then SECONDS of training, then the held-out checks and the export (about a minute).
# ASSET_DIR (default runs/pretrain-tiny-hr/asset) gets the model, pretrain_config.json and
# pretrain_figures.json (8 files, ~10 MB); after reading its figures, copy it to
# src/loomlens/assets/tiny-hr-florence2 and write its model card (docs/training.md says what to
# measure first). WORK_DIR keeps the resumable state: the same command resumes a cut run.
# On a CPU: docs/training.md, "tiny-hr". Needs loomlens importable (installed, or run from the
# repository root, which puts src on PYTHONPATH).
set -euo pipefail
budget=${1:?seconds of training}
asset=${2:-runs/pretrain-tiny-hr/asset}
work=${3:-runs/pretrain-tiny-hr/work}
workers=$(( $(nproc) > 2 ? $(nproc) - 2 : 1 ))
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=20 PYTHONPATH="${PYTHONPATH:-}:$(pwd)/src"
python3 -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA GPU visible to torch: run this on a GPU machine, or see docs/training.md for the CPU route")'
# lr 1e-3 (half the from-scratch 2e-3) and a 200-step one-object start (600 from scratch): the
# model already looks; the fabric classes are new. Neither was measured; the checks every 500
# steps and pretrain_figures.json say how it went.
recipe=(--init src/loomlens/assets/tiny-florence2 --image-size 384 --fabric-share 0.5 --batch-size 64 --lr 1e-3
        --one-object-steps 200 --workers "$workers" --device auto)
rehearsal="$work-rehearsal"
rm -rf "$rehearsal"
python3 -m loomlens.train.pretrain "${recipe[@]}" --work "$rehearsal" --out "$rehearsal/asset" --steps 20 \
  --eval-every 10000 --eval-images 8
python3 - "$rehearsal/asset" <<'PY'
import sys
from PIL import Image
from loomlens.model import load_model
model, processor = load_model(sys.argv[1], device="cuda")
assert processor.image_processor.size["height"] == 384 and processor.image_processor.image_seq_length == 577
inputs = processor(text=["<OD>"], images=[Image.new("RGB", (4096, 256), (128, 128, 128))], return_tensors="pt").to("cuda")
model.generate(**inputs, max_new_tokens=12, do_sample=False)
print("rehearsal: the exported asset reloads and answers at 384 px")
PY
python3 -m loomlens.train.pretrain "${recipe[@]}" --work "$work" --out "$asset" --steps 1000000 \
  --time-budget "$budget" --eval-every 500
python3 - "$work" "$asset" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(f"{sys.argv[1]}/log.jsonl")]
print(f"{rows[-1]['step']} steps in {rows[-1]['elapsed']:.0f} s = {rows[-1]['step'] / rows[-1]['elapsed']:.2f} steps/s")
for r in rows:
    if "map50" in r:
        print({k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()})
print(open(f"{sys.argv[2]}/pretrain_figures.json").read())
PY
