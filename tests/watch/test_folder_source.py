"""A frame folder's frames carry the time they landed, not the time a busy watcher read them."""

from __future__ import annotations

import os
from datetime import UTC, datetime

from PIL import Image

from loomlens.watch.sources import END, open_source


def test_folder_frames_are_timed_when_they_landed(tmp_path) -> None:
    """A backlog (a restart, a slow model) was stamped with the reading time: events hours
    apart came out a fraction of a second apart."""
    landed = [datetime(2026, 1, 5, 6, 0, s, 123456, tzinfo=UTC) for s in (0, 30)]
    for i, moment in enumerate(landed):
        path = tmp_path / f"{i}.png"
        Image.new("RGB", (32, 16)).save(path)
        ns = int(moment.timestamp()) * 1_000_000_000 + moment.microsecond * 1000 + 789
        os.utime(path, ns=(ns, ns))
    source = open_source(str(tmp_path), fps=100, once=True)
    frames = []
    while (got := source.poll()) is not END:
        if got is not None:
            frames.append(got)
    assert [f.at for f in frames] == landed
