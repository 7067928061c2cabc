"""Synthetic line videos for the watcher tests: plain fabric with a bright rectangle (the defect)
drawn on known frames, written with OpenCV."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

FABRIC = (70, 80, 90)  # BGR
DEFECT = (250, 250, 250)
SIZE = (512, 288)


def recorded(db: Path, columns: str) -> list[tuple]:
    """The events table's `columns` (comma-separated) in `db`, in id order, read while a watcher
    may be writing it; [] before the database or its table exists."""
    if not db.exists():
        return []
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10) as conn:
        try:
            return conn.execute(f"select {columns} from loomlens_events order by id").fetchall()
        except sqlite3.OperationalError:  # the table is not there yet
            return []


def kill_9_once_recorded(command: list[str], db: Path, count: int, log: Path, env: dict, wait_s: float = 240) -> None:
    """Run `command` (a watcher writing to `db`) until `db` holds `count` events, then kill -9
    it; fail when it ends first or records too few in `wait_s` (its output is in `log`)."""
    with log.open("w") as out:
        child = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            deadline = time.monotonic() + wait_s
            while len(recorded(db, "id")) < count and child.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            assert child.poll() is None, f"the watcher ended early:\n{log.read_text()}"
            assert len(recorded(db, "id")) >= count, "no events recorded in time"
            os.kill(child.pid, signal.SIGKILL)
            child.wait(timeout=30)
        finally:
            if child.poll() is None:
                child.kill()


def fabric_frame(defect: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """One BGR frame of plain fabric, with a bright rectangle (x1, y1, x2, y2) when given."""
    import cv2

    frame = np.full((SIZE[1], SIZE[0], 3), FABRIC, np.uint8)
    if defect is not None:
        cv2.rectangle(frame, defect[:2], defect[2:], DEFECT, -1)
    return frame


def write_video(path: Path, defects: dict[int, tuple[int, int, int, int]], frames: int, fps: float = 10) -> Path:
    """A video of `frames` frames at `fps`, frame i showing the defect `defects.get(i)`."""
    import cv2

    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, SIZE)
    for i in range(frames):
        writer.write(fabric_frame(defects.get(i)))
    writer.release()
    return path


@pytest.fixture()
def line_video(tmp_path) -> Path:
    """16 frames at 10 fps: a 60x50 defect at (200, 100) on frames 3 to 10."""
    return write_video(tmp_path / "line.mp4", {i: (200, 100, 260, 150) for i in range(3, 11)}, frames=16)
