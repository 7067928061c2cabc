"""Tiled detection for frames larger than the model's input.

In: a detect function (crops -> boxes), a frame, a tile size. Out: the frame's boxes, merged.

Florence-2 squeezes any frame to its input size (768 px; 256 for the tiny model): a 40 px
defect in a 2560x1440 frame becomes ~12 px (4 px for tiny) and is lost. Tiling cuts the frame
into overlapping windows of `tile` px, detects in all of them (and the whole frame, for
defects larger than a tile; on a frame far larger than a tile also in windows of two tiles,
`mid_windows`) in one batched call, maps boxes back to frame pixels and merges
duplicates class-wise. Overlap > defect size means every defect lies whole in at least one
tile; its clipped copies in the neighbours are found by measuring overlap as intersection over
the *smaller* box (a clipped copy lies inside the whole one) and merged into it. A defect
longer than a tile (a broken pick or a crease across the fabric) lies whole in none: each
tile it crosses sees a piece running into the tile's side, and those pieces are stitched back
into one box before merging (`stitch_pieces`). The whole frame's boxes are coarse (its pixels
were squeezed to the input): one that the tiles placed too gives up its edges to theirs
(`placed_finer`) instead of growing their box to its own extent, and one the frame shows large
takes the place of the tiles' pieces of it (`seen_whole`), unless they show a thread it boxed
far thicker than they do. A tile that sees only a piece of a
long defect may name it something else (the end of a thread looks like a spot); a piece, once
stitched, that the whole frame boxes inside a far longer defect of another class is dropped
(`misnamed_pieces`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace

import numpy as np
from PIL import Image

from loomlens.data.records import Box
# The same windows `convert --tile` trains on, and the frames it cuts (`exceeds`).
from loomlens.data.tiles import Window, exceeds, tile_windows

#: A box edge within this share of a tile's side runs into it: training clips a cut defect at
#: the side exactly, and a prediction places an edge to within a bin or two of it.
SIDE_REACH = 0.02
#: How far, in pixels of the model's input, a box from the squeezed whole frame may place each
#: edge from a tile's box of the same defect: a few input pixels, the placement error of a box
#: a few pixels across there (docs/evaluate-and-predict.md, "Tiling").
COARSE_REACH_PX = 4.0
#: A box scoring under this share of the best kept box it reaches is dropped, not merged: a
#: faint answer beside a defect (a tile's guess, the squeezed frame's blur) would otherwise
#: grow that defect's box to its own extent (docs/evaluate-and-predict.md, "Tiling").
FAINT_SHARE = 0.5
#: A box the squeezed whole frame draws at least this many input pixels on its shorter side
#: shows a defect the frame saw whole; the tiles each saw a piece of it (`seen_whole`;
#: docs/evaluate-and-predict.md, "Tiling").
SEEN_WHOLE_PX = 16.0
#: A whole-frame box scoring under this share of the best tile box it would replace is the
#: squeezed frame's guess, not a defect it saw whole: the frame scores what it sees blurred
#: lower than the tiles do, so only a far lower score marks a guess (`seen_whole`).
WHOLE_GUESS_SHARE = 0.1
#: A whole-frame box around one group of tile boxes that runs at least half its length along
#: one axis and fills under this share of it across boxes a thread the tiles placed, coarsely
#: (`seen_whole`: a 3 px broken end inside a 400 px tall box).
THIN_SHARE = 0.25
#: A box no tile saw whole lying at least half inside a whole-frame box of another class this
#: many times its length is a piece of that longer defect the tiles misnamed
#: (`misnamed_pieces`; docs/evaluate-and-predict.md, "Tiling").
MISNAMED_FACTOR = 4.0
#: The middle view's windows are this many tiles across (`mid_windows`).
MID_FACTOR = 2


#: The tiling modes a predictor takes (`should_tile`).
TILE_MODES = ("auto", "on", "off")


def should_tile(width: int, height: int, mode: str, tile: int) -> bool:
    """Whether `mode` ("on" | "off" | "auto") tiles a `width` x `height` frame: "auto" tiles a
    frame longer than a `tile` on some side (`loomlens.data.tiles.exceeds`)."""
    if mode not in TILE_MODES:
        raise ValueError(f"tile must be auto, on or off, got {mode!r}")
    return mode == "on" or (mode == "auto" and exceeds(width, height, tile))


def smaller_overlap(box: Box, others: np.ndarray) -> np.ndarray:
    """Intersection over the smaller area of `box` with each row (x1, y1, x2, y2) of `others`."""
    w = np.clip(np.minimum(box.x2, others[:, 2]) - np.maximum(box.x1, others[:, 0]), 0, None)
    h = np.clip(np.minimum(box.y2, others[:, 3]) - np.maximum(box.y1, others[:, 1]), 0, None)
    areas = (others[:, 2] - others[:, 0]) * (others[:, 3] - others[:, 1])
    return w * h / np.minimum(box.width * box.height, areas)


def mean_edges(boxes: Sequence[Box]) -> tuple[float, float, float, float]:
    """The score-weighted mean (x1, y1, x2, y2) of `boxes` (a box without a score counts 1;
    all scores 0: the plain mean): one defect's edges measured several times."""
    weights = np.array([1.0 if b.score is None else b.score for b in boxes])
    corners = np.array([[b.x1, b.y1, b.x2, b.y2] for b in boxes])
    mean = weights @ corners / weights.sum() if weights.sum() > 0 else corners.mean(axis=0)
    return tuple(float(v) for v in mean)


