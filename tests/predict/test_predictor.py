"""The Predictor contract on the tiny model: every task, inputs, thresholds, adapters, info."""

import pytest
import yaml
from PIL import Image, ImageDraw

from loomlens.data.records import Box
from loomlens.predict import Prediction, Predictor, RegionRules
from loomlens.data.tasks import TASKS

INPUTS = {"phrase_grounding": "drop", "referring_expression_segmentation": "broken-weft",
          "region_to_segmentation": "10,10,120,80", "region_to_category": "<loc_1><loc_2><loc_300><loc_400>"}


@pytest.fixture(scope="module")
def image():
    """A light square on a dark ground: the pretrained tiny finds it."""
    picture = Image.new("RGB", (320, 180), (40, 40, 40))
    ImageDraw.Draw(picture).rectangle([100, 40, 220, 150], fill=(230, 230, 230))
    return picture


@pytest.mark.parametrize("task", list(TASKS))
def test_every_task_answers_and_says_if_it_was_trained(predictor, image, task):
    (p,) = predictor.predict([image], task=task, text=INPUTS.get(task))
    assert isinstance(p, Prediction) and p.task == task and (p.width, p.height) == (320, 180)
    # The embedded model's pretraining record lists the tasks it was trained on.
    assert p.trained is (task in {"od", "caption", "dense_region_caption", "phrase_grounding"})
    assert isinstance(p.text, str)
    assert p.boxes or task != "od"
    assert 0 <= p.answer_probability <= 1  # measured for every task
    assert p.answer_probability > 0.5 or task != "od"  # the square: the model means to box it
    for b in p.boxes:
        assert 0 <= b.x1 < b.x2 <= 320 and 0 <= b.y1 < b.y2 <= 180
    for label, points in p.polygons:
        assert isinstance(label, str) and all(len(pt) == 2 for pt in points)


def test_batch_of_paths_and_images_in_order(predictor, image, tmp_path):
    path = tmp_path / "a.png"
    Image.new("RGB", (64, 48)).save(path)
    out = predictor.predict([path, image], task="caption")
    assert [(p.width, p.height) for p in out] == [(64, 48), (320, 180)]


def test_bad_inputs_are_refused_clearly(predictor, image):
    with pytest.raises(ValueError, match="unknown task"):
        predictor.predict([image], task="segment_everything")
    with pytest.raises(ValueError, match="needs a phrase"):
        predictor.predict([image], task="phrase_grounding")
    with pytest.raises(ValueError, match="inside"):
        predictor.predict([image], task="region_to_category", text="0,0,999,10")
    # a phrase longer than the encoder's positions (321 for the tiny model, with its 257 picture
    # tokens) failed deep in the model with "IndexError: index out of range in self"
    predictor.predict([image], task="phrase_grounding", text="drop " * 55)  # 321 positions: the most
    with pytest.raises(ValueError, match=r"with the picture it takes 322 positions of the 321 this model's "
                                         r"encoder has: shorten it by at least 1 token"):
        predictor.predict([image], task="phrase_grounding", text="drop " * 56)


def test_a_phrase_is_counted_by_the_processor_once(predictor, monkeypatch):
    """Each grounding call ran the processor (a picture resized to the model's input) only to
    count the phrase's positions: a server asked the same phrase again and again paid it each time."""
    import loomlens.predict.predictor as module

    counted = []

    def counting(processor, question):
        counted.append(question)
        return positions(processor, question)

    positions = module.encoder_positions
    monkeypatch.setattr(module, "encoder_positions", counting)
    for _ in range(3):
        predictor.check_text("phrase_grounding", "weft once")
        with pytest.raises(ValueError, match="322 positions of the 321"):  # refused every time, as before
            predictor.check_text("phrase_grounding", "weft " + "drop " * 55)
    assert len(counted) == len(set(counted)) == 2


def test_score_threshold_and_region_rules_filter_boxes(predictor, image, monkeypatch, fixed_detections):
    fixed_detections([Box("drop", 10, 10, 30, 30, 0.9), Box("drop", 200, 10, 220, 30, 0.9),
                      Box("wrinkle", 10, 10, 30, 30, 0.1)])
    assert len(predictor.predict([image], score_threshold=0.5)[0].boxes) == 2
    monkeypatch.setattr(predictor, "rules", RegionRules.model_validate(
        {"classes": {"drop": {"regions": [[[0, 0], [0.5, 0], [0.5, 1], [0, 1]]]}}}))
    kept = predictor.predict([image])[0].boxes
    assert [(b.label, b.x1) for b in kept] == [("drop", 10), ("wrinkle", 10)]


