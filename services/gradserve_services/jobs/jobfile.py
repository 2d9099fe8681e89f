"""The job file: YAML schema, validation, and the command-line flags that override it.

Every problem raises `InvalidArgument` whose `field` is the dotted key at fault (`train.epochs`,
`optimizer.name`), so the CLI can print one line naming it and exit 2 before any training starts.
Unknown keys are errors too: a misspelt `epoch:` silently ignored would train the wrong job.

Every key, its default and its meaning: `JOB_FILE_KEYS` (`gradserve train --print-reference` prints
it; the README's job-file reference is that text). In outline:

    seed: 0
    dataset:    {name, path, label, features, categorical, hash_rows, x_key, y_key, task, test_fraction, ...}
    model:      {mlp: {hidden, activation, dropout, layernorm} | nodes: [...], output: NAME ; loss}
    optimizer:  {name, lr, momentum, beta1, beta2, eps, weight_decay, clip_norm, schedule: {...}}
    train:      {epochs, batch_size, workers, consistency, staleness, micro_batch_size}
    checkpoint: {dir, every_steps}
    service:    {target, token}
    out: runs/NAME
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml

from gradserve_services.cluster.config import CONSISTENCY_MODES
from gradserve_services.engine.losses import LOSSES
from gradserve_services.engine.ops import OPS, Elementwise
from gradserve_services.errors import InvalidArgument
from gradserve_services.optim import OPTIMIZER_NAMES, SCHEDULE_NAMES, OptimizerConfig, ScheduleConfig

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

DATASET_NAMES = ("digits", "diabetes", "synthetic_ctr", "npz", "csv", "parquet")
FILE_DATASETS = ("npz", "csv", "parquet")
TASKS = ("classification", "regression", "binary")
# The names the engine, the optimizer and the cluster define: the job file restates none of them.
ACTIVATIONS = tuple(kind for kind, op in OPS.items() if isinstance(op, Elementwise))

TOP_LEVEL_KEYS = ("seed", "dataset", "model", "optimizer", "train", "checkpoint", "service", "out")
DATASET_KEYS = (
    "name", "path", "label", "features", "x_key", "y_key", "task", "test_fraction",
    "standardize", "standardize_target", "drop_missing", "categorical", "hash_rows", "hash_seed",
    "samples", "fields", "vocab", "zipf",
)
MODEL_KEYS = ("mlp", "input_features", "nodes", "output", "loss")
MLP_KEYS = ("hidden", "activation", "dropout", "layernorm")
OPTIMIZER_KEYS = tuple(field.name for field in dataclasses.fields(OptimizerConfig))
SCHEDULE_KEYS = tuple(field.name for field in dataclasses.fields(ScheduleConfig))
TRAIN_KEYS = ("epochs", "batch_size", "workers", "consistency", "staleness", "micro_batch_size")
CHECKPOINT_KEYS = ("dir", "every_steps")
SERVICE_KEYS = ("target", "token")

@dataclass(frozen=True)
class KeyDoc:
    key: str  # dotted job-file key
    meaning: str
    default: object = None  # the value a job gets when the key is absent (None: null)
    default_rule: str | None = None  # instead of `default`, when it depends on other keys or the data


# The reference of every key above, in file order; a test checks it against the key lists and that
# each literal default is what parsing gives when the key is left out.
JOB_FILE_KEYS = (
    KeyDoc("seed", "seeds the train/test split, the batch order, initial parameters, dropout masks and synthetic data", 0),
    KeyDoc("dataset.name", "`digits`, `diabetes` (scikit-learn's, bundled), `synthetic_ctr` (clicks from a planted "
           "model, below), `npz`, `csv` or `parquet`", default_rule="from `dataset.path`'s suffix"),
    KeyDoc("dataset.path", "the `.npz` / `.csv` / `.parquet` file, relative to the job file's folder"),
    KeyDoc("dataset.label", "csv, parquet: the label column (header name)", "label"),
    KeyDoc("dataset.features", "csv, parquet: the dense feature columns (input `dense` when there are categorical ones)",
           default_rule="every column but the label and the categorical ones"),
    KeyDoc("dataset.categorical", "categorical columns (csv, parquet) or arrays (npz, each `(n,)` or `(n, k)`), "
           "strings or integers, hashed into `hash_rows` rows each; the model reads them as the ids input "
           "`categorical` `(batch, columns)` and needs the graph form", []),
    KeyDoc("dataset.hash_rows", "categorical: the rows each column's values hash into: BLAKE2b (8-byte digest, "
           "keyed by `hash_seed`) of `POSITION:TEXT` (the column's position in `categorical`; an integer's digits "
           "or a string stripped; missing: empty), modulo `hash_rows`", 65536),
    KeyDoc("dataset.hash_seed", "categorical: the hashing key; the same seed gives the same rows in any process", 0),
    KeyDoc("dataset.samples", "synthetic_ctr: rows generated", 200000),
    KeyDoc("dataset.fields", "synthetic_ctr: categorical fields (input `categorical`, ids in `[0, vocab)`), "
           "beside 13 dense features (input `dense`)", 26),
    KeyDoc("dataset.vocab", "synthetic_ctr: distinct ids per field", 1000),
    KeyDoc("dataset.zipf", "synthetic_ctr: Zipf exponent of the ids' frequencies", 1.5),
    KeyDoc("dataset.x_key", "npz: the array of features", "x"),
    KeyDoc("dataset.y_key", "npz: the array of labels or targets", "y"),
    KeyDoc("dataset.task", "`classification` (integer class labels), `regression` or `binary`",
           default_rule="from `model.loss`, else the data (integer labels: classification)"),
    KeyDoc("dataset.test_fraction", "share of rows held out for testing (stratified by class where it can be)", 0.2),
    KeyDoc("dataset.standardize", "scale features to mean 0, variance 1, fitted on the train split", True),
    KeyDoc("dataset.standardize_target", "regression: scale targets the same way", True),
    KeyDoc("dataset.drop_missing", "drop rows with a missing or NaN value instead of refusing the file", False),
    KeyDoc("model.mlp", "the MLP shorthand (give it, or `nodes` and `output`)",
           default_rule="none: one of the two forms is required"),
    KeyDoc("model.mlp.hidden", "hidden layer widths (none: a linear model)", []),
    KeyDoc("model.mlp.activation", "`relu`, `leaky_relu`, `sigmoid`, `tanh` or `gelu`", "relu"),
    KeyDoc("model.mlp.dropout", "dropout rate after each hidden layer, in [0, 1)", 0.0),
    KeyDoc("model.mlp.layernorm", "layer normalisation before each activation", False),
    KeyDoc("model.input_features", "graph form: the input width", default_rule="the data's feature count"),
    KeyDoc("model.nodes", "graph form: the nodes (docs/ARCHITECTURE.md, model spec)",
           default_rule="none: one of the two forms is required"),
    KeyDoc("model.output", "graph form: the output node's name", default_rule="none: required with `nodes`"),
    KeyDoc("model.loss", "`softmax_cross_entropy`, `mse` or `binary_cross_entropy`",
           default_rule="from the task: softmax_cross_entropy, mse, binary_cross_entropy"),
    KeyDoc("optimizer.name", "`sgd`, `momentum`, `nesterov`, `adam` or `adamw`", "adam"),
    KeyDoc("optimizer.lr", "learning rate", default_rule="`0.001` for adam and adamw, else `0.1`"),
    KeyDoc("optimizer.momentum", "momentum, nesterov: momentum factor", 0.9),
    KeyDoc("optimizer.beta1", "adam, adamw: first-moment decay", 0.9),
    KeyDoc("optimizer.beta2", "adam, adamw: second-moment decay", 0.999),
    KeyDoc("optimizer.eps", "adam, adamw: denominator guard", 1e-8),
    KeyDoc("optimizer.weight_decay", "L2 penalty (adamw: decoupled)", 0.0),
    KeyDoc("optimizer.clip_norm", "clip the global gradient norm to this (null: no clipping)"),
    KeyDoc("optimizer.schedule", "a schedule name, or a mapping of the keys below", "constant"),
    KeyDoc("optimizer.schedule.name", "`constant`, `step` or `cosine`", "constant"),
    KeyDoc("optimizer.schedule.warmup_steps", "updates whose rate ramps linearly up to `lr`", 0),
    KeyDoc("optimizer.schedule.step_size", "step: steps between decays", 100),
    KeyDoc("optimizer.schedule.gamma", "step: decay factor", 0.1),
    KeyDoc("optimizer.schedule.total_steps", "cosine: steps to reach `min_lr`",
           default_rule="cosine: the job's steps (epochs x batches per epoch); else `1000`"),
    KeyDoc("optimizer.schedule.min_lr", "cosine: the final learning rate", 0.0),
    KeyDoc("train.epochs", "passes over the train split", 10),
    KeyDoc("train.batch_size", "rows per step, split across the workers", 64),
    KeyDoc("train.workers", "Ray worker actors, each computing the gradient of its shard", 2),
    KeyDoc("train.consistency", "`sync` (every step sees the last one's parameters), `async` or `bounded`", "sync"),
    KeyDoc("train.staleness", "bounded: how many versions a gradient may lag", 0),
    KeyDoc("train.micro_batch_size", "rows per forward/backward pass within a shard (null: the whole shard)"),
    KeyDoc("checkpoint.dir", "folder for resumable checkpoints (null: none; `--resume` needs one)"),
    KeyDoc("checkpoint.every_steps", "steps between checkpoints", 100),
    KeyDoc("service.target", "host:port of a running `gradserve serve` (null: embed one for the job)"),
    KeyDoc("service.token", "bearer token for `service.target`"),
    KeyDoc("out", "folder for metrics.jsonl, metrics.png and parameters.npz",
           default_rule="`runs/NAME`, NAME the job file's name without `.yaml`"),
)

# Command-line flag (argparse dest) -> the dotted job-file key it replaces.
OVERRIDES = {
    "epochs": "train.epochs",
    "batch_size": "train.batch_size",
    "workers": "train.workers",
    "consistency": "train.consistency",
    "lr": "optimizer.lr",
    "seed": "seed",
    "target": "service.target",
    "token": "service.token",
    "checkpoint_dir": "checkpoint.dir",
    "checkpoint_every": "checkpoint.every_steps",
    "out": "out",
}


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
    _reject_unknown(raw, TOP_LEVEL_KEYS, "")
    seed = _integer(raw.get("seed", 0), "seed", minimum=0)
    train = _parse_train(_section(raw, "train"))
    out = raw.get("out", f"runs/{name}")
    if not isinstance(out, (str, Path)) or not str(out):
        raise InvalidArgument(f"must be a folder path, got {out!r}", field="out")
    service = _section(raw, "service")
    _reject_unknown(service, SERVICE_KEYS, "service")
    return Job(
        name=name,
        seed=seed,
        dataset=_parse_dataset(_section(raw, "dataset", required=True), base_dir),
        model=_parse_model(_section(raw, "model", required=True)),
        optimizer=_parse_optimizer(_section(raw, "optimizer")),
        train=train,
        checkpoint=_parse_checkpoint(_section(raw, "checkpoint")),
        target=_optional_target(service.get("target")),
        token=_optional_string(service.get("token"), "service.token"),
        out_dir=Path(out),
    )


def _parse_dataset(raw: Mapping, base_dir: Path) -> DatasetConfig:
    _reject_unknown(raw, DATASET_KEYS, "dataset")
    name = raw.get("name")
    path = raw.get("path")
    if name is None and isinstance(path, str):
        name = Path(path).suffix.lstrip(".").lower()  # `path: data.csv` alone is enough
    _choice(name, DATASET_NAMES, "dataset.name", what="dataset")
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
        _choice(task, TASKS, "dataset.task", what="task")
    fraction = _number(raw.get("test_fraction", 0.2), "dataset.test_fraction")
    if not 0.0 < fraction < 1.0:
        raise InvalidArgument(f"must be between 0 and 1 (exclusive), got {fraction}", field="dataset.test_fraction")
    categorical = raw.get("categorical", [])
    if not isinstance(categorical, list) or not all(isinstance(c, str) and c for c in categorical) \
            or len(set(categorical)) != len(categorical):
        raise InvalidArgument("must be a list of distinct column names", field="dataset.categorical")
    if categorical and name not in FILE_DATASETS:
        raise InvalidArgument(f"the built-in {name!r} dataset has no categorical columns to choose",
                              field="dataset.categorical")
    zipf = _number(raw.get("zipf", 1.5), "dataset.zipf")
    if zipf <= 0:
        raise InvalidArgument(f"must be > 0, got {zipf}", field="dataset.zipf")
    return DatasetConfig(
        name=name,
        path=resolved,
        label=_string(raw.get("label", "label"), "dataset.label"),
        features=features,
        x_key=_string(raw.get("x_key", "x"), "dataset.x_key"),
        y_key=_string(raw.get("y_key", "y"), "dataset.y_key"),
        task=task,
        test_fraction=fraction,
        standardize=_boolean(raw.get("standardize", True), "dataset.standardize"),
        standardize_target=_boolean(raw.get("standardize_target", True), "dataset.standardize_target"),
        drop_missing=_boolean(raw.get("drop_missing", False), "dataset.drop_missing"),
        categorical=tuple(categorical),
        hash_rows=_integer(raw.get("hash_rows", 65536), "dataset.hash_rows", minimum=1),
        hash_seed=_integer(raw.get("hash_seed", 0), "dataset.hash_seed", minimum=0, maximum=2**64 - 1),
        samples=_integer(raw.get("samples", 200000), "dataset.samples", minimum=2),
        fields=_integer(raw.get("fields", 26), "dataset.fields", minimum=1),
        vocab=_integer(raw.get("vocab", 1000), "dataset.vocab", minimum=1),
        zipf=zipf,
    )


def _parse_model(raw: Mapping) -> ModelConfig:
    _reject_unknown(raw, MODEL_KEYS, "model")
    loss = raw.get("loss")
    if loss is not None:
        _choice(loss, LOSSES, "model.loss", what="loss")
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
    _reject_unknown(raw, MLP_KEYS, "model.mlp")
    hidden = raw.get("hidden", [])
    if isinstance(hidden, int) and not isinstance(hidden, bool):
        hidden = [hidden]
    if not isinstance(hidden, list):
        raise InvalidArgument(f"must be a list of layer widths, got {hidden!r}", field="model.mlp.hidden")
    for index, width in enumerate(hidden):
        _integer(width, f"model.mlp.hidden[{index}]", minimum=1)
    activation = raw.get("activation", "relu")
    _choice(activation, ACTIVATIONS, "model.mlp.activation", what="activation")
    dropout = _number(raw.get("dropout", 0.0), "model.mlp.dropout")
    if not 0.0 <= dropout < 1.0:
        raise InvalidArgument(f"must be in [0, 1), got {dropout}", field="model.mlp.dropout")
    return {
        "hidden": list(hidden),
        "activation": activation,
        "dropout": dropout,
        "layernorm": _boolean(raw.get("layernorm", False), "model.mlp.layernorm"),
    }


def _parse_optimizer(raw: Mapping) -> dict:
    """The optimizer as the job file gives it (keys left out stay out), read into numbers here and
    range-checked by `OptimizerConfig`, the parameter server's own rules."""
    _reject_unknown(raw, OPTIMIZER_KEYS, "optimizer")
    name = raw.get("name", "adam")
    _choice(name, OPTIMIZER_NAMES, "optimizer.name", what="optimizer")
    config: dict = {"name": name}
    config["lr"] = _number(raw.get("lr", 0.001 if name in ("adam", "adamw") else 0.1), "optimizer.lr")
    for key in ("momentum", "beta1", "beta2", "eps", "weight_decay"):
        if key in raw:
            config[key] = _number(raw[key], f"optimizer.{key}")
    if raw.get("clip_norm") is not None:
        config["clip_norm"] = _number(raw["clip_norm"], "optimizer.clip_norm")
    if "schedule" in raw:
        config["schedule"] = _parse_schedule(raw["schedule"])
    OptimizerConfig.from_dict(config)
    return config


