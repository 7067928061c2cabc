"""Typed configs (pydantic) that YAML files map onto, one per stage.

A value comes from, in rising priority: the field's default, a YAML file (`--config`), then
command-line overrides. Overrides are `key=value` pairs; a key is a field name (`lr`), a
dotted path (`lora.r`, `speed.fold_lora`), or a field of a nested section given bare (`r`,
`dora`, `fold_lora`) when that name is unambiguous. Keys that moved (`MOVED`) are read at their
new place, so an old run's `config.yaml` still loads. Values are read as YAML scalars (`1e-4`, `true`, `null`,
`[od, phrase_grounding]`) and then validated by the model, so a typo fails with the field's
name instead of being ignored.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

#: The configs shipped with the package (`--config demo` finds `configs/demo.yaml`).
CONFIG_DIR = Path(__file__).resolve().parent / "configs"


#: What `--device` takes, for every command's help (`model.runtime.resolve_device` resolves it).
DEVICE_HELP = "auto (CUDA when there is one, else the CPU), cpu, cuda, cuda:N or mps."
#: Images per generation call of `predict`, `eval` and `select` unless told otherwise: on a CPU
#: two halves of 16 at once (`infer/streams.py`); halves of 8 gained a third as much
#: (docs/benchmarks.md, "Inference speed").
INFER_BATCH_SIZE = 32


def check_device_name(name: str) -> str:
    """`name` if it is `auto`, `cpu`, `mps` or `cuda`, with or without `:N` (as torch prints a
    device); else a ValueError that says what is accepted. Needs no device (nor torch): a
    config naming cuda validates anywhere."""
    kind, _, index = str(name).partition(":")
    if name == "auto" or (kind in ("cpu", "cuda", "mps") and (not index or index.isdigit())):
        return name
    raise ValueError(f"unknown device {name!r}: use {DEVICE_HELP}")


class LoraSettings(BaseModel):
    """How LoRA is attached: which layers, its rank and scale, DoRA, which tower is frozen."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    targets: str | list[str] = Field(
        "seed",
        description="a preset (seed, attention, language, all-linear), module names (suffixes such "
        "as q_proj, or full dotted names), or a mix of both, as a list or comma-separated",
    )
    r: int = Field(16, gt=0, description="LoRA rank")
    alpha: float | None = Field(None, gt=0, description="LoRA alpha; default 2 * r")
    dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout; 0 lets the layers run in their "
                           "fastest exact form (docs/training.md, the default recipe)")
    rslora: bool = Field(False, description="scale by alpha / sqrt(r) instead of alpha / r")
    plus_ratio: float = Field(1.0, ge=1, description="LoRA+: the B matrices (and 1-D adapter weights) learn at this "
                              "multiple of lr; 1 = plain LoRA")
    dora: bool = Field(False, description="weight-decomposed LoRA")
    freeze: Literal["none", "vision", "language"] = Field(
        "none", description="tower whose adapters are not trained"
    )

    @field_validator("targets", mode="before")
    @classmethod
    def _split_targets(cls, value: object) -> object:
        if isinstance(value, str) and "," in value:
            return [t.strip() for t in value.split(",") if t.strip()]
        return value

    @property
    def lora_alpha(self) -> float:
        """alpha, defaulting to 2 r (the write-up's best choice)."""
        return self.alpha if self.alpha is not None else 2.0 * self.r


