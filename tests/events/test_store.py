"""The event store: writes are committed at once, queries page and filter, a killed watcher's
open events are marked interrupted; the same code on SQLite (WAL) and on a real PostgreSQL."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta, timezone

import pytest

from loomlens.events import Event, EventStore, database_url
from loomlens.events.store import VideoMark, events_table, folder_marks_table

T0 = datetime(2026, 3, 1, 8, 0, tzinfo=UTC)


def _event(camera: str, label: str, minutes: int, score: float = 0.5) -> Event:
    at = T0 + timedelta(minutes=minutes)
    return Event(camera=camera, label=label, started_at=at, last_seen_at=at + timedelta(seconds=3), score=score,
                 x1=1, y1=2, x2=30, y2=40, width=512, height=288, source=f"rtsp://{camera}")


def _exercise(store: EventStore) -> None:
    """The store's contract, on whatever database `store` is."""
    ids = [store.start(_event(cam, label, i)) for i, (cam, label) in
           enumerate([("loom1", "hole"), ("loom1", "stain"), ("loom2", "hole"), ("loom1", "hole"), ("loom2", "knot")])]
    assert len(set(ids)) == 5
    page, total = store.query(limit=2)
    assert total == 5 and [e.id for e in page] == [ids[4], ids[3]]  # newest first
    page, total = store.query(limit=2, offset=4)
    assert total == 5 and [e.id for e in page] == [ids[0]]
    assert [e.id for e in store.query(camera="loom1", label="hole")[0]] == [ids[3], ids[0]]
    # time window [since, until), in any zone
    plus_one = timezone(timedelta(hours=1))
    since = (T0 + timedelta(minutes=1)).astimezone(plus_one)
    assert [e.id for e in store.query(since=since, until=T0 + timedelta(minutes=3))[0]] == [ids[2], ids[1]]
    assert store.distinct("camera") == ["loom1", "loom2"]
    assert store.distinct("label") == ["hole", "knot", "stain"]

    store.update(ids[0], score=0.9, frames=7, frame_path="/x/f.jpg")
    store.end(ids[1], T0 + timedelta(minutes=9))
    got = store.get(ids[0])
    assert (got.score, got.frames, got.frame_path, got.status) == (0.9, 7, "/x/f.jpg", "open")
    assert got.started_at == T0 and got.started_at.tzinfo is not None
    assert store.get(ids[1]).status == "ended" and store.get(ids[1]).ended_at == T0 + timedelta(minutes=9)
    # a restart of loom1's watcher: its open events were interrupted, ended when last seen
    assert store.interrupt_open(["loom1"]) == 2
    interrupted = store.get(ids[3])
    assert interrupted.status == "interrupted" and interrupted.ended_at == interrupted.last_seen_at
    assert store.get(ids[2]).status == "open"  # another camera's watcher is still running
    assert store.get(10_000) is None
    js = store.get(ids[0]).as_json()
    assert js["box"] == [1.0, 2.0, 30.0, 40.0] and js["started_at"] == "2026-03-01T08:00:00+00:00"
    assert js["images"] == {"frame": True, "crop": False}
    with pytest.raises(ValueError, match="no column"):
        store.update(ids[0], colour="red")


def _exercise_marks(store: EventStore) -> None:
    """How far a camera's folder or video file was read: saved with the event its frame starts or
    alone, replaced in place, a video's mark kept apart from a folder's of the same camera."""
    assert store.video_mark("loom9") is None
    mark = VideoMark(size=123_456_789, mtime_ns=1_700_000_000_123_456_789, frame=41)
    event_id = store.start(_event("loom9", "hole", 0), mark)
    assert store.get(event_id) is not None and store.video_mark("loom9") == mark
    store.set_mark("loom9", mark._replace(frame=99, ended=True))
    assert store.video_mark("loom9") == VideoMark(123_456_789, 1_700_000_000_123_456_789, 99, True)
    store.set_mark("loom9", (1_700_000_000_000_000_000, "007.jpg"))
    assert store.folder_mark("loom9") == (1_700_000_000_000_000_000, "007.jpg")
    assert store.video_mark("loom9").frame == 99


def test_sqlite_store_in_wal_mode(tmp_path) -> None:
    path = tmp_path / "deep" / "events.db"
    store = EventStore(path)
    _exercise(store)
    store.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    # every write was committed: a plain reader sees it all
    assert EventStore(path, create=False).query()[1] == 5


def test_sqlite_store_marks(tmp_path) -> None:
    store = EventStore(tmp_path / "events.db")
    _exercise_marks(store)
    store.close()


def test_a_database_made_before_video_marks_opens_and_keeps_its_folder_marks(tmp_path) -> None:
    from sqlalchemy import create_engine

    path = tmp_path / "old.db"
    engine = create_engine(f"sqlite:///{path}")
    for table in (events_table, folder_marks_table):  # what a watcher made before video marks
        table.create(engine)
    with engine.begin() as conn:
        conn.execute(folder_marks_table.insert().values(camera="loom1", mtime_ns=5, name="005.jpg"))
    engine.dispose()
    reader = EventStore(path, create=False)  # the server's reader: no table made, no mark
    assert reader.video_mark("loom1") is None and reader.folder_mark("loom1") == (5, "005.jpg")
    reader.close()
    store = EventStore(path)  # a watcher adds the video marks' table
    assert store.folder_mark("loom1") == (5, "005.jpg")
    _exercise_marks(store)
    store.close()


def test_reader_refuses_a_missing_database_with_the_fix(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="loomlens watch --db"):
        EventStore(tmp_path / "nothing.db", create=False)


def test_an_empty_database_reads_as_no_events(tmp_path) -> None:
    (tmp_path / "empty.db").touch()
    store = EventStore(tmp_path / "empty.db", create=False)
    assert store.query() == ([], 0) and store.get(1) is None and store.distinct("camera") == []


def test_database_urls(tmp_path) -> None:
    assert database_url(tmp_path / "a.db") == f"sqlite:///{tmp_path / 'a.db'}"
    assert database_url("postgresql+psycopg://u:p@db/line") == "postgresql+psycopg://u:p@db/line"
    with pytest.raises(ValueError, match="not a database URL"):
        database_url("not a url://")


def test_a_file_name_with_url_characters_is_that_file(tmp_path) -> None:
    """`?` and `#` in a path were read as the URL's query and fragment (`we?ird #.db` made `we`)."""
    path = tmp_path / "we?ird #.db"
    store = EventStore(path)
    store.close()
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(("-wal", "-shm"))) == [path.name]
    reader = EventStore(path, create=False)
    assert reader.query() == ([], 0)
    reader.close()


def test_postgresql_store(postgres_url) -> None:
    """Several watchers share one PostgreSQL: the same contract holds there."""
    store = EventStore(postgres_url)
    _exercise(store)
    other_watcher = EventStore(postgres_url)  # a second watcher's connection sees every commit
    assert other_watcher.query(camera="loom2")[1] == 2
    other_watcher.close()
    _exercise_marks(store)
    store.close()


@pytest.mark.parametrize(("where", "why"), [("notes.txt", "file is not a database"),
                                            ("folder", "unable to open database file"),
                                            ("notes.txt/events.db", "File exists")])
def test_a_database_path_that_is_no_database_is_a_one_line_error(tmp_path, where, why):
    (tmp_path / "notes.txt").write_text("the shift's notes, not a database\n")
    (tmp_path / "folder").mkdir()
    with pytest.raises(ValueError, match=f"cannot open the events database .*{why}.*--db events.db"):
        EventStore(tmp_path / where)
    assert (tmp_path / "notes.txt").read_text() == "the shift's notes, not a database\n"
