"""Dataset + collate + batch plan: tokenised once, pixels processed once, padding-aware order."""

from dataclasses import replace

import torch

from loomlens.data.dataset import Collator, FlorenceDataset, plan_batches, read_jsonl


def test_items_match_the_processor_and_the_label_contract(small_data, small_model_dir):
    from PIL import Image

    from loomlens.model import load_model

    _, processor = load_model(str(small_model_dir))
    ds = FlorenceDataset(small_data / "train.jsonl", processor)
    row = read_jsonl(small_data / "train.jsonl")[0]
    with Image.open(small_data / row["image"]) as im:
        expected = processor(text=[row["prefix"]], images=[im.convert("RGB")], return_tensors="pt")
    item = ds[0]
    assert torch.equal(item["input_ids"], expected["input_ids"][0])
    assert torch.equal(item["pixel_values"], expected["pixel_values"][0])
    assert item["labels"].tolist() == processor.tokenizer(row["suffix"]).input_ids  # <s> suffix </s>


class Counting:
    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.inner(*args, **kwargs)


def test_each_image_goes_through_the_image_processor_once(small_data, small_model_dir):
    from types import SimpleNamespace

    from loomlens.model import load_model

    _, processor = load_model(str(small_model_dir))
    ds = FlorenceDataset(small_data / "train.jsonl", processor)
    counting = Counting(processor.image_processor)
    ds.processor = SimpleNamespace(image_processor=counting)
    for _ in range(3):  # three epochs
        for i in range(len(ds)):
            ds[i]
    assert counting.calls == len({ex.image for ex in ds.examples}) < len(ds)


def test_the_image_cache_stays_within_its_budget_and_items_stay_the_same(small_data, small_model_dir):
    from loomlens.data.augment import Augment
    from loomlens.model import load_model

    _, processor = load_model(str(small_model_dir))
    jsonl = small_data / "train.jsonl"
    for augment in (None, Augment()):  # processed pixels kept, or decoded pictures
        whole = FlorenceDataset(jsonl, processor, augment=augment, seed=1)
        expected = [whole[i]["pixel_values"] for i in range(len(whole))]
        assert not whole.cache_full and whole.cached_bytes > 0
        one_image = whole.cached_bytes // len(whole._pixels or whole._pictures)
        for budget in (0, one_image + one_image // 2):
            bounded = FlorenceDataset(jsonl, processor, augment=augment, seed=1, cache_bytes=budget)
            for _ in range(2):  # a second epoch's reads come from the cache or the file alike
                assert all(torch.equal(bounded[i]["pixel_values"], expected[i]) for i in range(len(bounded)))
                bounded.set_epoch(0)
            assert bounded.cached_bytes <= budget
            assert len(bounded._pixels) + len(bounded._pictures) == (0 if budget == 0 else 1)
            assert bounded.cache_full == (budget > 0)  # 0 is "keep nothing", not a cache that filled


def test_task_filter_and_collate_padding(small_data, small_model_dir):
    from loomlens.model import load_model

    _, processor = load_model(str(small_model_dir))
    ds = FlorenceDataset(small_data / "train.jsonl", processor, tasks=["phrase_grounding"])
    assert set(ds.tasks) == {"phrase_grounding"}
    items = [ds[i] for i in range(3)]
    batch = Collator(pad_token_id=processor.tokenizer.pad_token_id)(items)
    for i, item in enumerate(items):
        n, m = len(item["input_ids"]), len(item["labels"])
        assert batch["attention_mask"][i].sum() == n
        assert (batch["input_ids"][i, n:] == processor.tokenizer.pad_token_id).all()
        assert (batch["labels"][i, m:] == -100).all() and torch.equal(batch["labels"][i, :m], item["labels"])
    assert batch["pixel_values"].shape == (3, 3, 64, 64) and batch["pixel_values"].dtype == torch.float32


TASKS = ["phrase_grounding", "od", "od", "dense_region_caption", "od", "phrase_grounding"] * 20
LENGTHS = [(i * 37) % 50 + 5 for i in range(len(TASKS))]


def test_grouped_plan_follows_the_seed_order_and_covers_every_sample_once():
    batches = plan_batches(TASKS, LENGTHS, batch_size=4, order="grouped", seed=1, epoch=0)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(TASKS)))
    seen = [TASKS[b[0]] for b in batches]
    assert all(len({TASKS[i] for i in b}) == 1 for b in batches)
    assert seen == sorted(seen, key=["od", "dense_region_caption", "phrase_grounding"].index)


