"""Inputs (files, folders, globs, videos), predictions.jsonl, drawn images, COCO output."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from loomlens.data.records import Box
from loomlens.predict.draw import draw_prediction
from loomlens.predict.files import predict_files
from loomlens.predict.predictor import Prediction
from loomlens.predict.sources import expand_inputs, iter_items
from loomlens.predict.video import read_frames

cv2 = pytest.importorskip("cv2")


def write_video(path, frames=10, fps=5.0, size=(96, 64)):
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, size)
    for i in range(frames):
        writer.write(np.full((size[1], size[0], 3), i * 20, np.uint8))
    writer.release()
    return path


@pytest.fixture()
def inputs(tmp_path):
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    Image.new("RGB", (80, 60), (200, 0, 0)).save(folder / "a.png")
    Image.new("RGB", (40, 30)).save(folder / "sub" / "b.jpg")
    (folder / "notes.txt").write_text("not an image")
    write_video(folder / "clip.avi")
    return folder


def test_video_frames_are_sampled_with_timestamps(inputs):
    frames = list(read_frames(inputs / "clip.avi", every=3))
    assert [f.index for f in frames] == [0, 3, 6, 9]
    assert [f.timestamp for f in frames] == pytest.approx([0.0, 0.6, 1.2, 1.8])
    assert frames[0].image.size == (96, 64) and frames[0].image.mode == "RGB"
    with pytest.raises(ValueError):
        list(read_frames(inputs / "clip.avi", every=0))


def test_inputs_expand_from_folders_and_globs(inputs):
    assert [p.name for p in expand_inputs([inputs])] == ["a.png", "clip.avi", "b.jpg"]
    assert [p.name for p in expand_inputs([str(inputs / "**" / "*.jpg"), inputs / "a.png"])] == ["b.jpg", "a.png"]
    relative = Path(os.path.relpath(inputs / "a.png"))  # one file named two ways is one input
    assert expand_inputs([relative, (inputs / "a.png").resolve(), inputs / "sub" / ".." / "a.png"]) == [relative]
    with pytest.raises(FileNotFoundError):
        expand_inputs([inputs / "missing*.png"])
    with pytest.raises(ValueError):
        expand_inputs([inputs / "notes.txt"])


def test_predict_files_writes_jsonl_drawings_and_coco(predictor, inputs, tmp_path, fixed_detections):
    from faster_coco_eval import COCO

    fixed_detections([Box("drop", 2, 3, 20, 25, 0.8)])
    summary = predict_files(predictor, [inputs], tmp_path / "out", every=5, coco=True)
    lines = [json.loads(x) for x in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert summary["items"] == len(lines) == 4  # a.png, two frames of clip.avi, b.jpg
    video = [x for x in lines if x["frame"] is not None]
    assert [(x["frame"], x["timestamp"]) for x in video] == [(0, 0.0), (5, 1.0)]
    assert all({"boxes", "task", "width", "height", "trained", "text", "answer_probability"} <= set(x) for x in lines)
    assert sorted(p.name for p in (tmp_path / "out" / "drawn").iterdir()) == [
        "a.jpg", "b.jpg", "clip_f000000.jpg", "clip_f000005.jpg"]
    coco = COCO(str(tmp_path / "out" / "coco_images.json"))
    assert len(coco.getImgIds()) == 4
    results = json.loads((tmp_path / "out" / "coco_results.json").read_text())
    assert isinstance(results, list) and sum(len(x["boxes"]) for x in lines) == len(results) == 4
    # the results format: image_id, category_id, bbox (x, y, w, h), score per box
    assert all(set(r) == {"image_id", "category_id", "bbox", "score"} for r in results)
    assert results[0]["bbox"] == pytest.approx([2, 3, 18, 22]) and results[0]["score"] == pytest.approx(0.8)
    assert len(coco.loadRes(results).getAnnIds()) == len(results)


def test_two_inputs_with_one_name_get_two_drawings(predictor, tmp_path):
    for folder in ("left", "right"):
        (tmp_path / folder).mkdir()
        Image.new("RGB", (64, 48)).save(tmp_path / folder / "frame.png")
    predict_files(predictor, [tmp_path / "left", tmp_path / "right"], tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out" / "drawn").iterdir()) == ["frame.jpg", "right_frame.jpg"]


def test_drawing_is_a_copy_with_each_box_once():
    image = Image.new("RGB", (200, 100))
    pred = Prediction("od", 200, 100, [Box("drop", 20, 20, 80, 60, 0.87)])
    drawn = draw_prediction(image, pred)
    assert image.getextrema() == ((0, 0), (0, 0), (0, 0))  # the input is untouched
    pixels = np.asarray(drawn).any(axis=2)
    assert pixels[60, 50] and pixels[40, 20] and not pixels[40, 50]  # outline only, no fill
    # One rectangle: the column through the box crosses exactly two horizontal edges.
    column = pixels[25:100, 50]
    assert np.count_nonzero(np.diff(column.astype(int)) == 1) <= 2


def test_a_video_cut_off_midway_gives_its_frames_and_is_reported_with_where_it_ends(tmp_path):
    whole = tmp_path / "whole.avi"
    writer = cv2.VideoWriter(str(whole), cv2.VideoWriter_fourcc(*"MJPG"), 5.0, (96, 64))
    for _ in range(10):  # noise: the frames, not the header, make up the file
        writer.write(np.random.default_rng(0).integers(0, 255, (64, 96, 3), np.uint8))
    writer.release()
    data = whole.read_bytes()
    (tmp_path / "cut.avi").write_bytes(data[: len(data) // 2])  # a copy that stopped halfway
    problems = []
    items = list(iter_items([whole, tmp_path / "cut.avi"], 2, problems.append))
    cut = [i.frame for i in items if i.source.name == "cut.avi"]
    assert [i.frame for i in items if i.source.name == "whole.avi"] == [0, 2, 4, 6, 8]
    assert cut and cut == list(range(0, 2 * len(cut), 2)) and len(cut) < 5
    (problem,) = problems
    assert problem.source == str(tmp_path / "cut.avi") and problem.frame is not None and problem.frame < 10
    assert f"ends at frame {problem.frame} of the 10" in problem.error and "re-copy" in problem.error


def test_a_folder_predicted_twice_with_the_output_inside_it_never_reads_its_own_output(inputs):
    out = inputs / "runs" / "predict"
    for what in ("drawn", "labels-voc/images"):  # what a first run left there
        (out / what).mkdir(parents=True)
        Image.new("RGB", (80, 60)).save(out / what / "a.jpg")
    found = expand_inputs([inputs, str(inputs / "**" / "*.jpg")], exclude=[out])
    assert [p.name for p in found] == ["a.png", "clip.avi", "b.jpg"]
    assert len(expand_inputs([out / "drawn"], exclude=[out])) == 1  # asked for by name: as asked


class Stop(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM, which the CLI turns into it) part-way through a run."""


