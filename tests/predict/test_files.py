"""Inputs (files, folders, globs, videos), predictions.jsonl, drawn images, COCO output."""

import json
import os
import re
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


def test_a_folder_named_with_glob_brackets_is_read_by_its_name(tmp_path):
    """`cam[1]/*.png` found nothing: glob took `[1]` for a character class (matching `cam1`)."""
    folder = tmp_path / "cam[1]"
    (folder / "out").mkdir(parents=True)
    for name in ("a.png", "b.png", "out/c.png"):
        Image.new("RGB", (8, 8)).save(folder / name)
    assert [p.name for p in expand_inputs([str(folder / "*.png")])] == ["a.png", "b.png"]
    assert [p.name for p in expand_inputs([str(folder / "**" / "*.png")], exclude=[folder / "out"])] == ["a.png", "b.png"]
    assert [p.name for p in expand_inputs([folder])] == ["a.png", "b.png", "c.png"]
    (tmp_path / "cam1").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "cam1" / "z.png")
    assert [p.name for p in expand_inputs([str(tmp_path / "cam[12]" / "*.png")])] == ["z.png"]  # a class still globs


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


def test_a_file_name_that_is_not_utf8_is_a_problem_and_the_others_are_predicted(predictor, tmp_path):
    from loomlens.predict.resume import fingerprint

    folder = tmp_path / "in"
    folder.mkdir()
    latin = folder / os.fsdecode(b"caf\xe9.jpg")  # a Latin-1 name from an old Windows share
    Image.new("RGB", (64, 48)).save(latin, "JPEG")
    Image.new("RGB", (64, 48)).save(folder / "ok.png")
    fingerprint([latin], {}, [])  # hashed as its bytes, no UnicodeEncodeError
    for save_labels in (None, "labelstudio"):
        summary = predict_files(predictor, [folder], tmp_path / f"out-{save_labels}", save_labels=save_labels)
        assert summary["items"] == 1
        (problem,) = summary["problems"]
        assert problem["source"].endswith("caf\\xe9.jpg") and "convmv -f latin1 -t utf8" in problem["error"]
        assert json.loads((tmp_path / f"out-{save_labels}" / "problems.json").read_text()) == [problem]


def test_a_rules_file_a_person_wrote_in_out_is_never_rewritten_or_removed(predictor, inputs, tmp_path, monkeypatch):
    from loomlens.predict.regions import RegionRules

    run = tmp_path / "run"  # `--adapter runs/train --out runs/train`: the run's own rules, commented
    run.mkdir()
    (run / "regions.yaml").write_text("# the left edge only\nmin_score: 0.3\n")
    monkeypatch.setattr(predictor, "rules", RegionRules(min_score=0.3))
    summary = predict_files(predictor, [inputs / "a.png"], run)
    assert (run / "regions.yaml").read_text() == "# the left edge only\nmin_score: 0.3\n"
    assert "rules-applied.yaml" in summary["written"] and "min_score: 0.3" in (run / "rules-applied.yaml").read_text()
    monkeypatch.setattr(predictor, "rules", None)
    predict_files(predictor, [inputs / "a.png"], run)  # no rules now: only predict's own file goes
    assert (run / "regions.yaml").read_text() == "# the left edge only\nmin_score: 0.3\n"
    assert not (run / "rules-applied.yaml").exists()


def test_a_task_the_rules_do_not_filter_leaves_no_rules_applied_claiming_they_did(predictor, inputs, tmp_path,
                                                                                  monkeypatch):
    from loomlens.predict.regions import RegionRules

    out = tmp_path / "out"
    monkeypatch.setattr(predictor, "rules", RegionRules(min_score=0.3))
    assert "rules-applied.yaml" in predict_files(predictor, [inputs / "a.png"], out)["written"]
    # A caption is not filtered by region rules: the od run's rules-applied.yaml must not stay beside it.
    summary = predict_files(predictor, [inputs / "a.png"], out, task="caption", draw=False)
    assert summary["items"] == 1 and "rules-applied.yaml" not in summary["written"]
    assert not (out / "rules-applied.yaml").exists()


def test_a_rules_applied_file_without_predicts_header_is_never_rewritten_or_removed(predictor, inputs, tmp_path,
                                                                                    monkeypatch):
    from loomlens.predict.regions import RegionRules

    out = tmp_path / "out"
    out.mkdir()
    mine = "# my notes, not predict's\nmin_score: 0.9\n"
    (out / "rules-applied.yaml").write_text(mine)
    for rules in (RegionRules(min_score=0.3), None):
        monkeypatch.setattr(predictor, "rules", rules)
        summary = predict_files(predictor, [inputs / "a.png"], out, draw=False)
        assert (out / "rules-applied.yaml").read_text() == mine and "rules-applied.yaml" not in summary["written"]


def test_a_regions_yaml_as_an_older_predict_wrote_it_is_left_alone(predictor, inputs, tmp_path, monkeypatch):
    # Older predicts wrote the applied rules to OUT/regions.yaml as bare YAML, no mark: byte for
    # byte what `save_rules` writes for a run folder, so it cannot be told from a run's own rules.
    from loomlens.predict.regions import RegionRules, save_rules

    out = tmp_path / "out"
    out.mkdir()
    old = save_rules(RegionRules(min_score=0.3), out).read_text()
    for rules, told in ((RegionRules(min_score=0.5), "those are in rules-applied.yaml"), (None, "none were"),
                        (RegionRules(min_score=0.3), None)):
        monkeypatch.setattr(predictor, "rules", rules)
        summary = predict_files(predictor, [inputs / "a.png"], out, draw=False)
        assert (out / "regions.yaml").read_text() == old
        # but the run says it is not the rules in force, unless it is (a run folder's own)
        notices = [n["error"] for n in summary["notices"] if "regions.yaml" in n["error"]]
        assert (told is None and not notices) or (len(notices) == 1 and told in notices[0])
        if told:
            assert told in (out / "problems.json").read_text()


