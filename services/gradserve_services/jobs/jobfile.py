"""The job file: YAML schema, validation, and the command-line flags that override it.

Every problem raises `InvalidArgument` whose `field` is the dotted key at fault (`train.epochs`,
`optimizer.name`), so the CLI can print one line naming it and exit 2 before any training starts.
Unknown keys are errors too: a misspelt `epoch:` silently ignored would train the wrong job.

Every key, its default and its meaning: `JOB_FILE_KEYS` in `job_keys.py` (`gradserve train --print-reference` prints
it; the README's job-file reference is that text). In outline:

    seed: 0
    dataset:    {name, path, label, features, categorical, bags, hash_rows, x_key, y_key, task, test_fraction, ...}
    model:      {mlp: {hidden, activation, dropout, layernorm} | nodes: [...], output: NAME ; loss}
    optimizer:  {name, lr, momentum, beta1, beta2, eps, weight_decay, clip_norm, schedule: {...}}
    table_optimizer: {name, lr, beta1, beta2, eps, initial_accumulator_value}
    train:      {epochs, batch_size, workers, consistency, staleness, micro_batch_size}
    checkpoint: {dir, every_steps}
    service:    {target, token}
    out: runs/NAME
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml

from gradserve_services.cluster.config import COMPRESSIONS, CONSISTENCY_MODES, OUTER_OPTIMIZER, ROUND_MODES
from gradserve_services.engine.losses import LOSSES
from gradserve_services.errors import InvalidArgument
from gradserve_services.optim import OPTIMIZER_NAMES, SCHEDULE_NAMES, OptimizerConfig

from .job_keys import (ACTIVATIONS, CHECKPOINT_KEYS, DATASET_KEYS, DATASET_NAMES, FILE_DATASETS, JOB_FILE_KEYS,
                       MLP_KEYS, MODEL_KEYS, OPTIMIZER_KEYS, OVERRIDES, RESERVED_INPUTS, SCHEDULE_KEYS, SERVICE_KEYS,
                       TASKS, TOP_LEVEL_KEYS, TRAIN_KEYS, KeyDoc)
from .table_optimizer import parse_table_optimizer
from .values import (boolean, choice, integer, number, optional_string, reject_unknown, section,
                     string)

__all__ = [
    "DATASET_NAMES",
    "ACTIVATIONS",
    "DatasetConfig",
    "ModelConfig",
    "TrainConfig",
    "CheckpointConfig",
    "Job",
    "KeyDoc",
    "JOB_FILE_KEYS",
    "read_job_file",
    "apply_overrides",
    "parse_job",
    "load_job",
]

@dataclass(frozen=True)
class DatasetConfig:
    name: str
    path: Path | None  # npz/csv file, resolved against the job file's folder
    label: str  # csv: the label column
    features: tuple[str, ...] | None  # csv: feature columns (None: every other column)
    x_key: str  # npz: array names
    y_key: str
    task: str | None  # None: from the loss, else from the data
    test_fraction: float
    standardize: bool
    standardize_target: bool  # regression targets scaled to unit variance (fitted on train)
    drop_missing: bool  # drop rows with missing/NaN values instead of refusing the file
    categorical: tuple[str, ...] = ()  # columns / arrays hashed into table rows
    bags: tuple[str, ...] = ()  # multi-hot columns: a bag of values per row, each hashed (bags.py)
    bag_separator: str = "|"  # csv: between a bag cell's values
    hash_rows: int = 65536
    hash_seed: int = 0
    samples: int = 200000  # synthetic_ctr's size and shape
    fields: int = 26
    vocab: int = 1000
    zipf: float = 1.5


@dataclass(frozen=True)
class ModelConfig:
    mlp: Mapping | None  # {hidden, activation, dropout, layernorm}
    graph: Mapping | None  # {nodes, output[, input_features]}
    loss: str | None  # None: chosen from the task


@dataclass(frozen=True)
class TrainConfig:
    epochs: int
    batch_size: int
    workers: int
    consistency: str
    staleness: int
    micro_batch_size: int | None
    local_steps: int = 10  # local: inner steps per round (a job step is a round)
    inner_optimizer: dict | None = None  # local: None is the cluster's INNER_OPTIMIZER
    compression: str = "none"
    powersgd_rank: int = 4

    @property
    def rows_per_step(self) -> int:
        """Rows one step of the job sends: a batch, or in local mode a round of batches."""
        return self.batch_size * (self.local_steps if self.consistency in ROUND_MODES else 1)


@dataclass(frozen=True)
class CheckpointConfig:
    dir: Path | None
    every_steps: int


@dataclass(frozen=True)
class Job:
    name: str  # the job file's stem: names the default output folder
    seed: int
    dataset: DatasetConfig
    model: ModelConfig
    optimizer: dict  # ARCHITECTURE.md optimizer config; schedule.total_steps filled by the runner
    train: TrainConfig
    checkpoint: CheckpointConfig
    target: str | None  # host:port of a running service; None embeds one
    token: str | None
    out_dir: Path
    table_optimizer: dict | None = None  # the tables' per-row rule; None: the service derives it


def read_job_file(path: str | Path) -> dict:
    """The raw mapping of a YAML job file; unreadable or non-mapping files are `InvalidArgument`."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as failure:
        raise InvalidArgument(f"cannot read job file: {failure.strerror}", field=str(path)) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as failure:
        mark = getattr(failure, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(failure, "problem", None) or "malformed YAML"
        raise InvalidArgument(f"invalid YAML{where}: {problem}", field=str(path)) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise InvalidArgument(f"a job file is a mapping, got {type(raw).__name__}", field=str(path))
    return dict(raw)


def apply_overrides(raw: Mapping, flags: Mapping[str, object]) -> dict:
    """A copy of `raw` with each flag that is not None written to its dotted key (see OVERRIDES)."""
    merged = copy.deepcopy(dict(raw))
    for flag, value in flags.items():
        if value is None or flag not in OVERRIDES:
            continue
        *parents, leaf = OVERRIDES[flag].split(".")
        section = merged
        for parent in parents:
            if not isinstance(section.get(parent), Mapping):
                section[parent] = {}
            section[parent] = dict(section[parent])
            section = section[parent]
        section[leaf] = value
    return merged


def load_job(path: str | Path, flags: Mapping[str, object] | None = None) -> Job:
    """Read, override and validate a job file in one call."""
    path = Path(path)
    return parse_job(apply_overrides(read_job_file(path), flags or {}), name=path.stem, base_dir=path.parent)


def parse_job(raw: Mapping, *, name: str = "job", base_dir: Path = Path(".")) -> Job:
    """Validate a raw job mapping into a `Job`; relative data paths resolve against `base_dir`."""
    reject_unknown(raw, TOP_LEVEL_KEYS, "")
    seed = integer(raw.get("seed", 0), "seed", minimum=0)
    train = _parse_train(section(raw, "train"))
    out = raw.get("out", f"runs/{name}")
    if not isinstance(out, (str, Path)) or not str(out):
        raise InvalidArgument(f"must be a folder path, got {out!r}", field="out")
    service = section(raw, "service")
    reject_unknown(service, SERVICE_KEYS, "service")
    optimizer = dict(OUTER_OPTIMIZER) if train.consistency in ROUND_MODES and "optimizer" not in raw \
        else _parse_optimizer(section(raw, "optimizer"))
    tables = section(raw, "table_optimizer") if raw.get("table_optimizer") is not None else None
    return Job(
        name=name,
        seed=seed,
        dataset=_parse_dataset(section(raw, "dataset", required=True), base_dir),
        model=_parse_model(section(raw, "model", required=True)),
        optimizer=optimizer,
        train=train,
        checkpoint=_parse_checkpoint(section(raw, "checkpoint")),
        target=_optional_target(service.get("target")),
        token=optional_string(service.get("token"), "service.token"),
        out_dir=Path(out),
        table_optimizer=parse_table_optimizer(tables, optimizer),
    )


def _parse_dataset(raw: Mapping, base_dir: Path) -> DatasetConfig:
    reject_unknown(raw, DATASET_KEYS, "dataset")
    name = raw.get("name")
    path = raw.get("path")
    if name is None and isinstance(path, str):
        name = Path(path).suffix.lstrip(".").lower()  # `path: data.csv` alone is enough
    choice(name, DATASET_NAMES, "dataset.name", what="dataset")
    resolved = None
    if name in FILE_DATASETS:
        if not isinstance(path, str) or not path:
            raise InvalidArgument(f"a {name} dataset needs a file path", field="dataset.path")
        resolved = Path(path) if Path(path).is_absolute() else base_dir / path
    elif path is not None:
        raise InvalidArgument(f"the built-in {name!r} dataset takes no path", field="dataset.path")
    features = raw.get("features")
    if features is not None:
        if not isinstance(features, list) or not features or not all(isinstance(f, str) for f in features):
            raise InvalidArgument("must be a non-empty list of column names", field="dataset.features")
        features = tuple(features)
    task = raw.get("task")
    if task is not None:
        choice(task, TASKS, "dataset.task", what="task")
    fraction = number(raw.get("test_fraction", 0.2), "dataset.test_fraction")
    if not 0.0 < fraction < 1.0:
        raise InvalidArgument(f"must be between 0 and 1 (exclusive), got {fraction}", field="dataset.test_fraction")
    categorical = raw.get("categorical", [])
    if not isinstance(categorical, list) or not all(isinstance(c, str) and c for c in categorical) \
            or len(set(categorical)) != len(categorical):
        raise InvalidArgument("must be a list of distinct column names", field="dataset.categorical")
    if categorical and name not in FILE_DATASETS:
        raise InvalidArgument(f"the built-in {name!r} dataset has no categorical columns to choose",
                              field="dataset.categorical")
    bags = _parse_bags(raw.get("bags", []), name, categorical)
    zipf = number(raw.get("zipf", 1.5), "dataset.zipf")
    if zipf <= 0:
        raise InvalidArgument(f"must be > 0, got {zipf}", field="dataset.zipf")
    return DatasetConfig(
        name=name,
        path=resolved,
        label=string(raw.get("label", "label"), "dataset.label"),
        features=features,
        x_key=string(raw.get("x_key", "x"), "dataset.x_key"),
        y_key=string(raw.get("y_key", "y"), "dataset.y_key"),
        task=task,
        test_fraction=fraction,
        standardize=boolean(raw.get("standardize", True), "dataset.standardize"),
        standardize_target=boolean(raw.get("standardize_target", True), "dataset.standardize_target"),
        drop_missing=boolean(raw.get("drop_missing", False), "dataset.drop_missing"),
        categorical=tuple(categorical),
        bags=bags,
        bag_separator=_bag_separator(raw.get("bag_separator", "|")),
        hash_rows=integer(raw.get("hash_rows", 65536), "dataset.hash_rows", minimum=1),
        hash_seed=integer(raw.get("hash_seed", 0), "dataset.hash_seed", minimum=0, maximum=2**64 - 1),
        samples=integer(raw.get("samples", 200000), "dataset.samples", minimum=2),
        fields=integer(raw.get("fields", 26), "dataset.fields", minimum=1),
        vocab=integer(raw.get("vocab", 1000), "dataset.vocab", minimum=1),
        zipf=zipf,
    )


def _parse_bags(bags, name: str, categorical: list) -> tuple[str, ...]:
    """Bag columns name the bag inputs the model reads: a name an input may have, taken by no
    other input or column."""
    if not isinstance(bags, list) or not all(isinstance(b, str) and b for b in bags) or len(set(bags)) != len(bags):
        raise InvalidArgument("must be a list of distinct column names", field="dataset.bags")
    if bags and name not in FILE_DATASETS:
        raise InvalidArgument(f"the built-in {name!r} dataset has no bag columns to choose", field="dataset.bags")
    for bag in bags:
        if "." in bag or bag in RESERVED_INPUTS:
            raise InvalidArgument(f"bag column {bag!r} names the model's bag input: it needs a name without '.' "
                                  f"other than {', '.join(RESERVED_INPUTS)}", field="dataset.bags")
        if bag in categorical:
            raise InvalidArgument(f"column {bag!r} is both categorical and a bag", field="dataset.bags")
    return tuple(bags)


def _bag_separator(value) -> str:
    separator = string(value, "dataset.bag_separator")
    if "," in separator or "\n" in separator or '"' in separator:
        raise InvalidArgument(f"must not hold a comma, quote or newline (CSV's own), got {separator!r}",
                              field="dataset.bag_separator")
    return separator


def _parse_model(raw: Mapping) -> ModelConfig:
    reject_unknown(raw, MODEL_KEYS, "model")
    loss = raw.get("loss")
    if loss is not None:
        choice(loss, LOSSES, "model.loss", what="loss")
    has_graph = "nodes" in raw or "output" in raw
    if ("mlp" in raw) == has_graph:
        raise InvalidArgument("give either `mlp:` or a graph (`nodes:` and `output:`)", field="model")
    if "mlp" in raw:
        if "input_features" in raw:
            raise InvalidArgument("the mlp shorthand takes its width from the data", field="model.input_features")
        return ModelConfig(mlp=_parse_mlp(raw["mlp"]), graph=None, loss=loss)
    nodes = raw.get("nodes")
    if not isinstance(nodes, list) or not nodes:
        raise InvalidArgument("must be a non-empty list of nodes", field="model.nodes")
    if not isinstance(raw.get("output"), str):
        raise InvalidArgument("must name the output node", field="model.output")
    graph = {"nodes": copy.deepcopy(nodes), "output": raw["output"]}
    if "input_features" in raw:
        graph["input_features"] = raw["input_features"]
    return ModelConfig(mlp=None, graph=graph, loss=loss)


def _parse_mlp(raw) -> dict:
    if not isinstance(raw, Mapping):
        raise InvalidArgument("must be a mapping like {hidden: [128, 64], activation: relu}", field="model.mlp")
    reject_unknown(raw, MLP_KEYS, "model.mlp")
    hidden = raw.get("hidden", [])
    if isinstance(hidden, int) and not isinstance(hidden, bool):
        hidden = [hidden]
    if not isinstance(hidden, list):
        raise InvalidArgument(f"must be a list of layer widths, got {hidden!r}", field="model.mlp.hidden")
    for index, width in enumerate(hidden):
        integer(width, f"model.mlp.hidden[{index}]", minimum=1)
    activation = raw.get("activation", "relu")
    choice(activation, ACTIVATIONS, "model.mlp.activation", what="activation")
    dropout = number(raw.get("dropout", 0.0), "model.mlp.dropout")
    if not 0.0 <= dropout < 1.0:
        raise InvalidArgument(f"must be in [0, 1), got {dropout}", field="model.mlp.dropout")
    return {
        "hidden": list(hidden),
        "activation": activation,
        "dropout": dropout,
        "layernorm": boolean(raw.get("layernorm", False), "model.mlp.layernorm"),
    }


def _parse_optimizer(raw: Mapping) -> dict:
    """The optimizer as the job file gives it (keys left out stay out), read into numbers here and
    range-checked by `OptimizerConfig`, the parameter server's own rules."""
    reject_unknown(raw, OPTIMIZER_KEYS, "optimizer")
    name = raw.get("name", "adam")
    choice(name, OPTIMIZER_NAMES, "optimizer.name", what="optimizer")
    config: dict = {"name": name}
    config["lr"] = number(raw.get("lr", 0.001 if name in ("adam", "adamw") else 0.1), "optimizer.lr")
    for key in ("momentum", "beta1", "beta2", "eps", "weight_decay"):
        if key in raw:
            config[key] = number(raw[key], f"optimizer.{key}")
    if raw.get("clip_norm") is not None:
        config["clip_norm"] = number(raw["clip_norm"], "optimizer.clip_norm")
    if "schedule" in raw:
        config["schedule"] = _parse_schedule(raw["schedule"])
    OptimizerConfig.from_dict(config)
    return config


def _parse_schedule(raw) -> dict:
    if isinstance(raw, str):
        raw = {"name": raw}
    if not isinstance(raw, Mapping):
        raise InvalidArgument("must be a mapping like {name: cosine}", field="optimizer.schedule")
    reject_unknown(raw, SCHEDULE_KEYS, "optimizer.schedule")
    name = raw.get("name", "constant")
    choice(name, SCHEDULE_NAMES, "optimizer.schedule.name", what="schedule")
    schedule: dict = {"name": name}
    for key in ("warmup_steps", "step_size", "total_steps"):
        if key in raw:
            schedule[key] = integer(raw[key], f"optimizer.schedule.{key}", minimum=0)
    for key in ("gamma", "min_lr"):
        if key in raw:
            schedule[key] = number(raw[key], f"optimizer.schedule.{key}")
    return schedule


def _parse_train(raw: Mapping) -> TrainConfig:
    reject_unknown(raw, TRAIN_KEYS, "train")
    consistency = raw.get("consistency", "sync")
    choice(consistency, CONSISTENCY_MODES, "train.consistency", what="consistency mode")
    micro = raw.get("micro_batch_size")
    return TrainConfig(
        epochs=integer(raw.get("epochs", 10), "train.epochs", minimum=1),
        batch_size=integer(raw.get("batch_size", 64), "train.batch_size", minimum=1),
        workers=integer(raw.get("workers", 2), "train.workers", minimum=1),
        consistency=consistency,
        staleness=integer(raw.get("staleness", 0), "train.staleness", minimum=0),
        micro_batch_size=None if micro is None else integer(micro, "train.micro_batch_size", minimum=1),
        **_parse_rounds(raw),
    )


def _parse_rounds(raw: Mapping) -> dict:
    """The local-round and compression keys of `train` (their ranges checked by the cluster's
    TrainerConfig when the session starts, except what only the job can say)."""
    compression = raw.get("compression", "none")
    choice(compression, COMPRESSIONS, "train.compression", what="compression")
    inner = None
    if raw.get("inner_optimizer") is not None:
        try:
            inner = _parse_optimizer(section(raw, "inner_optimizer"))
        except InvalidArgument as bad:  # named optimizer.X by the shared reader: say which one
            named = "inner_" + bad.field if bad.field.startswith("optimizer") else bad.field
            raise InvalidArgument(bad.message, field="train." + named) from None
    return {"local_steps": integer(raw.get("local_steps", 10), "train.local_steps", minimum=1),
            "inner_optimizer": inner, "compression": compression,
            "powersgd_rank": integer(raw.get("powersgd_rank", 4), "train.powersgd_rank", minimum=1)}


def _parse_checkpoint(raw: Mapping) -> CheckpointConfig:
    reject_unknown(raw, CHECKPOINT_KEYS, "checkpoint")
    folder = raw.get("dir")
    if folder is not None and (not isinstance(folder, (str, Path)) or not str(folder)):
        raise InvalidArgument(f"must be a folder path, got {folder!r}", field="checkpoint.dir")
    return CheckpointConfig(
        dir=None if folder is None else Path(folder),
        every_steps=integer(raw.get("every_steps", 100), "checkpoint.every_steps", minimum=1),
    )


def _optional_target(value) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or ":" not in value or not value.rsplit(":", 1)[1].isdigit():
        raise InvalidArgument(f"must be host:port, got {value!r}", field="service.target")
    return value
