"""Losses that teach a model *where*, shared by pretraining and fine-tuning.

- The pointer loss: at each location token, the last decoder layer's cross-attention (mean
  over heads) is pushed onto the image cells along that coordinate's edge of the box (x1: the
  box's left column, y1: its top row, ...). Fine-tuning uses it with `pointer_weight`;
  pretraining always (without it the tiny model's decoder never found the object: model card).
- The dense head: a CenterNet-style head on the vision feature map (class heatmaps, centre
  offsets, log sizes), trained beside the text during pretraining to keep the features
  spatial, and dropped afterwards.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from loomlens.data.shapes import Scene


def pointer_targets(labels: torch.Tensor, loc_start: int, grid: int) -> list[tuple[int, int, list[int]]]:
    """For each loc token in `labels`: (sample, position, encoder positions it should attend).

    Loc tokens come in groups of four (x1, y1, x2, y2 in bins). Coordinate x1 points at the
    cells of the box's left column, y1 its top row, x2 its right column, y2 its bottom row.
    Encoder position 0 is the pooled image token; cell (row, col) is `1 + row * grid + col`.
    """
    cell = lambda q: min(grid - 1, int(q) * grid // 1000)  # noqa: E731 - bin -> grid index
    targets = []
    for b, row in enumerate(labels.tolist()):
        locs = [(t, v - loc_start) for t, v in enumerate(row) if loc_start <= v < loc_start + 1000]
        for g in range(0, len(locs) - 3, 4):
            (t1, x1), (t2, y1), (t3, x2), (t4, y2) = locs[g : g + 4]
            if t4 - t1 != 3:
                continue  # not one box (e.g. a polygon or a broken sequence)
            cols = range(cell(x1), cell(x2) + 1)
            rows = range(cell(y1), cell(y2) + 1)
            targets.append((b, t1, [1 + r * grid + cell(x1) for r in rows]))
            targets.append((b, t2, [1 + cell(y1) * grid + c for c in cols]))
            targets.append((b, t3, [1 + r * grid + cell(x2) for r in rows]))
            targets.append((b, t4, [1 + cell(y2) * grid + c for c in cols]))
    return targets


def pointer_mask(labels: torch.Tensor, loc_start: int, grid: int, encoder_length: int) -> torch.Tensor:
    """`pointer_targets` as a CPU tensor (batch, label positions, encoder positions) of 0/1,
    built in one numpy pass so the loss needs no per-box indexing on the device."""
    mask = np.zeros((*labels.shape, encoder_length), np.float32)
    for b, t, cells in pointer_targets(labels.cpu(), loc_start, grid):
        mask[b, t, cells] = 1.0
    return torch.from_numpy(mask)


def pointer_loss(cross_attention: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of -log(attention mass on the target cells), heads averaged; 0 with no targets.

    `cross_attention` is (batch, heads, decoder positions, encoder positions); `mask` comes
    from `pointer_mask`.
    """
    mask = mask.to(cross_attention.device, cross_attention.dtype)
    picked = mask.sum(-1) > 0
    if not picked.any():
        return cross_attention.sum() * 0.0
    mass = (cross_attention.mean(dim=1) * mask).sum(-1)[picked]
    return -torch.log(mass.clamp(min=1e-6)).mean()


class DenseHead(nn.Module):
    """CenterNet-style head on the vision map: class heatmaps, centre offsets, log sizes."""

    def __init__(self, channels: int, num_classes: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.GELU())
        self.out = nn.Conv2d(channels, num_classes + 4, 1)
        nn.init.constant_(self.out.bias[:num_classes], -2.2)  # prior p=0.1, as CenterNet
        self.num_classes = num_classes

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(features))


def dense_targets(scenes: list[Scene], grid: int, size: int, classes: tuple[str, ...]):
    """Heatmap (one channel per class of `classes`), offset/size targets and their mask on a
    `grid` x `grid` map."""
    b = len(scenes)
    heat = np.zeros((b, len(classes), grid, grid), np.float32)
    reg = np.zeros((b, 4, grid, grid), np.float32)
    mask = np.zeros((b, grid, grid), np.float32)
    stride = size / grid
    yy, xx = np.mgrid[0:grid, 0:grid]
    for i, scene in enumerate(scenes):
        for box in scene.boxes:
            c = classes.index(box.label)
            cx, cy = (box.x1 + box.x2) / 2 / stride, (box.y1 + box.y2) / 2 / stride
            gx, gy = min(int(cx), grid - 1), min(int(cy), grid - 1)
            sigma = max(0.5, min(box.width, box.height) / stride / 4)
            g = np.exp(-((xx - gx) ** 2 + (yy - gy) ** 2) / (2 * sigma**2))
            heat[i, c] = np.maximum(heat[i, c], g)
            reg[i, :, gy, gx] = (cx - gx, cy - gy, math.log(box.width / stride), math.log(box.height / stride))
            mask[i, gy, gx] = 1.0
    return torch.from_numpy(heat), torch.from_numpy(reg), torch.from_numpy(mask)


def dense_loss(pred: torch.Tensor, heat, reg, mask, num_classes: int) -> torch.Tensor:
    """Focal loss on heatmaps (CenterNet) plus L1 on offsets and log sizes at centres."""
    logits = pred[:, :num_classes]
    p = torch.sigmoid(logits).clamp(1e-4, 1 - 1e-4)
    pos = heat.eq(1).float()
    pos_loss = -(torch.log(p) * (1 - p) ** 2 * pos).sum()
    neg_loss = -(torch.log(1 - p) * p**2 * (1 - heat) ** 4 * (1 - pos)).sum()
    n = pos.sum().clamp(min=1)
    l1 = (F.l1_loss(pred[:, num_classes:], reg, reduction="none").sum(1) * mask).sum() / mask.sum().clamp(min=1)
    return (pos_loss + neg_loss) / n + 0.5 * l1
