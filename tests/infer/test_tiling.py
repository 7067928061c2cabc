"""Tiles cover the frame, boxes come back in frame pixels, clipped duplicates merge."""

from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from loomlens.data.records import Box
from loomlens.infer.tiling import (
    merge_boxes, mid_windows, misnamed_pieces, placed_finer, seen_whole, should_tile, stitch_pieces, tile_windows,
    tiled_detect,
)


@pytest.mark.parametrize("size", [(2560, 1440), (700, 300), (256, 256), (100, 50)])
def test_windows_cover_the_frame_with_overlap(size):
    w, h = size
    windows = tile_windows(w, h, 256, overlap=0.25)
    covered = np.zeros((h, w), bool)
    for x0, y0, x1, y1 in windows:
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h and x1 - x0 <= 256
        covered[y0:y1, x0:x1] = True
    assert covered.all()
    xs = sorted({x0 for x0, *_ in windows})
    assert all(b - a <= 256 * 0.75 for a, b in zip(xs, xs[1:]))  # at least a quarter shared


def test_auto_tiles_only_frames_longer_than_a_tile():
    assert should_tile(2560, 1440, "auto", 256) and should_tile(400, 300, "auto", 256)
    assert should_tile(257, 100, "auto", 256) and not should_tile(256, 256, "auto", 256)
    assert should_tile(10, 10, "on", 256) and not should_tile(9999, 9999, "off", 256)
    with pytest.raises(ValueError):
        should_tile(1, 1, "sometimes", 256)


def test_merge_keeps_the_whole_box_and_other_classes():
    whole = Box("drop", 100, 100, 140, 140, 0.9)
    clipped = Box("drop", 100, 100, 120, 140, 0.6)  # the same defect cut by a tile edge
    other = Box("wrinkle", 100, 100, 140, 140, 0.5)
    apart = Box("drop", 300, 300, 320, 320, 0.4)
    assert merge_boxes([clipped, whole, other, apart]) == [whole, apart, other]


def white_square_detector(crops):
    """A stand-in model: finds the white pixels of each crop, as one box."""
    found = []
    for crop in crops:
        ys, xs = np.nonzero(np.asarray(crop)[..., 0] > 200)
        found.append([Box("spot", xs.min(), ys.min(), xs.max() + 1, ys.max() + 1, 0.9)] if xs.size else [])
    return found


def test_tiled_detection_maps_boxes_back_and_merges():
    frame = np.zeros((700, 1000, 3), np.uint8)
    frame[430:450, 610:650] = 255  # a 40x20 defect
    calls = []

    def detect(crops):
        calls.append(len(crops))
        return white_square_detector(crops)

    boxes = tiled_detect(detect, Image.fromarray(frame), tile=256, input_edge=256, overlap=0.25)
    assert len(calls) == 1  # one batched call for all tiles and the whole frame
    assert [(b.x1, b.y1, b.x2, b.y2) for b in boxes] == [(610, 430, 650, 450)]


@pytest.mark.parametrize("axis", ["x", "y"])
def test_a_defect_longer_than_a_tile_comes_back_as_one_box(axis):
    """A broken pick across a line-scan strip lies whole in no tile: each tile it crosses sees a
    piece running into its sides, and the pieces are stitched back (no whole-frame pass here,
    as for a model that cannot see the thin line in the squeezed frame)."""
    frame = np.zeros((256, 1500, 3), np.uint8)
    frame[100:110, 130:1400, 0] = 255  # red
    frame[200:204, 600:640, 1] = 255  # a short one of the same class, apart, in green
    if axis == "y":
        frame = frame.transpose(1, 0, 2)

    def detect(crops):  # one box per colour channel that shows, all of one class
        found = []
        for crop in crops:
            lit = [np.nonzero(np.asarray(crop)[..., c] > 200) for c in (0, 1)]
            found.append([Box("pick", xs.min(), ys.min(), xs.max() + 1, ys.max() + 1, 0.9) for ys, xs in lit if xs.size])
        return found

    boxes = tiled_detect(detect, Image.fromarray(np.ascontiguousarray(frame)), tile=256, input_edge=256, whole_frame=False)
    found = sorted((b.x1, b.y1, b.x2, b.y2) for b in boxes)
    expected = [(130, 100, 1400, 110), (600, 200, 640, 204)]
    assert found == sorted(expected if axis == "x" else [(y1, x1, y2, x2) for x1, y1, x2, y2 in expected])


