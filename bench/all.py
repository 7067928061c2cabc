"""Every benchmark at the `make bench` size (about 90 minutes on 2 free cores, an estimate), then the
tables in docs/benchmarks.md rewritten from their results, with date, machine and command.

    make bench                                        # = python -m bench.all
    python -m bench.all --only train_speed infer_speed
    python -m bench.all --small                        # each at its own small default (~10 min)
    python -m bench.all --render                       # only rewrite the docs from runs/bench/*.json

Each benchmark runs as its own `python -m bench.NAME ...` process and writes
`runs/bench/NAME.json`. The accuracy benchmark keeps its seed-0 run
(runs/bench/accuracy-runs/seed0); the inference and tiling benchmarks use its adapter when
it is there. docs/benchmarks.md holds one `<!-- bench:NAME -->` ... `<!-- /bench:NAME -->`
section per benchmark; only what lies between the markers is replaced.
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import RESULTS, ROOT, Table, describe, markdown

DOC = ROOT / "docs" / "benchmarks.md"
KEPT_RUNS = RESULTS / "accuracy-runs"
ADAPTER = KEPT_RUNS / "seed0"
#: The data that adapter was trained on (kept beside it): infer_speed scores each way on its val split.
ADAPTER_DATA = KEPT_RUNS / "data-0" / "data"

#: name -> arguments at the `make bench` size (each benchmark's own defaults are smaller).
PLAN: dict[str, list[str]] = {
    # Two epochs of the demo's data: val loss at equal samples is compared where training has
    # got somewhere (after a fifth of an epoch, batch 1's 8x the steps still leads).
    "train_speed": ["--images", "480", "--samples", "1600", "--repeats", "2", "--val-samples", "64",
                    "--also", "precision=fp32", "--also", "precision=bf16-base",
                    "--also", "lora.freeze=vision,cache_image_features=true"],
    # The demo's data and cap (its 800 steps fit in 480 s on 2 free cores), and half of it:
    # shorter runs of the v3 tiny model score ~0 (val mAP50 0.00 at step 200 of the demo).
    "accuracy": ["--images", "480", "--seeds", "0", "1", "--budget", "480", "--budgets", "240",
                 "--keep", str(KEPT_RUNS)],
    # The adapter's own val split when the accuracy runs kept it (`command`), else 32 synthetic frames.
    "infer_speed": ["--repeats", "3"],
    # 96 frames 2560x1440 with flips, cut into 512 px tiles: ~1000 samples, the demo's size.
    "tiling": ["--train-frames", "96", "--steps", "700", "--frames", "16"],
    # 40 frames of 1280 px converted as shipped and as before (one thread, PNG at zlib level 6).
    "convert_speed": [],
    "scaling": [],
    "transfer": ["--images", "480", "--steps", "500"],
    # The budget: the default recipe, 20 min of training on AITEX (../shared/data/aitex).
    "real": ["--budget", "1200"],
    # The same budget on synthetic cloth the recipe was not tuned on (the stand-in for a plant's set).
    "fabric": ["--budget", "1200"],
    # One, two and four looks a frame on the adapters above (`TTA_CASES`, those that exist).
    "tta": [],
    # The serving load test (issue #16): four phases of 20 s on loopback.
    "load": ["--seconds", "20"],
    # One watcher per camera (issue #19): frames/s it sustains, torch and onnxruntime.
    "watch": ["--frames", "24", "--onnx"],
    # Active selection (issue #18): `select`'s picks against random ones; its defaults are this size.
    "select": [],
    # The export on onnxruntime (fp32 with its KV cache, without, int8) against torch, at its mAP50.
    "onnx_speed": ["--images", "64", "--repeats", "3"],
}
#: (name, run, data, split) the tta benchmark scores, each when its run was kept: the accuracy
#: run on its val split, the real-fabric and fabric runs on their test splits.
TTA_CASES = (("demo", ADAPTER, ADAPTER_DATA, "val"),
             ("aitex", RESULTS / "real" / "runs" / "default", RESULTS / "real" / "data", "test"),
             ("fabric", RESULTS / "fabric" / "runs" / "default", RESULTS / "fabric" / "data", "test"))
#: benchmarks run by hand (hours on 2 cores), rendered into the docs when their JSON exists.
BY_HAND = ("ablate",)
#: benchmarks that take the accuracy run's adapter when it exists.
USE_ADAPTER = ("infer_speed", "tiling", "watch", "onnx_speed")
#: benchmarks whose own defaults are the `make bench` size: `--small` is their small one.
SMALL_FLAG = ("select",)


def command(name: str, threads: int | None, small: bool = False) -> list[str]:
    """The command line that runs benchmark `name` at the `make bench` size (`small`: at its
    own default size, the accuracy runs still kept for the adapter)."""
    args = (["--keep", str(KEPT_RUNS)] if name == "accuracy" else []) if small else list(PLAN[name])
    if small and name in SMALL_FLAG:
        args.append("--small")
    adapter = name in USE_ADAPTER and (ADAPTER / "checkpoints").exists()
    if adapter:
        args += ["--adapter", str(ADAPTER)]
    if name == "tta":
        args += [str(a) for case in TTA_CASES if (case[1] / "checkpoints").exists() for a in ("--case", *case)]
        args += ["--images", "32"] if small else []
    if name == "infer_speed" and not small:
        args += ["--data", str(ADAPTER_DATA)] if adapter and ADAPTER_DATA.exists() else ["--images", "32"]
    if threads:
        args += ["--threads", str(threads)]
    return [sys.executable, "-m", f"bench.{name}", *args]


def run(name: str, threads: int | None, small: bool = False) -> float:
    """Run one benchmark in its own process; returns its wall seconds."""
    cmd = command(name, threads, small)
    if name == "accuracy":
        shutil.rmtree(KEPT_RUNS, ignore_errors=True)
    print(f"\n=== {' '.join(['python', *cmd[1:]])}", flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT)
    return time.perf_counter() - start


def tables_of(name: str, result: dict[str, Any]) -> list[Table]:
    return importlib.import_module(f"bench.{name}").tables(result)


def section(name: str, result: dict[str, Any]) -> str:
    """The markdown between a benchmark's markers: when, where, the command, the tables."""
    head = f"Measured {describe(result['machine'])}.\n\n    {result['command']}\n\n"
    return head + markdown(tables_of(name, result))


