"""Going on with an interrupted `loomlens predict`.

While a run predicts, each finished batch's records are appended to `OUT/.predictions.partial.jsonl`
(flushed to disk), after a first line holding the run's fingerprint: its inputs (path, size,
modification time), its options and the model it predicts with. A run stopped by Ctrl-C, SIGTERM
or a power cut and started again with the same fingerprint reuses those records and predicts
only what is left; anything else (other inputs, options or weights) starts afresh. The file
goes when `predictions.jsonl` has been written whole, so it never stands in for a complete run.
A torn last line (a kill mid-write) is dropped and that picture predicted again.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from loomlens.data.atomic import atomic_write
from loomlens.data.records import Box
from loomlens.predict.predictor import Prediction

PARTIAL = ".predictions.partial.jsonl"


def fingerprint(files: Sequence[Path], options: Mapping[str, Any], weights: Sequence[Path]) -> str:
    """A digest of what decides a run's records: the input `files` and the model's `weights`
    files (path, size, modification time) and the `options` (JSON-able values).

    Args:
        files: the inputs, in the order they are read.
        options: task, thresholds, tiling, the predictor's settings.
        weights: the files the model and adapter were loaded from (folders are listed).
    Returns:
        A hex digest; two runs with the same one give the same records."""
    digest = hashlib.sha256(json.dumps(options, sort_keys=True, default=str).encode())
    listed = [p for w in weights for p in (sorted(w.iterdir()) if w.is_dir() else [w])]
    for path in [*files, *listed]:
        if path.is_file():
            stat = path.stat()
            # os.fsencode: a name that is not UTF-8 (`caf\xe9.jpg`) is hashed as its bytes.
            digest.update(os.fsencode(path.resolve()) + f"\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def item_key(source: str | Path, frame: int | None) -> str:
    """The key of one picture of a run: its source file and, for a video, the frame."""
    return f"{source}#{frame}"


class PartialRecords:
    """The records an interrupted run left in `out` (`done`: key -> record, when its fingerprint
    is `key`), and the file the current run appends each batch's records to."""

    def __init__(self, out: Path, key: str) -> None:
        self.path, self.key = out / PARTIAL, key
        self.done: dict[str, dict] = self._read()
        self._file: IO[str] | None = None

    def _read(self) -> dict[str, dict]:
        if not self.path.exists():
            return {}
        lines = self.path.read_text(encoding="utf-8", errors="replace").split("\n")
        try:
            if json.loads(lines[0]).get("fingerprint") != self.key:
                return {}
        except (ValueError, AttributeError):
            return {}
        done = {}
        for line in lines[1:]:
            try:
                record = json.loads(line)
            except ValueError:
                break  # a torn last line: everything before it was flushed whole
            done[item_key(record["source"], record["frame"])] = record
        return done

    def add(self, records: Sequence[dict]) -> None:
        """Append `records` (one finished batch) and push them to the disk. Until the first
        record comes the file is not touched: a run that predicts nothing leaves the one an
        interrupted run left as it was."""
        if not records:
            return
        if self._file is None:  # the first batch: the records kept, under this run's fingerprint
            kept = [{"fingerprint": self.key}, *self.done.values()]
            atomic_write(self.path, "".join(json.dumps(r) + "\n" for r in kept))
            self._file = self.path.open("a", encoding="utf-8")
        self._file.writelines(json.dumps(r) + "\n" for r in records)
        self._file.flush()
        os.fsync(self._file.fileno())

    def finish(self) -> None:
        """Close and remove the file: the run's `predictions.jsonl` is written."""
        if self._file is not None:
            self._file.close()
        self.path.unlink(missing_ok=True)


def prediction_from_record(record: Mapping[str, Any]) -> Prediction:
    """The `Prediction` a record was written from (boxes and polygons at the record's 0.01 px),
    for the pre-annotations of a picture an earlier run predicted."""
    boxes = [Box(b["label"], *b["box"], b["score"]) for b in record["boxes"]]
    polygons = [(p["label"], p["points"]) for p in record["polygons"]]
    return Prediction(record["task"], record["width"], record["height"], boxes, polygons, record["text"],
                      record["trained"], record["tiled"], record["dropped"],
                      answer_probability=record.get("answer_probability"))  # absent before it was written