def test_only_pieces_cut_by_the_seam_between_them_are_stitched():
    left, right = (0, 0, 256, 256), (192, 0, 448, 256)
    piece = Box("pick", 100, 50, 256, 60, 0.4)  # runs into the left tile's right side
    go_on = Box("pick", 192, 52, 400, 62, 0.4)  # runs into the right tile's left side
    # Along the chain the span of both; across it the mean of their edges, not the union
    # (50..62): each piece measured the thread's width with its own error.
    ((joined, cut),) = stitch_pieces([piece, go_on], [left, right], 448, 256)
    assert cut  # no tile saw the joined pick whole
    assert (joined.label, joined.x1, joined.x2, joined.score) == ("pick", 100, 400, 0.4)
    assert (joined.y1, joined.y2) == pytest.approx((51, 61))
    ((weighted, _),) = stitch_pieces([piece, replace(go_on, score=1.2)], [left, right], 448, 256)
    assert (weighted.y1, weighted.y2, weighted.score) == pytest.approx((51.5, 61.5, 1.2))  # the surer piece counts more
    unstitched = [
        [piece, Box("nep", 192, 52, 400, 62, 0.7)],  # another class
        [piece, Box("pick", 192, 150, 400, 160, 0.7)],  # another line, lower down
        [piece, Box("pick", 220, 52, 400, 62, 0.7)],  # starts inside the tile: its own defect
        [Box("pick", 100, 50, 240, 60, 0.4), go_on],  # ends before the side
    ]
    for pair in unstitched:
        assert [b for b, _ in stitch_pieces(pair, [left, right], 448, 256)] == pair
    # A tile side on the frame's own edge cuts nothing: a box running into it is whole there.
    edge = Box("pick", 300, 50, 448, 60)
    (kept, cut), (other, _) = stitch_pieces([edge, Box("pick", 192, 50, 300, 60)], [right, left], 448, 256)
    assert (kept, cut, other) == (edge, False, Box("pick", 192, 50, 300, 60))


def test_pieces_chained_along_both_axes_span_both():
    # A stain over four tiles: each tile boxes its corner of it, clipped by its own sides; the
    # chain runs along x and along y, so both spans are the pieces' union, not a mean.
    windows = [(0, 0, 256, 256), (192, 0, 448, 256), (0, 192, 256, 448), (192, 192, 448, 448)]
    pieces = [Box("stain", 100, 100, 256, 256, 0.9), Box("stain", 192, 100, 400, 256, 0.8),
              Box("stain", 100, 192, 256, 400, 0.7), Box("stain", 192, 192, 400, 400, 0.6)]
    assert stitch_pieces(pieces, windows, 448, 448) == [(Box("stain", 100, 100, 400, 400, 0.9), True)]


def test_inference_tiles_with_the_windows_training_is_cut_from():
    from loomlens.data import tiles

    assert tile_windows is tiles.tile_windows  # one definition: `convert --tile` and `--tile on` agree


def test_a_box_grown_by_merging_takes_in_the_pieces_it_now_reaches():
    pieces = [Box("d", 0, 0, 10, 1, 0.9), Box("d", 0, 0, 100, 1, 0.8), Box("d", 0, 0, 10, 10, 0.7),
              Box("d", 0, 0, 100, 10, 0.6)]
    assert merge_boxes(pieces) == [Box("d", 0, 0, 100, 10, 0.9)]


def test_a_coarse_box_around_two_separate_defects_never_swallows_them():
    a, b = Box("d", 1000, 100, 1040, 120, 0.9), Box("d", 1080, 100, 1120, 120, 0.85)
    assert merge_boxes([a, b, Box("d", 1000, 100, 1120, 120, 0.5)]) == [a, b]


