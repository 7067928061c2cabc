"""The one reader of a training run folder: what it was trained on and where its adapters are.

A run folder (docs/architecture.md) holds `config.yaml` (its `model` is the base it was trained
on, its `tasks` what it was trained for), `classes.txt`, `data_summary.json` (the training
data's `summary.json`, with the tile size it was cut to), `crop.json` when training's defect
crop showed frames longer than the input a window at a time (the window's edge), optionally `regions.yaml`
(region rules) and `checkpoints/best|last/` (each a peft adapter folder). `Run(path)` accepts
the run folder, a checkpoint folder inside it, or a bare adapter folder that belongs to no run;
train, eval, predict, serve and merge all read a run through it. Imports only `data`, yaml and the
stdlib, so every floor above `data` may use it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import yaml

from loomlens.data.atomic import holds_files
from loomlens.data.yolo import CLASSES_FILE, read_class_names

__all__ = ["ADAPTER_CONFIG", "CONFIG", "CROP", "DATA_SUMMARY", "RULES_FILE", "Run", "check_not_below_file",
           "check_output_folder"]

#: The resolved training config a run keeps.
CONFIG = "config.yaml"
#: The training data's summary.json, as a run keeps it.
DATA_SUMMARY = "data_summary.json"
#: What training's defect crop did: `{"window": edge}`, the input edge it showed frames longer than it at.
CROP = "crop.json"
#: Where a run keeps its region rules (`loomlens.predict.regions`).
RULES_FILE = "regions.yaml"
#: The file that makes a folder a peft adapter.
ADAPTER_CONFIG = "adapter_config.json"
#: How far above the given path a run folder is looked for (a checkpoint is two below its run).
_LEVELS_UP = 3


def check_not_below_file(folder: Path, what: str) -> None:
    """Raise FileExistsError naming the file when a parent of `folder` (the `what` to write, as
    the user would name it) is a file, so that the folder can never be made; checked before a
    model loads, since the OS's own "Not a directory" names neither the folder nor the fix."""
    blocker = next((p for p in Path(folder).parents if p.is_file()), None)
    if blocker is not None:
        raise FileExistsError(f"{blocker} is a file, so {what} {folder} cannot be made below it: give another folder")


