"""The job file's names and keys: the datasets, tasks and activations it knows, every key it
accepts, the reference of each key (`JOB_FILE_KEYS`: meaning and default) and the command-line flags
that override them. Names the engine, the optimizer and the cluster define are taken from there,
in the parser and in the reference alike."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from gradserve_services.cluster.config import COMPRESSIONS, CONSISTENCY_MODES
from gradserve_services.engine.losses import LOSSES
from gradserve_services.engine.inputs import INPUT
from gradserve_services.engine.ops import OPS, Elementwise
from gradserve_services.optim import OPTIMIZER_NAMES, SCHEDULE_NAMES, OptimizerConfig, ScheduleConfig
from gradserve_services.optim.rows import TABLE_OPTIMIZER_NAMES, TableOptimizerConfig

__all__ = ["DATASET_NAMES", "FILE_DATASETS", "TASKS", "ACTIVATIONS", "TOP_LEVEL_KEYS", "DATASET_KEYS",
           "MODEL_KEYS", "MLP_KEYS", "OPTIMIZER_KEYS", "SCHEDULE_KEYS", "TRAIN_KEYS", "CHECKPOINT_KEYS",
           "SERVICE_KEYS", "TABLE_OPTIMIZER_KEYS", "DENSE_INPUT", "CATEGORICAL_INPUT", "RESERVED_INPUTS", "KeyDoc",
           "JOB_FILE_KEYS", "OVERRIDES", "one_of"]

DATASET_NAMES = ("digits", "diabetes", "synthetic_ctr", "npz", "csv", "parquet")
FILE_DATASETS = ("npz", "csv", "parquet")
TASKS = ("classification", "regression", "binary")
# The named inputs a job's data feeds besides its bags (datasets.py), and the single input's name.
DENSE_INPUT, CATEGORICAL_INPUT = "dense", "categorical"
RESERVED_INPUTS = (DENSE_INPUT, CATEGORICAL_INPUT, INPUT)
# The names the engine, the optimizer and the cluster define: the job file restates none of them.
ACTIVATIONS = tuple(kind for kind, op in OPS.items() if isinstance(op, Elementwise))


def one_of(names) -> str:
    """`a`, `b` or `c`: a reference line listing the names a key takes."""
    quoted = [f"`{name}`" for name in names]
    return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"


TOP_LEVEL_KEYS = ("seed", "dataset", "model", "optimizer", "table_optimizer", "train", "checkpoint", "service", "out")
DATASET_KEYS = (
    "name", "path", "label", "features", "x_key", "y_key", "task", "test_fraction",
    "standardize", "standardize_target", "drop_missing", "categorical", "bags", "bag_separator", "hash_rows",
    "hash_seed",
    "samples", "fields", "vocab", "zipf",
)
MODEL_KEYS = ("mlp", "input_features", "nodes", "output", "loss")
MLP_KEYS = ("hidden", "activation", "dropout", "layernorm")
OPTIMIZER_KEYS = tuple(field.name for field in dataclasses.fields(OptimizerConfig))
SCHEDULE_KEYS = tuple(field.name for field in dataclasses.fields(ScheduleConfig))
TABLE_OPTIMIZER_KEYS = tuple(field.name for field in dataclasses.fields(TableOptimizerConfig))
TRAIN_KEYS = ("epochs", "batch_size", "workers", "consistency", "staleness", "micro_batch_size",
              "local_steps", "inner_optimizer", "compression", "powersgd_rank")
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
    KeyDoc("dataset.features", "csv, parquet: the dense feature columns (input `dense` when there are categorical "
           "or bag ones)",
           default_rule="every column but the label, the categorical and the bag ones"),
    KeyDoc("dataset.categorical", "categorical columns (csv, parquet) or arrays (npz, each `(n,)` or `(n, k)`), "
           "strings or integers, hashed into `hash_rows` rows each; the model reads them as the ids input "
           "`categorical` `(batch, columns)` and needs the graph form", []),
    KeyDoc("dataset.bags", "multi-hot columns, a bag of values per row (possibly empty), each value hashed as "
           "`categorical` ones are; bag `NAME` is the bag input `NAME` (`batch.NAME.values` + `batch.NAME.offsets`, "
           "torch EmbeddingBag style) that an `embedding_bag` node reads. csv: a cell of values separated by "
           "`bag_separator` (an empty cell: an empty bag); parquet: a list column; npz: the arrays `NAME.values` and "
           "`NAME.offsets` (one per row, from 0, non-decreasing)", []),
    KeyDoc("dataset.bag_separator", "csv: what separates a bag cell's values (each stripped)", "|"),
    KeyDoc("dataset.hash_rows", "categorical and bags: the rows each column's values hash into: BLAKE2b (8-byte "
           "digest, keyed by `hash_seed`) of `POSITION:TEXT` (the column's position in `categorical`, then bags "
           "numbered on after them; an integer's digits or a string stripped; missing: empty), modulo `hash_rows`",
           65536),
    KeyDoc("dataset.hash_seed", "categorical and bags: the hashing key; the same seed gives the same rows in any process", 0),
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
    KeyDoc("model.mlp.activation", one_of(ACTIVATIONS), "relu"),
    KeyDoc("model.mlp.dropout", "dropout rate after each hidden layer, in [0, 1)", 0.0),
    KeyDoc("model.mlp.layernorm", "layer normalisation before each activation", False),
    KeyDoc("model.input_features", "graph form: the input width", default_rule="the data's feature count"),
    KeyDoc("model.nodes", "graph form: the nodes (docs/ARCHITECTURE.md, model spec)",
           default_rule="none: one of the two forms is required"),
    KeyDoc("model.output", "graph form: the output node's name", default_rule="none: required with `nodes`"),
    KeyDoc("model.loss", one_of(LOSSES),
           default_rule="from the task: softmax_cross_entropy, mse, binary_cross_entropy"),
    KeyDoc("optimizer.name", one_of(OPTIMIZER_NAMES), "adam"),
    KeyDoc("optimizer.lr", "learning rate", default_rule="`0.001` for adam and adamw, else `0.1`"),
    KeyDoc("optimizer.momentum", "momentum, nesterov: momentum factor", 0.9),
    KeyDoc("optimizer.beta1", "adam, adamw: first-moment decay", 0.9),
    KeyDoc("optimizer.beta2", "adam, adamw: second-moment decay", 0.999),
    KeyDoc("optimizer.eps", "adam, adamw: denominator guard", 1e-8),
    KeyDoc("optimizer.weight_decay", "L2 penalty (adamw: decoupled)", 0.0),
    KeyDoc("optimizer.clip_norm", "clip the global gradient norm to this (null: no clipping)"),
    KeyDoc("optimizer.schedule", "a schedule name, or a mapping of the keys below", "constant"),
    KeyDoc("optimizer.schedule.name", one_of(SCHEDULE_NAMES), "constant"),
    KeyDoc("optimizer.schedule.warmup_steps", "updates whose rate ramps linearly up to `lr`", 0),
    KeyDoc("optimizer.schedule.step_size", "step: steps between decays", 100),
    KeyDoc("optimizer.schedule.gamma", "step: decay factor", 0.1),
    KeyDoc("optimizer.schedule.total_steps", "cosine: steps to reach `min_lr`",
           default_rule="cosine: the job's steps (epochs x batches per epoch); else `1000`"),
    KeyDoc("optimizer.schedule.min_lr", "cosine: the final learning rate", 0.0),
    KeyDoc("table_optimizer.name", "the tables' per-row rule: " + one_of(TABLE_OPTIMIZER_NAMES)
           + " (lazy Adam: torch's SparseAdam); `optimizer` covers the other parameters",
           default_rule="without the section, the service's: `sparse_adam` for adam and adamw, else `sgd`"),
    KeyDoc("table_optimizer.lr", "the tables' learning rate (constant: schedules and clipping are dense only)",
           default_rule="`optimizer.lr`"),
    KeyDoc("table_optimizer.beta1", "sparse_adam: first-moment decay", default_rule="`optimizer.beta1`"),
    KeyDoc("table_optimizer.beta2", "sparse_adam: second-moment decay", default_rule="`optimizer.beta2`"),
    KeyDoc("table_optimizer.eps", "denominator guard",
           default_rule="`optimizer.eps` for sparse_adam under adam, else torch's (1e-8 sparse_adam, 1e-10 adagrad)"),
    KeyDoc("table_optimizer.initial_accumulator_value", "adagrad: each row's starting sum of squares",
           default_rule="`0.0`"),
    KeyDoc("train.epochs", "passes over the train split", 10),
    KeyDoc("train.batch_size", "rows per step, split across the workers", 64),
    KeyDoc("train.workers", "Ray worker actors, each computing the gradient of its shard", 2),
    KeyDoc("train.consistency", one_of(CONSISTENCY_MODES) + " (sync: every step sees the last one's parameters)", "sync"),
    KeyDoc("train.staleness", "bounded: how many versions a gradient may lag", 0),
    KeyDoc("train.micro_batch_size", "rows per forward/backward pass within a shard (null: the whole shard)"),
    KeyDoc("train.local_steps", "local: inner steps per round; a job step is then a round of this many "
           "batches, and `optimizer` the servers' outer one (default nesterov, lr 0.7, momentum 0.9)", 10),
    KeyDoc("train.inner_optimizer", "local: the workers' optimizer, a mapping of `optimizer`'s keys",
           default_rule="`{name: adamw, lr: 0.001}`"),
    KeyDoc("train.compression", one_of(COMPRESSIONS) + " between workers and servers (powersgd: sync only)",
           "none"),
    KeyDoc("train.powersgd_rank", "powersgd: rank of each compressed matrix's factors", 4),
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