def test_plan_is_a_pure_function_of_seed_and_epoch():
    a = plan_batches(TASKS, LENGTHS, 4, "interleaved", seed=3, epoch=2)
    assert a == plan_batches(TASKS, LENGTHS, 4, "interleaved", seed=3, epoch=2)
    assert a != plan_batches(TASKS, LENGTHS, 4, "interleaved", seed=3, epoch=3)
    assert any(len({TASKS[i] for i in b}) > 1 for b in a)  # interleaved: tasks share batches


def test_plan_is_padding_aware():
    batches = plan_batches(TASKS, LENGTHS, 4, "interleaved", seed=0)
    padded = sum(max(LENGTHS[i] for i in b) * len(b) for b in batches)
    naive = [list(range(len(TASKS)))[i : i + 4] for i in range(0, len(TASKS), 4)]
    padded_naive = sum(max(LENGTHS[i] for i in b) * len(b) for b in naive)
    assert padded < 0.8 * padded_naive


def test_plan_without_length_grouping_keeps_batches_mixed():
    short = [2 if i % 3 == 0 else 30 for i in range(96)]  # a third are empty answers
    grouped = plan_batches(["od"] * 96, short, 8, seed=0)
    mixed = plan_batches(["od"] * 96, short, 8, seed=0, by_length=False)
    assert sorted(i for b in mixed for i in b) == list(range(96))
    assert any(all(short[i] == 2 for i in b) for b in grouped)
    assert not any(all(short[i] == 2 for i in b) for b in mixed)


def test_augmented_items_move_their_boxes_with_the_picture(small_data, small_model_dir):
    from PIL import ImageOps

    from loomlens.data.augment import NONE, Augment
    from loomlens.data.florence_text import parse_text
    from loomlens.model import load_model

    _, processor = load_model(str(small_model_dir))
    mirror = Augment(**{**NONE.__dict__, "hflip": 1.0})
    plain = FlorenceDataset(small_data / "train.jsonl", processor)
    flipped = FlorenceDataset(small_data / "train.jsonl", processor, augment=mirror)
    index = next(i for i, ex in enumerate(plain.examples) if ex.task == "od" and ex.boxes)
    ex = plain.examples[index]
    item = flipped[index]
    text = processor.tokenizer.decode(item["labels"], skip_special_tokens=False)
    picture, _, _ = plain.picture(ex.image)
    width = picture.width
    boxes, _ = parse_text(text, width, picture.height)
    expected = sorted((b.hflip(width) for b in ex.boxes), key=lambda b: (b.y1, b.x1))
    assert [(b.label, round(b.x1), round(b.x2)) for b in sorted(boxes, key=lambda b: (b.y1, b.x1))] == \
        [(b.label, round(b.x1), round(b.x2)) for b in expected]
    mirrored = processor.image_processor(images=[ImageOps.mirror(picture)],
                                         return_tensors="pt").pixel_values[0]
    assert torch.equal(item["pixel_values"], mirrored)


def test_augmentation_draws_per_epoch_and_repeats_within_one(small_data, small_model_dir):
    from loomlens.data.augment import Augment
    from loomlens.model import load_model

    _, processor = load_model(str(small_model_dir))
    ds = FlorenceDataset(small_data / "train.jsonl", processor, augment=Augment(), seed=3)
    first = ds[0]["pixel_values"]
    assert torch.equal(first, ds[0]["pixel_values"])
    ds.set_epoch(1)
    assert not torch.equal(first, ds[0]["pixel_values"])


def test_balanced_plan_holds_negatives_to_their_share(small_data, small_model_dir):
    from loomlens.data.sampling import Balance
    from loomlens.model import load_model

    _, processor = load_model(str(small_model_dir))
    ds = FlorenceDataset(small_data / "train.jsonl", processor, tasks=["od"])
    negatives = {i for i, c in enumerate(ds.classes) if c == frozenset()}
    assert negatives and len(negatives) < len(ds)
    plan = plan_batches(ds.tasks, ds.lengths, 4, labels=ds.classes, balance=Balance(0.25, 0.0))
    assert all(sum(i in negatives for i in b) <= 1 for b in plan)
    assert plan == plan_batches(ds.tasks, ds.lengths, 4, labels=ds.classes, balance=Balance(0.25, 0.0))


