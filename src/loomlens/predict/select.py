"""Which frames to label next (`loomlens select`): unlabelled frames ranked by what labelling
them would teach a run, the top N picked with diversity and written with pre-annotations for
LabelImg.

A frame is worth a person's time where the run is unsure of it. Three signals say so, each
from one prediction of the frame (every box, whatever its score, region rules kept) and one of
its horizontal mirror:

- `uncertainty`: how close its most doubtful box sits to the score threshold, in odds:
  `min(odds(s) / odds(t), odds(t) / odds(s))`, 1 for a box right at the threshold `t` and
  towards 0 for one far above or below it (`threshold_uncertainty`). A frame with no box
  scores 0 here.
- `entropy`: the mean entropy (nats) of the model's next-token distribution over its answer
  (`Prediction.entropy`): unsure about whether there is another defect, which class, or where.
  Not measured on a tiled frame (the component is then 0 for it).
- `disagreement`: the boxes at or above the threshold on the frame against those on its
  mirror, mirrored back and matched by label and IoU >= 0.5: `1 - F1` of that match
  (`flip_disagreement`). A model that means what it says finds the same defects either way.

Each component is turned into its rank among the frames over their count (1 for the highest,
1/n for the lowest, ties shared), so no component's scale outweighs another's, and the frame's
`score` is their weighted mean (`combine`). The top N are then picked greedily with diversity (`pick`): a
frame's score is scaled down by how close it lies to an already picked frame, in a cheap
image embedding (a 24 x 24 grey thumbnail, normalised for brightness and contrast,
`thumbnail`), until it is `diversity` times the pool's median distance away; so fifty
near-identical frames of one stopped loom yield one pick, not fifty.

`select_frames` writes into the output folder:
- `ranking.csv`: every frame, chosen ones first in the order picked, then the rest by score:
  rank, frame path, video frame index, score, each component, boxes at or above the threshold,
  chosen (yes/no), and a reason a person can read;
- `images/` and `annotations/`: the chosen frames (copies by default, hard links on request)
  with their pre-annotations as LabelImg's Pascal VOC (`loomlens.predict.labels`): only the
  boxes at or above the threshold, the ones a person would otherwise draw. Open Dir `images/`,
  Change Save Dir `annotations/`; an annotation file already there is kept, never overwritten;
- `problems.json`: frames that could not be read, skipped.
"""

from __future__ import annotations

import csv
import json
import math
import random
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from loomlens.data.atomic import atomic_open, atomic_write, output_folder
from loomlens.data.records import Box, iou
from loomlens.infer.detection import batched
from loomlens.predict.files import predict_chunk, unique_stem
from loomlens.predict.labels import LabelsOut
from loomlens.predict.predictor import Prediction, Predictor
from loomlens.predict.regions import RegionRules
from loomlens.predict.sources import (
    Item,
    Problem,
    expand_inputs,
    iter_items,
    read_image,
)
from loomlens.predict.video import read_frames

#: The score threshold when neither `threshold` nor the run's region rules give one.
DEFAULT_THRESHOLD = 0.2
#: The components of a frame's score, in the order `ranking.csv` lists them.
COMPONENTS = ("uncertainty", "entropy", "disagreement")
DEFAULT_WEIGHTS: dict[str, float] = {"uncertainty": 1.0, "entropy": 1.0, "disagreement": 1.0}
#: IoU at which a box on the mirrored frame matches one on the frame.
FLIP_IOU = 0.5
#: Side of the grey thumbnail the diversity embedding is made of.
THUMBNAIL = 24
#: Frames sampled to estimate the pool's median distance (all pairs among them).
DISTANCE_SAMPLE = 400
CSV_COLUMNS = ("rank", "frame", "video_frame", "score", *COMPONENTS, "boxes", "chosen", "reason")


