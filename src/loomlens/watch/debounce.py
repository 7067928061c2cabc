"""Debouncing detections into events, as a pure state machine (no model, no clock, no I/O).

A defect is one event when it is seen in `k` of `n` consecutive frames at about the same place
(same label, IoU >= `iou` with where it was last seen); the event ends after `m` frames in a
row without it. One detector flicker is therefore never an alert, and one missed frame never
splits a defect into two events. The number of tracks is capped, so memory stays bounded
whatever the detector says.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from loomlens.data.records import Box, iou


@dataclass(frozen=True)
class DebounceSettings:
    """`k` hits in `n` consecutive frames start an event, `m` missed frames in a row end it;
    a detection continues a track when its IoU with the track's last box is at least `iou`;
    at most `max_tracks` candidates and events are followed at once (the lowest-scoring
    candidates go first)."""

    k: int = 3
    n: int = 5
    m: int = 5  # at 2 frames a second: an event starts within 2.5 s and ends 2.5 s after the defect
    iou: float = 0.3
    # bounds memory and work whatever the detector answers
    max_tracks: int = 32

    def __post_init__(self) -> None:
        if not 1 <= self.k <= self.n:
            raise ValueError(f"debounce needs 1 <= k <= n (k hits in n frames), got k={self.k}, n={self.n}")
        if self.m < 1:
            raise ValueError(f"debounce needs m >= 1 (frames without the defect that end an event), got {self.m}")
        if not 0.0 < self.iou <= 1.0:
            raise ValueError(f"debounce iou must be in (0, 1], got {self.iou}")
        if self.max_tracks < 1:
            raise ValueError(f"max_tracks must be >= 1, got {self.max_tracks}")


@dataclass
class Track:
    """One defect being followed: its label, last box, best-scoring box and the frame index
    it was best in, the hit/miss history of its last `n` frames, whether it is an event
    (`confirmed`), the misses in a row since last seen, and the frames it was seen in."""

    id: int
    label: str
    box: Box
    best: Box
    best_frame: int
    first_frame: int
    last_frame: int
    history: deque = field(default_factory=deque)
    confirmed: bool = False
    misses: int = 0
    hits: int = 1


@dataclass(frozen=True)
class Change:
    """What one frame did to a track: `started` (now an event), `improved` (an event's best
    score rose), `ended` (gone for `m` frames), or `seen` (an event seen again)."""

    kind: str
    track: Track


def _score(box: Box) -> float:
    return box.score if box.score is not None else 1.0


class Debouncer:
    """Turns each frame's detections into event changes. Feed frames in order with `update`."""

    def __init__(self, settings: DebounceSettings | None = None):
        self.settings = settings or DebounceSettings()
        self.tracks: list[Track] = []
        self._next_id = 1

    def update(self, frame: int, boxes: list[Box]) -> list[Change]:
        """Match `boxes` (one frame's detections) to the tracks and advance them.

        Args:
            frame: this frame's index (increasing).
            boxes: its detections in pixels, with scores.
        Returns:
            the changes this frame made (started, improved, seen, ended), started first.
        """
        s = self.settings
        pairs = sorted(((iou(t.box, b), ti, bi) for ti, t in enumerate(self.tracks)
                        for bi, b in enumerate(boxes) if t.label == b.label), reverse=True)
        matched: dict[int, int] = {}
        used: set[int] = set()
        for overlap, ti, bi in pairs:
            if overlap < s.iou:
                break
            if ti not in matched and bi not in used:
                matched[ti] = bi
                used.add(bi)
        changes: list[Change] = []
        kept: list[Track] = []
        for ti, track in enumerate(self.tracks):
            hit = ti in matched
            track.history.append(hit)
            if len(track.history) > s.n:
                track.history.popleft()
            if hit:
                box = boxes[matched[ti]]
                track.box, track.last_frame, track.misses, track.hits = box, frame, 0, track.hits + 1
                better = _score(box) > _score(track.best)
                if better:
                    track.best, track.best_frame = box, frame
                if not track.confirmed and sum(track.history) >= s.k:
                    track.confirmed = True
                    changes.append(Change("started", track))
                elif track.confirmed:
                    changes.append(Change("improved" if better else "seen", track))
                kept.append(track)
                continue
            track.misses += 1
            if track.confirmed:
                if track.misses >= s.m:
                    changes.append(Change("ended", track))
                else:
                    kept.append(track)
            elif sum(track.history) + (s.n - len(track.history)) >= s.k and track.misses < s.n:
                kept.append(track)  # k hits within n frames are still possible
        for bi, box in enumerate(boxes):
            if bi in used:
                continue
            track = Track(self._next_id, box.label, box, box, frame, frame, frame, deque([True]))
            self._next_id += 1
            if s.k == 1:
                track.confirmed = True
                changes.append(Change("started", track))
            kept.append(track)
        self.tracks = self._capped(kept, changes)
        changes.sort(key=lambda c: c.kind != "started")  # stable: a capped event's end stays last
        return changes

    def _capped(self, tracks: list[Track], changes: list[Change]) -> list[Track]:
        """At most `max_tracks`: events first, then the best-scoring candidates; an event that
        does not fit any more is ended (never silently forgotten)."""
        if len(tracks) <= self.settings.max_tracks:
            return tracks
        ranked = sorted(tracks, key=lambda t: (not t.confirmed, -_score(t.best)))
        changes += [Change("ended", t) for t in ranked[self.settings.max_tracks:] if t.confirmed]
        return ranked[: self.settings.max_tracks]

    def finish(self) -> list[Change]:
        """End every open event (the source ended): their `ended` changes; candidates dropped."""
        changes = [Change("ended", t) for t in self.tracks if t.confirmed]
        self.tracks = []
        return changes
