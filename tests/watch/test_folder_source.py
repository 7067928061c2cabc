"""A frame folder's frames carry the time they landed, not the time a busy watcher read them."""

from __future__ import annotations

import os
import time
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


def test_a_frame_copied_in_with_an_older_time_is_warned_of(tmp_path, caplog) -> None:
    """Only a watermark is kept: a file landing below it (`cp -p`) is never read, so say so."""
    def frame(name: str, seconds: int) -> None:
        Image.new("RGB", (32, 16)).save(tmp_path / name)
        os.utime(tmp_path / name, (1_700_000_000 + seconds, 1_700_000_000 + seconds))

    def read_for(seconds: float) -> list:
        got, until = [], time.monotonic() + seconds
        while time.monotonic() < until:
            if (frame_or_none := source.poll()) not in (None, END):
                got.append(frame_or_none)
        return got

    frame("a.png", 10)
    frame("b.png", 20)
    source = open_source(str(tmp_path), fps=100, once=False)
    assert len(read_for(0.3)) == 2 and "not read" not in caplog.text
    frame("late.png", 5)  # copied in keeping its camera's time, before b.png's
    frame("c.png", 30)
    assert [f.index for f in read_for(0.3)] == [2]  # c.png; late.png lies below the mark
    assert caplog.text.count("1 file(s) landed") == 1 and "not cp -p" in caplog.text


def test_a_backlog_is_read_from_one_listing(tmp_path, monkeypatch) -> None:
    """A folder of days of frames (a restart after downtime) was listed and stat-ed once per frame."""
    from loomlens.watch.sources import FolderSource

    for i in range(12):
        Image.new("RGB", (32, 16)).save(tmp_path / f"{i:02d}.png")
        os.utime(tmp_path / f"{i:02d}.png", (1_700_000_000 + i, 1_700_000_000 + i))
    listings = []
    real = FolderSource._listing
    monkeypatch.setattr(FolderSource, "_listing", lambda self: listings.append(1) or real(self))
    source = open_source(str(tmp_path), fps=100, once=False)
    frames = [got for _ in range(12) if (got := source.poll()) not in (None, END)]
    assert [f.index for f in frames] == list(range(12)) and len(listings) == 1


def test_a_frame_still_being_written_when_listed_is_read_once(tmp_path) -> None:
    """The queue holds each file's time from the listing; a frame the camera finished after it
    was listed has a later time, and was read a second time on the next listing."""
    import io

    def png(colour: int) -> bytes:
        buffer = io.BytesIO()
        Image.new("RGB", (64, 32), (colour, 0, 0)).save(buffer, "PNG")
        return buffer.getvalue()

    for name, colour in (("a.png", 10), ("b.png", 20)):
        (tmp_path / name).write_bytes(png(colour))
        time.sleep(0.01)
    full = png(30)
    (tmp_path / "c.png").write_bytes(full[: len(full) // 2])  # the camera is still writing it
    source = open_source(str(tmp_path), fps=100, once=False)
    read = []
    until = time.monotonic() + 1
    while not read and time.monotonic() < until:
        if (got := source.poll()) not in (None, END):
            read.append(got)
    time.sleep(0.01)
    (tmp_path / "c.png").write_bytes(full)  # finished, with a later time than its listing's
    until = time.monotonic() + 0.5
    while time.monotonic() < until:
        if (got := source.poll()) not in (None, END):
            read.append(got)
    assert [f.image.getpixel((0, 0))[0] for f in read] == [10, 20, 30]