class SpeedSettings(BaseModel):
    """How fast a run trains on its machine: every speed knob in one place (`speed.NAME`, or
    the bare `NAME` as an override). They change what a run learns at most by rounding, except
    `vision_frozen_stages`, which keeps adapters out of the first DaViT stages so that
    `cache_image_features` can compute them once. Measured effects: docs/training.md ("Speed")."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    precision: Literal["auto", "fp32", "bf16", "bf16-base", "fp16"] = Field(
        "auto", description="bf16 / fp16: autocast over fp32 weights; bf16-base: the frozen base stored in bf16, the "
        "adapter in fp32, no autocast (faster, less accurate); auto: bf16 (else fp16) autocast on CUDA, bf16 on a "
        "CPU with bf16 instructions, else fp32",
    )
    attention: Literal["auto", "sdpa", "eager"] = Field(
        "auto", description="attention kernels: auto = eager on a CPU (SDPA's bf16 backward is slow on DaViT's "
        "small windows), sdpa on CUDA; the pointer loss needs eager",
    )
    fold_lora: bool = Field(
        True, description="compute each plain LoRA layer in its cheapest exact form where estimated cheaper: "
        "linear(x, W + s B A) in fp32; under autocast linear(x, W) + linear(x, s B A), or the low-rank form without "
        "peft's input casts (off = peft's own forward everywhere)",
    )
    cache_image_features: bool = Field(
        False, description="run the frozen part of the vision side once per image and reuse its output: "
        "the whole side (--freeze vision or language-only targets) or its first vision_frozen_stages stages",
    )
    vision_frozen_stages: int = Field(
        0, ge=0, description="the first N DaViT stages get no adapters (with cache_image_features "
        "their output is computed once per image); 0 = targets anywhere in the tower",
    )
    num_workers: int = Field(
        0, ge=0, description="processes preparing batches (GPU runs on large data); 0 = in the loop, with "
        "every image processed once and cached",
    )
    gradient_checkpointing: Literal["none", "vision", "language", "both"] = Field(
        "none", description="recompute activations in backward on these towers: less memory per sample "
        "(docs/training.md, \"Memory\"), more compute",
    )
    micro_batch: Literal["auto"] | int = Field(
        "auto", description="samples per forward + backward: each batch of batch_size is split into passes of this "
        "many, their gradients accumulated (the same step, less memory). auto: the whole batch on a CPU; on CUDA the "
        "largest divisor of batch_size that fits, tried on the longest training samples, halved if a later pass runs out "
        "of memory. A run records the size it uses in config.yaml and resumes with it",
    )

    @field_validator("micro_batch", mode="before")
    @classmethod
    def _micro_batch(cls, value: object) -> object:
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value)
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value > 0):
            return value
        raise ValueError(f"speed.micro_batch must be auto or a number of samples (1 or more, dividing batch_size), "
                         f"got {value!r}: use speed.micro_batch=auto to find the largest that fits")


class AugmentSettings(BaseModel):
    """Online, box-correct augmentation of every training picture (`loomlens.data.augment`):
    chances of the defect crop and of each flip and turn, strengths of each photometric change.
    `enabled: false` (or `augment=false`) trains on the pictures as they are. What each is
    worth: `bench/ablate.py` (docs/benchmarks.md)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    enabled: bool = Field(True, description="augment training pictures (never validation; not with "
                          "speed.cache_image_features, which encodes each picture once)")
    hflip: float = Field(0.5, ge=0, le=1, description="chance of a left-right mirror")
    vflip: float = Field(0.5, ge=0, le=1, description="chance of a top-bottom mirror")
    rot90: float = Field(0.0, ge=0, le=1, description="chance of a quarter turn (off: on a loom a defect's "
                         "direction is part of its class)")
    brightness: float = Field(0.2, ge=0, lt=1, description="largest relative brightness change")
    contrast: float = Field(0.2, ge=0, lt=1, description="largest relative contrast change")
    gamma: float = Field(0.2, ge=0, lt=1, description="largest change of the gamma exponent")
    grey: float = Field(0.1, ge=0, le=1, description="chance of a grey copy")
    scale: float = Field(0.1, ge=0, lt=1, description="largest share of each side a crop may drop (zoom and shift "
                         "jitter; never cuts a defect)")
    crop: float = Field(0.0, ge=0, le=1, description="chance that a frame longer than the model's input "
                        "is shown as one input-sized window at full resolution, holding a defect if it has one "
                        "(boxes it cuts kept when half shows, else another window or the whole frame; 0 = off, the default "
                        "until measured on real fabric); a run "
                        "that cropped is predicted and evaluated tiled at the input size")
    paste: float = Field(0.5, ge=0, le=1, description="chance that a frame showing defects gets one more, cut with "
                         "a fading rim of fabric from a training frame (its class drawn uniformly, so rare ones "
                         "come often) and pasted where it covers no box; defect-free frames are never pasted onto "
                         "(docs/training.md: it keeps a small set from over-fitting)")