def test_other_labels_reach_the_detection_of_od_only(predictor, image, monkeypatch):
    from loomlens.infer.detection import Detection
    from loomlens.infer.generation import Generation
    from loomlens.predict import predictor as module

    asked = []

    def detect(model, processor, images, **options):
        asked.append((options["task"], options["other_labels"]))
        return [Detection([], 0, Generation("", [], [])) for _ in images]

    monkeypatch.setattr(module, "detect_with_details", detect)
    for other in (False, True):
        monkeypatch.setattr(predictor, "other_labels", other)
        predictor.predict([image], task="od", tile="off")
        predictor.predict([image], task="phrase_grounding", text="a stain", tile="off")
    assert asked == [("<OD>", False), ("<CAPTION_TO_PHRASE_GROUNDING>", False), ("<OD>", True),
                     ("<CAPTION_TO_PHRASE_GROUNDING>", False)]


def test_adapter_from_a_run_folder(tmp_path, image):
    from loomlens.model import load_model
    from loomlens.model.lora import LoraSettings, apply_lora

    run = tmp_path / "run"
    model, _ = load_model("tiny")
    apply_lora(model, LoraSettings(targets=["q_proj", "v_proj"], r=2)).save_pretrained(run / "checkpoints" / "best")
    (run / "config.yaml").write_text(yaml.safe_dump({"model": "tiny", "tasks": ["od"], "data": "nowhere"}))
    (run / "classes.txt").write_text("drop\nwrinkle\n")
    (run / "regions.yaml").write_text("min_score: 0.5\n")
    (run / "data_summary.json").write_text('{"splits": {"train": {"most_boxes": 31}}}')
    p = Predictor(adapter=run, max_boxes=2, text_tokens=8, constrained=True)
    assert p.loaded.max_boxes == 31 and p.max_boxes == 2  # the run's densest frame, unless given
    # Merged once at load: a plain Florence-2 answers, no peft layers in the way.
    assert not any("lora_" in name for name, _ in p.loaded.model.named_parameters())
    info = p.info()
    assert info["adapter"].endswith("best") and info["classes"] == ["drop", "wrinkle"]
    # The adapter's own task plus those the embedded base was pretrained on.
    pretrained = ["caption", "dense_region_caption", "od", "phrase_grounding"]
    assert info["trained_tasks"] == pretrained and info["regions"] is True
    assert p.tile_size == 256  # no tiles in its data: the model's input size
    # ... and a whole-frame run never tiles by itself, however large the frame
    assert p.model_inputs(2560, 1440) == 1 and p.model_inputs(2560, 1440, tile="on") > 1
    (od,) = p.predict([image])
    assert od.trained is True and {b.label for b in od.boxes} <= {"drop", "wrinkle"}
    assert p.predict([image], task="caption")[0].trained is True
    assert p.predict([image], task="ocr")[0].trained is False
    with pytest.raises(ValueError, match="trained on base"):
        Predictor(model="base", adapter=run)
    (tmp_path / "typo.yaml").write_text("classes: {drops: {min_score: 0.9}}\n")  # `drop` misspelt
    with pytest.raises(ValueError, match="typo.yaml name class\\(es\\) 'drops' that the model does not know"):
        Predictor(adapter=run, regions=tmp_path / "typo.yaml")
    # Data cut into tiles (`convert --tile 512`): the run predicts on tiles of that size.
    (run / "data_summary.json").write_text('{"tile": 512, "tile_overlap": 0.25}')
    tiled_run = Predictor(adapter=run)
    assert tiled_run.tile_size == 512 and tiled_run.model_inputs(2560, 1440) > 1
    assert tiled_run.constrained is True  # the run has classes: the grammar by default
    assert Predictor(adapter=run, constrained=False).constrained is False
    assert Predictor(adapter=run, tile_size=384).tile_size == 384
    # Whole frames, but the defect crop showed the large ones a 256 px window at a time (what
    # training records in crop.json): auto tiles every frame longer than that window, as the
    # run learnt them.
    (run / "data_summary.json").write_text('{"tile": null}')
    (run / "crop.json").write_text('{"window": 256}')
    cropped_run = Predictor(adapter=run)
    assert cropped_run.tile_size == 256 and cropped_run.model_inputs(2560, 1440) > 1
    assert cropped_run.model_inputs(512, 288) > 1 and cropped_run.model_inputs(256, 144) == 1
    with pytest.raises(FileNotFoundError):
        Predictor(adapter=tmp_path / "empty")


