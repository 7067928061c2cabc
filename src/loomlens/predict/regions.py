"""Region rules: per-class regions of interest and score thresholds, from YAML, after detection.

The camera above a loom is fixed, so some defects can only appear in some parts of the frame
(the seed hard-coded "broken-weft only in the left part" in its inference code). Here such
knowledge is data, stored with the run (`RUN_DIR/regions.yaml`) and applied by the predictor:

    min_score: 0.2              # default threshold for every class
    classes:
      broken-weft:
        min_score: 0.35
        regions:                # keep a box whose centre lies inside one of these polygons
          - [[0, 0], [0.45, 0], [0.45, 1], [0, 1]]   # (x, y) as fractions of width, height
      drop: {min_score: 0.25}

A class with no `regions` is kept anywhere; a class not listed gets the default threshold.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import yaml
from matplotlib.path import Path as PolygonPath
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from loomlens.config import SettingsLoader
from loomlens.data.atomic import atomic_write
from loomlens.data.records import Box
from loomlens.run import RULES_FILE

Point = tuple[float, float]


class ClassRule(BaseModel):
    """The rule of one class: an optional threshold and optional regions of interest."""

    model_config = ConfigDict(extra="forbid")

    min_score: float | None = Field(None, ge=0, le=1)
    regions: list[list[Point]] = Field(default_factory=list)

    @field_validator("regions")
    @classmethod
    def _polygons(cls, regions: list[list[Point]]) -> list[list[Point]]:
        for polygon in regions:
            if len(polygon) < 3:
                raise ValueError(f"a region needs at least 3 points, got {polygon}")
            if not all(0 <= v <= 1 for point in polygon for v in point):
                raise ValueError(f"region points are fractions of the frame (0..1), got {polygon}")
            # Points on one line enclose no centre: the class's every box would be dropped.
            if np.linalg.matrix_rank(np.array(polygon) - np.mean(polygon, axis=0), tol=1e-9) < 2:
                raise ValueError(f"a region needs an area, but its points lie on one line: {polygon}")
        return regions


class RegionRules(BaseModel):
    """All the rules: a default threshold and per-class rules (see the module docstring)."""

    model_config = ConfigDict(extra="forbid")

    min_score: float = Field(0.0, ge=0, le=1)
    classes: dict[str, ClassRule] = Field(default_factory=dict)

    def threshold(self, label: str) -> float:
        """The score threshold boxes of class `label` are held to: its rule's, else the default."""
        rule = self.classes.get(label)
        return self.min_score if rule is None or rule.min_score is None else rule.min_score

    def keep(self, box: Box, width: int, height: int) -> bool:
        """Whether `box` (pixels of a `width` x `height` frame) passes its class's rule."""
        rule = self.classes.get(box.label, ClassRule())
        if box.score is not None and box.score < self.threshold(box.label):
            return False
        centre = ((box.x1 + box.x2) / 2 / width, (box.y1 + box.y2) / 2 / height)
        return not rule.regions or any(PolygonPath(p).contains_point(centre) for p in rule.regions)

    def apply(self, boxes: Sequence[Box], width: int, height: int) -> list[Box]:
        """The boxes that pass their rules."""
        return [b for b in boxes if self.keep(b, width, height)]

    def check_classes(self, classes: Sequence[str], source: str = "the region rules") -> None:
        """Raise ValueError when a rule names a class not in `classes` (the run's): a misspelt
        name (`drops:` for `drop`) would leave that class's boxes unfiltered without a word."""
        unknown = sorted(set(self.classes) - set(classes))
        if classes and unknown:
            raise ValueError(f"{source} name class(es) {', '.join(map(repr, unknown))} that the model does not "
                             f"know (its classes: {', '.join(classes)}); spell them as in its classes.txt")


def _line(document: yaml.Node | None, loc: Sequence[str | int]) -> int | None:
    """The line (1-based) of the YAML node at `loc` (keys and list indices) in `document`, or
    of the deepest one of its parents found; None for the whole file."""
    node, line = document, None
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            node = next((value for k, value in node.value if k.value == str(key)), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
        else:
            node = None
        if node is None:
            break
        line = node.start_mark.line + 1
    return line


def _refusal(err: ValidationError, document: yaml.Node | None) -> str:
    """What pydantic refused, on one line: the first fields' key, line and what is wrong."""
    parts, errors = [], err.errors()
    for e in errors[:3]:
        key, line = ".".join(map(str, e["loc"])) or "the file", _line(document, e["loc"])
        message = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            message = "not a key the rules take (min_score, classes; per class min_score, regions)"
        elif not isinstance(e.get("input"), (dict, list)):
            message += f", got {e.get('input')!r}"
        parts.append(f"{'' if line is None else f'line {line}, '}{key}: {message}")
    return "; ".join(parts) + (f"; and {len(errors) - 3} more" if len(errors) > 3 else "")


def load_rules(path: str | Path) -> RegionRules:
    """Read and validate a rules YAML file. Raises ValueError on one line naming the file and
    the fix, with the line and key of a YAML error or of each field the rules refused."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        reason = "not UTF-8 text" if isinstance(err, UnicodeDecodeError) else err.strerror or str(err)
        raise ValueError(f"region rules {path} cannot be read ({reason}): give the rules YAML file "
                         "(--regions, or a run's regions.yaml)") from None
    try:
        document = yaml.compose(text, Loader=yaml.SafeLoader)
        return RegionRules.model_validate(yaml.load(text, Loader=SettingsLoader) or {})  # a key twice: refused
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = "" if mark is None else f"line {mark.line + 1}: "
        raise ValueError(f"region rules {path}: {where}not valid YAML ({getattr(err, 'problem', None) or err}); "
                         "fix it as the example in docs/evaluate-and-predict.md") from None
    except ValidationError as err:
        raise ValueError(f"region rules {path}: {_refusal(err, document)}; fix it as the example in "
                         "docs/evaluate-and-predict.md") from None


def save_rules(rules: RegionRules, path: str | Path, header: str = "") -> Path:
    """Write `rules` as YAML to `path` (a folder gets `regions.yaml`), after `header` (comment
    lines); returns the file."""
    path = Path(path)
    if path.is_dir():
        path = path / RULES_FILE
    atomic_write(path, header + yaml.safe_dump(rules.model_dump(mode="json", exclude_defaults=True), sort_keys=False))
    return path