def test_the_defect_crop_feeds_a_window_and_its_boxes_and_only_on_large_frames(strip_data, input_size_data,
                                                                                small_model_dir):
    from loomlens.data.augment import NONE, augment, sample_rng
    from loomlens.data.florence_text import boxes_to_text
    from loomlens.model import load_model

    _, processor = load_model(str(small_model_dir))
    crop = replace(NONE, crop=1.0)
    ds = FlorenceDataset(strip_data / "train.jsonl", processor, tasks=["od"], augment=crop, seed=5)
    assert ds.edge == 64 and ds.crop_window == 64  # 192 px > 64: windows of the input's size
    index = next(i for i, ex in enumerate(ds.examples) if ex.boxes)
    ds.set_epoch(2)
    item = ds[index]
    ex = ds.examples[index]
    window, boxes = augment(ds.picture(ex.image)[0], list(ex.boxes), aug=crop, rng=sample_rng(5, 2, index), edge=64)
    assert window.size == (64, 64) and boxes  # the window holds a defect
    assert item["labels"].tolist() == processor.tokenizer(boxes_to_text(boxes, 64, 64)).input_ids
    assert torch.equal(item["pixel_values"], processor.image_processor(images=[window], return_tensors="pt")
                       .pixel_values[0])
    # Frames no longer than the input, or no crop: nothing to crop, nothing for a run to record.
    assert FlorenceDataset(input_size_data / "train.jsonl", processor, augment=crop).crop_window is None
    assert FlorenceDataset(strip_data / "train.jsonl", processor, augment=replace(crop, crop=0.0, hflip=1.0)) \
        .crop_window is None
    assert FlorenceDataset(strip_data / "train.jsonl", processor).crop_window is None  # validation: never


def test_a_run_that_never_crops_augments_a_large_frame_reduced_with_the_same_locations(strip_data,
                                                                                      small_model_dir):
    from PIL import Image, ImageOps

    from loomlens.data.augment import NONE
    from loomlens.data.florence_text import boxes_to_text
    from loomlens.data.sanitize import to_rgb
    from loomlens.model import load_model

    _, processor = load_model(str(small_model_dir))
    ds = FlorenceDataset(strip_data / "train.jsonl", processor, tasks=["od"], augment=replace(NONE, hflip=1.0))
    index = next(i for i, ex in enumerate(ds.examples) if ex.boxes)
    ex = ds.examples[index]
    with Image.open(ex.image) as im:
        full = to_rgb(im)
    picture, sx, sy = ds.picture(ex.image)
    assert max(picture.size) == 2 * ds.edge < max(full.size)  # 192 px wide: worked on at 128
    assert (sx, sy) == (picture.width / full.width, picture.height / full.height)
    item = ds[index]
    mirrored = [b.hflip(full.width) for b in ex.boxes]
    assert item["labels"].tolist() == processor.tokenizer(boxes_to_text(mirrored, *full.size)).input_ids
    at_input = processor.image_processor(images=[ImageOps.mirror(full)], return_tensors="pt").pixel_values[0]
    assert (item["pixel_values"] - at_input).abs().mean() < 0.05  # the same picture, but for resampling