class BalanceSettings(BaseModel):
    """What each epoch shows (`loomlens.data.sampling`): defect-free samples held to a share of
    every batch, images of rare classes repeated (LVIS repeat-factor sampling)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    negative_share: float | None = Field(0.25, ge=0, lt=1, description="share of each batch given to defect-free "
                                         "samples; null = the data's own mix")
    repeat_threshold: float = Field(0.1, ge=0, description="repeat an image sqrt(t / f) times for its rarest "
                                    "class, f its share of images; 0 = no repeats")


class GuardSettings(BaseModel):
    """Watching the run (`loomlens.train.guard`): a run that collapses (no box on nearly every
    defect frame, or val loss rising while train loss falls) rolls back to its best checkpoint
    at a lower learning rate; one that collapses again, or stops improving, stops. An exploded
    train loss rolls back as a NaN step does."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    collapse: bool = Field(True, description="detect collapse and roll back (off: train on regardless)")
    empty_share: float = Field(0.9, gt=0, le=1, description="share of val frames with a defect answered with no "
                               "box that counts as a collapse")
    rising: int = Field(3, ge=2, description="evaluations in a row of rising val loss (train loss falling) that "
                        "count as a collapse")
    rollback_lr: float = Field(0.5, gt=0, lt=1, description="learning-rate factor after each rollback")
    max_rollbacks: int = Field(2, ge=0, description="rollbacks before a further collapse stops the run")
    explode: float = Field(10.0, ge=0, description="a train loss over this multiple of the largest of the run's "
                           "first 10 (and over a uniform guess's) means the weights blew up: roll back as for a "
                           "NaN step; 0: off")


