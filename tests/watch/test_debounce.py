"""The debouncer as a pure unit on scripted detections: k of n starts, m misses end, IoU keeps
defects apart, flicker is never an event, the track cap holds."""

from __future__ import annotations

import pytest

from loomlens.data.records import Box, iou
from loomlens.watch.debounce import DebounceSettings, Debouncer

A = Box("hole", 100, 100, 140, 140, 0.6)
A_MOVED = Box("hole", 104, 102, 144, 142, 0.9)  # the same defect, a little further on
B = Box("hole", 300, 50, 340, 90, 0.5)


def run(script: list[list[Box]], **settings) -> list[tuple[int, str, int]]:
    """(frame, kind, track id) of every start and end over `script`, then the finish."""
    deb = Debouncer(DebounceSettings(**settings))
    out = []
    for frame, boxes in enumerate(script):
        out += [(frame, c.kind, c.track.id) for c in deb.update(frame, boxes) if c.kind in ("started", "ended")]
    out += [(len(script), c.kind, c.track.id) for c in deb.finish()]
    return out


def test_iou() -> None:
    assert iou(A, A) == pytest.approx(1.0)
    assert iou(A, B) == 0.0
    assert iou(A, A_MOVED) == pytest.approx((36 * 38) / (2 * 1600 - 36 * 38))


def test_k_of_n_starts_one_event_and_m_misses_end_it() -> None:
    script = [[A], [], [A_MOVED], [A], [], [], [A], [], [], []]
    # k=2 of n=3: frames 0 and 2 confirm; one miss (frame 4, 5) never ends it with m=3; frames 7-9 do.
    assert run(script, k=2, n=3, m=3) == [(2, "started", 1), (9, "ended", 1)]


def test_flicker_is_no_event() -> None:
    script = [[A], [], [], [A], [], [], [A], [], []]
    assert run(script, k=2, n=3, m=2) == []


def test_two_places_are_two_events_and_classes_stay_apart() -> None:
    other_class = Box("stain", A.x1, A.y1, A.x2, A.y2, 0.7)
    script = [[A, B, other_class]] * 3 + [[]] * 2
    events = run(script, k=3, n=3, m=2)
    assert [kind for _, kind, _ in events] == ["started"] * 3 + ["ended"] * 3
    assert {frame for _, kind, frame in events if kind == "started"} == {1, 2, 3}


def test_best_score_and_box_are_kept() -> None:
    deb = Debouncer(DebounceSettings(k=2, n=2, m=1))
    deb.update(0, [A])
    started = deb.update(1, [A_MOVED])
    assert [c.kind for c in started] == ["started"]
    assert started[0].track.best == A_MOVED and started[0].track.best_frame == 1
    assert [c.kind for c in deb.update(2, [A])] == ["seen"]
    ended = deb.update(3, [])
    assert [c.kind for c in ended] == ["ended"] and ended[0].track.best == A_MOVED
    assert ended[0].track.hits == 3 and ended[0].track.last_frame == 2


def test_a_source_that_ends_ends_its_events() -> None:
    assert run([[A], [A]], k=1, n=1, m=5) == [(0, "started", 1), (2, "ended", 1)]


def test_track_cap_keeps_events_and_bounds_memory() -> None:
    deb = Debouncer(DebounceSettings(k=1, n=1, m=100, max_tracks=3))
    boxes = [Box("hole", 50 * i, 0, 50 * i + 20, 20, 0.1 * (i + 1)) for i in range(5)]
    changes = deb.update(0, boxes)
    started = {c.track.id for c in changes if c.kind == "started"}
    ended = {c.track.id for c in changes if c.kind == "ended"}
    assert len(deb.tracks) == 3 and len(started) == 5 and len(ended) == 2
    assert sorted(round(t.best.score, 2) for t in deb.tracks) == [0.3, 0.4, 0.5]  # the best-scoring stay


@pytest.mark.parametrize(("bad", "says"), [({"k": 0}, "1 <= k <= n"), ({"k": 4, "n": 3}, "1 <= k <= n"),
                                           ({"m": 0}, "m >= 1"), ({"iou": 0.0}, r"iou must be in \(0, 1\]"),
                                           ({"max_tracks": 0}, "max_tracks must be >= 1")])
def test_bad_settings_are_refused(bad: dict, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        DebounceSettings(**bad)
