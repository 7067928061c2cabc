"""A grid sweep: one training run per combination of settings, one plot and one table for all.

Each point is an ordinary run folder under the sweep folder, named after its settings
(`lr=3e-06_r=16`). A killed sweep is continued by running the same command again: finished
runs return at once and the interrupted one resumes from its last checkpoint.
"""

from __future__ import annotations

import csv
import itertools
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from loomlens.config import TrainConfig, load_config
from loomlens.data.atomic import atomic_open, atomic_write
from loomlens.train.checkpoint import has_checkpoint
from loomlens.train.curves import plot_overlay, read_metrics

COLUMNS = ("run", "stopped", "steps", "seconds", "final_train_loss", "final_val_loss", "best_val_loss", "best_map50")


@dataclass
class SweepResult:
    """The runs' summaries and the files written."""

    rows: list[dict]
    table_md: Path
    table_csv: Path
    plot: Path


def grid(axes: Mapping[str, Sequence[str]]) -> list[dict[str, str]]:
    """Every combination of the axes' values, first axis slowest."""
    keys = list(axes)
    return [dict(zip(keys, values)) for values in itertools.product(*(axes[k] for k in keys))]


def distinct_values(axes: Mapping[str, Sequence[str]], shared: Mapping[str, str], config: str | Path | None,
                    log: Callable[[str], None] = print) -> dict[str, list[str]]:
    """`axes` (setting -> values) without each value that gives the settings an earlier value of
    its axis gave (with the `shared` ones and the YAML `config`): `1e-2` after `0.01`, `False`
    after `false`, a value repeated would train the same point again, in a folder of its own.
    Each value left out is logged, naming its option and the value kept."""
    kept: dict[str, list[str]] = {}
    for axis, values in axes.items():
        first: dict[str, str] = {}  # the settings a value gives -> the first value giving them
        for value in values:
            settings = load_config(TrainConfig, config, {**shared, axis: value}).model_dump_json()
            if settings in first:
                log(f"sweep: --{axis.replace('_', '-')} {value} is {first[settings]} again: that point trains once")
            else:
                first[settings] = value
        kept[axis] = list(first.values())
    return kept


def run_name(point: Mapping[str, str]) -> str:
    """A folder name for a grid point: `lr=3e-06_r=16` (characters other than `[\\w.=+-]` -> `-`)."""
    return "_".join(re.sub(r"[^\w.=+-]", "-", f"{k}={v}") for k, v in point.items()) or "run"


def summarize(run_dir: Path) -> dict:
    """One table row from a run's `metrics.csv`."""
    rows = read_metrics(run_dir / "metrics.csv") if (run_dir / "metrics.csv").exists() else []

    def values(key: str) -> list[float]:
        return [r[key] for r in rows if key in r]

    train, val, maps = values("train_loss"), values("val_loss"), values("map50")
    return {
        "run": run_dir.name,
        "steps": int(max(values("step"), default=0)),
        "seconds": round(max(values("seconds"), default=0.0), 1),
        "final_train_loss": train[-1] if train else None,
        "final_val_loss": val[-1] if val else None,
        "best_val_loss": min(val) if val else None,
        "best_map50": max(maps) if maps else None,
    }


def sweep(
    axes: Mapping[str, Sequence[str]],
    shared: Mapping[str, str],
    *,
    config: str | Path | None,
    out: Path,
    log: Callable[[str], None] = print,
) -> SweepResult:
    """Train every point of `axes` (setting -> values) with the `shared` settings and the YAML
    `config`, each in `out/<run_name>/`, a value spelling an earlier one's setting left out
    (`distinct_values`); write `out/sweep.md`, `out/sweep.csv` and
    `out/val_loss.png` (the runs' validation loss curves overlaid). Every point's settings are
    checked before the first trains, those of a point run before against what it can resume
    with (ValueError), and `out` must not be the data folder (FileExistsError); a point that
    diverges is a row saying so, and the sweep goes on with the others."""
    from loomlens.train.recipe import (TrainingDiverged, TrainingInterrupted, check_out_not_data, resumed_changes,
                                       train)

    out = Path(out)
    axes = distinct_values(axes, {**shared, "out": str(out)}, config, log)
    configs = {run_name(p): (p, load_config(TrainConfig, config, {**shared, **p, "out": str(out / run_name(p))}))
               for p in grid(axes)}
    check_out_not_data(out, next(iter(configs.values()))[1].data, "the sweep")  # its runs would lie in the data
    for _, cfg in configs.values():  # a point run before goes on only with settings it can resume with
        if has_checkpoint(cfg.out / "checkpoints" / "last"):
            resumed_changes(cfg, cfg.out)
    runs: dict[str, Path] = {}
    rows = []
    for name, (point, cfg) in configs.items():
        log(f"sweep: {name}")
        try:
            stopped = train(cfg, resume=has_checkpoint(cfg.out / "checkpoints" / "last"), log=log).stopped
        except TrainingDiverged as err:
            log(f"sweep: {name} diverged ({err}); going on with the other points")
            stopped = "diverged"
        except TrainingInterrupted as err:  # the sweep, not the one run, is what goes on
            raise TrainingInterrupted(f"{err}. To go on with the sweep, run the same sweep command again: finished "
                                      "points return at once and this one resumes") from None
        runs[name] = cfg.out
        rows.append({**point, **summarize(cfg.out), "stopped": stopped})

    columns = [*axes, *COLUMNS]
    table_csv, table_md = out / "sweep.csv", out / "sweep.md"
    with atomic_open(table_csv) as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)
    cells = [[_fmt(row[c]) for c in columns] for row in rows]
    atomic_write(table_md, "\n".join(["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
                                      + ["| " + " | ".join(c) + " |" for c in cells]) + "\n")
    plot = plot_overlay(runs, out / "val_loss.png", "val_loss")
    return SweepResult(rows, table_md, table_csv, plot)


def _fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)