def merge_boxes(boxes: Sequence[Box], threshold: float = 0.6) -> list[Box]:
    """Class-wise non-maximum *merging*: by descending score, a box whose intersection over
    the smaller area with a kept box of its label reaches `threshold` is merged into it (the
    kept box grows to enclose both and keeps the higher score), and a kept box that growing
    made reach another is merged with that one too, until none does; otherwise it is kept.
    Merging rather than dropping matters when a clipped copy outscores the whole box, or when
    no tile holds the defect whole: the union is still the whole defect. A box reaching two or
    more kept boxes that do not touch (a squeezed whole frame's coarse box around two nearby
    defects) is dropped: the tiles placed each of them more finely. So is a box scoring under
    `FAINT_SHARE` of the best kept box it reaches: a faint answer, not a copy of that defect
    (a whole box scoring under half its clipped copy is lost so, and the copy stands)."""
    kept: dict[str, list[Box]] = {}
    for box in sorted(boxes, key=lambda b: -(b.score if b.score is not None else 1.0)):
        same = kept.setdefault(box.label, [])
        hits = _reached(box, same, threshold)
        if (len(hits) > 1 and not _connected([same[i] for i in hits])) or _faint(box, [same[i] for i in hits]):
            continue
        if not hits:
            same.append(box)
            continue
        at, grown = hits[0], box
        while hits:  # the grown box may reach kept boxes it did not before
            grown = _enclosing([grown, *(same[i] for i in hits)])
            same[at] = grown
            for i in sorted((i for i in hits if i != at), reverse=True):
                del same[i]
                at -= i < at
            hits = [i for i in _reached(grown, same, threshold) if i != at]
    return [b for group in kept.values() for b in group]


def _faint(box: Box, reached: Sequence[Box], share: float = FAINT_SHARE) -> bool:
    """Whether `box` scores under `share` of the best of the boxes it `reached`."""
    best = _top_score(b.score for b in reached)
    return box.score is not None and best is not None and box.score < share * best


def _reached(box: Box, kept: Sequence[Box], threshold: float) -> list[int]:
    """The indices of the `kept` boxes whose overlap with `box` (`smaller_overlap`) reaches `threshold`."""
    if not kept:
        return []
    overlaps = smaller_overlap(box, np.array([[k.x1, k.y1, k.x2, k.y2] for k in kept]))
    return [int(i) for i in np.flatnonzero(overlaps >= threshold)]