def render(names: list[str], doc: Path = DOC) -> list[str]:
    """Rewrite the sections of `names` whose JSON exists; returns those rewritten."""
    text = doc.read_text()
    done = []
    for name in names:
        path = ROOT / RESULTS / f"{name}.json"
        if not path.exists():
            continue
        result = json.loads(path.read_text())
        text = replace_section(text, name, section(name, result))
        done.append(name)
    doc.write_text(text)
    return done


def replace_section(text: str, name: str, body: str) -> str:
    """`text` with what lies between `<!-- bench:NAME -->` and `<!-- /bench:NAME -->` set to
    `body`; raises KeyError when the markers are missing."""
    pattern = re.compile(rf"(<!-- bench:{name} -->\n).*?(<!-- /bench:{name} -->)", re.S)
    if not pattern.search(text):
        raise KeyError(f"docs/benchmarks.md has no <!-- bench:{name} --> section")
    return pattern.sub(lambda m: m.group(1) + body.rstrip() + "\n" + m.group(2), text, count=1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=list(PLAN), default=list(PLAN))
    parser.add_argument("--threads", type=int, default=None, help="torch threads for each benchmark")
    parser.add_argument("--small", action="store_true", help="each benchmark at its own small default size")
    parser.add_argument("--render", action="store_true", help="only rewrite docs/benchmarks.md from the JSONs")
    args = parser.parse_args(argv)

    if not args.render:
        seconds = {name: run(name, args.threads, args.small) for name in args.only}
        print("\n" + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()) + f"; total {sum(seconds.values()):.0f} s")
    done = render([*args.only, *BY_HAND])
    print(f"rewrote {', '.join(done) or 'nothing'} in {DOC.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
