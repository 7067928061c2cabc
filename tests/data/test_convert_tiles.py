"""convert --tile: tile files and JSONL agree, tiles stay in their frame's split, flips are
tiled too, damaged images are reported, images worked on at once give what one at a time gives,
bad arguments fail, the CLI flag works."""

from __future__ import annotations

import json
import re
from pathlib import PurePosixPath

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from loomlens.cli import app
from loomlens.data.convert import ConvertError, convert
from loomlens.data.florence_text import parse_text
from loomlens.data.records import Box, ImageRecord
from loomlens.data.synth import synthesize
from loomlens.data.tiles import tile_windows
from loomlens.data.voc import read_voc, write_voc

from .conftest import read_jsonl, write_image

TILE_NAME = re.compile(r"(?P<stem>.+)_x(?P<x>\d+)_y(?P<y>\d+)(?P<suffix>\.\w+)")


def _tile_samples(samples: list[dict]) -> list[dict]:
    return [s for s in samples if s["image"].startswith("images/tiles/")]


def _window(sample: dict) -> tuple[str, tuple[int, int, int, int]]:
    """The frame file name a tile sample was cut from, and its window in the frame."""
    m = TILE_NAME.fullmatch(PurePosixPath(sample["image"]).name)
    assert m, sample["image"]
    x0, y0 = int(m["x"]), int(m["y"])
    return m["stem"] + m["suffix"], (x0, y0, x0 + sample["width"], y0 + sample["height"])


def _assert_suffix_is_the_clipped_boxes(sample: dict, frame_boxes: list[Box], window) -> None:
    """The sample's `<loc_N>` boxes, parsed, are the frame's boxes clipped to `window` in tile
    pixels (within one bin); no box is cut with less than half showing (ambiguous windows are
    never written)."""
    x0, y0, x1, y1 = window
    expected = []
    for b in frame_boxes:
        cx1, cy1, cx2, cy2 = max(b.x1, x0), max(b.y1, y0), min(b.x2, x1), min(b.y2, y1)
        if cx1 < cx2 and cy1 < cy2:
            visible = (cx2 - cx1) * (cy2 - cy1) / (b.width * b.height)
            assert visible >= 0.5, (sample["image"], b)
            expected.append((b.label, cx1 - x0, cy1 - y0, cx2 - x0, cy2 - y0))
    got, dropped = parse_text(sample["suffix"], sample["width"], sample["height"])
    assert dropped == 0 and len(got) == len(expected), sample
    bin_x, bin_y = sample["width"] / 1000, sample["height"] / 1000
    for label, ex1, ey1, ex2, ey2 in expected:
        assert any(g.label == label and abs(g.x1 - ex1) <= bin_x and abs(g.x2 - ex2) <= bin_x
                   and abs(g.y1 - ey1) <= bin_y and abs(g.y2 - ey2) <= bin_y for g in got), (sample, label)


def test_tiles_agree_with_their_files_and_boxes_and_stay_in_their_frames_split(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    synthesize(src, images=6, seed=1, size=(512, 288))
    frames = {PurePosixPath(r.image).name: r for r in read_voc(src).records}
    report = convert(src, out, tile=128, val_fraction=0.34, seed=2)
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["tile"], summary["tile_overlap"]) == (128, 0.25) and report.tile == 128
    assert report.tile_reason == ""  # a tile given by number needs no reason
    positives = negatives = 0
    for split in ("train", "val"):
        samples = read_jsonl(out / f"{split}.jsonl")
        whole = {PurePosixPath(s["image"]).name for s in samples} - {PurePosixPath(s["image"]).name
                                                                    for s in _tile_samples(samples)}
        tiles = _tile_samples(samples)
        assert summary["splits"][split]["tile_samples"] == summary["splits"][split]["tiles"] == len(tiles)
        assert summary["splits"][split]["images"] == len(whole) + len(tiles)
        for sample in tiles:
            name, window = _window(sample)
            assert name in whole  # its own frame is in this split: no leakage
            frame = frames[name]
            assert window in tile_windows(frame.width, frame.height, 128, 0.25)
            with Image.open(out / sample["image"]) as im:
                assert im.size == (sample["width"], sample["height"]) and im.format == "JPEG"
            _assert_suffix_is_the_clipped_boxes(sample, frame.boxes, window)
            positives += bool(sample["suffix"])
            negatives += not sample["suffix"]
    assert positives > 0 and 0 < negatives <= positives + sum(not r.boxes for r in frames.values())