def _enclosing(boxes: Sequence[Box]) -> Box:
    """The box enclosing `boxes` (one label), with the first one's label and the highest score."""
    return replace(boxes[0], x1=min(b.x1 for b in boxes), y1=min(b.y1 for b in boxes), x2=max(b.x2 for b in boxes),
                   y2=max(b.y2 for b in boxes), score=_top_score(b.score for b in boxes))


def _top_score(scores: Iterable[float | None]) -> float | None:
    """The highest of `scores` that are given (None: none is, as for an unscored answer)."""
    return max((s for s in scores if s is not None), default=None)


def _connected(boxes: Sequence[Box]) -> bool:
    """Whether `boxes` form one group when boxes that touch or overlap are joined: pieces of
    one defect, as against separate defects side by side."""
    group, left = [boxes[0]], list(boxes[1:])
    while left:
        joined = [b for b in left if any(b.x1 <= g.x2 and g.x1 <= b.x2 and b.y1 <= g.y2 and g.y1 <= b.y2
                                         for g in group)]
        if not joined:
            return False
        group += joined
        left = [b for b in left if b not in joined]
    return True


def _cut_sides(box: Box, window: Window, width: int, height: int) -> str:
    """The sides of `window` ("l", "t", "r", "b") that `box` (frame pixels) runs into, where the
    window does not end at the `width` x `height` frame's own edge: the defect may go on there."""
    x0, y0, x1, y1 = window
    rx, ry = max(1.0, SIDE_REACH * (x1 - x0)), max(1.0, SIDE_REACH * (y1 - y0))
    sides = [("l", x0 > 0 and box.x1 - x0 <= rx), ("t", y0 > 0 and box.y1 - y0 <= ry),
             ("r", x1 < width and x1 - box.x2 <= rx), ("b", y1 < height and y1 - box.y2 <= ry)]
    return "".join(side for side, cut in sides if cut)


def _span_share(a1: float, a2: float, b1: float, b2: float) -> float:
    """How much of the shorter of the spans [a1, a2] and [b1, b2] the other covers."""
    return max(0.0, min(a2, b2) - max(a1, b1)) / max(min(a2 - a1, b2 - b1), 1e-9)


def _continues(a: Box, a_sides: str, b: Box, b_sides: str, reach: tuple[float, float]) -> str:
    """The axis ("x" or "y", else "") along which `b` is the piece of `a`'s defect in the next
    tile: `a` runs into its tile's right (bottom) side, `b` into its tile's left (top) side, the
    two meet or overlap along that axis, and across it they share at least half of the narrower one."""
    along_x = "r" in a_sides and "l" in b_sides and a.x1 < b.x1 <= a.x2 + reach[0] and b.x2 > a.x2
    along_y = "b" in a_sides and "t" in b_sides and a.y1 < b.y1 <= a.y2 + reach[1] and b.y2 > a.y2
    if along_x and _span_share(a.y1, a.y2, b.y1, b.y2) >= 0.5:
        return "x"
    return "y" if along_y and _span_share(a.x1, a.x2, b.x1, b.x2) >= 0.5 else ""


def _joined(pieces: Sequence[Box], axes: str) -> Box:
    """One box for the `pieces` of a defect chained along `axes`: along a chained axis the span
    enclosing them, across it the score-weighted mean of their edges. Each piece measures a
    thread's width afresh, so enclosing them would add up their errors: a 3 px thread across
    three tiles boxed by the worst edge on each side (weighted box fusion's reasoning,
    `infer.tta`)."""
    x1, y1, x2, y2 = mean_edges(pieces)
    if "x" in axes:
        x1, x2 = min(b.x1 for b in pieces), max(b.x2 for b in pieces)
    if "y" in axes:
        y1, y2 = min(b.y1 for b in pieces), max(b.y2 for b in pieces)
    best = max(pieces, key=lambda b: b.score if b.score is not None else 1.0)
    return replace(best, x1=x1, y1=y1, x2=x2, y2=y2)


