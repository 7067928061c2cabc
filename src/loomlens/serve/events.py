"""Defect events for the API and the page, read from the watchers' database (`--events-db`),
never from a watcher's memory: `GET /v1/events` (paged, by camera, class and time),
`GET /v1/events/{id}/image` (the frame or crop JPEG), and the rows of the page's Line view."""

from __future__ import annotations

import re
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse
from PIL import Image
from sqlalchemy.exc import SQLAlchemyError

from loomlens.events.store import Event, EventStore
from loomlens.serve.errors import InputError

LINE_HEADERS = ["id", "camera", "class", "score", "started (UTC)", "ended (UTC)", "status", "frames"]
WINDOWS = {"last hour": 1.0, "last 24 hours": 24.0, "last 7 days": 168.0, "all": None}


def _store(store: EventStore | None) -> EventStore:
    if store is None:
        raise InputError(404, "no_events", "this server reads no events database; start it with "
                         "--events-db PATH_OR_URL (the database `loomlens watch --db` writes)")
    return store


#: The query parameters GET /v1/events takes: any other (`label=` for `class=`) is refused, not
#: ignored, since an ignored filter answers every event as if it were the filtered ones.
EVENT_FILTERS = frozenset({"camera", "class", "since", "until", "limit", "offset"})
#: The largest id or offset a database integer holds.
_BIGGEST = 2**63 - 1


@contextmanager
def _reachable(store: EventStore):
    """Run a query of `store`; a database gone or broken answers 503 `events_db_unavailable`."""
    try:
        yield store
    except SQLAlchemyError as err:
        raise InputError(503, "events_db_unavailable", f"the events database cannot be read now "
                         f"({type(getattr(err, 'orig', None) or err).__name__}); try again later") from None


def _aware(moment: datetime | None) -> datetime | None:
    """`moment` with a zone (UTC when it came without one)."""
    if moment is None or moment.tzinfo is not None:
        return moment
    return moment.replace(tzinfo=UTC)


def parse_time(name: str, text: str | None) -> datetime | None:
    """The query parameter `name`'s time `text` (ISO 8601, a date, or Unix seconds) as an aware
    datetime (UTC when it has no zone), None when absent; raises `InputError` (422 `bad_time`).
    A zone's `+` sent unescaped in a URL arrives as a space (`18:00:00 01:00`): read as `+`."""
    if text is None or not text.strip():
        return None
    value = re.sub(r"(\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?) (\d{2}(?::?\d{2})?)$", r"\1+\2", text.strip())
    try:  # ISO first: 20261206 is a date, not Unix seconds in 1970
        return _aware(datetime.fromisoformat(value)).astimezone(UTC)
    except (ValueError, OverflowError):
        pass
    try:
        return datetime.fromtimestamp(float(value), UTC)
    except (ValueError, OverflowError, OSError):
        raise InputError(422, "bad_time", f"{name}={text!r} is not a time: give ISO 8601 "
                         "(YYYY-MM-DDThh:mm:ssZ, or with an offset as %2B01:00: a + is %2B in a URL), "
                         "a date YYYY-MM-DD, or Unix seconds") from None


def events_router(store: EventStore | None) -> APIRouter:
    """The /v1/events routes over `store` (None: they answer 404 saying how to set one)."""
    router = APIRouter(prefix="/v1")

    @router.get("/events", summary="Defect events recorded by the watchers, newest first")
    def list_events(request: Request, camera: str | None = Query(None, description="only this camera id"),
                    label: str | None = Query(None, alias="class", description="only this defect class"),
                    since: str | None = Query(None, description="started at or after (ISO 8601; UTC if no zone)"),
                    until: str | None = Query(None, description="started before (ISO 8601; UTC if no zone)"),
                    limit: int = Query(50, ge=1, le=500), offset: int = Query(0, ge=0, le=_BIGGEST)) -> dict:
        unknown = sorted(set(request.query_params) - EVENT_FILTERS)
        if unknown:
            raise InputError(422, "unknown_parameter", f"unknown parameter(s) {', '.join(unknown)}: GET /v1/events "
                             f"takes {', '.join(sorted(EVENT_FILTERS))} (the defect class is `class`)")
        with _reachable(_store(store)) as db:
            events, total = db.query(camera=camera, label=label, since=parse_time("since", since),
                                     until=parse_time("until", until), limit=limit, offset=offset)
        following = offset + len(events)
        return {"events": [e.as_json() for e in events], "total": total, "limit": limit, "offset": offset,
                "next_offset": following if following < total else None}

    @router.get("/events/{event_id}/image", summary="An event's best frame or its crop, as JPEG",
                response_class=FileResponse)
    def event_image(event_id: int, kind: str = Query("frame", pattern="^(frame|crop)$")):
        with _reachable(_store(store)) as db:
            event = db.get(event_id) if 0 <= event_id <= _BIGGEST else None
        if event is None:
            raise InputError(404, "no_such_event", f"no event {event_id}; list them with GET /v1/events")
        path = event.frame_path if kind == "frame" else event.crop_path
        if not path or not Path(path).is_file():
            raise InputError(404, "image_gone", f"event {event_id} has no {kind} image on this machine (removed by "
                             "the watcher's retention --keep-days/--keep-mb, or written on another machine)")
        return FileResponse(path, media_type="image/jpeg")

    return router


def _thumbnail(event: Event, side: int = 160) -> Image.Image | None:
    """The event's crop as a small picture, or None when it is not on disk."""
    if not event.crop_path or not Path(event.crop_path).is_file():
        return None
    try:
        with Image.open(event.crop_path) as im:
            im = im.convert("RGB")
            im.thumbnail((side, side))
            return im
    except OSError:
        return None


def line_view(store: EventStore, *, camera: str | None, label: str | None, window: str,
              limit: int = 24, now: datetime | None = None) -> tuple[list, list[list]]:
    """The Line view's content: (thumbnails as [(image, caption)], table rows), the `limit`
    newest events of `camera` and `label` (None or "all": every one) within `window` (a key
    of WINDOWS)."""
    if window not in WINDOWS:
        raise ValueError(f"unknown time window {window!r}; one of {list(WINDOWS)}")
    hours = WINDOWS[window]
    since = None if hours is None else (now or datetime.now(UTC)) - timedelta(hours=hours)
    events, _ = store.query(camera=None if camera in (None, "", "all") else camera,
                            label=None if label in (None, "", "all") else label, since=since, limit=limit)
    gallery, rows = [], []
    for e in events:
        thumb = _thumbnail(e)
        when = e.started_at.strftime("%Y-%m-%d %H:%M:%S")
        if thumb is not None:
            gallery.append((thumb, f"#{e.id} {e.camera}: {e.label} {e.score:.2f} at {when}"))
        rows.append([e.id, e.camera, e.label, round(e.score, 3), when,
                     e.ended_at.strftime("%Y-%m-%d %H:%M:%S") if e.ended_at else "", e.status, e.frames])
    return gallery, rows