def test_flipped_frames_are_tiled_too_pixel_for_pixel(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    pixels = np.random.default_rng(0).integers(0, 256, (200, 300, 3), np.uint8)
    record = ImageRecord("images/noise.png", 300, 200, [Box("drop", 20, 30, 50, 60), Box("wrinkle", 150, 90, 200, 110)])
    (src / "images").mkdir(parents=True)
    Image.fromarray(pixels).save(src / record.image)
    write_voc(record, src / "noise.xml", src)
    convert(src, out, flip=True, tile=128, val_fraction=0)
    tiles = _tile_samples(read_jsonl(out / "train.jsonl"))
    sources = {"noise.png": (pixels, record.boxes),
               "flipped_noise.png": (pixels[:, ::-1], [b.hflip(300) for b in record.boxes])}
    assert {_window(s)[0] for s in tiles} == set(sources)
    for sample in tiles:
        name, (x0, y0, x1, y1) = _window(sample)
        frame, boxes = sources[name]
        assert np.array_equal(np.asarray(Image.open(out / sample["image"])), frame[y0:y1, x0:x1])
        _assert_suffix_is_the_clipped_boxes(sample, boxes, (x0, y0, x1, y1))



@pytest.mark.parametrize("mode", ["RGBA", "P"])
def test_a_png_named_jpg_is_flipped_and_tiled_in_its_own_format(tmp_path, mode):
    """A picture saved from the web or a screenshot tool as PNG under a `.jpg` name: its mirror
    is a PNG, and so are the mirror's tiles (JPEG holds no alpha and no palette)."""
    src, out = tmp_path / "src", tmp_path / "out"
    record = ImageRecord("images/shot.jpg", 200, 100, [Box("drop", 20, 30, 50, 60)])
    (src / "images").mkdir(parents=True)
    Image.new("RGB", (200, 100), (120, 130, 140)).convert(mode).save(src / record.image, "PNG")
    write_voc(record, src / "shot.xml", src)
    convert(src, out, flip=True, tile=64, val_fraction=0)
    tiles = [out / s["image"] for s in _tile_samples(read_jsonl(out / "train.jsonl"))]
    assert any("flipped_" in t.name for t in tiles)
    assert {Image.open(t).format for t in tiles} == {"PNG"}


def test_a_phone_photo_stored_as_mpo_is_flipped_and_tiled_as_a_jpeg_at_full_quality(tmp_path):
    """Phones save JPEGs with a second picture inside (MPO): the mirror and the tiles are plain
    JPEGs at the quality of every other JPEG's, not at the MPO writer's default of 75."""
    src, out = tmp_path / "src", tmp_path / "out"
    pixels = np.random.default_rng(0).integers(0, 256, (100, 200, 3), np.uint8)
    record = ImageRecord("images/phone.jpg", 200, 100, [Box("drop", 20, 30, 50, 60)])
    (src / "images").mkdir(parents=True)
    Image.fromarray(pixels).save(src / record.image, "MPO", save_all=True,
                                 append_images=[Image.fromarray(pixels[::2, ::2])], quality=95)
    Image.fromarray(pixels).save(tmp_path / "plain.jpg", "JPEG")
    write_voc(record, src / "phone.xml", src)
    convert(src, out, flip=True, tile=64, val_fraction=0)
    made = [out / "images" / "flipped_phone.jpg", *(out / s["image"] for s in
                                                    _tile_samples(read_jsonl(out / "train.jsonl")))]
    assert {Image.open(m).format for m in made} == {"JPEG"}
    # Quality 95 of noise takes well over the default 75's bytes.
    assert made[0].stat().st_size > 1.5 * (tmp_path / "plain.jpg").stat().st_size
    tile = next(m for m in made if m.name.startswith("phone_"))
    x0, y0 = (int(v) for v in TILE_NAME.fullmatch(tile.name).group("x", "y"))
    Image.fromarray(pixels[y0:y0 + 64, x0:x0 + 64]).save(tmp_path / "tile.jpg", "JPEG")
    assert tile.stat().st_size > 1.5 * (tmp_path / "tile.jpg").stat().st_size

def test_a_rerun_gives_the_same_files_and_leaves_no_temporaries(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    synthesize(src, images=4, seed=3, size=(384, 216))
    convert(src, out, tile=96, flip=True, tasks=("od", "caption"), seed=4)
    first = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != "summary.json"}
    convert(src, out, tile=96, flip=True, tasks=("od", "caption"), seed=4)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != "summary.json"} == first
    assert not [p for p in out.rglob("*") if p.name.startswith(".")]