class TrainConfig(BaseModel):
    """Everything a fine-tuning run needs; written resolved to `RUN_DIR/config.yaml`."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, protected_namespaces=())
    #: A YAML file with a `train:` mapping (a `DemoConfig`) gives its recipe from there.
    yaml_section: ClassVar[str] = "train"

    data: Path = Field(description="folder written by `loomlens convert` (train.jsonl, val.jsonl)")
    model: str = Field("tiny", description="base model: tiny or tiny-hr (embedded), base, large, a hub id or a folder")
    out: Path = Field(Path("runs/train"), description="run folder")
    lora: LoraSettings = Field(default_factory=LoraSettings)
    speed: SpeedSettings = Field(default_factory=SpeedSettings)
    augment: AugmentSettings = Field(default_factory=AugmentSettings)
    balance: BalanceSettings = Field(default_factory=BalanceSettings)
    guard: GuardSettings = Field(default_factory=GuardSettings)
    device: str = Field("auto", description=DEVICE_HELP)
    qlora: bool = Field(False, description="load the base in 4-bit (CUDA + bitsandbytes only)")

    tasks: list[str] = Field(default_factory=list, description="task names to train on; empty = all in the data")
    order: Literal["grouped", "interleaved"] = Field(
        "grouped", description="grouped: one task after another, in the seed's order; interleaved: mixed"
    )
    shuffle: bool = Field(True, description="shuffle samples (within each task when grouped) every epoch")
    group_by_length: bool = Field(
        False, description="batch answers of similar length together (less padding; but empty answers, the "
        "defect-free frames, then all land in the same batches)"
    )

    epochs: float | None = Field(
        None, gt=0, description="passes over the training data; null = as many as time_budget allows, "
        "or without a budget 3 passes or 3000 steps, whichever is more"
    )
    max_steps: int | None = Field(None, gt=0, description="optimizer steps; overrides epochs")
    time_budget: float | None = Field(
        None, gt=0, description="training seconds, summed over resumes: the schedule anneals by then, and the run stops"
    )
    batch_size: int = Field(8, gt=0, description="samples per process per batch (the unit the batch plan, balance "
                            "and length grouping compose); speed.micro_batch splits it to fit memory")
    grad_accum: int = Field(1, gt=0, description="batches per process per optimizer step")
    lr: float = Field(2e-3, gt=0, description="peak learning rate (docs/training.md: how it was chosen)")
    weight_decay: float = Field(0.0, ge=0)
    warmup: float = Field(0.05, ge=0, description="warmup: a fraction of the steps (<1) or a number of steps")
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    loc_sigma: float = Field(0.0, ge=0, description="soft labels over location bins: Gaussian width in bins; 0 = exact")
    pointer_weight: float = Field(
        0.0, ge=0, description="pointer loss: cross-attention at location tokens onto the box edge's image cells"
    )
    max_grad_norm: float | None = Field(1.0, gt=0, description="gradient clipping; null = off")
    ema_decay: float = Field(
        0.998, ge=0, lt=1, description="moving average of the adapter's weights, which validation scores and "
        "best/ and last/ hold (train/average.py): the most it keeps of itself per step; 0 = off (each step's weights)"
    )
    seed: int = 0

    eval_every: int | None = Field(
        None, ge=0, description="evaluate every N steps; 0 = at the end of each epoch; null = ten times a run"
    )
    save_every: int = Field(0, ge=0, description="save last/ every N steps; 0 = at each evaluation")
    eval_max_images: int | None = Field(200, ge=0, description="val images scored at each evaluation; null = all, "
                                        "0 = no mAP")
    eval_batch_size: int = Field(16, gt=0)
    val_loss_max_samples: int | None = Field(256, gt=0, description="val samples for the val loss; null = all")
    best_metric: Literal["map50_f1", "map50", "map50_95", "val_loss"] = Field(
        "map50_f1", description="what picks best/: map50_f1 = the mean of val mAP50 and the best F1 (steadier than "
        "mAP50 alone on a small split, and F1 is the operating point the line sees); val_loss when mAP is off"
    )
    early_stopping: int = Field(6, ge=0, description="stop after N evaluations without a better score; 0 = off")
    tensorboard: bool = True
    progress: bool = Field(True, description="show a progress bar")

    @field_validator("tasks", mode="before")
    @classmethod
    def _split_tasks(cls, value: object) -> object:
        if isinstance(value, str):
            return [t.strip() for t in value.split(",") if t.strip()]
        return value

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        return check_device_name(value)

    @field_validator("data", "out", mode="before")
    @classmethod
    def _a_folder(cls, value: object) -> object:
        # Path("") is ".": an unset shell variable (`out=$RUN`) would train in the working directory.
        if isinstance(value, str) and not value.strip():
            raise ValueError("is empty: give a folder")
        return value

    @field_validator("data")
    @classmethod
    def _absolute_data(cls, value: Path) -> Path:
        # Recorded in config.yaml as an absolute path, so `train --resume` from another working
        # directory (cron, a service) finds the data, and `../data` there is the same data.
        return value.resolve()

    @field_validator("augment", mode="before")
    @classmethod
    def _augment_switch(cls, value: object) -> object:
        return {"enabled": value} if isinstance(value, bool) else value

    @model_validator(mode="after")
    def _one_base_dtype(self) -> "TrainConfig":
        if self.qlora and self.speed.precision == "bf16-base":
            raise ValueError("precision bf16-base stores the frozen base in bf16, but qlora stores it in 4 bits: "
                             "use precision bf16 (autocast) with qlora")
        return self

    @model_validator(mode="after")
    def _micro_batch_divides(self) -> TrainConfig:
        micro = self.speed.micro_batch
        if micro != "auto" and self.batch_size % micro:
            fits = ", ".join(str(d) for d in range(1, self.batch_size + 1) if self.batch_size % d == 0)
            raise ValueError(f"speed.micro_batch {micro} does not divide batch_size {self.batch_size}: use one of "
                             f"{fits}, or auto")
        return self


def _parse_value(text: Any) -> Any:
    """A command-line string as YAML reads it (`8` -> 8, `true` -> True, `null` -> None)."""
    if not isinstance(text, str):
        return text
    try:
        return yaml.safe_load(text) if text.strip() else text
    except yaml.YAMLError:
        return text


#: Settings that moved, old key -> new: an old run's `config.yaml` still loads (and resumes).
MOVED = {
    "precision": "speed.precision",
    "attention": "speed.attention",
    "fold_lora": "speed.fold_lora",
    "cache_image_features": "speed.cache_image_features",
    "num_workers": "speed.num_workers",
    "lora.vision_frozen_stages": "speed.vision_frozen_stages",
}


def _set(tree: dict, schema: type[BaseModel], key: str, value: Any) -> None:
    """Put `value` at `key` in the nested dict `tree`, resolving moved keys (`MOVED`, for a
    `TrainConfig`) and bare nested names."""
    name = key.replace("-", "_")
    path = (MOVED.get(name, name) if schema is TrainConfig else name).split(".")
    if len(path) == 1 and path[0] not in schema.model_fields:
        owners = [
            name for name, field in schema.model_fields.items()
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
            and path[0] in field.annotation.model_fields
        ]
        if len(owners) != 1:
            raise ValueError(_unknown(key, schema))
        path = [owners[0], path[0]]
    elif len(path) > 1 and ".".join(path) not in _known_keys(schema):
        raise ValueError(_unknown(key, schema))  # a section's typo, before pydantic's "Extra inputs"
    kinds = _field_kinds(schema, path)
    if isinstance(value, bool) and kinds & {int, float} and bool not in kinds:  # pydantic would read true as 1
        words = "".join(f" or {word}" for kind in kinds if get_origin(kind) is Literal for word in get_args(kind))
        raise ValueError(f"setting {key!r} takes a number, not {str(value).lower()} (YAML reads true, yes and on as a "
                         f"switch, and so does --{key} given no value): give it a number{words}, as {key}=N")
    node = tree
    for part in path[:-1]:
        node = node.setdefault(part, {})
    node[path[-1]] = value


def _field_kinds(schema: type[BaseModel], path: list[str]) -> set:
    """The types (and `Literal`s) the field at `path` of `schema` takes; empty for no field."""
    field = schema.model_fields.get(path[0])
    for part in path[1:]:
        sub = field.annotation if field else None
        field = sub.model_fields.get(part) if isinstance(sub, type) and issubclass(sub, BaseModel) else None
    return set(get_args(field.annotation) or (field.annotation,)) if field else set()


#: Names other trainers use for a setting (ultralytics, transformers, peft), for suggestions only.
OTHER_NAMES = {"learning_rate": "lr", "lr0": "lr", "rank": "lora.r", "lora_r": "lora.r", "lora_alpha": "lora.alpha",
               "lora_dropout": "lora.dropout", "steps": "max_steps", "budget": "time_budget", "batch": "batch_size",
               "per_device_train_batch_size": "batch_size", "num_train_epochs": "epochs", "patience": "early_stopping"}


def _unknown(key: str, schema: type[BaseModel]) -> str:
    """The error for a setting `schema` does not have: the closest known names (as typed, with
    or without a section, or another trainer's name for one), else every key."""
    known = _known_keys(schema)
    names = {k: k for k in known} | {k.rpartition(".")[2]: k for k in known}
    if schema is TrainConfig:
        names |= OTHER_NAMES
    typed = key.replace("-", "_")
    close = difflib.get_close_matches(typed, list(names), n=3, cutoff=0.6) or difflib.get_close_matches(
        typed.rpartition(".")[2], list(names), n=3, cutoff=0.6)
    if close:
        return f"unknown setting {key!r}: did you mean {' or '.join(dict.fromkeys(repr(names[c]) for c in close))}?"
    return f"unknown setting {key!r}; known: {', '.join(known)}"


def _known_keys(schema: type[BaseModel]) -> list[str]:
    keys = []
    for name, field in schema.model_fields.items():
        sub = field.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            keys += [f"{name}.{k}" for k in sub.model_fields]
        else:
            keys.append(name)
    return keys


def resolve_config_path(path: str | Path) -> Path:
    """A YAML file, or the bare name of a shipped config (`demo` or `demo.yaml` ->
    `configs/demo.yaml`). A path with a folder is only ever that file: a missing
    `myexp/base.yaml` must not quietly train the shipped `base`."""
    candidate = Path(path)
    if candidate.is_dir():
        raise FileNotFoundError(f"config {path} is a folder; give a YAML file in it, or a shipped config's name")
    if candidate.exists():
        return candidate
    shipped = CONFIG_DIR / f"{candidate.stem}.yaml"
    bare = candidate.name == str(path) and candidate.suffix in ("", ".yaml")
    if bare and shipped.exists():
        return shipped
    known = ", ".join(p.stem for p in sorted(CONFIG_DIR.glob("*.yaml")))
    raise FileNotFoundError(f"config {path} not found (shipped configs: {known})")


def load_config(
    schema: type[BaseModel],
    path: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    *,
    base: Mapping[str, Any] | None = None,
):
    """Build a `schema` config from `base` (a dict), then the YAML at `path`, then `overrides`
    (`key=value` pairs, values as strings or Python values); raises pydantic's
    `ValidationError` or `ValueError` naming the bad key."""
    tree: dict[str, Any] = {}
    for key, value in _flatten(base or {}):
        _set(tree, schema, key, value)
    if path is not None:
        for key, value in _flatten(_yaml_layer(schema, path)):
            try:
                _set(tree, schema, key, value)
            except ValueError as err:
                raise ValueError(f"{path}: {err}") from None
    for key, value in overrides.items() if overrides else ():
        _set(tree, schema, key, _parse_value(value))
    return schema.model_validate(tree)


#: Settings added after run folders were first written, with the value the runs before them
#: had: a recorded config.yaml is read over these, so resuming an older run goes on as it began.
RECORDED_BEFORE: dict[str, Any] = {"ema_decay": 0.0}


def load_recorded(path: str | Path, overrides: Mapping[str, Any] | None = None) -> TrainConfig:
    """The settings a run folder's `config.yaml` at `path` records, then `overrides`; a setting
    it predates takes the value its run had (`RECORDED_BEFORE`), not today's default."""
    return load_config(TrainConfig, path, overrides, base=RECORDED_BEFORE)


class SettingsLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (`_unique_mapping`): the
    loader of every YAML a person writes (training configs, region rules)."""


def _unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    """A mapping as the safe loader builds it, or a `ConstructorError` at a key given twice:
    YAML keeps the last one without a word, so a second `lora:` section reset the first's settings."""
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=deep)
        if isinstance(key, (str, int, float)) and key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"{key!r} is given twice (first at line {seen[key] + 1}): keep one", key_node.start_mark)
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep)


SettingsLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def _yaml_layer(schema: type[BaseModel], path: str | Path) -> Mapping[str, Any]:
    """The settings of the YAML at `path` for `schema`: the file, or its `schema.yaml_section`
    mapping when it has one (`train --config demo` takes the demo's training recipe)."""
    file = resolve_config_path(path)
    try:
        layer = yaml.load(file.read_text(encoding="utf-8"), Loader=SettingsLoader) or {}
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"{file}:{mark.line + 1}:{mark.column + 1}" if mark else str(file)
        tabs = " (YAML indents with spaces, never tabs)" if "'\\t'" in str(err.problem) else ""
        raise ValueError(f"{where}: not valid YAML: {err.problem or err.context}{tabs}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ValueError(f"{file}: not a YAML text file ({err})") from None
    if not isinstance(layer, Mapping):
        raise ValueError(f"{file}: holds a {type(layer).__name__}, not settings: write one `key: value` a line")
    section = getattr(schema, "yaml_section", None)
    if section and section not in schema.model_fields and isinstance(layer.get(section), Mapping):
        return layer[section]
    return layer


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    items = []
    for key, value in tree.items():
        if isinstance(value, Mapping):
            items += _flatten(value, f"{prefix}{key}.")
        else:
            items.append((f"{prefix}{key}", value))
    return items


#: Settings a resumed run may change: they decide how long it runs, how often it looks and where,
#: or in how many passes a step is computed, never what it computes (the micro-batch and
#: checkpointing give the same gradient up to rounding, so a run that ran out of memory can go on
#: with less); anything else breaks exact resume and is refused.
RESUMABLE = frozenset({
    "time_budget", "max_steps", "epochs", "eval_every", "save_every", "eval_max_images", "eval_batch_size",
    "val_loss_max_samples", "early_stopping", "progress", "tensorboard", "device", "speed.num_workers", "out",
    "speed.micro_batch", "speed.gradient_checkpointing",
})


def changed_settings(before: BaseModel, after: BaseModel) -> dict[str, tuple[Any, Any]]:
    """Dotted setting -> (old, new) for every setting that differs between two configs."""
    old, new = dict(_flatten(before.model_dump(mode="json"))), dict(_flatten(after.model_dump(mode="json")))
    return {k: (old.get(k), new.get(k)) for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)}