def test_od_looks_through_the_mirrors_the_run_learnt(tmp_path, image):
    from loomlens.model import load_model
    from loomlens.model.lora import LoraSettings, apply_lora

    run = tmp_path / "run"
    model, _ = load_model("tiny")
    apply_lora(model, LoraSettings(targets=["q_proj"], r=2)).save_pretrained(run / "checkpoints" / "best")
    augment = {"enabled": True, "hflip": 0.5, "vflip": 0.0}
    (run / "config.yaml").write_text(yaml.safe_dump({"model": "tiny", "tasks": ["od"], "augment": augment}))
    p = Predictor(adapter=run, max_boxes=2, text_tokens=8)
    assert p.info()["views"] == ["", "h"]  # auto: as is and mirrored left-right, as trained
    assert p.model_inputs(512, 288) == 2 and p.model_inputs(512, 288, task="phrase_grounding") == 1
    assert p.predict([image])[0].boxes == p.predict([image, image])[1].boxes
    assert Predictor(adapter=run, tta="off").views == ("",)
    assert Predictor(adapter=run, tta="on").views == ("", "h", "v", "hv")
    assert Predictor(model="tiny").views == ("",)  # a bare model learnt no mirrors
    with pytest.raises(ValueError, match="tta must be one of auto, on, off"):
        Predictor(adapter=run, tta="yes")


def test_precision_sets_the_weights_dtype(image):
    import numpy as np
    import torch

    with pytest.raises(ValueError, match="precision"):
        Predictor(precision="int4")
    scene = Image.fromarray((np.random.default_rng(0).random((180, 320, 3)) * 255).astype("uint8"))
    for precision, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        p = Predictor(precision=precision, max_boxes=2)
        assert {w.dtype for w in p.loaded.model.parameters()} == {dtype}
        assert p.info()["precision"] == precision
        (od,) = p.predict([scene], task="od")
        assert all(b.score is None or 0.0 <= b.score <= 1.0 for b in od.boxes)
    assert Predictor().precision in ("bf16", "fp32")  # auto: whichever this machine computes natively

def test_a_tiled_frame_takes_its_most_likely_pieces_answer_probability(predictor, monkeypatch):
    """The tile that holds the defect decides: a frame is as defective as its worst piece."""
    from loomlens.infer.detection import Detection
    from loomlens.infer.generation import Generation

    def found(spec, images, text, after_batch=None, reread_upto=None):
        return [Detection([], 0, Generation("", [], [], answer_probability=0.9 if im.getbbox() else 0.2))
                for im in images]

    monkeypatch.setattr(predictor, "_detect", found)
    frame = Image.new("RGB", (1024, 256))
    frame.paste((255, 255, 255), (900, 100, 910, 110))  # seen by one tile (and the whole frame)
    plain = Image.new("RGB", (1024, 256))
    tiled, untouched = predictor.predict([frame, plain], tile="on")
    assert tiled.tiled and (tiled.answer_probability, untouched.answer_probability) == (0.9, 0.2)


def test_a_tiled_frame_counts_the_malformed_parts_of_all_its_tiles(predictor, monkeypatch):
    from loomlens.infer.detection import Detection
    from loomlens.infer.generation import Generation

    monkeypatch.setattr(predictor, "_detect", lambda spec, images, text, after_batch=None, reread_upto=None: [
        Detection([], 1, Generation("", [], [])) for _ in images])  # each tile dropped one part
    (tiled,) = predictor.predict([Image.new("RGB", (1024, 256))], tile="on")
    assert tiled.tiled and tiled.dropped == predictor.model_inputs(1024, 256, tile="on") > 1


def test_a_tiled_frame_checks_its_deadline_and_runs_between_after_each_batch_of_looks(predictor, monkeypatch):
    """A server keeps its small requests and its deadlines while one large frame's crops run."""
    from types import SimpleNamespace

    from loomlens.infer import detection, tta
    from loomlens.predict import predictor as module

    frame = Image.new("RGB", (1024, 256), (120, 120, 120))
    assert predictor.model_inputs(1024, 256, tile="on") == 6 and predictor.batch_size == 4  # 5 tiles + the whole frame
    monkeypatch.setattr(predictor, "views", tta.ALL_VIEWS)
    monkeypatch.setattr(tta, "MIRROR_GATE", 0.0)  # every crop through all four views
    monkeypatch.setattr(detection, "stream_count", lambda model: 1)
    looks, calls, real = [], [], detection.generate
    monkeypatch.setattr(detection, "generate", lambda m, p, images, *a: looks.append(len(images)) or real(m, p, images, *a))
    predictor.predict([frame], tile="on", between=lambda: calls.append(sum(looks)))
    # Full batches across the frame's crops: 6 first looks (4 + 2), the 5 tiles' empty answers
    # read again (the gate at 0 puts them in doubt; not the whole frame, a coarser view), then
    # 18 mirrored looks.
    assert looks == [4, 2, 4, 1, 4, 4, 4, 4, 2] and calls == [4, 6, 10, 11, 15, 19, 23, 27, 29]
    clock = [0.0]
    monkeypatch.setattr(module, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    calls.clear()

    def late():  # the first batch of looks ran past the deadline
        calls.append(1)
        clock[0] = 2.0

    with pytest.raises(module.DeadlineExceeded):
        predictor.predict([frame], tile="on", deadline=1.0, between=late)
    assert calls == [1]