def thread_detector(coarse: tuple[int, int]):
    """A stand-in model on a 512 px frame with a thread along y 272..275: each crop no larger
    than a tile boxes its part of the thread to the pixel; the whole frame, squeezed, boxes it
    `coarse` (y1, y2) thick, as the tiny model does at half the resolution."""
    def detect(crops):
        found = []
        for crop in crops:
            if crop.width > 256:
                found.append([Box("broken-end", 0, coarse[0], 512, coarse[1], 0.7)])
            else:
                ys, xs = np.nonzero(np.asarray(crop)[..., 0] > 200)
                found.append([Box("broken-end", xs.min(), ys.min(), xs.max() + 1, ys.max() + 1, 0.4)] if xs.size else [])
        return found
    return detect


def test_the_squeezed_frame_gives_its_score_not_its_coarse_edges_to_a_defect_the_tiles_placed():
    frame = np.zeros((512, 512, 3), np.uint8)
    frame[272:275, :] = 255  # a 3 px thread across the frame
    image = Image.fromarray(frame)
    boxes = tiled_detect(thread_detector((269, 278)), image, tile=256, input_edge=256)
    assert [(b.x1, b.y1, b.x2, b.y2, b.score) for b in boxes] == [pytest.approx((0, 272, 512, 275, 0.7))]
    # Edges further than 4 input pixels (8 frame pixels here) off, a box nine times the thread's
    # thickness around it: still the thread, boxed coarsely (`_coarse_around`), not the union.
    boxes = tiled_detect(thread_detector((250, 278)), image, tile=256, input_edge=256)
    assert [(b.x1, b.y1, b.x2, b.y2, b.score) for b in boxes] == [pytest.approx((0, 272, 512, 275, 0.7))]


def test_a_whole_frame_box_is_folded_only_into_a_box_of_its_class_within_reach():
    fine = [Box("d", 100, 100, 120, 104, 0.3), Box("d", 300, 100, 320, 104, 0.6)]
    coarse = Box("d", 98, 97, 123, 107, 0.9)
    assert placed_finer([coarse], fine, (4, 4)) == ([], [Box("d", 100, 100, 120, 104, 0.9), fine[1]])
    assert placed_finer([coarse], fine, (2, 4)) == ([coarse], fine)  # x1, x2 miss by 2 and 3
    other = Box("e", 98, 97, 123, 107, 0.9)
    assert placed_finer([other], fine, (4, 4)) == ([other], fine)


def test_a_faint_answer_beside_a_defect_is_dropped_not_merged_into_it():
    thread = Box("broken-end", 0, 272, 512, 275, 0.4)
    faint = Box("broken-end", 0, 250, 512, 300, 0.1)  # a quarter of the thread's score
    copy = Box("broken-end", 0, 271, 256, 275, 0.3)  # three quarters: the same defect, merged
    assert merge_boxes([thread, faint]) == [thread]
    assert merge_boxes([thread, copy]) == [Box("broken-end", 0, 271, 512, 275, 0.4)]
    assert merge_boxes([faint]) == [faint]  # alone it is kept


def test_a_defect_the_squeezed_frame_sees_whole_replaces_the_tiles_pieces_of_it():
    # A diagonal crease over 100..400 px of a 512 px frame: every 256 px tile it crosses boxes
    # its whole self (the union would be the frame), the squeezed frame boxes the crease.
    def detect(crops):
        return [[Box("fold-mark", 100, 100, 400, 400, 0.5)] if c.width > 256
                else [Box("fold-mark", 0, 0, c.width, c.height, 0.3)] for c in crops]

    boxes = tiled_detect(detect, Image.new("RGB", (512, 512)), tile=256, input_edge=256)
    assert [(b.x1, b.y1, b.x2, b.y2, b.score) for b in boxes] == [(100, 100, 400, 400, 0.5)]