def _spy(predictor, monkeypatch) -> list[int]:
    """Record how many pictures each call of `predictor.predict` is given."""
    calls, real = [], predictor.predict

    def predict(images, **options):
        calls.append(len(images))
        return real(images, **options)

    monkeypatch.setattr(predictor, "predict", predict)
    return calls


def _stop_after(count: int):
    seen = []

    def on_item() -> None:
        seen.append(1)
        if len(seen) == count:
            raise Stop

    return on_item


def test_an_interrupted_run_goes_on_where_it_stopped_and_ends_as_a_straight_run(predictor, inputs, tmp_path,
                                                                                 monkeypatch):
    straight = predict_files(predictor, [inputs], tmp_path / "straight", save_labels="coco")
    assert straight["items"] == 12 and straight["resumed"] == 0  # a.png, 10 video frames, b.jpg; batches of 4
    out = tmp_path / "out"
    with pytest.raises(Stop):
        predict_files(predictor, [inputs], out, save_labels="coco", on_item=_stop_after(6))
    assert not (out / "predictions.jsonl").exists() and (out / ".predictions.partial.jsonl").exists()
    calls = _spy(predictor, monkeypatch)
    resumed = predict_files(predictor, [inputs], out, save_labels="coco")
    assert calls == [4] and resumed["resumed"] == 8  # the first two batches were kept
    assert (out / "predictions.jsonl").read_text() == (tmp_path / "straight" / "predictions.jsonl").read_text()
    assert sorted(p.name for p in (out / "drawn").iterdir()) == sorted(p.name for p in (tmp_path / "straight" / "drawn").iterdir())
    coco = json.loads((out / "labels-coco" / "annotations.json").read_text())
    assert len(coco["images"]) == 12
    assert not (out / ".predictions.partial.jsonl").exists()


def test_other_options_or_a_torn_last_line_predict_again(predictor, inputs, tmp_path, monkeypatch):
    out = tmp_path / "out"
    with pytest.raises(Stop):
        predict_files(predictor, [inputs], out, on_item=_stop_after(6))
    partial = out / ".predictions.partial.jsonl"
    partial.write_text(partial.read_text() + '{"source": "torn')  # a kill in the middle of a line
    calls = _spy(predictor, monkeypatch)
    with pytest.raises(Stop):
        predict_files(predictor, [inputs], out, on_item=_stop_after(9))
    assert calls == [4] and len(partial.read_text().splitlines()) == 1 + 12  # fingerprint + every picture
    calls.clear()
    changed = predict_files(predictor, [inputs], out, score_threshold=0.5)
    assert changed["resumed"] == 0 and sum(calls) == 12


def test_a_run_stopped_before_predicting_through_other_mirrors_starts_afresh(predictor, inputs, tmp_path,
                                                                              monkeypatch):
    out = tmp_path / "out"
    with pytest.raises(Stop):
        predict_files(predictor, [inputs], out, on_item=_stop_after(6))
    monkeypatch.setattr(predictor, "views", ("", "h"))  # `--tta on` the second time
    calls = _spy(predictor, monkeypatch)
    assert predict_files(predictor, [inputs], out)["resumed"] == 0 and sum(calls) == 12
