"""A live MJPEG stream on 127.0.0.1 that drops mid-way and comes back: the watcher reconnects,
a defect seen across the drop stays one event, and the event count is right. Detections are
scripted (the bright rectangle's bounds), so the count depends on the watcher alone."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from loomlens.data.records import Box
from loomlens.events import EventStore
from loomlens.watch import DebounceSettings, Watcher, open_source

from .conftest import fabric_frame

A, B = (60, 60, 120, 110), (300, 150, 380, 200)
# What each connection shows, frame by frame (20 frames a second): A comes and goes on the
# first; B appears near its end and is still there when the second connection starts.
SESSIONS = [[A if 5 <= i < 25 else B if i >= 45 else None for i in range(60)],
            [B if i < 15 else None for i in range(30)]]


class MJPEG(BaseHTTPRequestHandler):
    """Serves SESSIONS[n] to the n-th connection, then closes it (the drop); 503 after."""

    served = 0
    lock = threading.Lock()

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        import cv2

        with MJPEG.lock:
            n, MJPEG.served = MJPEG.served, MJPEG.served + 1
        if n >= len(SESSIONS):
            self.send_error(503, "camera off")
            return
        self.send_response(200)
        self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
        self.end_headers()
        try:
            for defect in SESSIONS[n]:
                jpg = cv2.imencode(".jpg", fabric_frame(defect))[1].tobytes()
                self.wfile.write(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n" % len(jpg)
                                 + jpg + b"\r\n")
                self.wfile.flush()
                threading.Event().wait(0.05)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def log_message(self, *args) -> None:
        pass


def bright_boxes(images) -> list[list[Box]]:
    """The scripted detector: the bounds of the bright pixels, when there are enough of them."""
    out = []
    for im in images:
        ys, xs = np.nonzero(np.asarray(im.convert("L")) > 200)
        out.append([Box("defect", xs.min(), ys.min(), xs.max() + 1.0, ys.max() + 1.0, 0.9)] if len(xs) > 100 else [])
    return out


@pytest.fixture()
def stream():
    MJPEG.served = 0
    server = ThreadingHTTPServer(("127.0.0.1", 0), MJPEG)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/line.mjpg"
    server.shutdown()
    server.server_close()


def test_watcher_reconnects_and_counts_events_right(stream, tmp_path) -> None:
    store = EventStore(tmp_path / "events.db")
    source = open_source(stream, camera="loom1", fps=10, max_reconnects=2, timeout_s=5)
    watcher = Watcher(sources=[source], detect=bright_boxes, store=store, media=tmp_path / "media",
                      debounce=DebounceSettings(k=2, n=3, m=3))
    stop = threading.Event()
    timer = threading.Timer(120, stop.set)  # a bound, never reached when the watcher works
    timer.start()
    try:
        stats = watcher.run(stop)
    finally:
        timer.cancel()
    assert not stop.is_set(), "the watcher did not end by itself after the stream went away"
    assert MJPEG.served >= 3  # two sessions, then at least one refused reconnect
    assert stats["reconnects"]["loom1"] >= 2
    events, total = store.query()
    assert total == 2, [(e.id, e.x1, e.y1, e.started_at, e.ended_at) for e in events]
    b, a = events  # newest first
    assert (a.x1, a.y1, a.x2, a.y2) == pytest.approx((60, 60, 121, 111), abs=2)
    assert (b.x1, b.y1, b.x2, b.y2) == pytest.approx((300, 150, 381, 201), abs=2)
    assert all(e.status == "ended" and e.started_at <= e.ended_at for e in events)
    assert a.ended_at < b.started_at
    store.close()


def test_stream_credentials_stay_out_of_the_record() -> None:
    from loomlens.watch.sources import default_camera, redact

    assert redact("rtsp://admin:s3cret@10.0.0.5:554/live?x=1") == "rtsp://10.0.0.5:554/live?x=1"
    assert redact("http://cam/a@b.mjpg") == "http://cam/a@b.mjpg"  # an @ in the path is no login
    assert default_camera("rtsp://admin:s3cret@cam-3/stream") == "cam-3-stream"


def test_a_stream_given_up_on_is_a_failed_source_not_a_watch_that_ended_well(tmp_path) -> None:
    """A camera off or a wrong URL: after --max-reconnects the watch ended with exit 0 and
    "0 frames, 0 events", as if the line had been watched; a service manager saw success."""
    import socket

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    source = open_source(f"http://operator:pw@127.0.0.1:{port}/line.mjpg", camera="loom9", fps=10,
                         max_reconnects=1, timeout_s=2)
    store = EventStore(tmp_path / "events.db")
    stats = Watcher(sources=[source], detect=bright_boxes, store=store).run(threading.Event())
    assert stats["frames"] == 0 and list(stats["failed"]) == ["loom9"]
    assert stats["failed"]["loom9"].startswith(f"http://127.0.0.1:{port}/line.mjpg: gave up after 2 failed "
                                               "connection(s) in a row, no frame ever read"), stats["failed"]
    store.close()
