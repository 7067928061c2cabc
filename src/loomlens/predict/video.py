"""Video input: frames read with OpenCV (opencv-python-headless), one in `every`, each with its
index and its timestamp in seconds from the start of the file."""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

VIDEO_SUFFIXES = frozenset({".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv"})


@dataclass
class Frame:
    """One sampled frame: its index in the file, its time in seconds, the picture (RGB)."""

    index: int
    timestamp: float
    image: Image.Image


def _cv2():
    try:
        import cv2
    except ImportError as exc:  # an optional extra: say how to get it
        raise RuntimeError("video input needs OpenCV: pip install 'loomlens[video]'") from exc
    return cv2


def is_video(path: str | Path) -> bool:
    """Whether `path` names a video file (by its suffix)."""
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


def frame_count(path: str | Path) -> int:
    """The number of frames the container declares (0 when it does not say)."""
    cv2 = _cv2()
    capture = cv2.VideoCapture(str(path))
    try:
        return max(0, int(capture.get(cv2.CAP_PROP_FRAME_COUNT)))
    finally:
        capture.release()


def ends_short(read: int, declared: int) -> bool:
    """Whether a video that gave `read` frames of the `declared` count was cut off: over 2 %
    short (a count estimated from a variable frame rate's duration can be a few frames off)."""
    return declared - read > max(1, declared // 50)


def read_frames(path: str | Path, every: int = 1) -> Generator[Frame, None, int]:
    """Frames 0, `every`, 2 x `every`, ... of the video at `path`, timestamped index / fps (the
    decoder's position when the file gives no fps); returns (as StopIteration's value) how many
    frames the file gave, so a caller can tell a file cut off from its declared end. Raises
    ValueError for a file OpenCV cannot open."""
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    cv2 = _cv2()
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        raise ValueError(f"cannot open video {path}: damaged, or not a video OpenCV decodes; "
                         "re-copy or re-encode it (e.g. to H.264 mp4)")
    fps = capture.get(cv2.CAP_PROP_FPS) or 0.0
    try:
        index = 0
        # grab() skips decoding the frames we do not keep; retrieve() decodes the kept one.
        while capture.grab():
            if index % every == 0:
                ok, bgr = capture.retrieve()
                if not ok:
                    break
                timestamp = index / fps if fps > 0 else capture.get(cv2.CAP_PROP_POS_MSEC) / 1000
                yield Frame(index, round(timestamp, 3), Image.fromarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)))
            index += 1
    finally:
        capture.release()
    return index
