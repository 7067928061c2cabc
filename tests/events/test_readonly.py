"""The server's reader opens the watcher's SQLite database read-only: it makes no table, sets
no journal mode, writes no file beside it (no -wal/-shm), so it reads a database it may not
write (another user, a read-only folder or mount); what it cannot read is one line saying why."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest
from sqlalchemy import create_engine
from sqlalchemy.exc import SQLAlchemyError

from loomlens.events import EventStore
from loomlens.events.store import events_table

from .test_store import _event

unless_root = pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")


def _watched(folder: Path, events: int = 2) -> Path:
    """A database a watcher wrote `events` events to and closed cleanly (no -wal, no -shm)."""
    path = folder / "events.db"
    store = EventStore(path)
    for i in range(events):
        store.start(_event("loom1", "hole", i))
    store.close()
    assert sorted(p.name for p in folder.iterdir()) == ["events.db"]
    return path


def _journal_mode(path: Path) -> str:
    with sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True) as conn:
        return conn.execute("PRAGMA journal_mode").fetchone()[0]


def test_the_reader_writes_no_file_beside_a_closed_database(tmp_path) -> None:
    path = _watched(tmp_path)
    before = path.read_bytes()
    reader = EventStore(path, create=False)
    assert reader.query()[1] == 2 and reader.distinct("camera") == ["loom1"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["events.db"]  # no -wal/-shm while open
    reader.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["events.db"]
    assert path.read_bytes() == before and _journal_mode(path) == "wal"


def test_the_reader_keeps_the_journal_mode_and_makes_no_table(tmp_path) -> None:
    path = tmp_path / "old.db"
    engine = create_engine(f"sqlite:///{path}")  # a rollback-journal database, as other tools make
    events_table.create(engine)
    engine.dispose()
    reader = EventStore(path, create=False)
    assert reader.query() == ([], 0) and reader.folder_mark("loom1") is None
    reader.close()
    assert _journal_mode(path) == "delete"
    with sqlite3.connect(path) as conn:
        tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert tables == {"loomlens_events"}  # create_all did not run: no marks tables


def test_the_reader_cannot_write(tmp_path) -> None:
    path = _watched(tmp_path)
    reader = EventStore(path, create=False)
    with pytest.raises(SQLAlchemyError, match="readonly"):
        reader.start(_event("loom2", "stain", 9))
    reader.close()
    assert EventStore(path, create=False).query()[1] == 2


def test_the_reader_sees_a_running_watcher_and_one_started_after_it(tmp_path) -> None:
    path = _watched(tmp_path)
    reader = EventStore(path, create=False)  # opened on the closed database
    writer = EventStore(path)  # a watcher starts: -wal and -shm appear
    writer.start(_event("loom2", "stain", 5))
    assert reader.query()[1] == 3 and reader.distinct("camera") == ["loom1", "loom2"]
    writer.start(_event("loom2", "knot", 6))
    assert reader.query(camera="loom2")[1] == 2
    writer.close()
    assert reader.query()[1] == 4
    reader.close()


@pytest.mark.parametrize("where", ["folder", "folder/events.db"])
def test_a_path_that_cannot_be_read_is_one_line_naming_it(tmp_path, where) -> None:
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "events.db").mkdir()
    path = tmp_path / where
    with pytest.raises(ValueError) as caught:
        EventStore(path, create=False)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"cannot open the events database {path} read-only: ")
    assert "--events-db" in message


@unless_root
def test_a_closed_database_in_a_read_only_folder_reads(tmp_path) -> None:
    folder = tmp_path / "line"
    folder.mkdir()
    path = _watched(folder, events=3)
    path.chmod(0o444)
    folder.chmod(0o555)
    try:
        reader = EventStore(path, create=False)
        assert reader.query()[1] == 3 and reader.get(1).camera == "loom1"
        reader.close()
        assert sorted(p.name for p in folder.iterdir()) == ["events.db"]
    finally:
        folder.chmod(0o755)


@unless_root
def test_a_running_watchers_database_in_a_read_only_folder_reads(tmp_path) -> None:
    folder = tmp_path / "line"
    folder.mkdir()
    path = _watched(folder)
    writer = EventStore(path)
    writer.start(_event("loom2", "stain", 5))  # its -wal and -shm exist while it runs
    folder.chmod(0o555)
    try:
        reader = EventStore(path, create=False)
        assert reader.query()[1] == 3
        writer.start(_event("loom2", "knot", 6))
        assert reader.query()[1] == 4
        reader.close()
    finally:
        folder.chmod(0o755)
        writer.close()


@unless_root
def test_a_database_this_user_cannot_read_is_one_line_with_the_fix(tmp_path) -> None:
    path = _watched(tmp_path)
    path.chmod(0o000)
    try:
        with pytest.raises(ValueError) as caught:
            EventStore(path, create=False)
    finally:
        path.chmod(0o644)
    message = str(caught.value)
    assert "\n" not in message and str(path) in message and "read permission" in message


@unless_root
def test_a_wal_without_its_shm_in_a_read_only_folder_says_the_fix(tmp_path) -> None:
    folder = tmp_path / "line"
    folder.mkdir()
    path = _watched(folder)
    Path(f"{path}-wal").touch()  # a -wal left (or copied) without its -shm
    folder.chmod(0o555)
    try:
        with pytest.raises(ValueError, match=f"{folder}") as caught:
            EventStore(path, create=False)
    finally:
        folder.chmod(0o755)
    assert "\n" not in str(caught.value) and "loomlens watch --db" in str(caught.value)
