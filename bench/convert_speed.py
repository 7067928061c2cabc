"""Convert's speed on large frames: `convert --flip --tile auto` as shipped against the way it
wrote before (one image at a time, PNG at Pillow's default zlib level 6), in the same run.

    python -m bench.convert_speed [--frames 40] [--size 1280] [--repeats 2]

Writes `--frames` synthetic cloth frames of `--size` px as PNG (a camera's lossless export) in
LabelImg layout, then converts them each way into a fresh folder, the two ways taking turns,
`--repeats` times; reports each way's median seconds and frames a second, their ratio, the bytes
written, and whether both wrote the same samples (JSONL byte for byte) and the same pixels
(every image decoded). Figures: docs/benchmarks.md, "Convert".
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from bench.common import RESULTS, Table, common_flags, fmt, publish, ratio
from bench.fabric import PLANT_WORDS, write_frames

NAME = "convert_speed"
WORK = RESULTS / "convert_speed"
WAYS = ("before", "shipped")


def convert_once(source: Path, out: Path, way: str) -> float:
    """Seconds `convert(source, out, flip=True, tile="auto")` takes, written `way`: "shipped",
    or "before" (one thread, PNG at Pillow's default level)."""
    from loomlens.data import atomic, convert as module

    shutil.rmtree(out, ignore_errors=True)
    saved = module._workers, dict(atomic.SAVE_OPTIONS)
    if way == "before":
        module._workers = lambda pixels: 1
        atomic.SAVE_OPTIONS["PNG"] = {}
    try:
        start = time.perf_counter()
        module.convert(source, out, flip=True, tile="auto", val_fraction=0.17, test_fraction=0.2, seed=0)
        return time.perf_counter() - start
    finally:
        module._workers = saved[0]
        atomic.SAVE_OPTIONS.clear()
        atomic.SAVE_OPTIONS.update(saved[1])


def same_output(a: Path, b: Path) -> tuple[bool, bool]:
    """(the JSONL files are byte for byte the same, every image decodes to the same pixels)."""
    samples = all((a / f).read_bytes() == (b / f).read_bytes() for f in ("train.jsonl", "val.jsonl", "test.jsonl"))
    images_a = sorted(p.relative_to(a) for p in (a / "images").rglob("*.png"))
    images_b = sorted(p.relative_to(b) for p in (b / "images").rglob("*.png"))
    pixels = images_a == images_b and all(
        np.array_equal(np.asarray(Image.open(a / p)), np.asarray(Image.open(b / p))) for p in images_a)
    return samples, pixels


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def tables(result: dict[str, Any]) -> list[Table]:
    rows = [[way, fmt(result[way]["seconds"], 1), fmt(result["frames"] / result[way]["seconds"], 2),
             f"{result[way]['bytes'] / 2**20:.0f}"] for way in WAYS]
    rows.append(["shipped / before", ratio(result["before"]["seconds"], result["shipped"]["seconds"]) + " faster",
                 "", ""])
    return [Table(
        f"convert --flip --tile auto on {result['frames']} frames of {result['size']} px",
        ["way", "seconds (median)", "frames/s", "MiB written"], rows,
        [f"{result['frames']} synthetic cloth frames (PNG, LabelImg layout) -> {result['samples']} samples "
         f"({result['tiles']} tiles); median of {result['repeats']} runs each way, taking turns",
         "before: one image at a time, PNG at Pillow's default zlib level 6; shipped: images worked on "
         f"{result['workers']} threads at once, PNG at level 1",
         f"same samples (JSONL byte for byte): {result['same_samples']}; same pixels in every image: "
         f"{result['same_pixels']}"])]


def main(argv: list[str] | None = None) -> int:
    from loomlens.data.convert import _workers

    parser = argparse.ArgumentParser(prog="python -m bench.convert_speed", description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=40, help="frames to convert")
    parser.add_argument("--size", type=int, default=1280, help="frame edge in pixels")
    parser.add_argument("--repeats", type=int, default=2, help="runs each way")
    common_flags(parser, NAME)
    args = parser.parse_args(argv)
    source = WORK / "source"
    write_frames(source, args.frames, seed=11, size=args.size, words=PLANT_WORDS)
    seconds: dict[str, list[float]] = {way: [] for way in WAYS}
    for _ in range(args.repeats):
        for way in WAYS:
            seconds[way].append(convert_once(source, WORK / way, way))
    same_samples, same_pixels = same_output(WORK / "before", WORK / "shipped")
    lines = sum(len((WORK / "shipped" / f).read_text().splitlines()) for f in ("train.jsonl", "val.jsonl", "test.jsonl"))
    result = {"frames": args.frames, "size": args.size, "repeats": args.repeats,
              "workers": _workers(args.size * args.size),
              "samples": lines, "tiles": sum(1 for _ in (WORK / "shipped" / "images" / "tiles").glob("*")),
              "same_samples": same_samples, "same_pixels": same_pixels,
              **{way: {"seconds": statistics.median(seconds[way]), "runs": seconds[way],
                       "bytes": folder_bytes(WORK / way)} for way in WAYS}}
    return publish(NAME, result, args.out, argv, tables)


if __name__ == "__main__":
    raise SystemExit(main())