def stitch_pieces(boxes: Sequence[Box], windows: Sequence[Window], width: int, height: int
                  ) -> list[tuple[Box, bool]]:
    """Join the pieces of defects longer than a tile: boxes of one label, each cut by its tile's
    side, that continue each other across neighbouring tiles (chains too) become one box
    (`_joined`: their span along the chain, the mean of their edges across it), with the highest
    score among them; every other box is returned as it is.

    Args:
        boxes: detections in frame pixels.
        windows: the tile (x0, y0, x1, y1) each box was found in, one per box.
        width, height: the frame's size; a tile side on the frame's edge cuts nothing.
    Returns:
        One (box, cut) per defect, in the order of each defect's first piece in `boxes`; cut
        when no tile saw that box whole (a chain, or one piece running into its tile's side).
    """
    sides = [_cut_sides(b, w, width, height) for b, w in zip(boxes, windows)]
    reach = (SIDE_REACH * max(w[2] - w[0] for w in windows), SIDE_REACH * max(w[3] - w[1] for w in windows))
    group = list(range(len(boxes)))

    def root(i: int) -> int:
        while group[i] != i:
            i = group[i]
        return i

    cut, axes = [i for i, s in enumerate(sides) if s], [""] * len(boxes)
    for i in cut:
        for j in cut:
            if boxes[i].label == boxes[j].label and (axis := _continues(boxes[i], sides[i], boxes[j], sides[j],
                                                                        reach)):
                a, b = root(i), root(j)
                axes[a] += axis + (axes[b] if a != b else "")  # the axes the chain runs along
                group[b] = a
    members: dict[int, list[int]] = {}
    for i in range(len(boxes)):
        members.setdefault(root(i), []).append(i)
    return [(boxes[m[0]], bool(sides[m[0]])) if len(m) == 1 else (_joined([boxes[i] for i in m], axes[r]), True)
            for r, m in members.items()]


def misnamed_pieces(stitched: Sequence[tuple[Box, bool]], whole: Sequence[Box]) -> list[Box]:
    """Drop the tiles' boxes that are pieces of a longer defect the tiles named wrongly.

    A box no tile saw whole (a stitched chain, or a piece running into its tile's side) that
    lies at least half inside (`smaller_overlap`) a whole-frame box of another label at least
    `MISNAMED_FACTOR` times as long is a piece of the defect the squeezed frame saw whole: a
    tile showing 40 px of a 400 px broken pick calls it a slub or an oil spot. Stitching joins
    only pieces of one label, so left alone such a piece stays a confident false box and the
    thread's own pieces fall short of it. Judged after stitching, so that a thread the tiles
    chained end to end under its own name is measured at its full length.

    Args:
        stitched: the tiles' boxes as `stitch_pieces` returns them, (box, cut), frame pixels.
        whole: the whole frame's boxes, frame pixels.
    Returns:
        The stitched boxes without the misnamed pieces.
    """
    if not whole:
        return [b for b, _ in stitched]
    corners = np.array([[w.x1, w.y1, w.x2, w.y2] for w in whole])
    lengths = np.array([max(w.width, w.height) for w in whole])
    labels = np.array([w.label for w in whole])
    return [b for b, cut in stitched
            if not (cut and ((smaller_overlap(b, corners) >= 0.5) & (labels != b.label)
                             & (lengths >= MISNAMED_FACTOR * max(b.width, b.height))).any())]


