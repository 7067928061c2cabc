"""GET /v1/events and /v1/events/{id}/image read the watchers' database (not a watcher's
memory), behind the API key like the rest of /v1; the Line view lists the same events."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta, timezone

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from loomlens.events import Event, EventStore
from loomlens.serve import ServeSettings, create_app
from loomlens.serve.events import line_view

from .helpers import write_events_db

KEY = "events-key-91"
NOW = datetime.now(UTC).replace(microsecond=0)


@pytest.fixture(scope="module")
def predictor():
    from loomlens.predict import Predictor

    return Predictor(model="tiny", max_boxes=2, batch_size=2, text_tokens=12)


@pytest.fixture()
def db(tmp_path):
    """A watcher's database: 3 events on 2 cameras, the newest with its JPEGs on disk."""
    return write_events_db(tmp_path, now=NOW)


def _client(predictor, **settings) -> TestClient:
    return TestClient(create_app(predictor, ServeSettings(page=False, **settings)),
                      headers={"X-API-Key": KEY})


def test_events_are_paged_and_filtered(predictor, db) -> None:
    with _client(predictor, events_db=str(db), api_key=KEY) as client:
        assert client.get("/v1/events", headers={"X-API-Key": "wrong"}).status_code == 401
        body = client.get("/v1/events", params={"limit": 2}).json()
        assert body["total"] == 3 and [e["id"] for e in body["events"]] == [3, 2] and body["next_offset"] == 2
        assert client.get("/v1/events", params={"limit": 2, "offset": 2}).json()["next_offset"] is None
        assert [e["id"] for e in client.get("/v1/events", params={"camera": "loom1"}).json()["events"]] == [3, 1]
        assert [e["id"] for e in client.get("/v1/events", params={"class": "stain"}).json()["events"]] == [3, 2]
        since = (NOW - timedelta(hours=20)).isoformat()
        assert client.get("/v1/events", params={"since": since}).json()["total"] == 2
        until = (NOW - timedelta(hours=20)).replace(tzinfo=None).isoformat()  # no zone: UTC
        assert [e["id"] for e in client.get("/v1/events", params={"until": until}).json()["events"]] == [1]
        newest = client.get("/v1/events", params={"limit": 1}).json()["events"][0]
        assert newest["camera"] == "loom1" and newest["box"] == [1.0, 1.0, 9.0, 9.0]
        assert newest["images"] == {"frame": True, "crop": True}
        bad = client.get("/v1/events", params={"limit": 0})
        assert bad.status_code == 422 and "error" in bad.json()


def test_event_images(predictor, db) -> None:
    with _client(predictor, events_db=str(db)) as client:
        frame = client.get("/v1/events/3/image")
        assert frame.status_code == 200 and frame.headers["content-type"] == "image/jpeg"
        assert Image.open(__import__("io").BytesIO(frame.content)).size == (64, 36)
        assert Image.open(__import__("io").BytesIO(client.get("/v1/events/3/image?kind=crop").content)).size == (20, 20)
        gone = client.get("/v1/events/1/image")
        assert gone.status_code == 404 and gone.json()["error"]["code"] == "image_gone"
        assert client.get("/v1/events/99/image").json()["error"]["code"] == "no_such_event"
        assert client.get("/v1/events/3/image?kind=thumb").status_code == 422


def test_a_watcher_writing_later_is_seen_without_restart(predictor, db) -> None:
    with _client(predictor, events_db=str(db)) as client:
        assert client.get("/v1/events").json()["total"] == 3
        writer = EventStore(db)
        writer.start(Event(camera="loom3", label="hole", started_at=NOW, last_seen_at=NOW, score=0.5,
                           x1=0, y1=0, x2=5, y2=5, width=64, height=36))
        writer.close()
        assert client.get("/v1/events", params={"camera": "loom3"}).json()["total"] == 1


def test_without_an_events_db_the_routes_say_how_to_set_one(predictor) -> None:
    with _client(predictor) as client:
        answer = client.get("/v1/events")
        assert answer.status_code == 404 and "--events-db" in answer.json()["error"]["message"]


def test_line_view_rows_and_thumbnails(db) -> None:
    store = EventStore(db, create=False)
    gallery, rows = line_view(store, camera="all", label="all", window="last 24 hours", now=NOW)
    assert [r[0] for r in rows] == [3, 2] and len(gallery) == 1
    thumb, caption = gallery[0]
    assert thumb.size == (20, 20) and caption.startswith("#3 loom1: stain")
    assert [r[0] for r in line_view(store, camera="loom1", label=None, window="all", now=NOW)[1]] == [3, 1]
    assert line_view(store, camera="loom2", label="hole", window="all", now=NOW) == ([], [])
    with pytest.raises(ValueError, match="time window"):
        line_view(store, camera=None, label=None, window="forever")


