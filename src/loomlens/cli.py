"""The loomlens command line: a thin layer over the stages.

Every command takes plain flags (`--data DIR`) or ultralytics-style `key=value` words
(`data=DIR`); both spellings are equivalent. Heavy imports happen inside each command so
that `loomlens --help` stays fast.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.markup import escape

from loomlens.config import DEVICE_HELP, INFER_BATCH_SIZE

if TYPE_CHECKING:  # imported for annotations only: the commands import them when run
    from loomlens.events import EventStore
    from loomlens.watch import Alerter, Watcher

app = typer.Typer(
    name="loomlens",
    help="Fine-tune Florence-2 with LoRA to find fabric defects, and run it on the line.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

BACKEND_HELP = ("torch, or onnx: run a folder `loomlens export` wrote (pass it as --model) on onnxruntime "
                "(CPU; CUDA where present), with --precision fp32 or int8.")
TTA_HELP = ("Test-time augmentation of od: auto (also look through the mirrors the run was trained on and fuse "
            "the boxes, for each picture or tile the first look may find a defect in: more accurate; four views, "
            "the default recipe's, take up to 3-4x the time), on (all four views), off (once, fastest). Scores "
            "change with it: take thresholds from `eval` with the same --tta.")
@app.callback()
def _before_any_command() -> None:
    """Settings of the whole process, from the environment: the pixel limit for large frames."""
    from loomlens.data.sanitize import apply_pixel_limit

    try:
        apply_pixel_limit()
    except ValueError as err:
        raise _fail(str(err)) from None


PRECISION_HELP = ("Weights' dtype: auto (bf16 where the device computes it natively: AMX or AVX512-BF16 "
                  "CPUs, recent GPUs; else fp32), fp32 or bf16.")


def _expand_key_value_args(argv: list[str]) -> list[str]:
    """Turn `key=value` words of a command line (less the program) into `--key value`
    (ultralytics style) where `key` is an option of the command; never a word that is an
    existing file. The rest is left alone: file names such as `frame=7.jpg` above all, and the
    settings train and sweep take as `key=value` words (`_extra_overrides`), which keep the
    name as typed for their errors."""
    import typer.main

    name = next((arg for arg in argv if not arg.startswith("-")), None)
    command = typer.main.get_command(app).commands.get(name) if name else None  # type: ignore[attr-defined]
    if command is None:
        return list(argv)
    options = {opt[2:] for param in command.params for opt in param.opts if opt.startswith("--")}
    # A flag's word: `dora=true` -> --dora, `dora=false` -> --no-dora (its off switch).
    flags = {opt[2:]: param for param in command.params if getattr(param, "is_flag", False)
             for opt in param.opts if opt.startswith("--")}
    out: list[str] = []
    for arg in argv:
        key, eq, value = arg.partition("=")
        option = key.replace("_", "-")
        if not (eq and not arg.startswith("-") and option in options and not Path(arg).exists()):
            out.append(arg)
        elif option in flags and value.lower() in ("true", "false", "yes", "no", "on", "off", "1", "0"):
            on = value.lower() in ("true", "yes", "on", "1")
            off = next(iter(flags[option].secondary_opts), None)
            out += [f"--{option}"] if on else [off] if off else []
        else:
            out += [f"--{option}", value]
    return out


def _fail(message: str, details: list[str] | None = None) -> SystemExit:
    """Print a user error (and up to 30 detail lines) to stderr; return the exit to raise. A
    `SystemExit(1)`, not `typer.Exit`: that one is a RuntimeError, which a command's own
    `except RuntimeError` around the call would catch and report again as "error: 1"."""
    typer.secho(f"error: {message}", fg="red", err=True)
    for line in (details or [])[:30]:
        typer.echo(f"  {line}", err=True)
    if details and len(details) > 30:
        typer.echo(f"  ... and {len(details) - 30} more", err=True)
    return SystemExit(1)


@app.command("convert")
def convert_command(
    src: Path = typer.Argument(..., help="Annotated dataset folder with its images: LabelImg VOC *.xml or YOLO "
                               "*.txt with classes.txt, an ultralytics/Roboflow data.yaml, COCO *.json, CVAT for "
                               "images *.xml or a Label Studio JSON export."),
    out: Path | None = typer.Argument(None, help="Output folder: train.jsonl, val.jsonl (test.jsonl), classes.txt, "
                                      "summary.json, images/ for flipped copies and tiles."),
    out_option: Path | None = typer.Option(None, "--out", help="The output folder, as an option (as `train` and "
                                           "`predict` take it)."),
    fmt: str = typer.Option("auto", "--format", help="auto, voc, cvat, yolo, coco or labelstudio."),
    tasks: str = typer.Option("od", help="Comma-separated: od, dense_region_caption, phrase_grounding, caption."),
    order: str = typer.Option("grouped", help="grouped: all OD samples, then dense region captions, then "
                              "grounding, then captions (the seed's best); interleaved: each image's tasks "
                              "together."),
    flip: bool = typer.Option(False, "--flip", help="Add a horizontally flipped copy of every image "
                              "(in its original's split)."),
    tile: str = typer.Option("auto", help="Cut frames longer than N px into N px tiles too, for small defects "
                             "(tiles stay in their frame's split; whole frames are kept); a run trained on them "
                             "predicts such frames in tiles of that size. auto: tiles only where squeezing the "
                             "frames to the default model's 256 px input would leave a quarter of the boxes under "
                             "8 px, as large as keeps them in sight; off: never."),
    tile_overlap: float = typer.Option(0.25, help="Share of a tile its neighbours overlap, in [0, 0.9)."),
    val_fraction: float = typer.Option(0.17, help="Share of images for validation (drawn only where the "
                                       "dataset has no val split of its own)."),
    test_fraction: float = typer.Option(0.0, help="Share of images for a test split (0: none; drawn from the "
                                        "training images where the dataset has a split of its own but no test)."),
    seed: int = typer.Option(0, help="Seed of the split and the sample order."),
    resplit: bool = typer.Option(False, "--resplit", help="Ignore the dataset's own split (train/ valid/ test/ "
                                 "folders, data.yaml lists, CVAT subsets) and draw a new one."),
    group_by: str | None = typer.Option(None, help="Keep groups of look-alike frames in one split: folder, "
                                        "regex:PATTERN (first group, else the match, in the image path) or "
                                        "time:SECONDS (bursts by the timestamp in the name, else file mtime). "
                                        "Default: frames saved from one video (NAME_f000123) and a Roboflow "
                                        "export's copies of one picture (NAME_jpg.rf.HASH) stay together."),
    copy_images: bool = typer.Option(False, "--copy-images", help="Copy the images into OUT/images/originals/ "
                                     "so OUT can be moved on its own."),
    link_images: bool = typer.Option(False, "--link-images", help="As --copy-images, with hard links where the "
                                     "file system allows (no extra space)."),
    strict: bool = typer.Option(False, "--strict", help="Fail (exit 1, nothing written) on any input problem "
                                "instead of skipping and reporting it."),
    keep_empty: bool = typer.Option(False, "--keep-empty", help="Keep an image whose every box was dropped as "
                                    "a defect-free one (by default it is left out: it would teach the model to "
                                    "miss those defects)."),
    unlabelled_clean: bool = typer.Option(False, "--unlabelled-clean", help="Keep the images no annotation names "
                                          "as defect-free (a folder of good frames without label files; by "
                                          "default each is reported and left out)."),
) -> None:
    """Convert LabelImg VOC / YOLO, ultralytics, COCO, CVAT or Label Studio annotations to Florence-2 JSONL samples.

    Bad boxes, files, images and paths are reported (file, line, fix) and skipped; the rest converts.
    """
    from rich.console import Console
    from rich.progress import Progress

    from loomlens.data.convert import ConvertError, convert
    if copy_images and link_images:
        raise _fail("give --copy-images or --link-images, not both")
    if (out is None) == (out_option is None):
        raise _fail("give the output folder once: `loomlens convert SRC OUT` or `loomlens convert SRC --out OUT`")
    out = out or out_option
    tile_edge = _tile_option(tile)
    console = Console()
    try:
        with Progress(console=console, transient=True) as bar:
            job = bar.add_task("reading", total=None)
            stages = {"check": "checking images", "images": _image_work(flip, tile_edge)}
            report = convert(
                src, out, format=fmt, tasks=[t.strip() for t in tasks.split(",") if t.strip()], order=order,
                flip=flip, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed, strict=strict,
                tile=tile_edge, tile_overlap=tile_overlap, keep_empty=keep_empty, unlabelled_clean=unlabelled_clean,
                resplit=resplit, group_by=group_by,
                images="copy" if copy_images else "link" if link_images else "refer",
                progress=lambda stage, done, total: bar.update(job, completed=done, total=total,
                                                               description=stages[stage]),
            )
    except ConvertError as err:
        raise _fail(str(err), [str(p) for p in err.problems]) from None
    _print_convert_report(console, report, src, tile=tile)
    console.print(f"{len(report.problems)} problem(s); wrote {escape(str(out))}/train.jsonl, val.jsonl"
                  f"{', test.jsonl' if 'test' in report.splits else ''}, classes.txt, summary.json",
                  highlight=False)


def _image_work(flip: bool, tile: int | str | None) -> str:
    """What `convert`'s progress bar says while it decodes, flips and tiles the images."""
    tiling = ["tiling where needed"] if tile == "auto" else ["tiling"] if tile else []
    return " and ".join(["decoding", *(["flipping"] if flip else []), *tiling]) + " images"


