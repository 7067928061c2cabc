#!/usr/bin/env bash
# Pretrain the embedded tiny Florence-2 on one CUDA GPU, the way the shipped weights were made.
#   scripts/pretrain-gpu.sh SECONDS [OUT_DIR]
# A 20-step rehearsal (train, check, export) runs first, so a broken setup fails in a minute
# rather than after the long run. Needs loomlens importable (installed, or PYTHONPATH=src).
# The model lands in OUT_DIR/asset; copy it over src/loomlens/assets/tiny-florence2 to ship it.
set -euo pipefail
budget=${1:?seconds of training}
out=${2:-runs/pretrain-gpu}
workers=$(( $(nproc) > 2 ? $(nproc) - 2 : 1 ))
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=20
run() {  # run WORK ASSET BUDGET EVAL_EVERY
  python3 -m loomlens.train.pretrain --work "$1" --out "$2" --steps 1000000 --time-budget "$3" \
    --batch-size 64 --lr 2e-3 --eval-every "$4" --workers "$workers" --device auto
}
rm -rf "$out/rehearsal"
run "$out/rehearsal/work" "$out/rehearsal/asset" 15 10000
run "$out/work" "$out/asset" "$budget" 1000
python3 - "$out" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(f"{sys.argv[1]}/work/log.jsonl")]
print(f"{rows[-1]['step']} steps in {rows[-1]['elapsed']:.0f} s = {rows[-1]['step'] / rows[-1]['elapsed']:.1f} steps/s")
for r in rows:
    if "map50" in r:
        print({k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()})
PY
