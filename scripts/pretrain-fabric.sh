#!/usr/bin/env bash
# Continue an embedded model's pretraining with half its scenes fabric (woven and knitted cloth,
# line-scan strips, small and faint defects), warm-started from a shipped asset, in one command
# that fits a 10-minute GPU call:
#   scripts/pretrain-fabric.sh IMAGE_SIZE INIT SECONDS ASSET_DIR [WORK_DIR] [WORKERS]
# e.g. scripts/pretrain-fabric.sh 256 src/loomlens/assets/tiny-florence2 300 "$OUT/tiny" (the
# tiny, 256 px) or scripts/pretrain-fabric.sh 384 src/loomlens/assets/tiny-hr-florence2 300
# "$OUT/tiny-hr" (tiny-hr, 384 px: a 24 x 24 token grid). A 10-step rehearsal (train, export,
# reload at IMAGE_SIZE, answer) fails a broken setup within a minute; then SECONDS of training,
# then the held-out checks and the export (about a minute). ASSET_DIR gets the model,
# pretrain_config.json and pretrain_figures.json (8 files, ~10 MB); after measuring it
# (docs/training.md says what), copy it over the shipped asset and update its model card.
# WORK_DIR keeps the resumable state: the same command resumes a cut run. WORKERS scene-drawing
# processes (default: all cores but two) set the pace on a GPU; two runs side by side on one
# machine split the cores between them. On a CPU: docs/training.md, "tiny-hr". Needs loomlens
# importable (installed, or run from the repository root, which puts src on PYTHONPATH).
set -euo pipefail
size=${1:?input edge in px: 256 or 384}
init=${2:?the asset to start from}
budget=${3:?seconds of training}
asset=${4:?where the model is written}
work=${5:-runs/pretrain-fabric-$size/work}
workers=${6:-$(( $(nproc) > 2 ? $(nproc) - 2 : 1 ))}
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=20 PYTHONPATH="${PYTHONPATH:-}:$(pwd)/src"
# lr 1e-3 (half the from-scratch 2e-3) and a 200-step one-object start (600 from scratch): the
# model already looks; the fabric classes are new. The CPU runs with this recipe are in
# docs/training.md; the checks every --eval-every steps and pretrain_figures.json say how it went.
recipe=(--init "$init" --image-size "$size" --fabric-share 0.5 --batch-size 64 --lr 1e-3
        --one-object-steps 200 --workers "$workers" --device auto)
rehearsal="$work-rehearsal"
rm -rf "$rehearsal"
python3 -m loomlens.train.pretrain "${recipe[@]}" --work "$rehearsal" --out "$rehearsal/asset" --steps 10 \
  --eval-every 10000 --eval-images 4
python3 - "$rehearsal/asset" "$size" <<'PY'
import sys
import torch
from PIL import Image
from loomlens.model import load_model
folder, size = sys.argv[1], int(sys.argv[2])
device = "cuda" if torch.cuda.is_available() else "cpu"
model, processor = load_model(folder, device=device)
assert processor.image_processor.size["height"] == size, processor.image_processor.size
inputs = processor(text=["<OD>"], images=[Image.new("RGB", (4096, 256), (128, 128, 128))], return_tensors="pt").to(device)
model.generate(**inputs, max_new_tokens=12, do_sample=False)
print(f"rehearsal: the exported asset reloads and answers at {size} px on {device}")
PY
python3 -m loomlens.train.pretrain "${recipe[@]}" --work "$work" --out "$asset" --steps 1000000 \
  --time-budget "$budget" --eval-every 1000
python3 - "$work" "$asset" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(f"{sys.argv[1]}/log.jsonl")]
print(f"{rows[-1]['step']} steps in {rows[-1]['elapsed']:.0f} s = {rows[-1]['step'] / rows[-1]['elapsed']:.2f} steps/s")
for r in rows:
    if "map50" in r:
        print({k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()})
print(open(f"{sys.argv[2]}/pretrain_figures.json").read())
PY