@dataclass
class FrameSignals:
    """What the run said about one frame: where it came from (`source`, and `frame` for a
    video frame), its size, every box it found where the region rules allow it (`boxes`,
    scored), the ones at or above their threshold (`shown`, the pre-annotation), the three
    components (`entropy` and `disagreement` None where not measured), the box nearest its
    threshold and that threshold, the boxes the mirrored frame found at or above it
    (`flip_boxes`, None without the flip) and how many matched, and the diversity
    `embedding`."""

    source: Path
    frame: int | None
    width: int
    height: int
    boxes: list[Box]
    shown: list[Box]
    uncertainty: float
    entropy: float | None
    disagreement: float | None
    nearest: Box | None = None
    nearest_threshold: float | None = None
    flip_boxes: int | None = None
    matched: int = 0
    embedding: np.ndarray = field(default_factory=lambda: np.zeros(THUMBNAIL * THUMBNAIL, np.float32))

    @property
    def name(self) -> str:
        """The frame as `ranking.csv` and a reason name it: its path (`#index` for a video frame)."""
        return str(self.source) if self.frame is None else f"{self.source}#{self.frame}"


@dataclass
class Ranked:
    """One frame's place in the ranking: its `signals`, the components as ranks in 0..1
    (`normalised`), the combined `score`, its 1-based `rank` in `ranking.csv`, whether it was
    `chosen` (and as which pick), the chosen frame nearest to it in the embedding with the
    factor that closeness scaled its score by (`crowded_by`, `spread`: 1 = no penalty), and a
    `reason` a person can read."""

    signals: FrameSignals
    normalised: dict[str, float]
    score: float
    rank: int = 0
    chosen: bool = False
    pick: int | None = None
    crowded_by: str | None = None
    spread: float = 1.0
    reason: str = ""


# --- the components ------------------------------------------------------------------------

def threshold_uncertainty(*, score: float, threshold: float) -> float:
    """How close a box's score lies to the threshold, as the smaller odds ratio.

    Args:
        score: the box's score in [0, 1].
        threshold: the score threshold in (0, 1).

    Returns:
        `min(odds(score) / odds(threshold), odds(threshold) / odds(score))` in [0, 1]: 1 at
        the threshold, 0.5 where the odds are off by a factor of two either way, 0 at a score
        of 0 or 1.
    """
    eps = 1e-6
    s = min(max(score, eps), 1 - eps)
    t = min(max(threshold, eps), 1 - eps)
    distance = abs(math.log(s / (1 - s)) - math.log(t / (1 - t)))
    return math.exp(-distance)


def box_threshold(box: Box, *, threshold: float | None = None, rules: RegionRules | None = None) -> float:
    """The score threshold `box` is held to.

    Args:
        box: a predicted box (its label picks a class rule).
        threshold: one threshold for every box; None takes the rules'.
        rules: the run's region rules; their class threshold, else their default, where it is
            above 0.

    Returns:
        `threshold`, else the rules' threshold for the box's class, else `DEFAULT_THRESHOLD`.
    """
    if threshold is not None:
        return threshold
    value = rules.threshold(box.label) if rules is not None else 0.0
    return value if value > 0 else DEFAULT_THRESHOLD


def match_count(a: Sequence[Box], b: Sequence[Box], *, min_iou: float = FLIP_IOU) -> int:
    """How many boxes of `a` and `b` pair up: greedily by descending IoU, same label, IoU at
    least `min_iou`, each box in one pair at most.

    Args:
        a: boxes in one frame's pixels.
        b: boxes in the same pixels (a mirrored frame's, mirrored back).
        min_iou: the least IoU of a pair.

    Returns:
        The number of pairs.
    """
    pairs = sorted(((iou(x, y), i, j) for i, x in enumerate(a) for j, y in enumerate(b) if x.label == y.label),
                   reverse=True)
    used_a: set[int] = set()
    used_b: set[int] = set()
    for overlap, i, j in pairs:
        if overlap < min_iou:
            break
        if i not in used_a and j not in used_b:
            used_a.add(i)
            used_b.add(j)
    return len(used_a)


def flip_disagreement(*, boxes: Sequence[Box], flipped: Sequence[Box], min_iou: float = FLIP_IOU) -> float:
    """How much a frame's boxes and its mirror's disagree: `1 - F1` of their match.

    Args:
        boxes: the frame's boxes (at or above their thresholds).
        flipped: the mirrored frame's boxes, already mirrored back into the frame's pixels.
        min_iou: the least IoU of a matching pair (same label too).

    Returns:
        `1 - 2 * matched / (len(boxes) + len(flipped))` in [0, 1]: 0 when both find the same
        boxes (or both find none), 1 when no box of one is found by the other.
    """
    total = len(boxes) + len(flipped)
    if total == 0:
        return 0.0
    return 1.0 - 2.0 * match_count(boxes, flipped, min_iou=min_iou) / total