def _frames(root, frames):
    """A split of `(width, height, boxes)` frames (grey PNGs) with its summary: the data folder."""
    import json

    from PIL import Image

    from loomlens.data.florence_text import boxes_to_text

    lines = []
    for i, (width, height, boxes) in enumerate(frames):
        name = f"images/{i}.png"
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (width, height), (90, 90, 90)).save(root / name)
        lines.append({"image": name, "width": width, "height": height, "prefix": "<OD>", "task": "od",
                      "suffix": boxes_to_text(boxes, width, height)})
    (root / "train.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    (root / "val.jsonl").write_text(json.dumps(lines[0]) + "\n")
    (root / "classes.txt").write_text("drop\n")
    (root / "summary.json").write_text(json.dumps({"tile": None}))
    return root


def test_vanishing_counts_the_boxes_only_the_squeeze_hides(small_model_dir, tmp_path):
    from loomlens.data.records import Box
    from loomlens.model import load_model

    _, processor = load_model(str(small_model_dir))  # a 64 px input
    data = _frames(tmp_path, [
        (1024, 64, [Box("drop", 100, 10, 140, 30),    # 40 px wide: 2.5 px at the input, hidden
                    Box("drop", 300, 10, 302, 40),    # 2 px wide even at full size: tiles would not help
                    Box("drop", 500, 0, 700, 60)]),   # 200 px wide: 12.5 px at the input
        (96, 64, [Box("drop", 10, 10, 13, 40)]),      # not a large frame: never squeezed far
    ])
    ds = FlorenceDataset(data / "train.jsonl", processor)
    assert (ds.boxes, ds.vanishing) == (4, 1)


def test_train_says_when_the_squeeze_hides_the_defects_and_not_on_tiles(make_config, tmp_path):
    from loomlens.data.records import Box
    from loomlens.train.recipe import train

    data = _frames(tmp_path / "data", [(1024, 64, [Box("drop", 100 * i, 10, 100 * i + 40, 30)]) for i in range(1, 5)])
    said = []
    train(make_config(data=str(data), max_steps=1, eval_every=0), log=said.append)
    assert any("4 of 4 training boxes are under 4 px" in line and "--tile 64" in line for line in said), said
    (data / "summary.json").write_text('{"tile": 64}')  # the same frames, as if cut into tiles beside them
    said.clear()
    train(make_config(data=str(data), max_steps=1, eval_every=0, out=str(tmp_path / "run2")), log=said.append)
    assert not any("training boxes are under" in line for line in said), said


def test_train_says_once_when_the_image_cache_is_full(make_config, monkeypatch, tmp_path):
    import csv

    from loomlens.train import recipe
    from loomlens.train.recipe import train

    monkeypatch.setattr(recipe, "default_cache_bytes", lambda: 1)  # no image fits
    said = []
    result = train(make_config(max_steps=3, eval_every=0), log=said.append)
    full = [line for line in said if "image cache full" in line]
    assert len(full) == 1 and "decoded each time" in full[0], said
    with open(result.run_dir / "metrics.csv") as f:
        assert sum("image cache full" in (row.get("event") or "") for row in csv.DictReader(f)) == 1


def test_a_pasted_defect_joins_the_answer_of_frames_with_defects_only(small_data, small_model_dir):
    from loomlens.data.augment import NONE
    from loomlens.data.florence_text import parse_text
    from loomlens.model import load_model

    _, processor = load_model(str(small_model_dir))
    jitter = replace(NONE, hflip=0.5, brightness=0.2)
    plain = FlorenceDataset(small_data / "train.jsonl", processor, augment=jitter, seed=3)
    pasting = FlorenceDataset(small_data / "train.jsonl", processor, augment=replace(jitter, paste=1.0), seed=3)
    grown = 0
    for index, ex in enumerate(pasting.examples):
        before, after = plain[index], pasting[index]
        if ex.task != "od" or not ex.boxes:
            # defect-free frames and one-class grounding answers are never pasted onto, and the
            # paste's own draws leave the other transforms' as they were
            assert torch.equal(before["labels"], after["labels"])
            assert torch.equal(before["pixel_values"], after["pixel_values"])
            continue
        text = processor.tokenizer.decode(after["labels"], skip_special_tokens=True)
        boxes, _ = parse_text(text, 96, 64)
        grown += len(boxes) == len(ex.boxes) + 1
        assert len(boxes) in (len(ex.boxes), len(ex.boxes) + 1)  # + 1 unless no place was free
    assert grown >= 3


def test_a_picture_squeezed_to_the_input_keeps_the_bins_of_its_answer(small_data, small_model_dir):
    # Augmentation hands the processor the picture at the model's input (96x64 frames at 64 px):
    # with no geometric change the answer must be the converted one, bin for bin.
    from loomlens.data.augment import NONE
    from loomlens.model import load_model

    _, processor = load_model(str(small_model_dir))
    ds = FlorenceDataset(small_data / "train.jsonl", processor, augment=replace(NONE, brightness=0.2), seed=2)
    assert ds.input_size == (64, 64)
    checked = 0
    for index, ex in enumerate(ds.examples):
        if ex.boxes:
            assert ds[index]["labels"].tolist() == list(ex.labels)
            checked += 1
    assert checked >= 5


def test_augmentation_hands_the_processor_the_picture_at_the_input(small_data, small_model_dir):
    # One resampling to the input, then the photometry on the input's pixels: the item is the
    # processor's reading of augment(..., size=input), not of the picture recoloured at full size.
    from loomlens.data.augment import NONE, augment, sample_rng
    from loomlens.model import load_model

    _, processor = load_model(str(small_model_dir))
    look = replace(NONE, gamma=0.5, scale=0.1)
    ds = FlorenceDataset(small_data / "train.jsonl", processor, augment=look, seed=4)
    index = next(i for i, ex in enumerate(ds.examples) if ex.boxes)
    picture = ds.picture(ds.examples[index].image)[0]
    assert picture.size != ds.input_size  # 96x64 frames, a 64 px input

    def read(size):
        varied, _ = augment(picture, list(ds.examples[index].boxes), aug=look, rng=sample_rng(4, 0, index),
                            edge=ds.edge, size=size, resample=ds._resample)
        return processor.image_processor(images=[varied], return_tensors="pt").pixel_values[0]

    item = ds[index]["pixel_values"]
    assert torch.equal(item, read(ds.input_size))
    assert not torch.equal(item, read(None))
