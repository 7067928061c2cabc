"""The defect-event store: one table of events in any SQLAlchemy database.

A watcher writes it (`loomlens watch --db`), the server reads it (`loomlens serve --events-db`).
A plain path is a SQLite file, opened in WAL mode so a reader never blocks the writer and a
process killed mid-run loses nothing already committed. The server opens that file read-only
(`mode=ro`): it creates no table, sets no journal mode and writes no file, so it works as
another user or on a read-only mount of the watcher's folder. A URL
(`postgresql+psycopg://...`) is any SQLAlchemy database, the way several watchers share one
store. Each write is its own transaction: an event is on disk as soon as `start` returns.
"""

from __future__ import annotations

import os
import sqlite3
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import NamedTuple

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    create_engine,
    event,
    func,
    inspect,
    select,
    update,
)
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.pool import NullPool

metadata = MetaData()

events_table = Table(
    "loomlens_events",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("camera", String(200), nullable=False, index=True),
    Column("label", String(200), nullable=False, index=True),
    Column("status", String(16), nullable=False),  # open | ended | interrupted
    Column("started_at", DateTime(timezone=True), nullable=False, index=True),
    Column("last_seen_at", DateTime(timezone=True), nullable=False),
    Column("ended_at", DateTime(timezone=True), nullable=True),
    Column("score", Float, nullable=False),
    Column("x1", Float, nullable=False),
    Column("y1", Float, nullable=False),
    Column("x2", Float, nullable=False),
    Column("y2", Float, nullable=False),
    Column("width", Integer, nullable=False),
    Column("height", Integer, nullable=False),
    Column("frames", Integer, nullable=False),
    Column("source", String(1000), nullable=False),
    Column("frame_path", String(1000), nullable=True),
    Column("crop_path", String(1000), nullable=True),
)

#: How far a watcher has read each camera's frame folder: the (modification time in ns, name)
#: of the last file it predicted on, so a restarted watcher goes on after it.
folder_marks_table = Table(
    "loomlens_folder_marks",
    metadata,
    Column("camera", String(200), primary_key=True),
    Column("mtime_ns", BigInteger, nullable=False),
    Column("name", String(1000), nullable=False),
)

#: How far a watcher has read each camera's video file: the file (its size and modification
#: time in ns: another file, or the same path re-written, is read from its start), the last
#: frame read and whether the file was read to its end. A table of its own, created beside the
#: folder marks in a database made before it (`create_all` adds only what is missing).
video_marks_table = Table(
    "loomlens_video_marks",
    metadata,
    Column("camera", String(200), primary_key=True),
    Column("size", BigInteger, nullable=False),
    Column("mtime_ns", BigInteger, nullable=False),
    Column("frame", BigInteger, nullable=False),
    Column("ended", Boolean, nullable=False),
)

STATUSES = ("open", "ended", "interrupted")


class VideoMark(NamedTuple):
    """How far a video file was read: the file's `size` and `mtime_ns` (which file it is), the
    index of the last `frame` read in it (-1: none) and whether it was read to its end."""

    size: int
    mtime_ns: int
    frame: int = -1
    ended: bool = False


#: How far a camera's source was read: a folder's (mtime_ns, name) of its last file, or a
#: video file's VideoMark.
Mark = tuple[int, str] | VideoMark


@dataclass
class Event:
    """One defect event: where (`camera`, `source`), what (`label`, best `score` and its box
    `x1..y2` in the pixels of a `width` x `height` frame), when (UTC `started_at`,
    `last_seen_at`, `ended_at`; None while open), in how many frames it was seen, its `status`
    (open | ended | interrupted: its watcher stopped before it ended) and its JPEGs on disk."""

    camera: str
    label: str
    started_at: datetime
    last_seen_at: datetime
    score: float
    x1: float
    y1: float
    x2: float
    y2: float
    width: int
    height: int
    frames: int = 1
    source: str = ""
    status: str = "open"
    ended_at: datetime | None = None
    frame_path: str | None = None
    crop_path: str | None = None
    id: int | None = None

    def as_json(self) -> dict:
        """The event as JSON-ready values (times ISO 8601 UTC, box as a list)."""
        out = asdict(self)
        for key in ("started_at", "last_seen_at", "ended_at"):
            out[key] = None if out[key] is None else _utc(out[key]).isoformat()
        out["box"] = [round(v, 2) for v in (self.x1, self.y1, self.x2, self.y2)]
        for key in ("x1", "y1", "x2", "y2", "frame_path", "crop_path"):
            del out[key]
        out["images"] = {"frame": self.frame_path is not None, "crop": self.crop_path is not None}
        return out


