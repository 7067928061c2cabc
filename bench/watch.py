"""How many frames a second one watcher sustains per camera, and so how many cameras one
machine keeps up with at 1 frame a second.

    python -m bench.watch                                   # small: a few minutes on 2 cores
    python -m bench.watch --frames 24 --onnx --adapter runs/bench/accuracy-runs/seed0

For each size (512x288 whole frames; 2560x1440 cut into --tile px tiles, as a run trained with
`convert --tile` predicts) it writes a synthetic loom video (the demo's camera, defects on
most frames) and runs the real watcher on it end to end: decode, predict (through
`loomlens.predict`), debounce, commit events to SQLite and write their JPEGs. A video file is
read as fast as the watcher goes, so frames / wall seconds is what it sustains; cameras at
1 frame/s is that rate rounded down (one watcher per camera, all sharing the machine's cores).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import Table, common_flags, fmt, parse_size, publish, set_threads

NAME = "watch"
CAMERA = 0


def write_video(path: Path, frames: int, size: tuple[int, int]) -> Path:
    """`frames` synthetic loom frames of `size` as an mp4 at 10 frames a second."""
    import cv2
    import numpy as np

    from loomlens.data.synth import render_frame

    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10, size)
    for i in range(frames):
        image, _ = render_frame(CAMERA, i, size, negative=i % 4 == 3)
        writer.write(cv2.cvtColor(np.asarray(image), cv2.COLOR_RGB2BGR))
    writer.release()
    return path


def measure(predictor, video: Path, folder: Path, tile: str, label: str) -> dict[str, Any]:
    """Run one watcher over `video`; its frames per second, events and seconds."""
    from loomlens.events import EventStore
    from loomlens.watch import DebounceSettings, Watcher, predictor_detector
    from loomlens.watch.sources import VideoFileSource

    store = EventStore(folder / f"{label}.db")
    source = VideoFileSource(video, "bench", fps=10)
    watcher = Watcher(sources=[source], detect=predictor_detector(predictor, tile=tile), store=store,
                      media=folder / f"{label}-media", debounce=DebounceSettings(k=2, n=3, m=2))
    started = time.perf_counter()
    stats = watcher.run()
    seconds = time.perf_counter() - started
    store.close()
    fps = stats["frames"] / seconds
    return {"config": label, "frames": stats["frames"], "events": stats["events"], "seconds": round(seconds, 2),
            "fps": round(fps, 3), "cameras_at_1fps": int(fps)}


def main(argv: list[str] | None = None) -> int:
    from loomlens.predict import Predictor

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=12, help="frames per video")
    parser.add_argument("--small", type=parse_size, default=(512, 288), help="whole-frame size WxH")
    parser.add_argument("--large", type=parse_size, default=(2560, 1440), help="tiled size WxH")
    parser.add_argument("--tile", type=int, default=512, help="tile edge in frame pixels for the large size")
    parser.add_argument("--adapter", default=None, help="a run to load (default: the bare tiny model)")
    parser.add_argument("--max-boxes", type=int, default=6)
    parser.add_argument("--onnx", action="store_true", help="also the onnx backend (exports the model to a temp folder)")
    common_flags(parser, NAME)
    args = parser.parse_args(argv)
    threads = set_threads(args.threads)

    rows = []
    with tempfile.TemporaryDirectory(prefix="loomlens-bench-watch-") as tmp:
        folder = Path(tmp)
        backends = [("torch", {"adapter": args.adapter})]
        if args.onnx:
            from loomlens.export import export_onnx

            export_onnx(run=args.adapter, out=folder / "onnx", frames=1, log=lambda _: None)
            backends.append(("onnx", {"model": str(folder / "onnx"), "backend": "onnx"}))
        videos = {size: write_video(folder / f"{size[0]}x{size[1]}.mp4", args.frames, size)
                  for size in (args.small, args.large)}
        for backend, load in backends:
            whole = Predictor(max_boxes=args.max_boxes, **load)
            tiled = Predictor(max_boxes=args.max_boxes, tile_size=args.tile, **load)
            for size, predictor, tile in ((args.small, whole, "off"), (args.large, tiled, "on")):
                label = "x".join(map(str, size)) + (f" tiles {args.tile}" if tile == "on" else "")
                run = measure(predictor, videos[size], folder, tile, f"{backend}-{label.replace(' ', '-')}")
                rows.append({**run, "config": label, "backend": backend, "precision": predictor.precision})
    result = {"frames": args.frames, "adapter": args.adapter, "threads": threads, "rows": rows}
    return publish(NAME, result, args.out, argv, tables)


def tables(result: dict[str, Any]) -> list[Table]:
    rows = [[r["config"], r["backend"], r["precision"], str(r["frames"]), str(r["events"]), fmt(r["fps"], 2),
             str(r["cameras_at_1fps"])] for r in result["rows"]]
    notes = [f"One watcher, {result['threads']} torch threads, {result['adapter'] or 'bare tiny model'}; the "
             "whole path (decode, predict, debounce, SQLite commit, JPEGs). cameras at 1 frame/s: frames/s rounded "
             "down, one watcher per camera sharing the machine."]
    return [Table("Watch: frames a second one watcher sustains",
                  ["frames", "backend", "precision", "n", "events", "frames/s", "cameras at 1 fps"], rows, notes)]


if __name__ == "__main__":
    sys.exit(main())