def test_images_worked_on_at_once_give_what_one_at_a_time_gives(tmp_path, monkeypatch):
    from loomlens.data import convert as module

    src = tmp_path / "src"
    synthesize(src, images=6, seed=5, size=(384, 216))
    for i in (1, 4):
        damaged = src / "images" / f"frame_{i:05d}.jpg"
        damaged.write_bytes(damaged.read_bytes()[:2000])

    def files(out):
        return {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != "summary.json"}

    monkeypatch.setattr(module, "_workers", lambda pixels: 1)
    alone = convert(src, tmp_path / "alone", tile=96, flip=True, seed=4)
    monkeypatch.setattr(module, "_workers", lambda pixels: 4)
    together = convert(src, tmp_path / "together", tile=96, flip=True, seed=4)
    assert files(tmp_path / "together") == files(tmp_path / "alone")
    assert [p.file for p in together.problems] == [p.file for p in alone.problems] == [
        "annotations/frame_00001.xml", "annotations/frame_00004.xml"]


def test_images_worked_on_at_once_are_as_many_as_the_cores_and_the_memory_allow(monkeypatch):
    from loomlens.data import convert as module

    monkeypatch.setattr(module.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.setattr(module.os, "sysconf", lambda name: {"SC_PHYS_PAGES": 6 * 2**20, "SC_PAGE_SIZE": 4096}[name])
    assert module._workers(1280 * 1280) == 8  # 16 cores, at most 8
    assert module._workers(100_000_000) == 5  # a quarter of 24 GiB at 1.2 GB a frame
    assert module._workers(300_000_000) == 1  # a line-scan camera's largest frames: one at a time
    monkeypatch.setattr(module.os, "sched_getaffinity", lambda pid: {0, 1})
    assert module._workers(1280 * 1280) == 2


def test_a_damaged_image_is_reported_and_the_rest_is_tiled(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    synthesize(src, images=3, seed=1, size=(384, 216))
    damaged = src / "images" / "frame_00001.jpg"
    damaged.write_bytes(damaged.read_bytes()[:2000])  # the header (its size) still reads
    report = convert(src, out, tile=128, val_fraction=0)
    (problem,) = report.problems
    assert problem.file == "annotations/frame_00001.xml" and "damaged" in problem.message
    assert "truncated" in problem.message and problem.fix
    samples = read_jsonl(out / "train.jsonl")
    names = {_window(s)[0] for s in _tile_samples(samples)}
    assert names and "frame_00001.jpg" not in names
    assert not [s for s in samples if s["image"].endswith("frame_00001.jpg")]  # nor the whole frame
    assert report.images == 2
    with pytest.raises(ConvertError, match="strict"):
        convert(src, tmp_path / "strict", tile=128, strict=True)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"tile": 16}, "at least 32 px"), ({"tile": 128, "tile_overlap": 0.9}, r"\[0, 0.9\)"),
    ({"tile": 128, "tile_overlap": -0.1}, r"\[0, 0.9\)"),
])
def test_bad_tile_arguments_are_user_errors(tmp_path, kwargs, message):
    synthesize(tmp_path / "src", images=1, seed=1, size=(256, 144))
    with pytest.raises(ConvertError, match=message):
        convert(tmp_path / "src", tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_the_cli_tile_flags(tmp_path):
    synthesize(tmp_path / "src", images=3, seed=1, size=(384, 216))
    runner = CliRunner()
    result = runner.invoke(app, ["convert", str(tmp_path / "src"), str(tmp_path / "out"), "--tile", "128",
                                 "--tile-overlap", "0.3", "--val-fraction", "0"])
    assert result.exit_code == 0, result.output
    assert "tiles" in result.output
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert (summary["tile"], summary["tile_overlap"]) == (128, 0.3) and summary["splits"]["train"]["tiles"] > 0
    bad = runner.invoke(app, ["convert", str(tmp_path / "src"), str(tmp_path / "bad"), "--tile", "8"])
    assert bad.exit_code == 1 and "at least 32 px" in bad.output
    assert "--tile-overlap" in runner.invoke(app, ["convert", "--help"]).output


def test_the_cli_tiles_by_itself_only_where_the_squeeze_would_hide_the_defects(tmp_path):
    # 1536x864 frames whose drops are ~3 px once squeezed whole to 256 px: auto cuts tiles.
    synthesize(tmp_path / "large", images=3, seed=1, size=(1536, 864))
    runner = CliRunner()
    auto = runner.invoke(app, ["convert", str(tmp_path / "large"), str(tmp_path / "a"), "--val-fraction", "0"])
    assert auto.exit_code == 0, auto.output
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["tile"] in (256, 512) and summary["splits"]["train"]["tiles"] > 0
    assert "--tile auto: tiles of" in auto.output and summary["tile_reason"].startswith(f"tiles of {summary['tile']} px")
    off = runner.invoke(app, ["convert", str(tmp_path / "large"), str(tmp_path / "b"), "--val-fraction", "0",
                              "--tile", "OFF"])
    assert off.exit_code == 0, off.output
    assert json.loads((tmp_path / "b" / "summary.json").read_text())["tile"] is None
    assert "--tile OFF: no tiles, though" in off.output and f"--tile auto would cut {summary['tile']} px" in off.output
    # Frames no larger than the input are never tiled by auto, and the report says why.
    synthesize(tmp_path / "small", images=3, seed=1, size=(256, 144))
    small = runner.invoke(app, ["convert", str(tmp_path / "small"), str(tmp_path / "c"), "--val-fraction", "0"])
    assert small.exit_code == 0 and "--tile auto: no tiles" in small.output
    assert json.loads((tmp_path / "c" / "summary.json").read_text())["tile"] is None
    bad = runner.invoke(app, ["convert", str(tmp_path / "small"), str(tmp_path / "d"), "--tile", "big"])
    assert bad.exit_code == 1 and "auto, off or a tile edge" in bad.output and not (tmp_path / "d").exists()


def test_auto_tiles_mid_size_frames_where_the_squeeze_hides_small_defects(tmp_path):
    # 512 px frames (twice the 256 px input) whose 6 px spots are 3 px at the input, beside one
    # large stain: 3 of 4 boxes fall under 8 px, so auto cuts 256 px tiles.
    src = tmp_path / "src"
    for i in range(4):
        box = Box("nep", 100, 100, 106, 106) if i else Box("stain", 100, 100, 200, 200)
        write_image(src / f"f{i}.png", (512, 512))
        write_voc(ImageRecord(f"f{i}.png", 512, 512, [box]), src / f"f{i}.xml", src)
    report = convert(src, tmp_path / "out", val_fraction=0, tile="auto")
    assert report.tile == 256 and report.tile_reason.startswith("tiles of 256 px: 3 of 4 boxes fall under 8 px")
    # The same spots in frames of the input's size lose nothing to the squeeze: no tiles.
    for i in range(4):
        write_image(src / f"f{i}.png", (256, 256))
        write_voc(ImageRecord(f"f{i}.png", 256, 256, [Box("nep", 100, 100, 106, 106)]), src / f"f{i}.xml", src)
    report = convert(src, tmp_path / "small", val_fraction=0, tile="auto")
    assert report.tile is None and report.tile_reason.startswith("no tiles: no frame is larger")
    assert convert(src, tmp_path / "off", val_fraction=0).tile_reason == ""  # nothing auto would have cut


def test_the_library_tiles_only_when_asked(tmp_path):
    synthesize(tmp_path / "large", images=2, seed=1, size=(1536, 864))
    whole = convert(tmp_path / "large", tmp_path / "out", val_fraction=0)
    assert whole.tile is None and "--tile auto would cut" in whole.tile_reason  # not asked, but said
    report = convert(tmp_path / "large", tmp_path / "auto", val_fraction=0, tile="auto")
    assert report.tile is not None and report.tile_reason


def test_auto_cuts_only_the_frames_prediction_tiles(tmp_path):
    # Line-scan strips whose 6 px defects need 256 px tiles, beside 500x300 frames (longer than a
    # tile: prediction tiles them too) and 240x180 ones (no longer than a tile: seen whole): the
    # strips and the 500x300 frames are cut, the small frames are not.
    src = tmp_path / "src"
    for i in range(3):
        for name, size, box in ((f"strip{i}", (2048, 256), Box("nep", 100, 100, 106, 106)),
                                (f"frame{i}", (500, 300), Box("nep", 50, 50, 70, 70)),
                                (f"small{i}", (240, 180), Box("nep", 50, 50, 70, 70))):
            write_image(src / f"{name}.png", size)
            write_voc(ImageRecord(f"{name}.png", *size, [box]), src / f"{name}.xml", src)
    report = convert(src, tmp_path / "out", val_fraction=0, tile="auto")
    assert report.tile == 256
    cut_from = {_window(s)[0] for s in _tile_samples(read_jsonl(tmp_path / "out" / "train.jsonl"))}
    assert cut_from == {f"{kind}{i}.png" for kind in ("strip", "frame") for i in range(3)}