def _utc(moment: datetime) -> datetime:
    """`moment` as an aware UTC datetime (SQLite gives naive ones back)."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _utc_values(values: dict) -> dict:
    """`values` with every datetime in UTC: SQLite keeps no offset, so one zone for all."""
    return {k: _utc(v) if isinstance(v, datetime) else v for k, v in values.items()}


def database_url(path_or_url: str | Path) -> str:
    """A SQLAlchemy URL for `path_or_url`: a URL as it is, a plain path as a SQLite file.

    Raises ValueError for a string that looks like a URL but SQLAlchemy cannot read."""
    text = str(path_or_url)
    if "://" not in text:  # quoted: a `?` or `#` in a file name is no query or fragment
        return URL.create("sqlite", database=str(Path(text).expanduser().resolve())).render_as_string()
    try:
        make_url(text)
    except ArgumentError as exc:
        raise ValueError(f"{text!r} is not a database URL SQLAlchemy reads ({exc}); give a file path "
                         "for SQLite or a URL such as postgresql+psycopg://user:pass@host/db") from None
    return text


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")  # readers never block the watcher
    cursor.execute("PRAGMA synchronous=NORMAL")  # in WAL: a killed process loses no commit
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()


def _sqlite_file(url: str) -> Path | None:
    """The file of a SQLite `url` (None: not SQLite, in memory, or already a `file:` URI)."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:") or "uri" in parsed.query:
        return None
    return Path(parsed.database).expanduser().absolute()


def _beside(file: Path) -> list[Path]:
    """The -wal and -shm files of the SQLite database `file`."""
    return [Path(f"{file}-wal"), Path(f"{file}-shm")]


def _closed_wal(file: Path) -> bool:
    """Whether `file` is a WAL-mode database with no -wal or -shm beside it: its watcher closed it
    cleanly (or is not running), so the main file holds every commit and is read as immutable."""
    if any(side.exists() for side in _beside(file)):
        return False
    try:
        with open(file, "rb") as fh:
            header = fh.read(20)
    except OSError:
        return False
    return header[:16] == b"SQLite format 3\x00" and header[18:20] == b"\x02\x02"  # WAL versions


def _connect_readonly(file: Path) -> sqlite3.Connection:
    """A read-only connection to `file` that writes nothing, not even a -wal or -shm file.

    `mode=ro` reads a watcher's live database through the -wal and -shm it keeps (read access
    is enough). A WAL database closed cleanly has neither, and SQLite would create them, which a
    read-only folder refuses (and a writable one is left holding files of the server's user), so
    it is opened `immutable=1`. Each query connects anew, so once a watcher starts (its -wal and
    -shm appear) reads go through them again; a watcher starting during one query writes to its
    -wal, not to this file, until a checkpoint."""
    uri = f"{file.as_uri()}?mode=ro" + ("&immutable=1" if _closed_wal(file) else "")
    return sqlite3.connect(uri, uri=True, timeout=10.0, check_same_thread=False)


def _unreadable(file: Path, why: object) -> ValueError:
    """The one-line error for a SQLite database the server cannot read, saying the fix."""
    side = [p for p in _beside(file) if p.exists()]
    if not all(os.access(p, os.R_OK) for p in (file, *side)):
        fix = (f"give the user running `loomlens serve` read permission on {file}"
               + (" and its -wal/-shm files" if side else ""))
    elif side and not os.access(file.parent, os.W_OK):
        fix = (f"it was left with its -wal/-shm files in a folder this user cannot write: start and stop "
               f"`loomlens watch --db {file}` cleanly, or let this user write to {file.parent}")
    else:
        fix = "point --events-db at the SQLite file `loomlens watch --db` writes"
    return ValueError(f"cannot open the events database {file} read-only: {why}; {fix}")


