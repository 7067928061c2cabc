"""A frame folder's frames carry the time they landed, not the time a busy watcher read them."""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime

from PIL import Image

from loomlens.watch.sources import END, REREAD, open_source


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


def _land(folder, name: str, seconds: int) -> None:
    """A tiny frame `name` in `folder`, modified `seconds` after a fixed moment (written as
    bytes: PIL's save stats the path, which would count among the source's stats)."""
    import io

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, "PNG")
    (folder / name).write_bytes(buffer.getvalue())
    os.utime(folder / name, (1_700_000_000 + seconds, 1_700_000_000 + seconds))


def _next_frame(source):
    """Poll `source` until it gives a frame (a guard, not a timing: fails after 10 s)."""
    until = time.monotonic() + 10
    while time.monotonic() < until:
        if (got := source.poll()) not in (None, END):
            return got
    raise AssertionError("no frame came")


def test_a_new_frame_costs_a_stat_not_one_per_file_in_the_folder(tmp_path, monkeypatch) -> None:
    """A live folder was listed with every file in it stat-ed for each new frame (n^2 / 2 stats
    for a shift of n frames); now a listing stats only the names it has not met."""
    backlog, live = 60, 30
    for i in range(backlog):
        _land(tmp_path, f"{i:04d}.png", i)
    (tmp_path / "notes.txt").write_text("not a frame")
    _land(tmp_path, ".hidden.png", 0)
    stats = []
    real_stat = os.stat

    def counting_stat(path, *args, **kwargs):
        if isinstance(path, (str, os.PathLike)) and os.path.dirname(os.fspath(path)) == str(tmp_path):
            stats.append(os.path.basename(os.fspath(path)))
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", counting_stat)
    source = open_source(str(tmp_path), fps=1000, once=False)
    looks = []
    look = source._look
    monkeypatch.setattr(source, "_look", lambda: (looks.append(1), look())[1])
    frames = [_next_frame(source) for _ in range(backlog)]
    for i in range(backlog, backlog + live):
        _land(tmp_path, f"{i:04d}.png", i)
        frames.append(_next_frame(source))
    for _ in range(20):  # idle looks at a folder with nothing new
        assert source.poll() is None
        time.sleep(0.002)
    assert [f.index for f in frames] == list(range(backlog + live))
    assert [f.at.timestamp() for f in frames] == [1_700_000_000 + i for i in range(backlog + live)]
    # per frame: one stat when listed, one when read (its time then) and one by read_image (its
    # size); per look, the last few names read (`REREAD`, a camera that writes one name again)
    assert len(stats) <= 3 * (backlog + live) + REREAD * len(looks), (len(stats), len(looks))
    assert ".hidden.png" not in stats and "notes.txt" not in stats


def test_a_frame_copied_in_again_with_a_new_time_is_read(tmp_path, caplog) -> None:
    """A file below the mark (`cp -p`) or skipped as unreadable is not read, but copied in again
    with a plain `cp` (a time above the mark) it is, as the warning and the skip advise."""
    _land(tmp_path, "a.png", 10)
    _land(tmp_path, "b.png", 20)
    source = open_source(str(tmp_path), fps=1000, once=False)
    assert [_next_frame(source).index for _ in range(2)] == [0, 1]
    _land(tmp_path, "late.png", 5)  # below b.png's time: warned of, not read
    (tmp_path / "bad.png").write_bytes(b"not a png")
    os.utime(tmp_path / "bad.png", (1_700_000_030, 1_700_000_030))
    _land(tmp_path, "c.png", 40)
    assert _next_frame(source).at.timestamp() == 1_700_000_040  # bad.png was skipped on the way
    assert "1 file(s) landed" in caplog.text and "skipping" in caplog.text
    _land(tmp_path, "late.png", 50)
    assert _next_frame(source).at.timestamp() == 1_700_000_050
    _land(tmp_path, "bad.png", 60)
    assert _next_frame(source).at.timestamp() == 1_700_000_060
    for _ in range(20):
        assert source.poll() is None
        time.sleep(0.002)


def test_a_camera_that_writes_one_name_again_is_read_each_time(tmp_path) -> None:
    """`latest.jpg` written again and again: each new write is a new frame, though names read
    before are not stat-ed on every look (only the last `REREAD` are)."""
    _land(tmp_path, "latest.png", 10)
    source = open_source(str(tmp_path), fps=1000, once=False)
    assert _next_frame(source).at.timestamp() == 1_700_000_010
    for t in (20, 30):
        _land(tmp_path, "latest.png", t)
        assert _next_frame(source).at.timestamp() == 1_700_000_000 + t
    for i in range(REREAD + 1):  # latest.png falls out of the names looked at again
        _land(tmp_path, f"{i:04d}.png", 40 + i)
        _next_frame(source)
    _land(tmp_path, "latest.png", 200)
    for _ in range(20):
        assert source.poll() is None
        time.sleep(0.002)


def test_subfolders_of_a_watched_folder_are_named_at_start_as_not_watched(tmp_path, caplog) -> None:
    """A camera writing into dated subfolders (frames/2026-01-05/...) was watched as an empty
    folder, silently: no frame read, no event, no word why."""
    for name in ("line1", "line2", ".cache"):  # a hidden folder is nobody's frames
        (tmp_path / name).mkdir()
        Image.new("RGB", (32, 16)).save(tmp_path / name / "0.png")
    Image.new("RGB", (32, 16)).save(tmp_path / "top.png")
    with caplog.at_level("WARNING", logger="loomlens.watch"):
        source = open_source(str(tmp_path), fps=100, once=True)
    (said,) = [r.getMessage() for r in caplog.records if "subfolder" in r.getMessage()]
    assert "2 subfolders" in said and "line1" in said and "line2" in said and ".cache" not in said
    assert f"give each as a source of its own, e.g. loomlens watch {tmp_path / 'line1'}" in said
    frames = []
    while (got := source.poll()) is not END:
        frames += [got] if got is not None else []
    assert len(frames) == 1  # the folder's own frame, as before
    caplog.clear()
    with caplog.at_level("WARNING", logger="loomlens.watch"):
        open_source(str(tmp_path / "line1"), fps=100, once=True)
    assert not caplog.records  # a folder without subfolders: nothing to say