def test_the_page_has_a_line_view_reading_the_events(predictor, db, tmp_path) -> None:
    app = create_app(predictor, ServeSettings(events_db=str(db), examples=0, examples_dir=str(tmp_path)))
    with TestClient(app) as client:
        config = client.get("/config").json()
    ids = {c.get("props", {}).get("elem_id") for c in config["components"]}
    assert {"line-gallery", "line-events", "line-camera", "line-class", "line-window"} <= ids
    assert "input-image" in ids  # the Predict tab is still there
    cameras = next(c for c in config["components"] if c.get("props", {}).get("elem_id") == "line-camera")
    assert [choice[0] for choice in cameras["props"]["choices"]] == ["all", "loom1", "loom2"]


def test_times_with_a_zone_as_typed_in_a_url(predictor, db) -> None:
    """`since=...T18:00:00+01:00` typed into a URL arrives with a space for the `+`: it was a 422
    full of pydantic internals; it now reads as +01:00, and a time that is none names the fix."""
    with _client(predictor, events_db=str(db)) as client:
        since = (NOW - timedelta(hours=19)).astimezone(timezone(timedelta(hours=1)))
        raw = since.replace(tzinfo=None).isoformat()
        for query in (f"since={raw}+01:00", f"since={raw}%2B01:00", f"since={raw}%2001:00"):
            body = client.get(f"/v1/events?{query}").json()
            assert body["total"] == 2, (query, body)
        bad = client.get("/v1/events?since=yesterday")
        assert bad.status_code == 422 and bad.json()["error"]["code"] == "bad_time"
        assert "'yesterday'" in bad.json()["error"]["message"] and "%2B" in bad.json()["error"]["message"]


def test_wrong_query_values_are_named_in_plain_words(predictor, db) -> None:
    with _client(predictor, events_db=str(db)) as client:
        for url, said in (("/v1/events?limit=0", "query limit: Input should be greater than or equal to 1 (got '0')"),
                          ("/v1/events/abc/image", "path event_id: "),
                          ("/v1/events/3/image?kind=foo", "query kind: ")):
            error = client.get(url).json()["error"]
            assert error["code"] == "invalid_request" and said in error["message"], error
            assert "{'type'" not in error["message"]


def test_out_of_range_unknown_and_basic_format_queries(predictor, db) -> None:
    """Values the database cannot hold were plain-text 500s; `label=` (for `class=`) was ignored
    and every event answered; 20261206 was read as Unix seconds in 1970."""
    with _client(predictor, events_db=str(db)) as client:
        for url, status, code in (("/v1/events?offset=9223372036854775808", 422, "invalid_request"),
                                  ("/v1/events/99999999999999999999/image", 404, "no_such_event"),
                                  ("/v1/events?since=9999-12-31T23:59:59-01:00", 422, "bad_time"),
                                  ("/v1/events?label=drop", 422, "unknown_parameter")):
            answer = client.get(url)
            assert (answer.status_code, answer.json()["error"]["code"]) == (status, code), (url, answer.text)
        assert "the defect class is `class`" in client.get("/v1/events?label=drop").json()["error"]["message"]
        today = NOW.strftime("%Y%m%d")
        assert client.get(f"/v1/events?since={today}").json()["total"] == client.get(
            f"/v1/events?since={NOW.date().isoformat()}").json()["total"]


def test_a_file_that_is_no_database_is_refused_at_start_and_one_that_breaks_is_a_503(predictor, db, tmp_path):
    (tmp_path / "notes.db").write_text("not a database at all\n")
    with pytest.raises(ValueError, match="cannot open the events database .*file is not a database"):
        create_app(predictor, ServeSettings(page=False, events_db=str(tmp_path / "notes.db")))
    with _client(predictor, events_db=str(db)) as client:
        db.write_bytes(b"\0" * 4096)  # the database breaks under a running server
        answer = client.get("/v1/events")
        assert answer.status_code == 503 and answer.json()["error"]["code"] == "events_db_unavailable"


def test_the_server_writes_nothing_beside_the_watchers_database(predictor, db) -> None:
    """The server opens the database read-only: no -wal/-shm made, the journal mode kept."""
    import sqlite3

    before = sorted(p.name for p in db.parent.iterdir())
    with _client(predictor, events_db=str(db)) as client:
        assert client.get("/v1/events").json()["total"] == 3
        assert sorted(p.name for p in db.parent.iterdir()) == before
    assert sorted(p.name for p in db.parent.iterdir()) == before
    with sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_the_server_reads_a_database_in_a_read_only_folder(predictor, db) -> None:
    db.parent.chmod(0o555)  # another user's folder, or a read-only mount
    try:
        with _client(predictor, events_db=str(db)) as client:
            assert client.get("/v1/events").json()["total"] == 3
            assert client.get("/v1/events/3/image").status_code == 200
    finally:
        db.parent.chmod(0o755)
    db.chmod(0o000)
    try:
        with pytest.raises(ValueError, match=f"cannot open the events database {db} read-only: .*read permission"):
            create_app(predictor, ServeSettings(page=False, events_db=str(db)))
    finally:
        db.chmod(0o644)