def _parse_schedule(raw) -> dict:
    if isinstance(raw, str):
        raw = {"name": raw}
    if not isinstance(raw, Mapping):
        raise InvalidArgument("must be a mapping like {name: cosine}", field="optimizer.schedule")
    _reject_unknown(raw, SCHEDULE_KEYS, "optimizer.schedule")
    name = raw.get("name", "constant")
    _choice(name, SCHEDULE_NAMES, "optimizer.schedule.name", what="schedule")
    schedule: dict = {"name": name}
    for key in ("warmup_steps", "step_size", "total_steps"):
        if key in raw:
            schedule[key] = _integer(raw[key], f"optimizer.schedule.{key}", minimum=0)
    for key in ("gamma", "min_lr"):
        if key in raw:
            schedule[key] = _number(raw[key], f"optimizer.schedule.{key}")
    return schedule


def _parse_train(raw: Mapping) -> TrainConfig:
    _reject_unknown(raw, TRAIN_KEYS, "train")
    consistency = raw.get("consistency", "sync")
    _choice(consistency, CONSISTENCY_MODES, "train.consistency", what="consistency mode")
    micro = raw.get("micro_batch_size")
    return TrainConfig(
        epochs=_integer(raw.get("epochs", 10), "train.epochs", minimum=1),
        batch_size=_integer(raw.get("batch_size", 64), "train.batch_size", minimum=1),
        workers=_integer(raw.get("workers", 2), "train.workers", minimum=1),
        consistency=consistency,
        staleness=_integer(raw.get("staleness", 0), "train.staleness", minimum=0),
        micro_batch_size=None if micro is None else _integer(micro, "train.micro_batch_size", minimum=1),
    )