def placed_finer(whole: Sequence[Box], tiled: Sequence[Box], reach: tuple[float, float]
                 ) -> tuple[list[Box], list[Box]]:
    """Fold the squeezed whole frame's boxes into the tiles' boxes of the same defects.

    A whole-frame box whose four edges each lie within `reach` of a tile box of its label is
    that defect placed coarsely: it is dropped and the tile box (the nearest, by the sum of
    edge distances) keeps the higher score of the two. Merged instead, it would grow the tile
    box to its own extent: a 3 px thread boxed 8 px thick. A whole-frame box no tile box
    matches (a defect larger than the tiles, or one they missed) is kept.

    Args:
        whole: the whole frame's boxes, frame pixels.
        tiled: the tiles' boxes, stitched and merged, frame pixels.
        reach: (x, y) in frame pixels.
    Returns:
        (the whole-frame boxes left, the tile boxes with their scores raised where matched).
    """
    tiled, left = list(tiled), []
    for w in whole:
        gaps = [(abs(w.x1 - t.x1) + abs(w.x2 - t.x2) + abs(w.y1 - t.y1) + abs(w.y2 - t.y2), i)
                for i, t in enumerate(tiled) if t.label == w.label
                and max(abs(w.x1 - t.x1), abs(w.x2 - t.x2)) <= reach[0]
                and max(abs(w.y1 - t.y1), abs(w.y2 - t.y2)) <= reach[1]]
        if not gaps:
            left.append(w)
            continue
        i = min(gaps)[1]
        tiled[i] = replace(tiled[i], score=_top_score([tiled[i].score, w.score]))
    return left, tiled


def seen_whole(whole: Sequence[Box], tiled: Sequence[Box], scale: tuple[float, float], threshold: float
               ) -> tuple[list[Box], list[Box]]:
    """Let the squeezed whole frame's large boxes replace the tiles' pieces of the same defects.

    A whole-frame box at least `SEEN_WHOLE_PX` input pixels on its shorter side that reaches
    (`smaller_overlap` >= `threshold`) one connected group of tile boxes of its label takes
    their place, with its own edges and the highest score: the frame saw that defect whole,
    each tile a piece of it (a diagonal crease that each tile boxes to its corners, whose union
    overshoots). Small boxes, boxes reaching separate tile boxes and boxes scoring under
    `WHOLE_GUESS_SHARE` of the best of the tile boxes they reach (a 450 px guess around a
    thread the tiles stitched end to end) are left to `merge_boxes`. A box around one group
    that is thin against it (`_coarse_around`: a thread the tiles placed) is dropped, its score
    going to the group as in `placed_finer`: replacing or merging, it would box a 3 px thread
    tens or hundreds of pixels thick.

    Args:
        whole: the whole frame's boxes no tile box matched (`placed_finer`), frame pixels.
        tiled: the tiles' boxes, stitched and merged, frame pixels.
        scale: frame pixels per input pixel along x and y.
        threshold: the overlap at which a box reaches another (`merge_boxes`').
    Returns:
        (the whole-frame boxes left, the tile boxes with the replaced ones swapped for theirs).
    """
    tiled, left = list(tiled), []
    for w in whole:
        hits = [i for i in _reached(w, tiled, threshold) if tiled[i].label == w.label]
        group = [tiled[i] for i in hits]
        one = bool(group) and _connected(group)  # one defect's pieces
        if one and _coarse_around(w, group):
            for i in hits:  # as `placed_finer` does: the frame's score, not its edges
                tiled[i] = replace(tiled[i], score=_top_score([tiled[i].score, w.score]))
            continue
        if min(w.width / scale[0], w.height / scale[1]) < SEEN_WHOLE_PX or not one or _faint(
                w, group, WHOLE_GUESS_SHARE):
            left.append(w)
            continue
        score = _top_score([w.score, *(b.score for b in group)])
        tiled = [t for i, t in enumerate(tiled) if i not in hits] + [replace(w, score=score)]
    return left, tiled


def _coarse_around(box: Box, group: Sequence[Box], share: float = THIN_SHARE) -> bool:
    """Whether `box` is a coarse box around the thin defect `group` shows: the box enclosing
    `group` spans at least half of `box` along one axis and under `share` of it across."""
    x = (max(b.x2 for b in group) - min(b.x1 for b in group)) / max(box.width, 1e-9)
    y = (max(b.y2 for b in group) - min(b.y1 for b in group)) / max(box.height, 1e-9)
    return (x >= 0.5 and y < share) or (y >= 0.5 and x < share)


