"""`--flag-threshold`: a frame the model holds defective but leaves without a box becomes an
event over the whole frame, labelled `unlocated`; nothing changes without the setting."""

from __future__ import annotations

import threading

import numpy as np

from loomlens.data.records import Box
from loomlens.events import EventStore
from loomlens.predict import Prediction
from loomlens.watch import DebounceSettings, Watcher, open_source, predictor_detector
from loomlens.watch.watcher import UNLOCATED


class Fixed:
    """A predictor whose answers are given: (boxes, answer probability) per call, in turn."""

    def __init__(self, answers):
        self.answers = iter(answers)

    def predict(self, images, **_):
        return [Prediction("od", im.width, im.height, *next(self.answers)) for im in images]


def answer(boxes, p):
    return (boxes, [], "", True, False, 0, 1.0, None, p)


def test_a_sure_frame_without_a_box_gets_a_whole_frame_box_only_when_asked():
    from PIL import Image

    frame = Image.new("RGB", (64, 32))
    box = Box("drop", 1, 2, 9, 9, 0.4)
    answers = [answer([box], 0.95), answer([], 0.9), answer([], 0.2), answer([], None)]
    got = predictor_detector(Fixed(answers), flag_threshold=0.5)([frame] * 4)
    assert got == [[box], [Box(UNLOCATED, 0.0, 0.0, 64.0, 32.0, 0.9)], [], []]
    assert predictor_detector(Fixed(answers))([frame] * 4) == [[box], [], [], []]  # off by default


def test_unlocated_defects_are_debounced_into_one_event(tmp_path):
    import cv2

    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(4):
        cv2.imwrite(str(folder / f"{i:03d}.jpg"), np.full((48, 64, 3), 90, np.uint8))
    store = EventStore(tmp_path / "events.db")
    detect = predictor_detector(Fixed([answer([], 0.9)] * 3 + [answer([], 0.1)]), flag_threshold=0.5)
    source = open_source(str(folder), camera="loom 1", fps=100, once=True)
    Watcher(sources=[source], detect=detect, store=store, debounce=DebounceSettings(k=2, n=3, m=1)).run(threading.Event())
    (event,), total = store.query(limit=10)
    assert total == 1 and event.label == UNLOCATED and event.score == 0.9
    assert (event.x1, event.y1, event.x2, event.y2) == (0.0, 0.0, 64.0, 48.0)