def thumbnail(image: Image.Image, *, side: int = THUMBNAIL) -> np.ndarray:
    """The diversity embedding of a picture: a `side` x `side` grey thumbnail, zero mean and
    unit variance (a brighter or dimmer copy of a frame embeds where the frame does).

    Args:
        image: the picture.
        side: the thumbnail's side in pixels.

    Returns:
        A float32 vector of `side * side` values.
    """
    grey = np.asarray(ImageOps.grayscale(image).resize((side, side), Image.Resampling.BOX), np.float32).ravel()
    return (grey - grey.mean()) / (grey.std() + 1e-6)


def frame_signals(
    *,
    item: Item,
    prediction: Prediction,
    flipped: Prediction | None,
    threshold: float | None = None,
    rules: RegionRules | None = None,
) -> FrameSignals:
    """The components of one frame from its predictions (every box, whatever its score).

    Args:
        item: the frame (source, video index, picture for the embedding).
        prediction: the prediction of the frame, no score threshold nor rules applied.
        flipped: the prediction of its horizontal mirror, in the mirror's pixels, no threshold
            nor rules applied; None: no flip disagreement.
        threshold: one threshold for every box; None: the rules', else `DEFAULT_THRESHOLD`.
        rules: the run's region rules: their regions drop boxes (the mirror's once mirrored
            back, where the regions mean what they say), their thresholds see `box_threshold`.

    Returns:
        The frame's `FrameSignals`.
    """
    w, h = prediction.width, prediction.height
    regions = open_rules(rules)

    def at(box: Box) -> float:
        return box_threshold(box, threshold=threshold, rules=rules)

    def allowed(boxes: Iterable[Box]) -> list[Box]:
        return regions.apply(list(boxes), w, h) if regions is not None else list(boxes)

    def shown_of(boxes: Iterable[Box]) -> list[Box]:
        return [b for b in boxes if b.score is None or b.score >= at(b)]

    boxes = allowed(prediction.boxes)
    scored = [(threshold_uncertainty(score=b.score, threshold=at(b)), b) for b in boxes if b.score is not None]
    uncertainty, nearest = max(scored, key=lambda pair: pair[0], default=(0.0, None))
    shown = shown_of(boxes)
    disagreement, flip_boxes, matched = None, None, 0
    if flipped is not None:
        back = shown_of(allowed(b.hflip(w) for b in flipped.boxes))
        disagreement = flip_disagreement(boxes=shown, flipped=back)
        flip_boxes, matched = len(back), match_count(shown, back)
    return FrameSignals(
        source=item.source, frame=item.frame, width=w, height=h,
        boxes=boxes, shown=shown, uncertainty=uncertainty, entropy=prediction.entropy,
        disagreement=disagreement, nearest=nearest, nearest_threshold=None if nearest is None else at(nearest),
        flip_boxes=flip_boxes, matched=matched, embedding=thumbnail(item.image),
    )


# --- the model's side ----------------------------------------------------------------------

def open_rules(rules: RegionRules | None) -> RegionRules | None:
    """`rules` with every threshold lifted (regions kept): selection needs the boxes below the
    threshold too, the doubtful ones above all."""
    if rules is None:
        return None
    classes = {name: rule.model_copy(update={"min_score": None}) for name, rule in rules.classes.items()}
    return rules.model_copy(update={"min_score": 0.0, "classes": classes})


@contextmanager
def _without_rules(predictor: Predictor) -> Iterator[RegionRules | None]:
    """The predictor without its region rules for the block (a mirrored frame's boxes meet the
    regions only once mirrored back: `frame_signals`); yields its own rules."""
    rules = predictor.rules
    predictor.rules = None
    try:
        yield rules
    finally:
        predictor.rules = rules


def _mirrored(item: Item) -> Item:
    return replace(item, image=ImageOps.mirror(item.image))


