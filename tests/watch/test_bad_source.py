"""One source that fails mid-watch (a damaged file) is reported and ended; the other cameras
are watched to their end (it used to stop the whole watcher, healthy cameras included)."""

from __future__ import annotations

from loomlens.events import EventStore
from loomlens.watch import DebounceSettings, Watcher, open_source

from .conftest import write_video
from .test_stream_reconnect import bright_boxes


class Broken:
    """A source whose file turned out unreadable at its first frame."""

    camera, name, reconnects = "loom 2", "loom2.mp4", 0

    def poll(self):
        raise ValueError("loom2.mp4 holds no frame OpenCV can decode: re-copy or re-encode it")

    def close(self) -> None:
        pass


def test_a_failing_source_ends_alone_and_the_others_are_watched(tmp_path) -> None:
    video = write_video(tmp_path / "loom1.avi", {i: (60, 60, 120, 110) for i in range(3, 8)}, frames=12)
    good = open_source(str(video), camera="loom 1", fps=100)
    store = EventStore(tmp_path / "events.db")
    watcher = Watcher(sources=[Broken(), good], detect=bright_boxes, store=store,
                      debounce=DebounceSettings(k=1, n=1, m=1))
    stats = watcher.run()
    assert stats["frames"] == 12
    assert stats["failed"] == {"loom 2": "loom2.mp4 holds no frame OpenCV can decode: re-copy or re-encode it"}
    events = store.query(limit=10)[0]
    assert [e.camera for e in events] == ["loom 1"]