def dump_config(config: BaseModel, path: Path) -> None:
    """Write `config`, resolved, as YAML; atomically, so a run's config.yaml is never half written."""
    from loomlens.data.atomic import atomic_write

    atomic_write(path, yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))


def described(config: BaseModel, indent: str = "") -> list[str]:
    """`config` as YAML lines, each setting followed by what it does (its field's description)
    as a comment: what `loomlens config` prints, the one flat list a user can override."""
    lines = []
    for name, field in type(config).model_fields.items():
        value = getattr(config, name)
        if isinstance(value, BaseModel):
            lines += [f"{indent}{name}:", *described(value, indent + "  ")]
            continue
        text = yaml.safe_dump({name: str(value) if isinstance(value, Path) else value},
                              default_flow_style=True, width=10**6).strip()[1:-1]  # `{name: value}` less braces
        lines.append(f"{indent}{text}" + (f"  # {field.description}" if field.description else ""))
    return lines


class DemoConfig(BaseModel):
    """`loomlens demo`: the synthetic loom data to make and the training recipe to run on it
    (`train` holds `TrainConfig` settings; the demo fills in `data` and `out`)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    images: int = Field(480, gt=1, description="synthetic frames (flipped copies come on top)")
    size: tuple[int, int] = Field((512, 288), description="frame width, height")
    seed: int = 0
    tasks: list[str] = Field(default_factory=lambda: ["od"], description="convert tasks")
    flip: bool = True
    eval_images: int | None = Field(None, gt=0, description="val images in the before/after evaluation; null = all")
    train: dict[str, Any] = Field(default_factory=dict, description="TrainConfig settings")


class PretrainConfig(BaseModel):
    """Every knob of a pretraining run of the embedded tiny model (`python -m
    loomlens.train.pretrain`); saved, resolved, as `pretrain_config.json` beside the weights."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    out: str = Field("runs/pretrain", description="work folder: resumable state, log, config")
    seed: int = Field(0, description="seed of the model init and of every scene (scenes of step N: seed + N)")
    steps: int = Field(4000, gt=0, description="optimizer steps; a cap with time_budget")
    batch_size: int = Field(16, gt=0, description="fresh scenes per step")
    lr: float = Field(1.5e-3, gt=0, description="peak learning rate (AdamW, warmup then cosine: train/schedule.py)")
    warmup: float = Field(100, ge=0, description="warmup: a fraction of the steps (<1) or a number of steps")
    weight_decay: float = Field(0.01, ge=0)
    loc_sigma: float = Field(
        60.0, gt=0, description="Gaussian soft-label width in loc bins at the start: about one grid cell, so the "
        "right cell earns credit from the first step; annealed geometrically to loc_sigma_end",
    )
    loc_sigma_end: float = Field(2.0, gt=0)
    dense_weight: float = Field(1.0, ge=0, description="weight of the dense head's loss")
    pointer_weight: float = Field(1.0, ge=0, description="weight of the pointer loss")
    one_object_steps: int = Field(600, ge=0, description="curriculum: one object per scene for these first steps")
    max_objects: int = Field(4, gt=0)
    task_mix: dict[str, float] = Field(
        default_factory=lambda: {"od": 0.7, "dense_region_caption": 0.1, "phrase_grounding": 0.1, "caption": 0.1},
        description="share of each task among the samples",
    )
    eval_every: int = Field(200, gt=0, description="steps between 'is it looking?' checks")
    eval_images: int = Field(64, gt=0, description="held-out scenes of each check")
    save_every: int = Field(100, gt=0)
    time_budget: float | None = Field(
        None, gt=0, description="seconds of training, summed over resumes, the schedule (lr and soft-label width) is "
        "paced over: a run on any machine anneals fully by the deadline",
    )
    stop_at: int | None = Field(None, gt=0, description="stop (resumably) after this step, to split a run")
    threads: int | None = Field(None, gt=0, description="torch CPU threads")
    device: str = Field("auto", description=DEVICE_HELP)
    workers: int = Field(0, ge=0, description="processes drawing scenes ahead of the loop (0: in the loop)")
    shape: dict[str, Any] = Field(default_factory=dict, description="`model.tiny.TinyShape` fields; {} = its defaults")
    fabric_share: float = Field(
        0.0, ge=0, le=1, description="share of the scenes (training and held-out) drawn from the fabric family "
        "(data/fabric_scenes.py) instead of the generic shapes; 0 = the shipped tiny's recipe",
    )
    init: str | None = Field(
        None, description="start a new run from this model's weights (tiny, or a model folder), resampling the "
        "grid-tied tables when the input size differs (model/warm_start.py); null = random init",
    )

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        return check_device_name(value)