def test_only_a_large_whole_frame_box_over_one_group_of_tile_boxes_replaces_them():
    pieces = [Box("d", 90, 90, 260, 260, 0.4), Box("d", 250, 250, 410, 410, 0.3)]  # touching: one group
    large = Box("d", 100, 100, 400, 400, 0.2)  # 150 input px a side at half scale
    assert seen_whole([large], pieces, (2, 2), 0.6) == ([], [Box("d", 100, 100, 400, 400, 0.4)])
    small = Box("d", 100, 100, 120, 400, 0.2)  # 10 input px wide: the tiles place it finer
    assert seen_whole([small], pieces, (2, 2), 0.6) == ([small], pieces)
    apart = [Box("d", 100, 100, 200, 200, 0.4), Box("d", 300, 300, 400, 400, 0.3)]  # two defects
    assert seen_whole([large], apart, (2, 2), 0.6) == ([large], apart)
    other = Box("e", 100, 100, 400, 400, 0.2)
    assert seen_whole([other], pieces, (2, 2), 0.6) == ([other], pieces)
    guess = Box("d", 100, 100, 400, 400, 0.03)  # under a tenth of the pieces' best score
    assert seen_whole([guess], pieces, (2, 2), 0.6) == ([guess], pieces)


def test_a_coarse_whole_frame_box_around_a_thread_the_tiles_placed_is_dropped():
    thread = [Box("broken-end", 0, 229, 330, 233, 0.7), Box("broken-end", 320, 229, 640, 234, 0.6)]  # one chain
    coarse = Box("broken-end", 3, 225, 639, 637, 0.75)  # the squeezed frame: 412 px tall around it
    raised = [Box("broken-end", 0, 229, 330, 233, 0.75), Box("broken-end", 320, 229, 640, 234, 0.75)]
    assert seen_whole([coarse], thread, (2.5, 2.5), 0.6) == ([], raised)
    band = Box("broken-end", 0, 222, 640, 240, 0.75)  # the pieces fill over a quarter of it across: seen whole
    assert seen_whole([band], thread, (1, 1), 0.6) == ([], [band])


def test_a_thread_keeps_its_edges_under_the_squeezed_frames_higher_scored_coarse_box():
    # A 4 px thread across a 640 px frame: each tile boxes its piece, the squeezed frame draws a
    # box 412 px tall around it, scoring higher; merged or replaced, the thread would be that box.
    def detect(crops):
        return [[Box("broken-end", 3, 225, 639, 637, 0.75)] if c.width == 640
                else [Box("broken-end", 0, 229 - y0, c.width, 233 - y0, 0.7)] if y0 <= 229 < y0 + c.height
                else [] for c, y0 in zip(crops, offsets(crops))]

    def offsets(crops):
        windows = tile_windows(640, 640, 256)
        return [w[1] for w in windows] + [0] * (len(crops) - len(windows))

    boxes = tiled_detect(detect, Image.new("RGB", (640, 640)), tile=256, input_edge=256)
    assert [(b.label, (b.x1, b.y1, b.x2, b.y2, b.score)) for b in boxes] == [
        ("broken-end", pytest.approx((0, 229, 640, 233, 0.75)))]


@pytest.mark.parametrize("host", ["whole", "middle"])
def test_a_tiles_misnamed_piece_of_a_long_defect_the_frame_saw_is_dropped(host):
    # A broken pick along a 1024 px frame: the squeezed frame (or, where it misses the pick, the
    # middle view's windows) boxes all of it, each tile it crosses its piece, and the one tile
    # that also holds a grey fleck calls its piece a slub.
    frame = np.zeros((1024, 1024, 3), np.uint8)
    frame[300:304, :] = 255
    frame[310, 700] = 100

    def detect(crops):
        found = []
        for crop in crops:
            pixels = np.asarray(crop)[..., 0]
            if crop.width == 1024:  # the whole frame
                found.append([Box("broken-end", 0, 296, 1024, 308, 0.4)] if host == "whole" else [])
                continue
            ys, xs = np.nonzero(pixels > 200)  # a tile, or a window of the middle view
            label = "slub" if (pixels == 100).any() and crop.width == 256 else "broken-end"
            found.append([Box(label, xs.min(), ys.min(), xs.max() + 1, ys.max() + 1, 0.6)] if xs.size else [])
        return found

    image = Image.fromarray(frame)
    assert "slub" in {b.label for b in tiled_detect(detect, image, tile=256, input_edge=256, whole_frame=False)}
    assert {b.label for b in tiled_detect(detect, image, tile=256, input_edge=256)} == {"broken-end"}