def score_frames(
    predictor: Predictor,
    items: Iterable[Item],
    *,
    threshold: float | None = None,
    flip: bool = True,
    tile: str = "auto",
    problems: list[Problem] | None = None,
    on_item: Callable[[], None] | None = None,
) -> list[FrameSignals]:
    """Predict on every frame (and its mirror) and measure its components.

    Args:
        predictor: the loaded run; its region rules apply (in `frame_signals`), their
            thresholds lifted.
        items: the frames (`loomlens.predict.sources.iter_items`).
        threshold: one score threshold for every box; None: the run's rules, else
            `DEFAULT_THRESHOLD`.
        flip: also predict on each frame's horizontal mirror (the disagreement component;
            twice the model's work).
        tile: `auto`, `on` or `off`, as `Predictor.predict` takes it.
        problems: where a frame the predictor refuses is listed (skipped); None: it raises.
        on_item: called after each frame (progress).

    Returns:
        One `FrameSignals` per frame predicted, in order.
    """
    found: list[FrameSignals] = []
    refused: list[Problem] = [] if problems is None else problems
    with _without_rules(predictor) as rules:
        for chunk in batched(items, max(1, predictor.batch_size // (2 if flip else 1))):
            mirrors = {id(i): _mirrored(i) for i in chunk} if flip else {}
            before = len(refused)
            done = {id(i): p for i, p in predict_chunk(predictor, [*chunk, *mirrors.values()], refused,
                                                       tile=tile, score_threshold=0.0)}
            if problems is None and len(refused) > before:
                raise ValueError(refused[before].error)
            for item in chunk:
                mirror = mirrors.get(id(item))
                if id(item) in done and (mirror is None or id(mirror) in done):
                    found.append(frame_signals(item=item, prediction=done[id(item)],
                                               flipped=done[id(mirror)] if mirror is not None else None,
                                               threshold=threshold, rules=rules))
                if on_item:
                    on_item()
    return found


# --- ranking -------------------------------------------------------------------------------

def normalised_ranks(values: Sequence[float | None]) -> list[float]:
    """Each value's rank among `values` over their count: 1/n for the lowest, 1 for the
    highest, ties sharing their mean rank; None ranks lowest, 0 where every value is None.
    The lowest frame keeps a score above 0, so diversity can still prefer it to a duplicate.

    Args:
        values: one component over the frames.

    Returns:
        The ranks in (0, 1], in the order given.
    """
    if not values or all(v is None for v in values):
        return [0.0] * len(values)
    keyed = [-math.inf if v is None else v for v in values]
    order = sorted(range(len(keyed)), key=lambda i: keyed[i])
    ranks = [0.0] * len(keyed)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and keyed[order[end + 1]] == keyed[order[start]]:
            end += 1
        for k in range(start, end + 1):
            ranks[order[k]] = (start + end) / 2
        start = end + 1
    return [(r + 1) / len(values) for r in ranks]


def check_weights(weights: Mapping[str, float] | None) -> dict[str, float]:
    """`weights` over `COMPONENTS`, a component not named keeping its `DEFAULT_WEIGHTS` value
    (`entropy=0.5` halves one, `entropy=0` drops it; None: the defaults). Raises ValueError
    for an unknown component, a negative weight, or none above 0."""
    if weights is None:
        return dict(DEFAULT_WEIGHTS)
    unknown = set(weights) - set(COMPONENTS)
    if unknown:
        raise ValueError(f"unknown component(s) {', '.join(sorted(unknown))} in the weights; "
                         f"use {', '.join(COMPONENTS)}")
    out = {c: float(weights.get(c, DEFAULT_WEIGHTS[c])) for c in COMPONENTS}
    if any(v < 0 or not math.isfinite(v) for v in out.values()) or not any(v > 0 for v in out.values()):
        raise ValueError(f"weights must be finite, at least 0, and one above 0; got {dict(weights)}")
    return out


def combine(signals: Sequence[FrameSignals], *, weights: Mapping[str, float] | None = None) -> list[Ranked]:
    """Each frame's components as ranks among the frames, and their weighted mean.

    Args:
        signals: the frames.
        weights: component -> weight (`check_weights`); a component measured on no frame is
            left out of the mean.

    Returns:
        One `Ranked` per frame, in the order given (not yet picked or ranked).
    """
    weights = check_weights(weights)
    columns = {c: [getattr(s, c) for s in signals] for c in COMPONENTS}
    measured = {c: w for c, w in weights.items() if w > 0 and any(v is not None for v in columns[c])}
    ranks = {c: normalised_ranks(columns[c]) for c in COMPONENTS}
    total = sum(measured.values())
    out = []
    for i, s in enumerate(signals):
        normalised = {c: ranks[c][i] for c in COMPONENTS}
        score = sum(w * normalised[c] for c, w in measured.items()) / total if total else 0.0
        out.append(Ranked(signals=s, normalised=normalised, score=score))
    return out


def _distances(embeddings: np.ndarray, index: int) -> np.ndarray:
    """RMS difference of every embedding to the one at `index` (0 for the same picture)."""
    return np.sqrt(((embeddings - embeddings[index]) ** 2).mean(axis=1))


def typical_distance(embeddings: np.ndarray, *, seed: int = 0) -> float:
    """The median distance between two frames of the pool (all pairs among at most
    `DISTANCE_SAMPLE` frames drawn with `seed`); 0 for fewer than two frames."""
    n = len(embeddings)
    if n < 2:
        return 0.0
    rows = sorted(random.Random(seed).sample(range(n), min(n, DISTANCE_SAMPLE)))
    sample = embeddings[rows]
    found = [_distances(sample, i)[i + 1:] for i in range(len(rows) - 1)]
    return float(np.median(np.concatenate(found)))


def pick(ranked: Sequence[Ranked], *, n: int, diversity: float = 0.5) -> list[Ranked]:
    """Pick `n` frames greedily: each time the frame whose score, scaled by its spread, is
    highest; a frame's spread is its distance to the nearest frame picked so far over
    `diversity` times the pool's typical distance (`typical_distance`), capped at 1.

    Args:
        ranked: the frames (`combine`); their `chosen`, `pick`, `crowded_by`, `spread` are set.
        n: how many to pick (all of them when there are fewer).
        diversity: 0 picks by score alone; 0.5 lets no frame closer than half the typical
            distance to a picked one go at its full score.

    Returns:
        The picked frames in the order picked.
    """
    if n < 0 or diversity < 0:
        raise ValueError(f"n and diversity must be at least 0, got n={n}, diversity={diversity}")
    if not ranked:
        return []
    embeddings = np.stack([r.signals.embedding for r in ranked]).astype(np.float32)
    radius = diversity * typical_distance(embeddings)
    nearest = np.full(len(ranked), np.inf)
    nearest_of = np.full(len(ranked), -1)
    scores = np.array([r.score for r in ranked])
    free = np.ones(len(ranked), bool)
    chosen: list[Ranked] = []
    for k in range(min(n, len(ranked))):
        spread = np.minimum(1.0, nearest / radius) if radius > 0 else np.ones(len(ranked))
        scaled = scores * spread
        # Highest scaled score; ties go to the higher plain score, then the earlier frame.
        best = int(max(np.flatnonzero(free), key=lambda i: (scaled[i], scores[i], -i)))
        free[best] = False
        r = ranked[best]
        r.chosen, r.pick, r.spread = True, k + 1, float(spread[best])
        if nearest_of[best] >= 0:
            r.crowded_by = ranked[int(nearest_of[best])].signals.name
        chosen.append(r)
        d = _distances(embeddings, best)
        closer = d < nearest
        nearest[closer], nearest_of[closer] = d[closer], best
    for i, r in enumerate(ranked):
        if not r.chosen:
            r.spread = float(min(1.0, nearest[i] / radius)) if radius > 0 and nearest_of[i] >= 0 else 1.0
            r.crowded_by = ranked[int(nearest_of[i])].signals.name if nearest_of[i] >= 0 else None
    return chosen


def describe(r: Ranked, *, n: int, total: int) -> str:
    """A reason a person can read: why the frame was chosen or not (`n` were picked), then what
    the model said, the component that ranks it highest among the `total` frames first."""
    s = r.signals
    if r.chosen:
        status = f"pick {r.pick} of {n}"
        if r.spread < 1:
            status += f" (close to the earlier pick {r.crowded_by}, score scaled by {r.spread:.2f})"
    elif r.crowded_by is not None and r.spread < 0.5:
        status = f"not chosen: a near-duplicate of the chosen {r.crowded_by}"
    else:
        status = f"not chosen: ranked below the {n} picked"
    facts = {}
    if s.nearest is not None:
        side = "above" if s.nearest.score >= s.nearest_threshold else "below"
        facts["uncertainty"] = (f"its most doubtful box ({s.nearest.label}) scores {s.nearest.score:.2f}, "
                                f"{side} the threshold {s.nearest_threshold:.2f}")
    else:
        facts["uncertainty"] = "no box found"
    if s.entropy is not None:
        place = round(total + 1 - r.normalised["entropy"] * total)  # 1 for the highest (ties: their middle)
        facts["entropy"] = f"token entropy {s.entropy:.2f} nats (#{place} of {total})"
    if s.disagreement is not None:
        if s.disagreement == 0:
            facts["disagreement"] = ("the mirrored frame finds the same boxes" if s.shown
                                     else "the mirrored frame finds no box either")
        else:
            facts["disagreement"] = (f"the mirrored frame finds {s.flip_boxes} box(es) where the frame finds "
                                     f"{len(s.shown)}, {s.matched} matching")
    ordered = sorted(facts, key=lambda c: -r.normalised[c])
    return "; ".join([status, *(facts[c] for c in ordered)])


def rank_frames(
    signals: Sequence[FrameSignals],
    *,
    n: int,
    weights: Mapping[str, float] | None = None,
    diversity: float = 0.5,
) -> list[Ranked]:
    """The ranking `ranking.csv` holds: scores (`combine`), `n` picks with diversity (`pick`),
    then every frame ranked (picks first, in the order picked, then the rest by score) with its
    reason.

    Args:
        signals: the frames (`score_frames`).
        n: how many frames to choose.
        weights: component -> weight (default: all 1).
        diversity: see `pick`; 0 ranks by score alone.

    Returns:
        Every frame as `Ranked`, in rank order, `rank` 1-based.
    """
    ranked = combine(signals, weights=weights)
    chosen = pick(ranked, n=n, diversity=diversity)
    rest = sorted((r for r in ranked if not r.chosen), key=lambda r: -r.score)
    ordered = [*chosen, *rest]
    for i, r in enumerate(ordered, start=1):
        r.rank = i
        r.reason = describe(r, n=len(chosen), total=len(ordered))
    return ordered


# --- files out -----------------------------------------------------------------------------

def _cell(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def write_ranking(ranked: Sequence[Ranked], path: str | Path) -> Path:
    """Write `ranking.csv` (`CSV_COLUMNS`) atomically; an unmeasured component is left empty.

    Args:
        ranked: the frames in rank order (`rank_frames`).
        path: the CSV file.

    Returns:
        `path`.
    """
    path = Path(path)
    with atomic_open(path, "w") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        for r in ranked:
            s = r.signals
            writer.writerow([r.rank, str(s.source), "" if s.frame is None else s.frame, _cell(r.score),
                             *(_cell(getattr(s, c)) for c in COMPONENTS), len(s.shown),
                             "yes" if r.chosen else "no", r.reason])
    return path


def _pictures(chosen: Sequence[FrameSignals], every: int) -> Iterator[tuple[FrameSignals, Image.Image]]:
    """The chosen frames' pictures, read again (a still from its file, a video frame by its
    index), so the pool was never held in memory."""
    for s in chosen:
        if s.frame is None:
            yield s, read_image(s.source)
    videos: dict[Path, dict[int, FrameSignals]] = {}
    for s in chosen:
        if s.frame is not None:
            videos.setdefault(s.source, {})[s.frame] = s
    for source, wanted in videos.items():
        for frame in read_frames(source, every):
            if frame.index in wanted:
                yield wanted[frame.index], frame.image


def write_chosen(
    chosen: Sequence[FrameSignals],
    out: str | Path,
    *,
    classes: Sequence[str],
    model_version: str,
    every: int = 1,
    link: bool = False,
) -> list[str]:
    """Put the chosen frames and their pre-annotations (Pascal VOC, the boxes at or above the
    threshold) into `out` for LabelImg, through `loomlens.predict.labels.LabelsOut`.

    Args:
        chosen: the picked frames.
        out: the folder (`images/`, `annotations/`).
        classes: the run's class names.
        model_version: the run or model the pre-annotations come from.
        every: the `--every` the video frames were sampled with (to find them again).
        link: hard-link the pictures where possible instead of copying them.

    Returns:
        What was written, relative to `out` (`LabelsOut.finish`).
    """
    labels = LabelsOut(out, "voc", list(classes), model_version, link=link)
    used: set[str] = set()
    for s, image in _pictures(chosen, every):
        item = Item(s.source, image, s.frame)
        labels.add(item, Prediction("od", s.width, s.height, list(s.shown)), unique_stem(item, used))
    return labels.finish()


def select_frames(
    predictor: Predictor,
    inputs: Sequence[str | Path],
    out: str | Path,
    *,
    n: int,
    threshold: float | None = None,
    flip: bool = True,
    diversity: float = 0.5,
    weights: Mapping[str, float] | None = None,
    every: int = 1,
    tile: str = "auto",
    link: bool = False,
    on_item: Callable[[], None] | None = None,
) -> dict:
    """Rank the frames of `inputs` by what labelling them would teach the run, and write the
    top `n` with their pre-annotations into `out` (see the module docstring).

    Args:
        predictor: the run, loaded to look at each frame once (`Predictor(adapter=RUN,
            tta="off")`): the mirrored frame is one of the measures here.
        inputs: image files, folders, globs, videos (`loomlens.predict.sources.expand_inputs`).
        out: the folder for `ranking.csv`, `images/`, `annotations/`, `problems.json`.
        n: how many frames to choose.
        threshold: one score threshold for every box; None: the run's region rules, else
            `DEFAULT_THRESHOLD`.
        flip: measure the disagreement with the mirrored frame (twice the model's work).
        diversity: see `pick`; 0 picks by score alone.
        weights: component -> weight (default: all 1).
        every: for videos, every N-th frame.
        tile: `auto`, `on` or `off`.
        link: hard-link the chosen pictures instead of copying them.
        on_item: called after each frame (progress), skipped ones too.

    Returns:
        A summary: `frames` ranked, `chosen` (their paths), `problems` (skipped inputs, each with
        its reason), `out`, and `written`. Raises FileNotFoundError or ValueError (naming the
        input) for an input that names nothing or is no picture, ValueError for bad settings
        or a predictor that fuses mirrors.
    """
    if len(predictor.views) > 1:
        raise ValueError("select looks at each frame and its mirror itself: load the predictor with tta='off'")
    if n < 1:
        raise ValueError(f"--n must be at least 1, got {n}")
    if threshold is not None and not 0 < threshold < 1:
        raise ValueError(f"--threshold must lie strictly between 0 and 1, got {threshold}")
    weights = check_weights(weights)
    out = output_folder(out)  # before any frame is scored: a bad --out must not cost the whole ranking
    problems: list[Problem] = []
    files = expand_inputs(inputs, exclude=[out], on_problem=problems.append)  # a misnamed file: in problems.json

    def skipped(problem: Problem) -> None:
        problems.append(problem)
        if on_item:
            on_item()

    signals = score_frames(predictor, iter_items(files, every, skipped), threshold=threshold, flip=flip,
                           tile=tile, problems=problems, on_item=on_item)
    problems = list({(p.source, p.frame): p for p in problems}.values())  # a frame and its mirror: once
    written = []
    if signals:
        ranked = rank_frames(signals, n=n, weights=weights, diversity=diversity)
        write_ranking(ranked, out / "ranking.csv")
        written.append("ranking.csv")
        chosen = [r.signals for r in ranked if r.chosen]
        written += write_chosen(chosen, out, classes=predictor.loaded.classes, every=every, link=link,
                                model_version=str(predictor.loaded.adapter or predictor.loaded.base))
    else:
        chosen = []
    atomic_write(out / "problems.json", json.dumps([p.as_dict() for p in problems], indent=1) + "\n")
    written.append("problems.json")
    return {"frames": len(signals), "chosen": [s.name for s in chosen], "problems": [p.as_dict() for p in problems],
            "out": str(out), "written": written}