def _parse_checkpoint(raw: Mapping) -> CheckpointConfig:
    _reject_unknown(raw, CHECKPOINT_KEYS, "checkpoint")
    folder = raw.get("dir")
    if folder is not None and (not isinstance(folder, (str, Path)) or not str(folder)):
        raise InvalidArgument(f"must be a folder path, got {folder!r}", field="checkpoint.dir")
    return CheckpointConfig(
        dir=None if folder is None else Path(folder),
        every_steps=_integer(raw.get("every_steps", 100), "checkpoint.every_steps", minimum=1),
    )


def _optional_target(value) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or ":" not in value or not value.rsplit(":", 1)[1].isdigit():
        raise InvalidArgument(f"must be host:port, got {value!r}", field="service.target")
    return value


# -- small typed readers: each names its field in the error -------------------------------------


def _section(raw: Mapping, key: str, *, required: bool = False) -> Mapping:
    value = raw.get(key)
    if value is None:
        if required:
            raise InvalidArgument("missing section", field=key)
        return {}
    if not isinstance(value, Mapping):
        raise InvalidArgument(f"must be a mapping, got {type(value).__name__}", field=key)
    return value


def _reject_unknown(raw: Mapping, known: tuple[str, ...], prefix: str) -> None:
    for key in raw:
        if key not in known:
            field = f"{prefix}.{key}" if prefix else str(key)
            raise InvalidArgument(f"unknown key; known keys here: {', '.join(known)}", field=field)


def _choice(value, choices, field: str, *, what: str) -> None:
    if not isinstance(value, str) or value not in choices:
        raise InvalidArgument(f"unknown {what} {value!r}; known: {', '.join(choices)}", field=field)


def _integer(value, field: str, *, minimum: int, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidArgument(f"must be an integer >= {minimum}, got {value!r}", field=field)
    if maximum is not None and value > maximum:
        raise InvalidArgument(f"must be an integer <= {maximum}, got {value!r}", field=field)
    return value


def _number(value, field: str) -> float:
    if isinstance(value, str):
        # PyYAML reads `1e-3` (no dot) as a string under YAML 1.1; accept what float() accepts.
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidArgument(f"must be a finite number, got {value!r}", field=field)
    return float(value)


def _boolean(value, field: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidArgument(f"must be true or false, got {value!r}", field=field)
    return value


def _string(value, field: str) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidArgument(f"must be a non-empty string, got {value!r}", field=field)
    return value


def _optional_string(value, field: str) -> str | None:
    return None if value is None else _string(value, field)
