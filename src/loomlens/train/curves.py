"""What a run shows while it trains: `metrics.csv`, `curves/*.png`, TensorBoard `tb/`.

`metrics.csv` has one row per optimizer step (`train_loss`, `lr`, `grad_norm`) and one per
evaluation (`val_loss`, `map50`, ..., `auroc`: the val frames' OK/NG AUROC by the model's
defect probability), with blank cells where a row has no value. The plots
are redrawn from the CSV after each evaluation, like the seed's loss curves.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping
from pathlib import Path

from loomlens.data.atomic import atomic_open

FIELDS = ("step", "epoch", "seconds", "lr", "train_loss", "grad_norm", "val_loss", "map50", "map50_95", "map75",
          "best_f1", "empty_on_defects", "auroc", "score", "event")
#: The one text column: what the run did at that step (a rollback, an early stop, ...).
TEXT_FIELDS = ("event",)


class MetricsLog:
    """Append rows to `metrics.csv` (and TensorBoard when installed); rows past `resume_step`
    from a killed run are dropped on open, since the resumed run will redo those steps."""

    def __init__(self, run_dir: Path, resume_step: int | None = None, tensorboard: bool = True) -> None:
        self.path = Path(run_dir) / "metrics.csv"
        rows = read_metrics(self.path) if resume_step is not None and self.path.exists() else []
        rows = [r for r in rows if r["step"] <= (resume_step or 0)]
        with atomic_open(self.path) as f:  # a kill here leaves the history as it was
            writer = csv.DictWriter(f, FIELDS)
            writer.writeheader()
            writer.writerows({k: _cell(r.get(k)) for k in FIELDS} for r in rows)
        self.writer = _tensorboard(Path(run_dir) / "tb", purge_step=resume_step) if tensorboard else None

    def log(self, row: Mapping[str, float | int | None]) -> None:
        """Append one row (keys from `FIELDS`; others are ignored) and mirror it to TensorBoard."""
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, FIELDS).writerow({k: _cell(row.get(k)) for k in FIELDS})
        if self.writer is not None:
            for key in FIELDS[3:]:
                if row.get(key) is not None and key not in TEXT_FIELDS:
                    group = "train" if key in ("lr", "train_loss", "grad_norm") else "val"
                    self.writer.add_scalar(f"{group}/{key}", row[key], int(row["step"]))
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _tensorboard(path: Path, purge_step: int | None):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is a dev extra; the CSV and plots do not need it
        return None
    return SummaryWriter(str(path), purge_step=purge_step)


def _cell(value) -> str:
    if value is None or value == "":
        return ""
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def read_metrics(path: Path) -> list[dict[str, float]]:
    """The rows of a `metrics.csv`, as dicts of floats (the `event` text as it is; blank cells
    left out)."""
    with open(path, newline="") as f:
        return [{k: v if k in TEXT_FIELDS else float(v) for k, v in row.items() if v not in ("", None)}
                for row in csv.DictReader(f)]


def _series(rows: list[dict[str, float]], key: str) -> tuple[list[float], list[float]]:
    points = [(r["step"], r[key]) for r in rows if key in r and math.isfinite(r[key])]
    return [p[0] for p in points], [p[1] for p in points]


def _smooth(values: list[float], weight: float = 0.9) -> list[float]:
    """Exponential moving average, debiased (as TensorBoard's) so early points are not
    pulled towards the first value."""
    out, last = [], 0.0
    for n, v in enumerate(values, start=1):
        last = weight * last + (1 - weight) * v
        out.append(last / (1 - weight**n))
    return out


def _finish(ax, **legend) -> None:
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # an empty plot (no evaluation yet) has no legend
        ax.legend(**legend)


def plot_run(run_dir: Path) -> list[Path]:
    """Draw `curves/loss.png` (train loss, smoothed, and val loss) and `curves/map.png`
    (val mAP50, mAP50-95 and the OK/NG AUROC) from the run's `metrics.csv`; returns the files
    written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows = read_metrics(run_dir / "metrics.csv")
    out_dir = run_dir / "curves"
    out_dir.mkdir(parents=True, exist_ok=True)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    steps, train = _series(rows, "train_loss")
    if steps:
        ax.plot(steps, train, color="tab:blue", alpha=0.25, linewidth=0.8)
        ax.plot(steps, _smooth(train), color="tab:blue", label="train loss (smoothed)")
    steps, val = _series(rows, "val_loss")
    if steps:
        ax.plot(steps, val, "o-", color="tab:orange", label="val loss")
    ax.set(xlabel="optimizer step", ylabel="cross-entropy per token", title=f"loss: {run_dir.name}")
    _finish(ax)
    fig.tight_layout()
    fig.savefig(out_dir / "loss.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, label in (("map50", "val mAP50"), ("map50_95", "val mAP50-95"), ("auroc", "val OK/NG AUROC")):
        steps, values = _series(rows, key)
        if steps:
            ax.plot(steps, values, "o-", label=label)
    ax.set(xlabel="optimizer step", ylabel="mAP, AUROC", ylim=(0, 1), title=f"detection: {run_dir.name}")
    _finish(ax, loc="lower right")
    fig.tight_layout()
    fig.savefig(out_dir / "map.png", dpi=110)
    plt.close(fig)
    return [out_dir / "loss.png", out_dir / "map.png"]


def plot_overlay(runs: Mapping[str, Path], out: Path, key: str = "val_loss") -> Path:
    """One plot of `key` against step for several runs (`name -> run folder`), for sweeps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for name, run_dir in runs.items():
        path = Path(run_dir) / "metrics.csv"
        if path.exists():
            steps, values = _series(read_metrics(path), key)
            ax.plot(steps, values, "o-", markersize=3, label=name)
    ax.set(xlabel="optimizer step", ylabel=key.replace("_", " "), title=f"{key.replace('_', ' ')} per run")
    _finish(ax, fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