def test_only_a_cut_piece_inside_a_far_longer_box_of_another_class_is_misnamed():
    thread = Box("broken-end", 0, 100, 1024, 110, 0.4)  # 1024 px long
    piece = Box("slub", 256, 102, 512, 106, 0.6)  # 256 px, and no tile saw it whole
    assert misnamed_pieces([(piece, True)], [thread]) == []
    assert misnamed_pieces([(replace(piece, label="broken-end"), True)], [thread]) == [replace(piece, label="broken-end")]
    assert misnamed_pieces([(piece, True)], [replace(thread, x2=1000)]) == [piece]  # under 4x as long
    assert misnamed_pieces([(piece, False)], [thread]) == [piece]  # a tile saw it whole: a defect of its own
    assert misnamed_pieces([(piece, True)], []) == [piece]


def test_a_thread_the_tiles_stitched_is_judged_at_its_full_length():
    # Every tile names its piece of a 1024 px thread right; the squeezed frame also guesses a
    # fold-mark over it. Each 256 px piece is at most a quarter of the guess's length, the
    # stitched thread is not: it stays.
    frame = np.zeros((1024, 1024, 3), np.uint8)
    frame[300:304, :] = 255

    def detect(crops):
        found = []
        for crop in crops:
            if crop.width == 1024:  # the whole frame
                found.append([Box("fold-mark", 0, 290, 1024, 314, 0.01)])
                continue
            ys, xs = np.nonzero(np.asarray(crop)[..., 0] > 200)  # a tile, or a window of the middle view
            found.append([Box("broken-end", xs.min(), ys.min(), xs.max() + 1, ys.max() + 1, 0.6)] if xs.size else [])
        return found

    boxes = tiled_detect(detect, Image.fromarray(frame), tile=256, input_edge=256)
    assert [(b.label, b.x1, b.x2) for b in boxes if b.score > 0.1] == [("broken-end", 0, 1024)]


def test_the_middle_view_sees_frames_far_larger_than_a_tile_through_windows_of_two_tiles():
    assert mid_windows(1024, 1024, 256) == tile_windows(1024, 1024, 512) and len(mid_windows(1024, 1024, 256)) == 9
    assert mid_windows(2560, 1440, 512) == tile_windows(2560, 1440, 1024)
    assert mid_windows(896, 896, 256) == []  # the squeezed frame is under four tiles' scale: near enough
    assert mid_windows(4096, 256, 256) == []  # a line-scan strip: the window would be squeezed one way


def test_a_defect_the_middle_view_sees_whole_replaces_the_tiles_pieces_of_it():
    # A faint diagonal crease over 300..700 px of a 1024 px frame: each tile it crosses boxes
    # itself corner to corner (their union overshoots), the frame squeezed four times loses it,
    # and the middle view's 512 px window that holds it boxes it.
    frame = np.zeros((1024, 1024, 3), np.uint8)
    frame[np.arange(300, 700), np.arange(300, 700)] = 255

    def detect(crops):
        found = []
        for crop in crops:
            ys, xs = np.nonzero(np.asarray(crop)[..., 0])
            if crop.width == 1024 or not xs.size:
                found.append([])
            elif crop.width == 256:
                found.append([Box("fold-mark", 0, 0, 256, 256, 0.3)])
            else:
                found.append([Box("fold-mark", xs.min(), ys.min(), xs.max() + 1, ys.max() + 1, 0.5)])
        return found

    boxes = tiled_detect(detect, Image.fromarray(frame), tile=256, input_edge=256)
    assert [(b.x1, b.y1, b.x2, b.y2, b.score) for b in boxes] == [(300, 300, 700, 700, 0.5)]


def test_the_middle_view_adds_no_box_of_its_own():
    def only_middle(crops):  # a blob only the middle view's windows report
        return [[Box("slub", 10, 10, 40, 40, 0.9)] if c.width == 512 else [] for c in crops]

    assert tiled_detect(only_middle, Image.new("RGB", (1024, 1024)), tile=256, input_edge=256) == []