def test_one_picture_refused_alone_is_a_problem_naming_it_not_the_end_of_the_run(predictor, tmp_path):
    small = tmp_path / "small.png"
    Image.new("RGB", (200, 150)).save(small)
    summary = predict_files(predictor, [small], tmp_path / "out", task="region_to_category", text="0,0,300,230")
    (problem,) = summary["problems"]
    assert summary["items"] == 0 and problem["source"] == str(small)
    assert problem["error"].startswith(f"{small}: ") and "200x150" in problem["error"]


def test_drawn_pictures_agree_with_the_predictions_after_an_interrupted_run(predictor, inputs, tmp_path,
                                                                           fixed_detections):
    out = tmp_path / "out"
    fixed_detections([Box("drop", 2, 3, 20, 25, 0.8)])
    predict_files(predictor, [inputs], out)  # an earlier run with other answers drew every picture
    fixed_detections([Box("hole", 30, 30, 40, 40, 0.6)])
    with pytest.raises(Stop):  # recorded as a batch, stopped after drawing its first picture
        predict_files(predictor, [inputs], out, score_threshold=0.5, on_item=_stop_after(1))
    predict_files(predictor, [inputs], out, score_threshold=0.5)
    predict_files(predictor, [inputs], tmp_path / "straight", score_threshold=0.5)
    for picture in (tmp_path / "straight" / "drawn").iterdir():
        assert (out / "drawn" / picture.name).read_bytes() == picture.read_bytes(), picture.name


def test_a_second_run_into_its_own_input_folder_predicts_only_the_inputs(predictor, inputs):
    first = predict_files(predictor, [inputs], inputs, every=5, save_labels="voc")
    second = predict_files(predictor, [inputs], inputs, every=5, save_labels="voc")
    assert first["items"] == second["items"] == 4 and first["files"] == second["files"] == 3
    assert not any("drawn" in json.loads(x)["source"] for x in (inputs / "predictions.jsonl").read_text().splitlines())


def test_a_run_that_predicts_nothing_leaves_the_earlier_runs_files_alone(predictor, inputs, tmp_path):
    out = tmp_path / "out"
    predict_files(predictor, [inputs / "a.png"], out)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    (tmp_path / "bad.png").write_bytes(b"")
    summary = predict_files(predictor, [tmp_path / "bad.png"], out)
    assert summary["items"] == 0 and summary["written"] == [] and len(summary["problems"]) == 1
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_a_run_that_predicts_nothing_keeps_what_an_interrupted_run_predicted(predictor, inputs, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(Stop):
        predict_files(predictor, [inputs], out, on_item=_stop_after(6))
    kept = (out / ".predictions.partial.jsonl").read_bytes()
    Image.new("RGB", (200, 150)).save(tmp_path / "small.png")  # read, then refused by the task
    refused = predict_files(predictor, [tmp_path / "small.png"], out, task="region_to_category", text="0,0,300,230")
    assert refused["items"] == 0 and len(refused["problems"]) == 1
    assert (out / ".predictions.partial.jsonl").read_bytes() == kept
    assert predict_files(predictor, [inputs], out)["resumed"] == 8


@pytest.mark.parametrize(("options", "says"), [
    ({"task": "detect"}, "use one of: od, caption"),
    ({"task": "phrase_grounding"}, "needs --text: a phrase"),
    ({"task": "od", "text": "drop"}, "takes no --text"),
    ({"task": "region_to_category", "text": "left half"}, "give x1,y1,x2,y2"),
    ({"tile": "maybe"}, "--tile must be one of auto, on, off"),
    ({"task": "caption", "save_labels": "voc"}, "--save-labels writes boxes, and task 'caption' answers text"),
])
def test_options_no_picture_could_be_predicted_with_are_refused_before_anything_is_written(
        predictor, inputs, tmp_path, options, says):
    with pytest.raises(ValueError, match=re.escape(says)):
        predict_files(predictor, [inputs], tmp_path / "out", **options)
    assert not (tmp_path / "out").exists()


def test_hidden_files_in_a_folder_are_no_inputs_and_an_unread_suffix_names_the_read_ones(inputs):
    (inputs / "._a.png").write_bytes(b"\0\5\26\7 AppleDouble")  # macOS's resource fork copy
    (inputs / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (inputs / ".thumbs").mkdir()
    Image.new("RGB", (8, 8)).save(inputs / ".thumbs" / "a.png")
    assert [p.name for p in expand_inputs([inputs])] == ["a.png", "clip.avi", "b.jpg"]
    Image.new("RGB", (8, 8)).save(inputs / "anim.gif")
    with pytest.raises(ValueError, match=r"anim\.gif is neither an image nor a video: .*\.png.*\.mp4"):
        expand_inputs([inputs / "anim.gif"])


def test_a_long_strip_is_drawn_with_lines_and_labels_for_its_short_side():
    strip = Image.new("RGB", (4096, 256))
    drawn = np.asarray(draw_prediction(strip, Prediction("od", 4096, 256, [Box("drop", 100, 120, 106, 126, 0.9)])))
    assert not drawn[123, 103].any()  # a 6 px defect stays visible inside its outline
    rows = np.flatnonzero(drawn[:, 95:140].any(axis=(1, 2)))
    assert 120 - rows.min() <= 16  # the label above it: a line of small text, not 57 px
