"""kill -9 in the middle of a watch, then a restart: every event already recorded is still
there, unchanged, the ones the killed watcher left open are marked interrupted, and the restart
records none of them again."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

from loomlens.events import EventStore

from .conftest import fabric_frame, kill_9_once_recorded, recorded

ROOT = Path(__file__).resolve().parents[2]
PLACES = [(60, 60, 120, 110), (300, 150, 380, 200), (200, 40, 260, 90)]


def _watch(folder: Path, db: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "loomlens.cli", "watch", str(folder), "--db", str(db), "--camera", "loom1",
            "--k", "1", "--n", "1", "--m", "1", "--fps", "20", *extra]


def _recorded(db: Path) -> list[tuple]:
    return recorded(db, "id, camera, label, started_at, score, x1, y1, x2, y2, frame_path")


def test_kill_9_loses_no_recorded_event(tmp_path) -> None:
    import cv2

    frames = tmp_path / "frames"
    frames.mkdir()
    for i in range(12):  # defect, fabric, defect elsewhere, fabric, ...: one event per defect frame
        cv2.imwrite(str(frames / f"{i:03d}.jpg"), fabric_frame(PLACES[(i // 2) % 3] if i % 2 == 0 else None))
    db = tmp_path / "events.db"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    kill_9_once_recorded(_watch(frames, db), db, 2, tmp_path / "first.log", env)
    before = _recorded(db)
    assert len(before) >= 2
    assert all(Path(row[-1]).is_file() for row in before)  # pictures are written before the row

    second = subprocess.run(_watch(frames, db, "--once"), capture_output=True, text=True, env=env, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    after = _recorded(db)
    assert after[: len(before)] == before  # nothing recorded was lost or changed
    # the restart goes on after the last frame the killed watcher read: each of the 6 defect
    # frames is one event over both runs, none recorded twice
    assert len(after) == 6
    store = EventStore(db, create=False)
    statuses = [store.get(row[0]).status for row in before]
    assert set(statuses) <= {"ended", "interrupted"} and "open" not in statuses
    assert "marked interrupted" in second.stdout or "interrupted" not in statuses
    assert {store.get(row[0]).status for row in after[len(before):]} <= {"ended"}
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
