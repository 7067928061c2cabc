"""`loomlens watch` end to end on a synthetic video with the tiny model: it runs, records one
debounced event to SQLite with its pictures, and ends by itself when the file is read."""

from __future__ import annotations

from pathlib import Path

from PIL import Image
from typer.testing import CliRunner

from loomlens.cli import app
from loomlens.events import EventStore
from loomlens.data.records import Box, iou


def test_watch_a_video_records_one_event(line_video, tmp_path) -> None:
    db = tmp_path / "out" / "events.db"
    result = CliRunner().invoke(app, ["watch", str(line_video), "--db", str(db), "--fps", "10",
                                      "--k", "2", "--n", "3", "--m", "2", "--camera", "loom7"])
    assert result.exit_code == 0, result.output
    assert "16 frames, 1 events (1 ended)" in result.output
    events, total = EventStore(db, create=False).query()
    assert total == 1
    event = events[0]
    assert (event.camera, event.status, event.source) == ("loom7", "ended", str(line_video))
    assert iou(Box(event.label, event.x1, event.y1, event.x2, event.y2), Box("d", 200, 100, 261, 151)) > 0.7
    assert event.started_at < event.ended_at and 2 <= event.frames <= 8
    assert (event.width, event.height) == (512, 288)
    with Image.open(event.frame_path) as frame, Image.open(event.crop_path) as crop:
        assert frame.size == (512, 288) and crop.width < 512
    assert Path(event.frame_path).parent == tmp_path / "out" / "event-images" / "loom7"


def test_watch_refuses_bad_sources_and_settings(line_video, tmp_path) -> None:
    runner = CliRunner()
    db = str(tmp_path / "e.db")
    missing = runner.invoke(app, ["watch", str(tmp_path / "nope.mp4"), "--db", db])
    assert missing.exit_code == 1 and "no such source" in missing.output
    assert not (tmp_path / "e.db").exists()  # sources and webhooks are checked before the database is made
    bad_k = runner.invoke(app, ["watch", str(line_video), "--db", db, "--k", "4", "--n", "3"])
    assert bad_k.exit_code == 1 and "k <= n" in bad_k.output
    cameras = runner.invoke(app, ["watch", str(line_video), "--db", db, "--camera", "a", "--camera", "b"])
    assert cameras.exit_code == 1 and "one per source" in cameras.output
    hook = runner.invoke(app, ["watch", str(line_video), "--db", db, "--webhook", "ftp://x"])
    assert hook.exit_code == 1 and "webhook" in hook.output
    # --tta is checked before any source opens or the database is made: the message is the option's
    tta_db = tmp_path / "tta.db"
    tta = runner.invoke(app, ["watch", str(tmp_path / "nope.mp4"), "--db", str(tta_db), "--tta", "mirror"])
    assert tta.exit_code == 1 and "--tta must be one of auto, on, off" in tta.output
    assert not tta_db.exists()
    # --tile and --regions too: --tile maybe made the database, loaded the model, and stopped the
    # watch at its first frame (a live camera's, after the line had started)
    tile = runner.invoke(app, ["watch", str(tmp_path / "nope.mp4"), "--db", str(tta_db), "--tile", "maybe"])
    assert tile.exit_code == 1 and "--tile must be one of auto, on, off" in tile.output, tile.output
    rules = runner.invoke(app, ["watch", str(tmp_path / "nope.mp4"), "--db", str(tta_db), "--regions",
                                str(tmp_path / "nope.yaml")])
    assert rules.exit_code == 1 and "nope.yaml cannot be read" in rules.output, rules.output
    assert not tta_db.exists()

    # a camera id names the folder of its event pictures: one with a path in it wrote them
    # outside --media (`../x`, `/x`), where retention never looks
    for bad in ("../cam", "/tmp/cam", "loom/1", ".."):
        refused = runner.invoke(app, ["watch", str(line_video), "--db", db, "--camera", bad])
        assert refused.exit_code == 1 and f"--camera {bad!r} names a folder path" in refused.output, refused.output
    assert not (tmp_path / "e.db").exists()


def test_a_damaged_video_beside_a_good_one_fails_the_run_after_the_good_one_is_watched(line_video, tmp_path) -> None:
    damaged = tmp_path / "loom8.avi"
    damaged.write_bytes(b"RIFF\x00\x00\x00\x00AVI not really a video")
    db = tmp_path / "events.db"
    result = CliRunner().invoke(app, ["watch", str(damaged), str(line_video), "--db", str(db), "--fps", "10",
                                      "--k", "2", "--n", "3", "--m", "2", "--camera", "loom8", "--camera", "loom7"])
    assert result.exit_code == 1, result.output
    assert "16 frames, 1 events (1 ended)" in result.output  # the good camera, to its end
    assert "1 of 2 source(s) stopped on an error" in result.output and "loom8:" in result.output
    assert [e.camera for e in EventStore(db, create=False).query()[0]] == ["loom7"]


def test_start_up_errors_keep_webhook_and_stream_secrets_out(line_video, tmp_path) -> None:
    """A refused webhook (not http, a bad port, no host, no scheme) or a mistyped stream URL was
    echoed whole in the error, its user:password, path token and query key with it, into a
    terminal or a service's log many can read."""
    runner, db = CliRunner(), str(tmp_path / "e.db")
    for url in ("ftp://line:hunter2@hooks.example/T0KEN?key=s3cr3t", "https://line:hunter2@hooks.example:8x/T0KEN?key=s3cr3t",
                "https://line:hunter2@/T0KEN?key=s3cr3t", "line:hunter2@hooks.example/T0KEN?key=s3cr3t"):
        result = runner.invoke(app, ["watch", str(line_video), "--db", db, "--webhook", url])
        assert result.exit_code == 1 and "webhook" in result.output, result.output
        assert not any(secret in result.output for secret in ("hunter2", "T0KEN", "s3cr3t")), result.output
    stream = runner.invoke(app, ["watch", "rstp://line:hunter2@cam7/stream", "--db", db])
    assert stream.exit_code == 1 and "no such source 'rstp://cam7/stream'" in stream.output, stream.output


def test_a_media_folder_that_cannot_be_written_is_refused_before_the_model_loads(line_video, tmp_path,
                                                                                monkeypatch) -> None:
    """--media a file, below a file, or read-only: the watch ran and logged, at every event,
    that its pictures could not be written."""
    import os

    import loomlens.predict

    def never(**_):
        raise AssertionError("the model loaded")

    monkeypatch.setattr(loomlens.predict, "Predictor", never)
    blocker = tmp_path / "disk"
    blocker.write_text("a file, not a folder")
    unwritable = [blocker, blocker / "pictures"]
    if os.geteuid() != 0:  # root writes anywhere
        (readonly := tmp_path / "readonly").mkdir(mode=0o555)
        unwritable.append(readonly)
    for media in unwritable:
        result = CliRunner().invoke(app, ["watch", str(line_video), "--db", str(tmp_path / "e.db"),
                                          "--media", str(media)])
        assert result.exit_code == 1 and f"--media {media}: event pictures cannot be written" in result.output, \
            result.output