def check_output_folder(folder: Path, what: str, fix: str, ours: Callable[[Path], bool] | None = None) -> None:
    """Raise FileExistsError naming `folder` (the `what` a command writes, as the user would name
    it) where it cannot take the output: it is a file, lies below one (`check_not_below_file`),
    or holds files and is not an earlier output of the same kind (`ours(folder)`), which the
    command would write among; `fix` says what to do then. A new or empty folder passes, empty
    as `data.atomic.holds_files` has it (what a file manager hides, `.DS_Store`, does not count).
    Checked before a model loads."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"{what} {folder} is a file; give a folder (a new one is made)")
    check_not_below_file(folder, what)
    if folder.is_dir() and holds_files(folder) and not (ours is not None and ours(folder)):
        raise FileExistsError(f"{what} {folder} already exists and is not empty: {fix}")


def _read_config(file: Path) -> dict:
    """The settings a run's `config.yaml` at `file` records ({} for an empty one). Raises
    ValueError on one line naming the file, the line where YAML gives one, and the fix, when
    it is not YAML settings (a mapping): every command that reads a run prints it as it is."""
    fix = ("it holds the settings `loomlens train` wrote for the run: restore it from a copy of the run folder, or "
           "fix it by hand; in a folder that is no loomlens run, move it away or give another folder")
    try:
        config = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{file}:{mark.line + 1}" if mark else str(file)
        raise ValueError(f"{where}: not valid YAML ({getattr(err, 'problem', None) or err}): {fix}") from None
    if config is not None and not isinstance(config, dict):
        raise ValueError(f"{file} holds a {type(config).__name__}, not a run's settings: {fix}")
    return config or {}


class Run:
    """What a run folder holds, read on demand. `path`: the folder given; `folder`: the run
    folder it belongs to (the nearest of `path` and its parents up to `_LEVELS_UP` levels that
    holds `config.yaml`), or None for a bare adapter; `config`: that config as a dict ({}
    without a run). ValueError naming the file and the fix when that config.yaml holds no
    settings (`_read_config`)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.folder = next(
            (p for p in (self.path, *self.path.parents[:_LEVELS_UP]) if (p / CONFIG).exists()), None
        )
        self.config: dict = _read_config(self.folder / CONFIG) if self.folder else {}

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"

    @property
    def base(self) -> str | None:
        """The base model the run was trained on (config `model`), None without a run."""
        model = self.config.get("model")
        return None if model is None else str(model)

    @property
    def classes(self) -> list[str]:
        """The run's class names (`classes.txt`), empty when it has none or there is no run."""
        return read_class_names(self.folder / CLASSES_FILE) if self.folder else []

    @property
    def tasks(self) -> frozenset[str]:
        """The tasks the run trained: its config's `tasks`, or (empty = all in the data) those
        found in its training JSONL (config `data`, relative to the working directory); `od`
        when neither says, and for a bare adapter."""
        if self.config.get("tasks"):
            return frozenset(self.config["tasks"])
        data = Path(self.config.get("data") or "")
        train = (data if data.is_absolute() else Path.cwd() / data) / "train.jsonl"
        if self.folder is not None and train.exists():
            with open(train, encoding="utf-8") as f:
                return frozenset(json.loads(line).get("task", "od") for line in f if line.strip())
        return frozenset({"od"})

    @property
    def crop(self) -> int | None:
        """The window edge training's defect crop showed frames longer than the input at (`crop.json`), None
        when it showed every frame whole (no crop, no frame longer than the input, or a run from before it)."""
        record = self.folder / CROP if self.folder else None
        return json.loads(record.read_text()).get("window") if record and record.exists() else None

    @property
    def tile(self) -> int | None:
        """The tile edge prediction's `tile="auto"` and `loomlens eval` tile frames longer than it at
        (validation too, for a cropping run), None for a run that only ever saw whole frames:
        the edge its training data was cut to (`convert --tile`), else its defect crop's
        window, since such a run learnt defects at that scale and a figure from whole squeezed
        frames would say nothing of what it finds on the line."""
        summary = self.folder / DATA_SUMMARY if self.folder else None
        cut = json.loads(summary.read_text()).get("tile") if summary and summary.exists() else None
        return cut or self.crop

    @property
    def most_boxes(self) -> int | None:
        """The most boxes one image (or tile) of the run's converted data holds, any split
        (`data_summary.json`); None for a bare adapter or a summary from before it was kept."""
        summary = self.folder / DATA_SUMMARY if self.folder else None
        splits = json.loads(summary.read_text()).get("splits", {}) if summary and summary.exists() else {}
        counts = [s["most_boxes"] for s in splits.values() if "most_boxes" in s]
        return max(counts) if counts else None

    @property
    def views(self) -> tuple[str, ...]:
        """The mirrors the run was trained on, as `infer.tta` views: "" (as is), "h" when its
        pictures were mirrored left-right (online augmentation, or `convert --flip` copies),
        "v" top-bottom, "hv" both; ("",) for a bare adapter or a run that saw none."""
        augment = self.config.get("augment") or {}  # none: a run from before online augmentation
        augment = {"enabled": augment} if isinstance(augment, bool) else augment
        # Training augments only what it encodes afresh: cached features are of the plain pictures
        # (`train.recipe.datasets`). Missing keys take `TrainConfig`'s defaults.
        cached = bool((self.config.get("speed") or {}).get("cache_image_features"))
        online = bool(augment) and augment.get("enabled", True) and not cached
        summary = self.folder / DATA_SUMMARY if self.folder else None
        copied = bool(summary and summary.exists() and json.loads(summary.read_text()).get("flip"))
        h = copied or (online and augment.get("hflip", 0.5) > 0)
        v = online and augment.get("vflip", 0.5) > 0
        return ("",) + ("h",) * h + ("v",) * v + ("hv",) * (h and v)

    @property
    def rules(self) -> Path | None:
        """The run's region rules file (`regions.yaml`), None when it has none."""
        rules = self.folder / RULES_FILE if self.folder else None
        return rules if rules and rules.exists() else None

    def adapter(self, checkpoint: str = "best") -> Path:
        """The adapter folder meant: `path` itself if it holds `adapter_config.json`, else
        `path/checkpoints/<checkpoint>` (checkpoint `best` or `last`). Raises
        FileNotFoundError saying what to do."""
        for candidate in (self.path, self.path / "checkpoints" / checkpoint):
            if (candidate / ADAPTER_CONFIG).exists():
                return candidate
        hint = "train one with `loomlens train`"
        wanted = self.path / "checkpoints" / checkpoint
        if checkpoint not in ("best", "last") and (self.path / "checkpoints").is_dir():
            hint = f"--checkpoint takes best or last, not {checkpoint!r}"
        elif wanted.is_dir() and any(wanted.iterdir()):  # there, but incomplete: a copy that broke off
            hint = f"checkpoints/{checkpoint}/ lacks {ADAPTER_CONFIG}: copy the run folder again"
        elif checkpoint == "best" and (self.path / "checkpoints" / "last" / ADAPTER_CONFIG).exists():
            hint = "no evaluation ran, so there is no best/: use --checkpoint last"
        elif checkpoint == "last" and (self.path / "checkpoints" / "best" / ADAPTER_CONFIG).exists():
            hint = "it holds best/ only: use --checkpoint best"
        elif self.folder == self.path:  # a run still training, or one stopped before its first save
            hint = ("the run has saved no checkpoint yet: training saves checkpoints/last/ at its first evaluation "
                    "and when it stops; wait for that, or train a run that stopped before it again with "
                    f"--out {self.path}")
        elif not self.path.exists():
            hint = "no such folder: give a run folder, or train one with `loomlens train`"
        elif runs := sorted(found.parent.name for found in self.path.glob(f"*/{CONFIG}")):  # a sweep's folder
            hint = f"it holds the runs {', '.join(runs[:6])}{', ...' if len(runs) > 6 else ''}: give one of them"
        raise FileNotFoundError(
            f"no adapter at {self.path}: expected {ADAPTER_CONFIG} there or in checkpoints/{checkpoint}/ ({hint})"
        )

    def recorded_base(self, checkpoint: str = "best") -> str:
        """The base the adapter was trained on: the run's `base` when there is a run (`tiny`
        stays portable), else the path peft recorded in the adapter's config."""
        if self.base is not None:
            return self.base
        return json.loads((self.adapter(checkpoint) / ADAPTER_CONFIG).read_text())["base_model_name_or_path"]
