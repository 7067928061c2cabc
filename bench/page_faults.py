"""Page faults of a CPU training step with and without `keep_freed_memory` (model/runtime.py).

    python -m bench.page_faults [--processes 3]

Runs a forward+backward with 16 MiB activations (the size of the tiny model's first DaViT
stage at batch 8) in fresh processes, each way, and prints the faults a step, summed over the
processes: glibc's default adapts its thresholds as blocks are freed, so one process may land
on a low-fault layout. Figures: docs/training.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

#: One warmed-up step's page faults, printed by a fresh process (`keep` or `default` malloc).
STEP = """
import resource, sys, torch
from torch import nn
if sys.argv[1] == "keep":
    from loomlens.model.runtime import keep_freed_memory
    assert keep_freed_memory()
torch.manual_seed(0)
net = nn.Sequential(nn.Linear(32, 128), nn.GELU(), nn.Linear(128, 32))
x = torch.randn(32768, 32)
def step():
    net(x).square().mean().backward()
for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
"""


def faults(mode: str) -> float:
    """Page faults a step in a fresh process with malloc `mode` (`keep` or `default`)."""
    out = subprocess.run([sys.executable, "-c", STEP, mode], capture_output=True, text=True, check=True, timeout=120)
    return float(out.stdout.split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=3)
    args = parser.parse_args()
    if not sys.platform.startswith("linux"):
        raise SystemExit("glibc's malloc only")
    result = {mode: sum(faults(mode) for _ in range(args.processes)) for mode in ("default", "keep")}
    result["kept_share"] = result["keep"] / max(result["default"], 1.0)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