def mid_windows(width: int, height: int, tile: int, overlap: float = 0.25) -> list[Window]:
    """The middle view's windows of a `width` x `height` frame tiled at `tile` px: windows
    `MID_FACTOR` tiles across, each squeezed to the model's input as the tiles are, for a frame
    at least twice such a window on its longer side and one on its shorter; else none.

    Where the squeezed whole frame is four or more times coarser than the tiles, a stain or a
    crease larger than a tile is cut by the tiles and blurred by the frame; a window twice a
    tile sees it whole at half the tiles' resolution (docs/evaluate-and-predict.md, "Tiling").
    A strip narrower than the window gets none: its window would be squeezed along one side."""
    mid = MID_FACTOR * tile
    if min(width, height) < mid or max(width, height) < 2 * mid:
        return []
    return tile_windows(width, height, mid, overlap)


def _stitched(windows: Sequence[Window], found: Sequence[Sequence[Box]], width: int, height: int
              ) -> list[tuple[Box, bool]]:
    """`stitch_pieces` of the boxes `found` in each of `windows` (window pixels), in frame pixels."""
    pieces = [(replace(b, x1=b.x1 + w[0], y1=b.y1 + w[1], x2=b.x2 + w[0], y2=b.y2 + w[1]), w)
              for w, boxes in zip(windows, found) for b in boxes]
    return stitch_pieces([b for b, _ in pieces], [w for _, w in pieces], width, height) if pieces else []


def _refined(coarse: Sequence[Box], tiled: list[Box], scale: tuple[float, float], threshold: float,
             add: bool = True) -> list[Box]:
    """The tiles' boxes with a coarser view's `coarse` boxes folded in (`placed_finer`, then
    `seen_whole`; `scale`: frame pixels per input pixel of that view), and the coarse boxes
    left over merged in as defects the tiles missed when `add`."""
    left, tiled = placed_finer(coarse, tiled, (COARSE_REACH_PX * scale[0], COARSE_REACH_PX * scale[1]))
    left, tiled = seen_whole(left, tiled, scale, threshold)
    return merge_boxes(tiled + left, threshold) if left and add else tiled


def tiled_detect(
    detect: Callable[[list[Image.Image]], list[list[Box]]],
    image: Image.Image,
    tile: int,
    input_edge: int,
    overlap: float = 0.25,
    whole_frame: bool = True,
    merge_threshold: float = 0.6,
) -> list[Box]:
    """Boxes in `image`'s pixels from `detect` (images -> boxes in each image's pixels) run
    once on every tile, and when `whole_frame` on the middle view's windows (`mid_windows`) and
    the whole frame, stitched and merged. The coarser views, squeezed to the model's
    `input_edge` px input, drop the tiles' misnamed pieces of their long defects
    (`misnamed_pieces`) and refine the tiles' boxes (`placed_finer`, `seen_whole`); the whole
    frame also adds the defects the tiles did not place. The middle view adds none: on its own
    its boxes are less precise than the tiles', and a box it alone finds was more often false
    than missed (docs/evaluate-and-predict.md, "Tiling")."""
    windows = tile_windows(image.width, image.height, tile, overlap)
    whole = whole_frame and len(windows) > 1
    middle = mid_windows(image.width, image.height, tile, overlap) if whole else []
    found = detect([image.crop(w) for w in [*windows, *middle]] + ([image] if whole else []))
    stitched = _stitched(windows, found[:len(windows)], image.width, image.height)
    mid = _stitched(middle, found[len(windows):len(windows) + len(middle)], image.width, image.height)
    mid = merge_boxes([b for b, _ in mid], merge_threshold) if mid else []
    frame = found[-1] if whole else []
    tiled = misnamed_pieces(stitched, [*frame, *mid])
    tiled = merge_boxes(tiled, merge_threshold) if tiled else []
    if not whole:
        return tiled
    if middle:
        tiled = _refined(mid, tiled, (MID_FACTOR * tile / input_edge,) * 2, merge_threshold, add=False)
    return _refined(frame, tiled, (image.width / input_edge, image.height / input_edge), merge_threshold)