def _tile_option(text: str) -> int | str | None:
    """`convert --tile`: "auto", "off" (None) or a whole number of pixels, else a clear error."""
    word = text.strip().lower()
    if word in ("auto", "off"):
        return None if word == "off" else word
    try:
        return int(word)
    except ValueError:
        raise _fail(f"--tile takes auto, off or a tile edge in pixels (e.g. --tile 256), not {text!r}") from None


def _print_convert_report(console, report, src: Path, tile: str = "auto", max_problems: int = 20) -> None:
    """Print a `ConvertReport`: counts per split and class, as a table with one column per
    class, or one row per class when that would not fit the console (12 classes cut every
    column to a letter in 80 columns); then how the split was made, what the `--tile` given
    (`tile`, as typed) did, and the first `max_problems` problems, printed
    verbatim (a problem's text may hold brackets, which rich would take for markup), and the
    classes with few boxes to learn from (`thin_classes`)."""
    from rich.table import Table

    from loomlens.data.convert import MIN_TRAIN_BOXES

    counts = ["images", *(["tiles"] if report.tile else []), "samples"]
    rows = [*counts, *report.classes]
    per_split = {name: [*(split[c] for c in counts), *(split["boxes_per_class"].get(c, 0) for c in report.classes)]
                 for name, split in report.splits.items()}
    title = escape(f"{report.images} images ({report.negatives} defect-free) from {src} [{report.format}]")
    table = Table(title=title)
    for column in ("split", *rows):
        table.add_column(escape(column), justify="left" if column == "split" else "right")
    for name, values in per_split.items():
        table.add_row(name, *map(str, values))
    if console.measure(table, options=console.options.update_width(10**6)).maximum > console.width:
        table = Table(title=title)
        for column in ("", *per_split):
            table.add_column(column, justify="left" if not column else "right")
        for i, row in enumerate(rows):
            table.add_row(escape(row), *(str(values[i]) for values in per_split.values()),
                          end_section=row == counts[-1])
    console.print(table)
    kept, drawn = report.split.get("kept", {}), report.split.get("drawn", {})
    if kept:
        lists = f" from {', '.join(report.split['from'])}" if report.split.get("from") else ""
        counts = ", ".join(f"{k} {v}" for k, v in sorted(kept.items()))
        console.print(f"kept the dataset's own split{lists} ({counts}); "
                      f"{sum(drawn.values())} image(s) split at random (--resplit redraws all)", highlight=False)
    if report.tile_reason:
        console.print(f"--tile {tile}: {report.tile_reason}", highlight=False)
    if report.thin_classes:
        few = ", ".join(f"{name} {n}" for name, n in report.thin_classes.items())
        console.print(f"[yellow]few boxes to learn from[/] in the train split's own frames (mirrors and tiles not "
                      f"counted): {escape(few)}; a class with under {MIN_TRAIN_BOXES} is seldom found, or found under "
                      "a look-alike's name: label more frames that show it", highlight=False)
    for problem in report.problems[:max_problems]:
        console.print(f"[yellow]problem[/] {escape(str(problem))}", highlight=False)
    if len(report.problems) > max_problems:
        console.print(f"... and {len(report.problems) - max_problems} more problems (all in summary.json)")


@app.command("synth")
def synth_command(
    out: Path = typer.Argument(..., help="Output folder: images/*.jpg and annotations/*.xml (LabelImg VOC)."),
    images: int = typer.Option(200, min=0, help="Number of frames."),
    seed: int = typer.Option(0, min=0, help="Seed: the camera view and every frame; same seed, same bytes."),
    size: str = typer.Option("768x432", help="Frame size WxH, up to 2560x1440."),
    negatives: float = typer.Option(0.3, min=0.0, max=1.0, help="Least share of defect-free frames."),
) -> None:
    """Generate a synthetic loom dataset: camera frames with broken-weft, drop and wrinkle defects."""
    import time
    from collections import Counter

    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    from loomlens.data.synth import synthesize

    try:
        width, height = (int(v) for v in size.lower().split("x"))
    except ValueError:
        raise _fail(f"--size must look like 768x432, got {size!r}") from None
    console = Console()
    started = time.perf_counter()
    try:
        with Progress(console=console, transient=True) as bar:
            job = bar.add_task("drawing frames", total=images)
            records = synthesize(out, images=images, seed=seed, size=(width, height), negative_fraction=negatives,
                                 progress=lambda done, _total: bar.update(job, completed=done))
    except (ValueError, OSError) as err:  # OSError: OUT is a file, a read-only or full disk
        raise _fail(str(err)) from None
    seconds = time.perf_counter() - started
    counts = Counter(b.label for r in records for b in r.boxes)
    rate = len(records) / max(seconds, 1e-9)
    table = Table(title=f"{len(records)} frames {width}x{height} in {out} ({rate:.0f}/s)")
    for column in ("frames", "defect-free", *sorted(counts)):
        table.add_column(column, justify="right")
    table.add_row(str(len(records)), str(sum(not r.boxes for r in records)), *(str(counts[c]) for c in sorted(counts)))
    console.print(table)
    console.print(f"next: loomlens convert {out} {out.parent / (out.name + '-jsonl')}", highlight=False)