def _open_reader(file: Path) -> Engine:
    """A read-only engine on the SQLite database `file` (the server's), checked to read now.

    Each query gets a fresh read-only connection (NullPool): no table is made, no journal mode
    or other pragma set, nothing written. Raises FileNotFoundError when `file` is absent and
    ValueError when it cannot be read, each one line naming the file and the fix."""
    try:
        file.stat()
    except FileNotFoundError:
        raise FileNotFoundError(f"no events database at {file}: start `loomlens watch --db {file}` "
                                "first, or point --events-db at the watcher's database") from None
    except OSError as err:  # a folder on the way this user may not enter, ...
        raise _unreadable(file, err.strerror or err) from None
    engine = create_engine(URL.create("sqlite", database=str(file)), creator=lambda: _connect_readonly(file),
                           poolclass=NullPool)
    try:
        inspect(engine).has_table(events_table.name)
    except SQLAlchemyError as err:
        engine.dispose()
        raise _unreadable(file, getattr(err, "orig", None) or err) from None
    return engine


class EventStore:
    """The events table of one database.

    Args:
        path_or_url: a SQLite file path (created with its folder when `create`) or a
            SQLAlchemy URL.
        create: make the table when it is missing (the watcher); a reader (the server) passes
            False: a SQLite file is then opened read-only (see `_open_reader`), an absent one is
            a FileNotFoundError and an unreadable one a one-line ValueError, both saying the fix.
    """

    def __init__(self, path_or_url: str | Path, *, create: bool = True):
        self.url = database_url(path_or_url)
        sqlite = self.url.startswith("sqlite")
        reader_file = None if create else _sqlite_file(self.url)
        if reader_file is not None:  # the server: read-only, no table made, no pragma, no file written
            self.engine: Engine = _open_reader(reader_file)
            return
        if sqlite:
            file = Path(make_url(self.url).database or "")
            if not create and not file.exists():
                raise FileNotFoundError(f"no events database at {file}: start `loomlens watch --db {file}` "
                                        "first, or point --events-db at the watcher's database")
        shown = make_url(self.url).render_as_string()  # the password masked
        try:
            if sqlite and create:
                file.parent.mkdir(parents=True, exist_ok=True)
            self.engine = create_engine(self.url, pool_pre_ping=not sqlite)
            if sqlite:
                event.listen(self.engine, "connect", _sqlite_pragmas)
            if create:
                metadata.create_all(self.engine)
            else:  # a reader (the server) checks at start that the database can be read at all
                self._ready()
        except ModuleNotFoundError as err:  # SQLAlchemy imports the URL's driver here
            raise ValueError(f"the database {shown} needs the driver {err.name}, which is not installed: "
                             "pip install it, or give a SQLite file (--db events.db)") from None
        except (OSError, SQLAlchemyError) as err:  # a folder or another file where the database should be, ...
            why = getattr(err, "orig", None) or err
            raise ValueError(f"cannot open the events database {shown}: {why}; give a new or existing SQLite file "
                             "(--db events.db) or a database URL that is reachable") from None

    def close(self) -> None:
        """Release the database connections."""
        self.engine.dispose()

    def _ready(self) -> bool:
        return inspect(self.engine).has_table(events_table.name)

    def start(self, ev: Event, mark: Mark | None = None) -> int:
        """Record a new event (committed before this returns). Returns its id. `mark`: how far
        the event's camera folder or video file has been read with the frame that started it,
        saved in the same transaction, so a kill can never keep the event and lose the mark (a
        restart would read that frame again and record the event twice)."""
        values = _utc_values({k: v for k, v in asdict(ev).items() if k != "id"})
        with self.engine.begin() as conn:
            result = conn.execute(events_table.insert().values(**values))
            ev.id = int(result.inserted_primary_key[0])
            if mark is not None:
                _upsert_mark(conn, ev.camera, mark)
        return ev.id

    def update(self, event_id: int, **values) -> None:
        """Change columns of event `event_id` (score, box, last_seen_at, frames, paths, ...)."""
        unknown = set(values) - set(events_table.c.keys())
        if unknown:
            raise ValueError(f"events have no column(s) {sorted(unknown)}")
        with self.engine.begin() as conn:
            conn.execute(update(events_table).where(events_table.c.id == event_id).values(**_utc_values(values)))

    def end(self, event_id: int, ended_at: datetime) -> None:
        """Mark event `event_id` ended at `ended_at`."""
        self.update(event_id, status="ended", ended_at=ended_at)

    def interrupt_open(self, cameras: list[str]) -> int:
        """Events of `cameras` still open (their watcher was killed): marked interrupted, ended
        when last seen. Returns how many."""
        with self.engine.begin() as conn:
            result = conn.execute(
                update(events_table)
                .where(events_table.c.camera.in_(cameras), events_table.c.status == "open")
                .values(status="interrupted", ended_at=events_table.c.last_seen_at))
            return int(result.rowcount or 0)

    def folder_mark(self, camera: str) -> tuple[int, str] | None:
        """The (mtime_ns, file name) up to which `camera`'s frame folder was read, or None."""
        if not inspect(self.engine).has_table(folder_marks_table.name):
            return None
        with self.engine.connect() as conn:
            row = conn.execute(select(folder_marks_table.c.mtime_ns, folder_marks_table.c.name)
                               .where(folder_marks_table.c.camera == camera)).first()
        return None if row is None else (int(row[0]), str(row[1]))

    def set_mark(self, camera: str, mark: Mark) -> None:
        """Record how far `camera`'s source was read: a folder's (mtime_ns, file name) of its
        last file, or a video file's VideoMark."""
        with self.engine.begin() as conn:
            _upsert_mark(conn, camera, mark)

    def video_mark(self, camera: str) -> VideoMark | None:
        """How far `camera`'s video file was read (which file, last frame, read to its end), or
        None when no watch of it recorded one (or the database predates video marks)."""
        if not inspect(self.engine).has_table(video_marks_table.name):
            return None
        c = video_marks_table.c
        with self.engine.connect() as conn:
            row = conn.execute(select(c.size, c.mtime_ns, c.frame, c.ended).where(c.camera == camera)).first()
        return None if row is None else VideoMark(int(row[0]), int(row[1]), int(row[2]), bool(row[3]))

    def get(self, event_id: int) -> Event | None:
        """The event with id `event_id`, or None."""
        if not self._ready():
            return None
        with self.engine.connect() as conn:
            row = conn.execute(select(events_table).where(events_table.c.id == event_id)).mappings().first()
        return None if row is None else _event(row)

    def query(self, *, camera: str | None = None, label: str | None = None, since: datetime | None = None,
              until: datetime | None = None, limit: int = 50, offset: int = 0) -> tuple[list[Event], int]:
        """Events newest first, filtered by camera, label (class) and start time in
        [since, until). Returns (one page of `limit` events from `offset`, total matching)."""
        if limit < 1 or offset < 0:
            raise ValueError(f"limit must be >= 1 and offset >= 0, got limit={limit}, offset={offset}")
        if not self._ready():
            return [], 0
        where = []
        if camera:
            where.append(events_table.c.camera == camera)
        if label:
            where.append(events_table.c.label == label)
        if since is not None:
            where.append(events_table.c.started_at >= _utc(since))
        if until is not None:
            where.append(events_table.c.started_at < _utc(until))
        page = (select(events_table).where(*where)
                .order_by(events_table.c.started_at.desc(), events_table.c.id.desc()).limit(limit).offset(offset))
        with self.engine.connect() as conn:
            rows = conn.execute(page).mappings().all()
            total = conn.execute(select(func.count()).select_from(events_table).where(*where)).scalar_one()
        return [_event(r) for r in rows], int(total)

    def distinct(self, column: str) -> list[str]:
        """The values of `column` (camera or label) in the store, sorted."""
        if column not in ("camera", "label"):
            raise ValueError(f"distinct values are listed for camera or label, not {column!r}")
        if not self._ready():
            return []
        col = events_table.c[column]
        with self.engine.connect() as conn:
            return [v for (v,) in conn.execute(select(col).distinct().order_by(col))]


def _upsert_mark(conn, camera: str, mark: Mark) -> None:
    """Set `camera`'s mark within the open transaction `conn`: a VideoMark in the video marks,
    a folder's (mtime_ns, file name) in the folder marks."""
    if isinstance(mark, VideoMark):
        table, values = video_marks_table, mark._asdict()
    else:
        table, values = folder_marks_table, {"mtime_ns": mark[0], "name": mark[1]}
    done = conn.execute(update(table).where(table.c.camera == camera).values(**values))
    if not done.rowcount:
        conn.execute(table.insert().values(camera=camera, **values))


def _event(row) -> Event:
    values = dict(row)
    for key in ("started_at", "last_seen_at", "ended_at"):
        if values[key] is not None:
            values[key] = _utc(values[key])
    return Event(**values)