@app.command("serve")
def serve(
    model: str | None = typer.Option(
        None, help="Base model: tiny or tiny-hr (embedded), base, large, a hub id or a folder (default: the adapter's base, else tiny)."),
    adapter: str | None = typer.Option(None, "--adapter", "--run", help="A training run folder (or adapter folder) to attach."),
    host: str = typer.Option("127.0.0.1", help="Address to bind; 0.0.0.0 exposes the server to the network."),
    port: int = typer.Option(7860, min=1, max=65535, help="TCP port."),
    api_key: str | None = typer.Option(
        None, envvar="LOOMLENS_API_KEY", show_envvar=True,
        help="Require this key on /v1/* (Authorization: Bearer KEY or X-API-Key) and as the page's password."),
    max_queue: int = typer.Option(16, min=1, help="Requests that may wait; more get 503 + Retry-After."),
    max_batch: int = typer.Option(4, min=1, help="Images the worker runs in one batch."),
    batch_wait_ms: float = typer.Option(5.0, min=0, help="How long the worker waits to fill a batch."),
    max_body_mb: float = typer.Option(20.0, min=0.001, help="Largest request body in MB (413 past it)."),
    max_megapixels: float = typer.Option(50.0, min=0.001, help="Largest image in megapixels (413 past it)."),
    max_side: int = typer.Option(4096, min=32, help="Longest image side kept: larger uploads are downscaled as decoded "
                                 "(answers stay in the uploaded image's pixels)."),
    max_tiles: int = typer.Option(144, min=1, help="Most crops (tiles, middle view, whole frame) one image may be cut into, each "
                                  "looked at once per --tta view; a larger frame is downscaled to fit (144: a 2560x1440 "
                                  "frame in 256 px tiles, 133 crops, is seen as eval sees it)."),
    tta: str = typer.Option("auto", help=TTA_HELP),
    large_cost: int = typer.Option(16, min=1, help="Requests costing more model inputs run in the large lane, "
                                   "interleaved with the small ones."),
    request_timeout_s: float = typer.Option(30.0, min=0.1, help="A request's deadline, queue and compute (504 past it)."),
    cors_origin: list[str] = typer.Option([], help="An origin (https://host:port) whose pages may call the API; "
                                          "repeat for more. Default: same origin only."),
    max_connections: int = typer.Option(
        128, min=1, help="Open connections at most; uvicorn answers 503 past it (bounds buffered uploads)."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    precision: str = typer.Option("auto", help=PRECISION_HELP),
    backend: str = typer.Option("torch", help=BACKEND_HELP),
    page: bool = typer.Option(True, "--page/--no-page", help="Serve the web page at /."),
    examples: int = typer.Option(4, min=0, help="Synthetic loom frames in the page's example gallery."),
    examples_dir: str | None = typer.Option(None, help="Where the example frames are made (default: a temp folder)."),
    events_db: str | None = typer.Option(None, help="The events database `loomlens watch --db` writes (SQLite path "
                                         "or SQLAlchemy URL): GET /v1/events and the page's Line view."),
    log_level: str = typer.Option("info", help="uvicorn log level."),
) -> None:
    """Serve the model: HTTP API at /v1 (docs at /docs), health at /healthz, web page at /."""
    import ipaddress
    import logging

    from loomlens.predict import Predictor
    from loomlens.serve import ServeSettings, create_app

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback and not api_key:
        typer.secho(f"warning: serving on {host} without an API key; anyone who reaches this port "
                    "can run the model (set --api-key or LOOMLENS_API_KEY)", fg="yellow", err=True)
    try:
        settings = ServeSettings(
            host=host, port=port, api_key=api_key or None, max_queue=max_queue, max_batch=max_batch,
            batch_wait_ms=batch_wait_ms, max_body_mb=max_body_mb,
            max_pixels=int(max_megapixels * 1_000_000), max_side=max_side, large_cost=large_cost,
            request_timeout_s=request_timeout_s, cors_origins=tuple(cors_origin), page=page, examples=examples,
            examples_dir=examples_dir, events_db=events_db)
    except ValueError as err:
        raise _fail(str(err)) from None
    from loomlens.model.loader import ModelLoadError

    try:
        predictor = Predictor(model=model, adapter=adapter, device=_device(device), precision=precision,
                              max_tiles=max_tiles, backend=backend, tta=tta)  # the one model load
    except (FileNotFoundError, ValueError, RuntimeError, ModelLoadError) as err:
        raise _fail(str(err)) from None
    try:
        asgi = create_app(predictor, settings)
    except (FileNotFoundError, ValueError) as err:
        raise _fail(str(err)) from None
    import uvicorn

    base = predictor.info().get("base", model)
    typer.echo(f"loomlens serving {base}{' + ' + adapter if adapter else ''} on http://{host}:{port} "
               f"(page /, API /v1/predict, docs /docs)", err=True)
    uvicorn.run(asgi, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5,
                limit_concurrency=max_connections)


# --- fine-tuning: train, sweep, merge, demo -------------------------------------------------

_EXTRA = {"allow_extra_args": True, "ignore_unknown_options": True}
_SETTINGS_HELP = (
    "Any other setting of the config works too, as --name value or name=value "
    "(e.g. --warmup 0.1, lora.dropout=0.1); `loomlens config` lists them all with their defaults."
)


def _extra_overrides(args: list[str]) -> dict[str, str]:
    """`--key value`, `--flag`, `--no-flag` and `key=value` words -> {key: value}."""
    out: dict[str, str] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--"):
            key, eq, value = arg[2:].partition("=")
            if not eq:  # a flag, or a value in the next word (never a `key=value` word of its own)
                if key.startswith("no-"):
                    key, value = key[3:], "false"
                elif i + 1 < len(args) and not args[i + 1].startswith("--") and "=" not in args[i + 1]:
                    value, i = args[i + 1], i + 1
                else:
                    value = "true"
            out[key] = value
        elif "=" in arg:
            key, value = arg.split("=", 1)
            out[key] = value
        else:
            raise _fail(f"unexpected argument {arg!r}; settings look like --name value or name=value")
        i += 1
    return out


def _device(name: str) -> str:
    """`--device` by the one device rule (`model.runtime.resolve_device`); a bad name exits 1."""
    from loomlens.model.runtime import resolve_device

    try:
        return str(resolve_device(name))
    except ValueError as err:
        raise _fail(str(err)) from None


def _given(**options) -> dict:
    """The options the user actually gave (typer leaves the others None)."""
    return {k: v for k, v in options.items() if v is not None}


#: `loomlens config`'s stand-in for a data folder no file or word gave (train requires one).
UNSET = Path("<unset>")


def _train_config(config: str | None, overrides: dict, resume: Path | None = None, placeholder: dict | None = None):
    """The `TrainConfig` of `config` (a YAML file or shipped name) and `overrides`, or of the
    run `resume` records; `placeholder` settings under both; a one-line exit for a bad one."""
    from pydantic import ValidationError

    from loomlens.config import TrainConfig, load_config, load_recorded
    from loomlens.run import CONFIG

    if resume is not None and config is not None:
        raise _fail(f"--config with --resume: a run goes on with the settings it records ({resume / CONFIG}); "
                    "give the settings to change as key=value, or start a new run with --config")
    if resume is not None and "out" in overrides and Path(overrides["out"]).resolve() != resume.resolve():
        raise _fail(f"--out with --resume: the run goes on in its own folder {resume}; to go on in another, copy the "
                    f"folder there and resume the copy (--resume {overrides['out']})")
    try:
        if resume is not None:
            return load_recorded(_resumed_run(resume) / CONFIG, {**overrides, "out": str(resume)})
        return load_config(TrainConfig, config, overrides, base=placeholder)
    except ValidationError as err:  # a check across settings has no field: its message says which
        source = f" (from {config} and the command line)" if config is not None else ""
        raise _fail(f"invalid settings{source}", [_setting_error(e) for e in err.errors()]) from None
    except (ValueError, OSError) as err:
        raise _fail(str(err)) from None


def _resumed_run(resume: Path) -> Path:
    """`resume` when it is a run folder, as `Run` (the one reader of run folders) finds one;
    else a one-line exit saying so, naming the run `resume` lies inside (a checkpoint folder
    given) or how to start one. Run's ValueError for a config.yaml that is no YAML settings
    goes to the caller."""
    from loomlens.run import Run

    found = Run(resume).folder
    if found == resume:
        return resume
    fix = (f"it lies inside the run {found}: --resume {found}" if found is not None
           else "give the --out of a run, or start one with --data")
    raise _fail(f"no run folder at {resume} (it has no config.yaml): {fix}")


#: What a training command's `--data` takes, for the one that was not given it.
_DATA_OPTION = "--data DIR (a folder from `loomlens convert`)"


def _need_data(overrides: dict, config: str | None, *others: str) -> None:
    """Exit naming --data and what it takes when neither it (nor `data=`) nor a --config that
    could hold it was given; `others` are the command's other ways to go (train's --resume)."""
    if "data" not in overrides and config is None:
        raise _fail(", or ".join([f"give {_DATA_OPTION} or --config FILE", *others]))


def _setting_error(error: dict) -> str:
    """One pydantic error as `setting: what is wrong (given VALUE)`: the value shows which of a
    sweep's list, or whether the file's or the line's, was wrong; a list where one value goes
    says where a sweep takes its lists. A check across settings has no field, and its message
    names them."""
    where, given = ".".join(map(str, error["loc"])), error.get("input")
    shown = f" (given {given!r})" if where and isinstance(given, (str, int, float, bool)) else ""
    if where == "data" and error["type"] == "missing":  # a --config without it
        shown = f": give {_DATA_OPTION}, or data: DIR in the --config file"
    if where and isinstance(given, list):  # a grid written into --config: one value a run
        shown = (f" (given {given!r}: a list where one value goes; `loomlens sweep` tries several, each option's "
                 "values as a comma list: --lr 1e-4,2e-3)")
    return f"{where or 'settings'}: {error['msg']}{shown}"


def _relaunch(num_processes: int) -> None:
    """Run this same command under `accelerate launch` with `num_processes` processes."""
    import os
    import subprocess

    argv, skip = [], False
    for arg in sys.argv[1:]:
        if skip:
            skip = False
        elif arg == "--num-processes":
            skip = True
        elif not arg.startswith("--num-processes="):
            argv.append(arg)
    # --multi_gpu picks torch's distributed launcher; without CUDA accelerate falls back to
    # gloo on CPU, which is how the 2-process test runs.
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
               str(num_processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "loomlens.cli", *argv]
    raise typer.Exit(subprocess.call(command, env={**os.environ, "LOOMLENS_LAUNCHED": "1"}))


@app.command("train", context_settings=_EXTRA, epilog=_SETTINGS_HELP)
def train_command(
    ctx: typer.Context,
    # data and out as typed (typer would make "" the path "."): the config refuses an empty one
    data: str | None = typer.Option(None, help="Folder from `loomlens convert` (train.jsonl, val.jsonl)."),
    model: str | None = typer.Option(None, help="Base model: tiny or tiny-hr (embedded), base, large, a hub id or a folder."),
    out: str | None = typer.Option(None, help="Run folder to write."),
    config: str | None = typer.Option(
        None, help="YAML config file, or a shipped one by name (base: the seed's recipe)."),
    resume: Path | None = typer.Option(None, help="Continue the run in this folder exactly where it was saved."),
    lr: str | None = typer.Option(None, help="Peak learning rate."),
    r: str | None = typer.Option(None, help="LoRA rank."),
    alpha: str | None = typer.Option(None, help="LoRA alpha (default 2 r)."),
    targets: str | None = typer.Option(
        None, help="LoRA targets: seed, attention, language, all-linear, or module names (q_proj,v_proj)."),
    freeze: str | None = typer.Option(None, help="Tower whose adapters stay frozen: none, vision, language."),
    dora: bool | None = typer.Option(None, "--dora/--no-dora", help="Weight-decomposed LoRA (DoRA)."),
    epochs: str | None = typer.Option(None, help="Epochs (unless --max-steps)."),
    max_steps: str | None = typer.Option(None, help="Optimizer steps; overrides --epochs (null: by --epochs)."),
    time_budget: str | None = typer.Option(None, help="Stop (evaluate and save) after this many seconds; null: none."),
    batch_size: str | None = typer.Option(None, help="Samples per process per batch; --micro-batch N (or auto: the "
                                          "largest that fits on CUDA) passes it in pieces, the step unchanged."),
    grad_accum: str | None = typer.Option(None, help="Batches per optimizer step."),
    order: str | None = typer.Option(None, help="Task order: grouped (seed's) or interleaved."),
    eval_every: str | None = typer.Option(None, help="Evaluate every N steps (0: each epoch)."),
    precision: str | None = typer.Option(None, help="auto (bf16 autocast on CUDA and on CPUs with bf16 instructions, "
                                         "else fp32), fp32, bf16 (autocast), bf16-base (frozen base in bf16, adapter "
                                         "fp32), fp16."),
    qlora: bool | None = typer.Option(None, "--qlora/--no-qlora", help="4-bit base (CUDA + bitsandbytes)."),
    device: str | None = typer.Option(None, help=f"{DEVICE_HELP} Default: auto."),
    num_processes: int = typer.Option(1, min=1, help="Processes (GPUs) through accelerate launch."),
) -> None:
    """Fine-tune Florence-2 with LoRA/DoRA; writes config, metrics, curves, TensorBoard and checkpoints."""
    import os

    if num_processes > 1 and not os.environ.get("LOOMLENS_LAUNCHED"):
        _relaunch(num_processes)
    from loomlens.data.jsonl import SplitError
    from loomlens.model.loader import ModelLoadError
    from loomlens.model.lora import LoraTargetError
    from loomlens.train.checkpoint import UnsafeCheckpointError
    from loomlens.train.recipe import TrainingDiverged, TrainingInterrupted, train

    explicit = _given(data=data, model=model, out=out, lr=lr, r=r, alpha=alpha, targets=targets, freeze=freeze,
                      dora=dora, epochs=epochs, max_steps=max_steps, time_budget=time_budget,
                      batch_size=batch_size, grad_accum=grad_accum, order=order, eval_every=eval_every,
                      precision=precision, qlora=qlora, device=device)
    overrides = {**_extra_overrides(ctx.args), **explicit}
    if resume is None:
        _need_data(overrides, config, "--resume RUN_DIR")
    cfg = _train_config(config, overrides, resume)
    try:
        result = train(cfg, resume=resume is not None)
    except TrainingInterrupted as err:
        typer.echo(str(err), err=True)
        raise typer.Exit(130) from None
    except (FileExistsError, FileNotFoundError, ModelLoadError, LoraTargetError, TrainingDiverged, RuntimeError,
            SplitError, UnsafeCheckpointError, ValueError, OSError) as err:
        raise _fail(str(err)) from None
    if result.last_eval:
        typer.echo("last evaluation: " + ", ".join(f"{k} {v:.4f}" for k, v in result.last_eval.items()))
    typer.echo(f"curves: {cfg.out / 'curves'}; checkpoints: {cfg.out / 'checkpoints'}; "
               f"TensorBoard: tensorboard --logdir {cfg.out / 'tb'}")


@app.command("config", context_settings=_EXTRA)
def config_command(
    ctx: typer.Context,
    config: str | None = typer.Option(None, help="YAML file, or a shipped config's name (base, demo), to start from."),
) -> None:
    """Print every training setting `loomlens train` would use, with what it does: the defaults,
    then --config, then any key=value given here (the same words train takes)."""
    from loomlens.config import described

    lines = described(_train_config(config, _extra_overrides(ctx.args), placeholder={"data": UNSET}))
    # required by train, and neither the file nor a word set it
    lines = [f"data: DATA  # required: {line.split('# ', 1)[1]}" if line.startswith(f"data: {UNSET.resolve()}")
             else line for line in lines]
    typer.echo("\n".join(lines))


def _sweep_values(option: str, text: str) -> list[str]:
    """The values a sweep option (`lr`, as its parameter is named) gives, comma-separated, each
    stripped: `0.01, 0.001` ran ' 0.001' in a point named `lr=-0.001`. A one-line exit for an
    empty one (`attention,`), which the settings check took as a value: `targets` failed only
    when its point loaded the model, after the points before it had trained."""
    values = [value.strip() for value in text.split(",")]
    if "" in values:
        given = ",".join(value for value in values if value) or "A,B"
        raise _fail(f"--{option.replace('_', '-')} {text!r} has an empty value: give the values to try separated by "
                    f"commas, none empty (--{option.replace('_', '-')} {given})")
    return values


@app.command("sweep", context_settings=_EXTRA, epilog=_SETTINGS_HELP)
def sweep_command(
    ctx: typer.Context,
    data: str | None = typer.Option(None, help="Folder from `loomlens convert`."),  # as typed, as train's
    out: str = typer.Option("runs/sweep", help="Sweep folder: one run folder per point, table and plot."),
    config: str | None = typer.Option(None, help="YAML config shared by every run."),
    lr: str | None = typer.Option(None, help="Learning rates, comma-separated: 1e-6,3e-6,5e-6."),
    r: str | None = typer.Option(None, help="LoRA ranks: 8,16,32."),
    targets: str | None = typer.Option(None, help="Target presets: seed,attention (module lists joined by +)."),
    freeze: str | None = typer.Option(None, help="none,vision,language."),
    order: str | None = typer.Option(None, help="grouped,interleaved."),
    dora: str | None = typer.Option(None, help="false,true."),
    loc_sigma: str | None = typer.Option(None, help="Soft location label widths in bins: 0,8."),
    pointer_weight: str | None = typer.Option(None, help="Pointer loss weights: 0,1."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
) -> None:
    """Train one run per combination of the values given; one val-loss plot and one table for all."""
    from loomlens.train.recipe import TrainingInterrupted
    from loomlens.train.sweep import grid, sweep

    axes = {k: _sweep_values(k, v) for k, v in _given(lr=lr, r=r, targets=targets, freeze=freeze, order=order,
                                                         dora=dora, loc_sigma=loc_sigma,
                                                         pointer_weight=pointer_weight).items()}
    if "targets" in axes:
        axes["targets"] = [t.replace("+", ",") for t in axes["targets"]]
    shared = {**_extra_overrides(ctx.args), **({"data": data} if data is not None else {}), "device": _device(device)}
    if "resume" in shared:  # train's way; a sweep's points resume by themselves
        folder = shared["resume"] if shared["resume"] != "true" else "SWEEP_FOLDER"  # `--resume` with no folder
        raise _fail(f"a sweep goes on when the same sweep command runs again (finished points return at once, the "
                    f"interrupted one resumes): give the values and settings it had, with --out {folder}, and no "
                    "--resume")
    _need_data(shared, config)
    for point in grid(axes):  # every point before the first trains: a typo in the last value costs nothing
        _train_config(config, {**shared, **point, "out": out})
    try:
        result = sweep(axes, shared, config=config, out=Path(out))
    except TrainingInterrupted as err:
        typer.echo(str(err), err=True)
        raise typer.Exit(130) from None
    except (OSError, ValueError, RuntimeError) as err:
        raise _fail(str(err)) from None
    typer.echo(result.table_md.read_text())
    typer.echo(f"plot: {result.plot}; table: {result.table_md}, {result.table_csv}")


@app.command("merge")
def merge_command(
    run: Path = typer.Argument(..., help="Training run folder (or an adapter folder)."),
    out: Path = typer.Argument(..., help="Folder for the merged model."),
    checkpoint: str = typer.Option("best", help="best or last."),
    model: str | None = typer.Option(None, help="Where the run's own base model is, when the folder it "
                                     "records is not on this machine (another base is refused)."),
    dtype: str = typer.Option("fp16", help="Stored precision: fp16 (default), bf16 or fp32."),
) -> None:
    """Merge the LoRA adapter into its base: a plain Florence-2 folder for `from_pretrained`."""
    from loomlens.model.loader import ModelLoadError
    from loomlens.model.merge import merge_adapter

    try:
        path = merge_adapter(run, out, checkpoint, base=model, dtype=dtype)
    except (OSError, ModelLoadError, ValueError, RuntimeError) as err:
        raise _fail(str(err)) from None
    typer.echo(f"merged model in {path}: Florence2ForConditionalGeneration.from_pretrained({str(path)!r})")


@app.command("export")
def export_command(
    run: str = typer.Argument(..., help="Training run folder, checkpoint or adapter folder (or a base model "
                              "name such as tiny: the base alone)."),
    out: Path = typer.Argument(..., help="Export folder: a new one, or an empty one."),
    fmt: str = typer.Option("onnx", "--format", help="onnx (the only format so far)."),
    model: str | None = typer.Option(None, help="Base model (default: the run's)."),
    checkpoint: str = typer.Option("best", help="best or last (with a run folder)."),
    opset: int = typer.Option(17, help="ONNX opset (14..20)."),
    int8: bool = typer.Option(False, "--int8", help="Also write int8 parts (dynamic quantisation), checked too."),
    check_frames: int = typer.Option(4, min=1, help="Synthetic frames the export is checked on against torch."),
    box_bins: float = typer.Option(1.0, min=0.0, help="Check: most location bins (1/1000 of the frame) a box may move."),
    score_tol: float = typer.Option(0.01, min=0.0, help="Check: most a box score may differ."),
) -> None:
    """Export the merged model as ONNX (vision encoder, token embedding, encoder, and the decoder
    with a KV cache as a first-step / with-past pair) with its processor and tokenizer files, for
    onnxruntime on a factory PC; then check it on synthetic frames against torch, print the
    comparison, and fail (writing nothing) if the boxes or scores differ beyond the tolerance.
    Use it with --backend onnx --model OUT."""
    if fmt != "onnx":
        raise _fail(f"unknown export format {fmt!r}; the one format is onnx")
    from loomlens.export import ExportCheckFailed, export_onnx
    from loomlens.model.loader import ALIASES, EMBEDDED, ModelLoadError

    if not Path(run).exists():  # a base model name: export the base alone
        if run not in EMBEDDED and run not in ALIASES and "/" not in run.strip("/"):  # no hub id either
            raise _fail(f"no run folder at {run}, and no model of that name (embedded: {', '.join(EMBEDDED)}; "
                        f"{', '.join(ALIASES)}; or a hub id such as microsoft/Florence-2-base)")
        if model is not None:
            raise _fail(f"no run folder at {run} (to export a base model alone, name it in place of the run: "
                        f"`loomlens export {model} {out}`)")
        run, model = None, run
    try:
        checks = export_onnx(run=run, out=out, model=model, checkpoint=checkpoint, opset=opset, int8=int8,
                             frames=check_frames, box_bins=box_bins, score_tol=score_tol, log=typer.echo)
    except ExportCheckFailed as err:
        raise _fail(str(err)) from None
    except (FileExistsError, FileNotFoundError, ValueError, RuntimeError, ModelLoadError) as err:
        raise _fail(str(err)) from None
    typer.echo("check against torch: parts frame boxes(torch/onnx) max-bins max-score-diff")
    for c in checks:
        typer.echo(f"  {c.parts:5} {c.frame:5} {c.torch_boxes:3}/{c.onnx_boxes:<3} {c.max_bins:8.3f} "
                   f"{c.max_score_diff:10.5f}  {'ok' if c.ok else 'DIFFERS'}")
    typer.echo(f"exported to {out}; run it with --backend onnx --model {out}")


@app.command("demo")
def demo_command(
    out: Path = typer.Option(Path("runs/demo"), help="Folder for everything the demo makes."),
    images: int | None = typer.Option(None, help="Synthetic frames (default from configs/demo.yaml)."),
    time_budget: float | None = typer.Option(None, help="Training seconds (default from configs/demo.yaml)."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
) -> None:
    """The main job end to end on the embedded tiny model: synth -> convert -> LoRA -> evaluate."""
    from loomlens.train.demo import run_demo

    try:
        report = run_demo(out, images=images, time_budget=time_budget, device=_device(device))
    except (OSError, ValueError, RuntimeError) as err:
        raise _fail(str(err)) from None
    typer.echo(report.read_text())
    typer.echo(f"report: {report}; curves: {out / 'run' / 'curves'}")


def _eval_split(data: Path, split: str) -> Path:
    """The split file `eval` reads: `data` itself when it is a .jsonl, else `data/SPLIT.jsonl`.
    Fails naming the fix for a split that is not there, a `--split` no folder holds, and a
    `--split` other than val (the default) that names another split than the file given: that
    file would be evaluated, and reported, in its place."""
    if data.suffix == ".jsonl":
        if split not in ("val", data.stem):
            raise _fail(f"--split {split} names another split than the file {data}: give the folder with --split "
                        f"{split}, or that split's own .jsonl file")
        if not data.is_file():
            raise _fail(f"no split file at {data}; give a .jsonl that `loomlens convert` wrote, or its folder")
        return data
    if split not in ("train", "val", "test"):
        raise _fail(f"--split takes val or test (or train), not {split!r}")
    from loomlens.data.convert import unconverted

    jsonl = data / f"{split}.jsonl"
    if not jsonl.exists():
        fix = ("convert into a new folder with a test split (`loomlens convert SRC NEW --test-fraction 0.2`) and "
               "train on that: a test split drawn after training would hold images the run trained on"
               if split == "test" else f"make one with `loomlens convert SRC {data}`")
        raise _fail(f"no split at {jsonl}; {unconverted(data) or fix}")
    return jsonl


def _eval_adapter(run: Path | None, checkpoint: str) -> Path | None:
    """The adapter `eval --checkpoint` means: `run` (None: the base alone) for best or last, else
    the adapter folder it names, which must exist and, beside `--run`, lie in that run: eval
    would read another run's adapter and write the report as `run`'s (over its eval-SPLIT).
    One-line exits naming the fix, before the model loads."""
    if checkpoint in ("best", "last"):
        return run
    path = Path(checkpoint)
    if not path.exists():
        raise _fail(f"--checkpoint takes best, last or the path of an adapter folder, not {checkpoint!r} (no such "
                    "folder)")
    if run is not None and not path.resolve().is_relative_to(run.resolve()):
        raise _fail(f"--checkpoint {path} lies outside the run {run} (--run): eval would read it and write the report "
                    "as that run's; give the run it belongs to as --run, or --checkpoint alone")
    return path


@app.command("eval")
def eval_command(
    data: Path = typer.Option(..., help="Folder written by `loomlens convert`, or one of its .jsonl splits."),
    run: Path | None = typer.Option(None, "--run", "--adapter", help="Training run folder: its adapter, base model and classes."),
    checkpoint: str = typer.Option("best", help="best, last, or the path of an adapter folder."),
    model: str | None = typer.Option(None, help="Base model, or a merged folder (`loomlens merge`, read as its run "
                                     "was); without --run, evaluates that model alone; with it, where the run's "
                                     "base is when the folder it records is not on this machine."),
    split: str = typer.Option("val", help="Split to evaluate: val or test."),
    out: Path | None = typer.Option(None, help="Report folder (default: RUN/eval-SPLIT, else runs/eval-SPLIT)."),
    batch_size: int = typer.Option(INFER_BATCH_SIZE, min=1, help="Images per generation batch."),
    max_boxes: int | None = typer.Option(None, min=1, help="Most boxes read per image, which sets the token budget "
                                         "(default: the most one image of the run's data holds, at least 20)."),
    max_images: int | None = typer.Option(None, min=1, help="Evaluate only the first N images."),
    constrained: bool | None = typer.Option(None, "--constrained/--no-constrained", help="Decode <OD> through the "
                                            "class grammar (default: on when the run has classes; --no-constrained "
                                            "reads the free form)."),
    tta: str = typer.Option("auto", help=TTA_HELP),
    precision: str = typer.Option("auto", help=PRECISION_HELP),
    device: str = typer.Option("auto", help=DEVICE_HELP),
) -> None:
    """Evaluate detection on a split: metrics.json, PR curves, confusion matrix, reliability,
    worst images and report.md, with real confidence scores. A run trained on tiles (`convert
    --tile`) or with the defect crop is evaluated as it predicts: frames longer than its tile in tiles."""
    from rich.console import Console
    from rich.table import Table

    from loomlens.evaluate.inspection import summary_line
    from loomlens.evaluate.report import check_report_folder, eval_images, placement_text, write_report
    from loomlens.evaluate.thresholds import threshold_text
    from loomlens.infer.loading import load_for_inference
    from loomlens.infer.tta import check_tta, choose_views
    from loomlens.model.loader import ModelLoadError

    jsonl = _eval_split(data, split)
    adapter = _eval_adapter(run, checkpoint)
    out = out or ((run or Path("runs")) / f"eval-{jsonl.stem}")
    try:  # the model as `predict` runs it
        check_tta(tta)  # before the model loads, as are the report folder and the split (its images and true boxes)
        check_report_folder(out)
        eval_images(jsonl)
        loaded = load_for_inference(model=model, adapter=adapter, checkpoint=checkpoint if adapter == run else "best",
                                    device=_device(device), precision=precision)
    except (FileExistsError, FileNotFoundError, ValueError, ModelLoadError) as err:
        raise _fail(str(err)) from None
    constrained = bool(loaded.classes) if constrained is None else constrained
    tile = loaded.tile_size  # frames as predict sees them (a merged folder keeps its run's)
    views = choose_views(tta, loaded.views)
    extra = {"model": loaded.base, "adapter": str(loaded.adapter) if loaded.adapter else None, "split": jsonl.stem,
             "precision": loaded.precision}
    try:
        with _sigterm_as_interrupt():
            metrics = write_report(loaded.model, loaded.processor, jsonl, out, classes=loaded.classes,
                                   batch_size=batch_size, max_boxes=max_boxes or loaded.max_boxes,
                                   constrained=constrained, max_images=max_images, extra=extra, tile=tile, views=views)
    except ValueError as err:  # e.g. --constrained with no classes.txt in the run or the split
        raise _fail(str(err)) from None
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM while the model answers: the files come at the end
        typer.echo(f"stopped: no report was written (an earlier one in {out} is left as it was); the same command "
                   "again evaluates from the start", err=True)
        raise typer.Exit(130) from None
    table = Table(title=f"{metrics['images']} images of {jsonl}" + (" (constrained)" if constrained else "")
                  + (f" (frames over {tile} px in {tile} px tiles)" if tile else "")
                  + (f" (fused over {len(views)} views)" if len(views) > 1 else ""))
    for column in ("mAP50-95", "mAP50", "mAP75", "best F1", "OK/NG AUROC", "recall @1% FA", "s/image"):
        table.add_column(column, justify="right")
    frames = metrics["image_level"]
    boxes = metrics["gt_boxes"]  # no true box: AP is undefined, not 0 (false alarms: predicted_on_negatives)
    table.add_row(*(f"{metrics[k]:.3f}" if boxes else "n/a" for k in ("map50_95", "map50", "map75", "best_f1")),
                  *(f"{v:.3f}" if v is not None else "n/a"
                    for v in (frames["auroc"], frames["recall_at_fpr"].get("0.01"))),
                  f"{metrics['seconds_per_image']:.3f}")
    Console().print(table)
    if boxes:
        located = metrics["located"]
        typer.echo(f"defects found and placed, their names set aside: mAP50 {located['map50']:.3f}, "
                   f"mAP50-95 {located['map50_95']:.3f}")
        typer.echo(f"true boxes at score >= {threshold_text(metrics['best_threshold'])}: "
                   f"{placement_text(metrics['placement']['at_threshold'])}")
    typer.echo(f"OK/NG by the defect probability: {summary_line(frames)}")
    typer.echo(f"report: {out / 'report.md'}")


@app.command("predict")
def predict_command(
    inputs: list[str] = typer.Argument(..., help="Image files, folders, glob patterns or video files."),
    out: Path = typer.Option(Path("runs/predict"), help="Folder for predictions.jsonl and drawn images."),
    model: str | None = typer.Option(None, help="Base model (default: the adapter's base, else tiny)."),
    adapter: Path | None = typer.Option(None, "--adapter", "--run", help="Training run folder or adapter folder."),
    checkpoint: str = typer.Option("best", help="best or last (with a run folder)."),
    task: str = typer.Option("od", help="od, caption, phrase_grounding, ocr, ... (see the docs)."),
    text: str | None = typer.Option(None, help="Phrase or region (x1,y1,x2,y2 pixels) for tasks that need one."),
    tile: str = typer.Option("auto", help="Tiled detection: auto (frames longer than the run's tile), on or off."),
    tile_size: int | None = typer.Option(None, min=32, help="Tile edge in pixels (default: the run's --tile from convert, else the model's input)."),
    tta: str = typer.Option("auto", help=TTA_HELP),
    every: int = typer.Option(1, min=1, help="For videos: predict on every N-th frame."),
    regions: Path | None = typer.Option(None, help="Region rules YAML (default: the run's regions.yaml)."),
    score_threshold: float = typer.Option(0.0, min=0.0, max=1.0, help="Drop boxes scoring lower."),
    coco: bool = typer.Option(False, help="Also write coco_results.json (COCO results: image_id, category_id, "
                              "bbox, score) and coco_images.json (the images and categories they refer to)."),
    other_labels: bool = typer.Option(False, help="od: each box also under the other classes the model nearly "
                                      "wrote (p >= 0.25), as `loomlens eval` counts them. Off: one label a place."),
    save_labels: str | None = typer.Option(None, help="Also write pre-annotations for a labelling tool: voc "
                                           "(LabelImg), yolo (LabelImg YOLO), labelstudio (tasks.json with scored "
                                           "predictions) or coco; `loomlens convert` reads the folder back."),
    labels_out: Path | None = typer.Option(None, help="Folder for --save-labels (default OUT/labels-FORMAT); "
                                           "annotation files already there are kept, never overwritten."),
    draw: bool = typer.Option(True, help="Write drawn images to OUT/drawn/."),
    max_boxes: int | None = typer.Option(None, min=1, help="Most boxes read per image (default: the most one "
                                         "image of the run's data holds, at least 20)."),
    batch_size: int = typer.Option(INFER_BATCH_SIZE, min=1, help="Images per generation batch."),
    constrained: bool | None = typer.Option(None, "--constrained/--no-constrained", help="Decode <OD> through the "
                                            "run's class grammar (default: on when the run has classes; "
                                            "--no-constrained reads the free form)."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    precision: str = typer.Option("auto", help=PRECISION_HELP),
    backend: str = typer.Option("torch", help=BACKEND_HELP),
    strict: bool = typer.Option(False, help="Exit 1 when any input was skipped (listed in OUT/problems.json)."),
) -> None:
    """Predict on images and videos: predictions.jsonl (pixels, labels, scores, timestamps),
    drawn images and optional COCO results. Unreadable inputs are skipped and listed in
    OUT/problems.json; predictions.jsonl is replaced only by a complete run (exit 1 when nothing
    could be predicted, or with --strict when anything was skipped)."""
    from pydantic import ValidationError
    from rich.progress import Progress

    from loomlens.model.loader import ModelLoadError
    from loomlens.predict import Predictor
    from loomlens.predict.files import check_options, own_outputs, predict_files
    from loomlens.predict.resume import PARTIAL
    from loomlens.predict.sources import count_items, expand_inputs

    try:
        check_options(task, text, tile, save_labels, regions)  # before the model loads
        files = expand_inputs(inputs, exclude=own_outputs(out, labels_out), on_problem=[].append)  # counted only
        total = count_items(files, every)
        predictor = Predictor(model=model, adapter=adapter, device=_device(device), max_boxes=max_boxes,
                              batch_size=batch_size, checkpoint=checkpoint, regions=regions, tile_size=tile_size,
                              constrained=constrained, precision=precision, backend=backend, tta=tta,
                              other_labels=other_labels)
        with Progress(transient=True) as bar, _sigterm_as_interrupt():
            job = bar.add_task(f"{task} on {total} images/frames", total=total)
            summary = predict_files(predictor, inputs, out, task=task, text=text, tile=tile, every=every,
                                    score_threshold=score_threshold, coco=coco, draw=draw,
                                    on_item=lambda: bar.advance(job), save_labels=save_labels,
                                    labels_out=labels_out)
    except (FileNotFoundError, ValueError, ValidationError, RuntimeError, ModelLoadError) as err:
        raise _fail(str(err)) from None
    except OSError as err:  # the disk or a folder refused a read or write: name the path, not a traceback
        raise _fail(f"cannot read or write {err.filename or out} ({err.strerror or err}): check that it is a "
                    "folder or file you can write to, with space left, and run the same command again") from None
    except KeyboardInterrupt:
        typer.echo(f"stopped: what was predicted is kept ({out / PARTIAL}); the same command again goes on from "
                   "there, and predictions.jsonl is written when every input is done", err=True)
        raise typer.Exit(130) from None
    _report_predicted(summary, out, strict)


def _report_predicted(summary: dict, out: Path, strict: bool) -> None:
    """What `predict` says when its files are done (`predict_files`' `summary`): what it wrote,
    what to check, and what it skipped; fails when nothing was predicted (or, `strict`, skipped)."""
    if not summary["written"]:  # nothing predicted, and an earlier run's results left as they were
        found = "no input could be read" if summary["problems"] else "no image or video found in the inputs"
        raise _fail(f"{found}; nothing was written, and {out} is left as it was (an earlier run's results too)",
                    [p["error"] for p in summary["problems"]])
    if summary["resumed"]:
        typer.echo(f"went on from an interrupted run: {summary['resumed']} images/frames it predicted were kept")
    typer.echo(f"{summary['items']} images/frames, {summary['boxes']} boxes -> {out}: {', '.join(summary['written'])}")
    for notice in summary["notices"][:10]:  # predicted all the same (in problems.json): nothing for --strict
        typer.secho(f"to check: {notice['error']}", fg="yellow", err=True)
    _report_skipped(summary["problems"], out, strict=strict, none_done=not summary["items"],
                    nothing="no predictions.jsonl was written (an earlier one is left as it was)")


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Within the block SIGTERM (a service manager's stop) ends the command as Ctrl-C does, by
    KeyboardInterrupt, so it stops the same clean way; the handler before comes back after."""
    import signal

    def interrupt(*_) -> None:
        raise KeyboardInterrupt

    before = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def _report_skipped(problems: list[dict], out: Path, *, strict: bool, none_done: bool, nothing: str) -> None:
    """Name the inputs a command skipped (all of them are in `out/problems.json`); fail when no
    input was done (also when there was none: a script must not take old results for new ones),
    saying why and `nothing`, what was left undone; and with exit 1 under `--strict`."""
    if problems:
        typer.secho(f"{len(problems)} input(s) skipped, all listed in {out / 'problems.json'}:", fg="yellow",
                    err=True)
        typer.echo("\n".join(f"  {p['error']}" for p in problems[:10]), err=True)
    if none_done:
        raise _fail(f"{'no input could be read' if problems else 'no image or video found in the inputs'}; {nothing}")
    if strict and problems:
        raise typer.Exit(1)


def _weights(text: str | None) -> dict[str, float] | None:
    """`--weights uncertainty=1,entropy=0.5,disagreement=1` -> {component: weight}; None: default."""
    if text is None:
        return None
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, eq, value = part.partition("=")
        try:
            out[key.strip()] = float(value)
        except ValueError:
            eq = ""
        if not eq:
            raise _fail(f"--weights takes component=number pairs separated by commas "
                        f"(e.g. uncertainty=1,entropy=0.5,disagreement=1), got {part!r}")
    return out


@app.command("select")
def select_command(
    inputs: list[str] = typer.Argument(..., help="Unlabelled frames: image files, folders, glob patterns or videos."),
    adapter: Path | None = typer.Option(None, "--adapter", "--run", help="The training run (or adapter folder) whose doubts rank the frames."),
    n: int = typer.Option(20, "--n", min=1, help="How many frames to choose for labelling."),
    out: Path = typer.Option(Path("runs/select"), help="Folder for ranking.csv and the chosen frames with their "
                             "pre-annotations (images/, annotations/: LabelImg's Pascal VOC)."),
    model: str | None = typer.Option(None, help="Base model (default: the adapter's base)."),
    checkpoint: str = typer.Option("best", help="best or last (with a run folder)."),
    threshold: float | None = typer.Option(None, help="Score threshold the doubt is measured against and the "
                                           "pre-annotations are cut at (default: the run's region rules, else "
                                           "0.2; the best_threshold of `loomlens eval` is a good value)."),
    flip: bool = typer.Option(True, "--flip/--no-flip", help="Also predict on each frame mirrored and count where the "
                              "two disagree (twice the model's work)."),
    diversity: float = typer.Option(0.5, min=0.0, help="How far apart the chosen frames must be, as a share of the "
                                    "typical distance between two frames (0: by score alone)."),
    weights: str | None = typer.Option(None, help="Weights of the components (uncertainty, entropy, "
                                       "disagreement; each 1 unless named), e.g. entropy=0.5 or "
                                       "disagreement=0."),
    link: bool = typer.Option(False, "--link/--copy", help="Put the chosen frames into OUT/images as hard links "
                              "(--link) or copies (--copy, the default: a folder you can hand to a labeller)."),
    every: int = typer.Option(1, min=1, help="For videos: consider every N-th frame."),
    tile: str = typer.Option("auto", help="Tiled detection: auto (frames longer than the run's tile), on or off."),
    tile_size: int | None = typer.Option(None, min=32, help="Tile edge in pixels (default: the run's)."),
    max_boxes: int | None = typer.Option(None, min=1, help="Most boxes read per frame (default: the most one "
                                         "image of the run's data holds, at least 20)."),
    batch_size: int = typer.Option(INFER_BATCH_SIZE, min=1, help="Images per generation batch."),
    constrained: bool | None = typer.Option(None, "--constrained/--no-constrained", help="Decode <OD> through the "
                                            "run's class grammar (default: on when the run has classes)."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    precision: str = typer.Option("auto", help=PRECISION_HELP),
    strict: bool = typer.Option(False, help="Exit 1 when any input was skipped (listed in OUT/problems.json)."),
) -> None:
    """Choose which frames to label next: rank unlabelled frames by how unsure the run is of them
    (boxes near the threshold, token entropy, disagreement with the mirrored frame), pick N that
    are not near-duplicates of each other, and write ranking.csv and the chosen frames with
    pre-annotations for LabelImg into OUT. Unreadable inputs are skipped and listed in
    OUT/problems.json."""
    from pydantic import ValidationError
    from rich.progress import Progress

    from loomlens.model.loader import ModelLoadError
    from loomlens.predict import Predictor
    from loomlens.predict.select import check_weights, select_frames
    from loomlens.predict.sources import count_items, expand_inputs

    if adapter is None and model is None:
        raise _fail("select ranks frames by what a trained run is unsure of: pass --adapter RUN "
                    "(a folder `loomlens train` wrote)")
    chosen_weights = _weights(weights)
    try:
        check_weights(chosen_weights)
        total = count_items(expand_inputs(inputs, exclude=[out]), every)
        predictor = Predictor(model=model, adapter=adapter, device=_device(device), max_boxes=max_boxes,
                              batch_size=batch_size, checkpoint=checkpoint, tile_size=tile_size,
                              constrained=constrained, precision=precision,
                              tta="off")  # disagreement with the mirrored frame is one of its measures
        with Progress(transient=True) as bar:
            job = bar.add_task(f"ranking {total} frames", total=total)
            summary = select_frames(predictor, inputs, out, n=n, threshold=threshold, flip=flip, diversity=diversity,
                                    weights=chosen_weights, every=every, tile=tile, link=link,
                                    on_item=lambda: bar.advance(job))
    except (FileNotFoundError, ValueError, ValidationError, RuntimeError, ModelLoadError) as err:
        raise _fail(str(err)) from None
    typer.echo(f"ranked {summary['frames']} frames, chose {len(summary['chosen'])} -> {out}: "
               f"{', '.join(summary['written'])}")
    if summary["chosen"]:
        typer.echo(f"label them in LabelImg: Open Dir {out / 'images'}, Change Save Dir {out / 'annotations'}; "
                   f"why each was chosen: {out / 'ranking.csv'}")
    _report_skipped(summary["problems"], out, strict=strict, none_done=not summary["frames"],
                    nothing="nothing was ranked")


def _event_media(store: EventStore, media: Path | None) -> Path:
    """The folder for event JPEGs: `media`, else event-images/ beside a SQLite `store`'s file,
    else runs/watch/event-images."""
    if media is not None:
        return media
    if store.url.startswith("sqlite"):
        return Path(store.engine.url.database).parent / "event-images"
    return Path("runs/watch/event-images")


def _run_until_stopped(watcher: Watcher, alerts: Alerter, store: EventStore) -> dict:
    """Run `watcher` until its sources end or Ctrl-C / SIGTERM, then close `alerts` and `store`;
    returns the run's counts (frames, events, ended, interrupted_before, failed)."""
    import signal
    import threading

    stop = threading.Event()
    # Ctrl-C and SIGTERM end the open events, then stop (the caller's handlers come back after)
    previous = {signum: signal.signal(signum, lambda *_: stop.set()) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        return watcher.run(stop)
    except ValueError as err:
        raise _fail(str(err)) from None
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        alerts.close()
        store.close()


@app.command("watch")
def watch_command(
    sources: list[str] = typer.Argument(..., help="Video files, folders where frames land, rtsp:// or http:// "
                                        "(MJPEG) stream URLs, or camera indexes (0, 1, ...)."),
    adapter: Path | None = typer.Option(None, "--adapter", "--run", help="Training run folder or adapter folder."),
    db: str = typer.Option("runs/watch/events.db", help="Events database: a SQLite file (WAL mode) or a "
                           "SQLAlchemy URL (postgresql+psycopg://user:pass@host/db) that several watchers share."),
    media: Path | None = typer.Option(None, help="Folder for each event's frame and crop JPEGs (default: "
                                      "event-images/ beside a SQLite database, else runs/watch/event-images)."),
    camera: list[str] = typer.Option([], help="Camera id of each source, in order (default: from the source)."),
    fps: float = typer.Option(2.0, min=0.01, help="Frames a second read from each source (of video time for files)."),
    once: bool = typer.Option(False, "--once", help="Folders: read the frames there now, then end."),
    k: int = typer.Option(3, min=1, help="A defect seen in K of N consecutive frames is an event..."),
    n: int = typer.Option(5, min=1, help="...the N of 'K of N'."),
    m: int = typer.Option(5, min=1, help="An event ends after M frames in a row without its defect."),
    iou: float = typer.Option(0.3, min=0.01, max=1.0, help="Overlap (IoU) at which a box is the same defect."),
    score_threshold: float = typer.Option(0.0, min=0.0, max=1.0, help="Ignore boxes scoring lower."),
    flag_threshold: float | None = typer.Option(
        None, min=0.0, max=1.0, help="Also record a frame left without a box whose defect probability is at least "
        "this, as an 'unlocated' box over the whole frame. `loomlens eval`'s threshold for a false-alarm rate counts "
        "this probability alone: boxes kept by --score-threshold and the region rules flag good frames on top of it "
        "(docs/line.md). Default: off."),
    webhook: list[str] = typer.Option([], help="POST each new event as JSON to this URL (repeat for more)."),
    on_event: list[str] = typer.Option([], help="Run this command per new event (event JSON on stdin and in "
                                       "$LOOMLENS_EVENT; repeat for more)."),
    keep_days: float = typer.Option(30.0, min=0.0, help="Event JPEGs older than this many days are removed (0: kept)."),
    keep_mb: float = typer.Option(2048.0, min=0.0, help="Event JPEGs kept under this many MB, oldest removed first (0: no cap)."),
    max_reconnects: int | None = typer.Option(None, min=0, help="Streams: failed reconnects in a row before giving "
                                              "up on a source (default: never give up)."),
    model: str | None = typer.Option(None, help="Base model (default: the adapter's base, else tiny)."),
    checkpoint: str = typer.Option("best", help="best or last (with a run folder)."),
    tile: str = typer.Option("auto", help="Tiled detection: auto (frames longer than the run's tile, as it was "
                             "trained), on, off."),
    tta: str = typer.Option("auto", help=TTA_HELP),
    regions: Path | None = typer.Option(None, help="Region rules YAML (default: the run's regions.yaml)."),
    max_tiles: int | None = typer.Option(None, min=1, help="Most crops (tiles, middle view, whole frame) one frame is cut into, each seen per --tta view (downscaled past it)."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    precision: str = typer.Option("auto", help=PRECISION_HELP),
    backend: str = typer.Option("torch", help=BACKEND_HELP),
) -> None:
    """Watch cameras, streams, videos or frame folders and record defect events: a defect seen in
    K of N frames at the same place is one event (ended after M frames without it), written to
    the database with a frame and a crop JPEG, and announced to webhooks and commands. Streams
    reconnect when they drop; files and --once folders end when read; Ctrl-C or SIGTERM stops."""
    import logging

    from loomlens.events import EventStore
    from loomlens.infer.tta import check_tta
    from loomlens.model.loader import ModelLoadError
    from loomlens.predict import Predictor
    from loomlens.predict.files import check_options
    from loomlens.watch import Alerter, DebounceSettings, Retention, Watcher, check_media, open_source, predictor_detector

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if camera and len(camera) != len(sources):
        raise _fail(f"{len(camera)} --camera id(s) for {len(sources)} source(s): give one per source, in order")
    opened, alerts = [], None
    try:
        check_tta(tta)  # before any source opens
        check_options("od", None, tile, regions=regions)  # --tile and --regions too
        debounce = DebounceSettings(k=k, n=n, m=m, iou=iou)
        alerts = Alerter(webhooks=webhook, commands=on_event)
        for i, spec in enumerate(sources):  # before the database: a missing source leaves no empty one behind
            opened.append(open_source(spec, camera=camera[i] if camera else None, fps=fps, once=once,
                                      max_reconnects=max_reconnects))
        media = check_media(_event_media(store := EventStore(db), media))
        retention = Retention(media, keep_days=keep_days or None, keep_mb=keep_mb or None)
        predictor = Predictor(model=model, adapter=adapter, device=_device(device), checkpoint=checkpoint,
                              regions=regions, precision=precision, max_tiles=max_tiles, backend=backend, tta=tta)
        detect = predictor_detector(predictor, tile=tile, score_threshold=score_threshold, flag_threshold=flag_threshold)
        watcher = Watcher(sources=opened, detect=detect, store=store, media=media, debounce=debounce, alerts=alerts,
                          retention=retention)
    except (FileNotFoundError, ValueError, RuntimeError, ModelLoadError) as err:
        for source in opened:
            source.close()
        if alerts is not None:  # its delivery thread is running
            alerts.close()
        raise _fail(str(err)) from None
    typer.echo(f"watching {len(opened)} source(s) -> {db} (pictures in {media}); Ctrl-C to stop", err=True)
    _say_watched(_run_until_stopped(watcher, alerts, store), db, sources=len(opened))


def _say_watched(stats: dict, db: str, sources: int) -> None:
    """Print what a watch recorded; fail naming the sources that stopped on an error (the others
    were watched to their end)."""
    typer.echo(f"{stats['frames']} frames, {stats['events']} events ({stats['ended']} ended) -> {db}"
               + (f"; {stats['interrupted_before']} event(s) a previous run left open marked interrupted"
                  if stats["interrupted_before"] else ""))
    if stats["failed"]:
        raise _fail(f"{len(stats['failed'])} of {sources} source(s) stopped on an error",
                    [f"{camera}: {why}" for camera, why in stats["failed"].items()])


#: Top-level modules of the optional dependencies -> the pyproject extra that installs them
#: (`make demo` installs loomlens without extras).
_EXTRAS = {
    "fastapi": "serve", "uvicorn": "serve", "gradio": "serve", "multipart": "serve", "python_multipart": "serve",
    "swagger_ui_bundle": "serve",
    "sqlalchemy": "line", "psycopg": "line", "httpx": "line", "cv2": "video", "onnx": "onnx", "onnxruntime": "onnx",
}


def main() -> None:
    """Console-script entry point. A command that needs an optional dependency which is not
    installed ends with the extra to install instead of a traceback."""
    sys.argv = [sys.argv[0], *_expand_key_value_args(sys.argv[1:])]
    try:
        app()
    except ModuleNotFoundError as err:
        extra = _EXTRAS.get((err.name or "").split(".")[0])
        if extra is None:
            raise
        _fail(f"this command needs {err.name}, which loomlens's {extra!r} extra installs: "
              f"pip install 'loomlens[{extra}]' (in a checkout: pip install -e '.[{extra}]')")
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
