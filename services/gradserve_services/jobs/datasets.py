"""Datasets for jobs: scikit-learn's bundled digits and diabetes, the synthetic click-through set,
`.npz`, `.csv` and `.parquet` files.

Everything is checked before training: a missing column, a label of the wrong type, a NaN, a file
that is not there — each is one `InvalidArgument` naming the field (and the row and column where
there is one), so the CLI prints one line and exits 2.

The task decides the label layout the engine expects (docs/ARCHITECTURE.md, losses):
classification -> int64 `(n,)` class indices; regression and binary -> float32 `(n, width)`.

Categorical columns (`dataset.categorical`) are hashed into table rows (hashing.py) and kept as
`ids`, int64 `(n, columns)`: the model then reads two named inputs, `dense` (the float features, when
there are any) and `categorical` (the ids), instead of the single `input`. Bag columns
(`dataset.bags`, bags.py) are hashed the same way, value by value, into one `BagColumn` each: the
bag input of the column's name.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field

import numpy as np

from gradserve_services.errors import InvalidArgument

from .bags import BagColumn, RawBag, csv_bag, npz_bag
from .job_keys import CATEGORICAL_INPUT, DENSE_INPUT
from .jobfile import DatasetConfig

__all__ = ["Dataset", "LOSS_FOR_TASK", "TASK_FOR_LOSS", "DENSE_INPUT", "CATEGORICAL_INPUT", "load_dataset"]

TASK_FOR_LOSS = {
    "softmax_cross_entropy": "classification",
    "mse": "regression",
    "binary_cross_entropy": "binary",
}
LOSS_FOR_TASK = {task: loss for loss, task in TASK_FOR_LOSS.items()}
BUILTIN_TASKS = {"digits": "classification", "diabetes": "regression"}
MISSING_TEXTS = frozenset({"", "nan", "na", "n/a", "null", "none", "?"})


@dataclass(frozen=True)
class Dataset:
    x: np.ndarray  # float32 (n, features)
    y: np.ndarray  # int64 (n,) for classification, float32 (n, width) otherwise
    task: str  # classification | regression | binary
    num_outputs: int  # classes for classification, target width otherwise
    feature_names: tuple[str, ...]
    source: str  # what the data is, for messages and the report
    ids: np.ndarray | None = None  # int64 (n, columns): hashed categorical values (or synthetic ids)
    categorical_names: tuple[str, ...] = ()
    table_rows: int = 0  # ids lie in [0, table_rows)
    click_probability: np.ndarray | None = None  # synthetic_ctr: the planted model's, (n,)
    bags: dict[str, BagColumn] = field(default_factory=dict)  # hashed bag columns, by input name


def load_dataset(config: DatasetConfig, loss: str | None = None, *, seed: int = 0) -> Dataset:
    """Load and check the configured dataset; `loss` (if given) fixes the task it must fit; `seed`
    draws the synthetic set."""
    if config.name == "synthetic_ctr":
        return _load_synthetic_ctr(config, loss, seed)
    raw_columns: list = []  # categorical columns, raw values, in dataset.categorical's order
    raw_bags: list[RawBag] = []  # bag columns, in dataset.bags' order
    if config.name in BUILTIN_TASKS:
        x, y, names, label_texts = _load_builtin(config.name)
        source, default_task = config.name, BUILTIN_TASKS[config.name]
    elif config.name == "npz":
        x, y, names, raw_columns, raw_bags = _load_npz(config)
        label_texts, source, default_task = None, str(config.path), _task_from_dtype(y)
    elif config.name == "parquet":
        from .parquet_data import load_parquet

        x, y, names, raw_columns, raw_bags = load_parquet(config)
        label_texts, source, default_task = None, str(config.path), _task_from_dtype(y)
    else:
        x, y, names, label_texts, raw_columns, raw_bags = _load_csv(config)
        source, default_task = str(config.path), _task_from_texts(label_texts)
    task = _resolve_task(config.task, loss, default_task)
    ids = _hashed_ids(raw_columns, config, len(x))
    bags = _hashed_bags(raw_bags, config)
    x, y, label_texts, ids, bags = _handle_missing(x, y, label_texts, ids, bags, config, source)
    y, num_outputs = _shape_labels(y, label_texts, task, config, source)
    if len(x) < 2:
        raise InvalidArgument(f"{source} has {len(x)} usable rows; a train/test split needs at least 2", field="dataset")
    categorical = {} if ids is None else {"ids": ids, "categorical_names": _column_names(config, ids)}
    if ids is not None or bags:
        categorical.update(bags=bags, table_rows=config.hash_rows)
    return Dataset(x=x.astype(np.float32), y=y, task=task, num_outputs=num_outputs,
                   feature_names=tuple(names), source=source, **categorical)


def _load_synthetic_ctr(config: DatasetConfig, loss: str | None, seed: int) -> Dataset:
    from .synthetic_ctr import DEFAULT_DENSE, make_synthetic_ctr

    if _resolve_task(config.task, loss, "binary") != "binary":
        raise InvalidArgument("synthetic_ctr's labels are clicks: a binary task (binary_cross_entropy)",
                              field="dataset.task")
    data = make_synthetic_ctr(config.samples, seed=seed, fields=config.fields, vocab=config.vocab,
                              zipf=config.zipf)
    return Dataset(
        x=data.dense.astype(np.float32), y=data.clicks.astype(np.float32).reshape(-1, 1), task="binary",
        num_outputs=1, feature_names=tuple(f"dense{i}" for i in range(DEFAULT_DENSE)),
        source=f"synthetic_ctr({config.samples} rows, {config.fields} fields of {config.vocab} ids, zipf {config.zipf})",
        ids=data.ids, categorical_names=tuple(f"field{f}" for f in range(config.fields)),
        table_rows=config.vocab, click_probability=data.click_probability,
    )


def _hashed_ids(raw_columns: list, config: DatasetConfig, rows: int) -> np.ndarray | None:
    from .hashing import hash_column

    if not config.categorical:
        return None
    ids = np.empty((rows, len(raw_columns)), dtype=np.int64)
    for column, values in enumerate(raw_columns):
        ids[:, column] = hash_column(values, config.hash_rows, seed=config.hash_seed, column=column)
    return ids


def _hashed_bags(raw_bags: list[RawBag], config: DatasetConfig) -> dict[str, BagColumn]:
    """Each bag's values hashed as categorical ones are, positions numbered on after the
    categorical columns (hashing.py): a bag and a column may share a table without sharing rows."""
    from .hashing import hash_column

    first = len(config.categorical)
    return {name: BagColumn.of_lengths(hash_column(raw.values, config.hash_rows, seed=config.hash_seed,
                                                   column=first + index), raw.lengths)
            for index, (name, raw) in enumerate(zip(config.bags, raw_bags))}


def _column_names(config: DatasetConfig, ids: np.ndarray) -> tuple[str, ...]:
    if len(config.categorical) == ids.shape[1]:
        return config.categorical
    return tuple(f"categorical{column}" for column in range(ids.shape[1]))  # npz arrays of several columns


def _load_builtin(name: str):
    # Both read the CSV files shipped inside scikit-learn: no network access.
    from sklearn import datasets as sklearn_datasets

    bunch = sklearn_datasets.load_digits() if name == "digits" else sklearn_datasets.load_diabetes()
    names = getattr(bunch, "feature_names", None) or [f"f{i}" for i in range(bunch.data.shape[1])]
    return np.asarray(bunch.data, dtype=np.float64), np.asarray(bunch.target), list(names), None


def _load_npz(config: DatasetConfig):
    field = "dataset.path"
    try:
        archive = np.load(config.path, allow_pickle=False)
    except FileNotFoundError:
        raise InvalidArgument(f"no such file: {config.path}", field=field) from None
    except (OSError, ValueError) as failure:
        raise InvalidArgument(f"{config.path} is not a readable .npz file ({failure})", field=field) from None
    with archive:
        for key, key_field in ((config.x_key, "dataset.x_key"), (config.y_key, "dataset.y_key")):
            if key not in archive.files:
                raise InvalidArgument(
                    f"{config.path} has no array {key!r} (arrays: {', '.join(archive.files) or 'none'})",
                    field=key_field,
                )
        for key in config.categorical:
            if key not in archive.files:
                raise InvalidArgument(f"{config.path} has no array {key!r} (arrays: {', '.join(archive.files)})",
                                      field="dataset.categorical")
        try:
            x, y = archive[config.x_key], archive[config.y_key]
            categorical = [archive[key] for key in config.categorical]
        except ValueError as failure:  # object arrays need pickle, which is refused
            raise InvalidArgument(f"{config.path}: {failure}", field=field) from None
        bags = [npz_bag(archive, name, len(x), config.path) for name in config.bags]
    if x.dtype.kind not in "iufb" or x.ndim < 2:
        raise InvalidArgument(
            f"array {config.x_key!r} must be numeric with a batch axis and features, got {x.dtype} {x.shape}",
            field="dataset.x_key",
        )
    if y.dtype.kind not in "iufb" or y.ndim not in (1, 2):
        raise InvalidArgument(
            f"array {config.y_key!r} must be numeric labels (n,) or targets (n, width), got {y.dtype} {y.shape}",
            field="dataset.y_key",
        )
    if len(x) != len(y):
        raise InvalidArgument(
            f"{config.x_key!r} has {len(x)} rows but {config.y_key!r} has {len(y)}", field="dataset.y_key"
        )
    x = x.reshape(len(x), -1).astype(np.float64)  # images (n, h, w) become (n, h*w) features
    return x, y, [f"f{i}" for i in range(x.shape[1])], _npz_columns(config, categorical, len(x)), bags


def _npz_columns(config: DatasetConfig, arrays, rows: int) -> list:
    """Each categorical array as its columns: (n,) is one, (n, k) is k."""
    columns = []
    for key, array in zip(config.categorical, arrays):
        if array.dtype.kind not in "iubUS" or array.ndim not in (1, 2) or len(array) != rows:
            raise InvalidArgument(
                f"array {key!r} must hold integers or strings, shape ({rows},) or ({rows}, k); "
                f"got {array.dtype} {array.shape}", field="dataset.categorical")
        columns.extend([array] if array.ndim == 1 else list(array.T))
    return columns


def _load_csv(config: DatasetConfig):
    """Header row, then one sample per row; numbers only, except that classification labels must be
    integers. Returns features as float64 (NaN where missing) and the label column's raw texts."""
    try:
        with open(config.path, newline="") as handle:
            rows = list(csv.reader(handle))
    except FileNotFoundError:
        raise InvalidArgument(f"no such file: {config.path}", field="dataset.path") from None
    except (OSError, UnicodeDecodeError, csv.Error) as failure:
        raise InvalidArgument(f"cannot read {config.path}: {failure}", field="dataset.path") from None
    if not rows or not any(cell.strip() for cell in rows[0]):
        raise InvalidArgument(f"{config.path} is empty; expected a header row", field="dataset.path")
    header = [cell.strip() for cell in rows[0]]
    body = [(number, row) for number, row in enumerate(rows[1:], start=2) if any(c.strip() for c in row)]
    if config.label not in header:
        raise InvalidArgument(
            f"column {config.label!r} is not in {config.path} (columns: {', '.join(header)})", field="dataset.label"
        )
    for column, key in [(c, "dataset.categorical") for c in config.categorical] + [(c, "dataset.bags")
                                                                                    for c in config.bags]:
        if column not in header:
            raise InvalidArgument(f"column {column!r} is not in {config.path} (columns: {', '.join(header)})", field=key)
    check_column_roles(config)
    features = list(config.features) if config.features else [
        c for c in header if c != config.label and c not in config.categorical and c not in config.bags]
    for column in features:
        if column not in header:
            raise InvalidArgument(
                f"column {column!r} is not in {config.path} (columns: {', '.join(header)})", field="dataset.features"
            )
    if config.label in features:
        raise InvalidArgument(f"the label column {config.label!r} is also a feature", field="dataset.features")
    if not features and not config.categorical and not config.bags:
        raise InvalidArgument(f"{config.path} has no feature columns besides the label", field="dataset.features")
    positions = [header.index(column) for column in features]
    categorical_positions = [header.index(column) for column in config.categorical]
    label_position = header.index(config.label)
    x = np.empty((len(body), len(features)), dtype=np.float64)
    label_texts = []
    categorical = [[None] * len(body) for _ in categorical_positions]
    for row_index, (line, row) in enumerate(body):
        if len(row) != len(header):
            raise InvalidArgument(
                f"{config.path} line {line} has {len(row)} fields but the header has {len(header)}",
                field="dataset.path",
            )
        for column_index, position in enumerate(positions):
            x[row_index, column_index] = _cell_number(row[position], config, line, features[column_index])
        label_texts.append((line, row[label_position].strip()))
        for column, position in enumerate(categorical_positions):
            categorical[column][row_index] = row[position]  # missing stays text: a category of its own
    bags = [csv_bag([(line, row[header.index(name)]) for line, row in body], config.bag_separator, name, config.path)
            for name in config.bags]
    return x, None, features, label_texts, [np.array(values, dtype=object) for values in categorical], bags


def check_column_roles(config: DatasetConfig) -> None:
    """A column is one of: the label, a dense feature, categorical, a bag."""
    for keyed, key in ((config.categorical, "dataset.categorical"), (config.bags, "dataset.bags")):
        if config.label in keyed or set(config.features or ()) & set(keyed):
            raise InvalidArgument(f"a column of {key} is also the label or a dense feature", field=key)


def _cell_number(text: str, config: DatasetConfig, line: int, column: str) -> float:
    text = text.strip()
    if text.lower() in MISSING_TEXTS:
        return math.nan
    try:
        return float(text)
    except ValueError:
        raise InvalidArgument(
            f"{config.path} line {line}, column {column!r}: {text!r} is not a number", field="dataset.features"
        ) from None


def _task_from_dtype(y: np.ndarray) -> str:
    return "classification" if y.dtype.kind in "iub" and y.ndim == 1 else "regression"


def _task_from_texts(label_texts) -> str:
    present = [text for _, text in label_texts if text.lower() not in MISSING_TEXTS]
    return "classification" if present and all(_is_integer_text(text) for text in present) else "regression"


def _is_integer_text(text: str) -> bool:
    return text.lstrip("+-").isdigit()


def _resolve_task(configured: str | None, loss: str | None, default: str) -> str:
    from_loss = TASK_FOR_LOSS.get(loss) if loss else None
    if configured and from_loss and configured != from_loss:
        raise InvalidArgument(f"task {configured!r} does not fit loss {loss!r} (a {from_loss} loss)", field="dataset.task")
    return from_loss or configured or default


def _handle_missing(x, y, label_texts, ids, bags, config: DatasetConfig, source: str):
    """Refuse rows with a NaN/missing value (naming the first), or drop them with `drop_missing`."""
    bad_rows = ~np.isfinite(x).all(axis=1)
    if label_texts is not None:
        bad_rows |= np.array([text.lower() in MISSING_TEXTS for _, text in label_texts], dtype=bool)
    elif y.dtype.kind == "f":
        bad_rows |= ~np.isfinite(y.reshape(len(y), -1)).all(axis=1)
    if not bad_rows.any():
        return x, y, label_texts, ids, bags
    if config.drop_missing:
        keep = ~bad_rows
        kept_texts = None if label_texts is None else [t for t, k in zip(label_texts, keep) if k]
        return (x[keep], None if y is None else y[keep], kept_texts, None if ids is None else ids[keep],
                {name: bag.take(keep) for name, bag in bags.items()})
    first = int(np.flatnonzero(bad_rows)[0])
    where = f"line {label_texts[first][0]}" if label_texts is not None else f"row {first}"
    raise InvalidArgument(
        f"{source} has {int(bad_rows.sum())} rows with missing or NaN values (first: {where}); "
        "clean them or set dataset.drop_missing: true",
        field="dataset",
    )


def _shape_labels(y, label_texts, task: str, config: DatasetConfig, source: str):
    if label_texts is not None:
        y = _labels_from_texts(label_texts, task, config)
    if task == "classification":
        return _class_indices(y, source)
    targets = np.asarray(y, dtype=np.float64)
    targets = targets.reshape(len(targets), -1)
    if task == "binary" and not ((targets >= 0) & (targets <= 1)).all():
        raise InvalidArgument(f"{source}: binary_cross_entropy needs targets in [0, 1]", field="dataset.label")
    return targets.astype(np.float32), targets.shape[1]


def _labels_from_texts(label_texts, task: str, config: DatasetConfig) -> np.ndarray:
    values = np.empty(len(label_texts), dtype=np.float64)
    for index, (line, text) in enumerate(label_texts):
        if task == "classification" and not _is_integer_text(text):
            raise InvalidArgument(
                f"column {config.label!r} must hold integer class indices for classification; "
                f"line {line} has {text!r}",
                field="dataset.label",
            )
        try:
            values[index] = float(text)
        except ValueError:
            raise InvalidArgument(
                f"column {config.label!r} must hold numbers; line {line} has {text!r}", field="dataset.label"
            ) from None
    return values


def _class_indices(y: np.ndarray, source: str):
    if y.ndim != 1:
        raise InvalidArgument(f"{source}: classification labels must be one class index per row, got shape {y.shape}",
                              field="dataset.label")
    if y.dtype.kind == "f" and not np.all(y == np.round(y)):
        first = int(np.flatnonzero(y != np.round(y))[0])
        raise InvalidArgument(
            f"{source}: classification labels must be integers; row {first} has {y[first]!r}", field="dataset.label"
        )
    labels = y.astype(np.int64)
    if labels.min() < 0:
        raise InvalidArgument(f"{source}: class labels must be >= 0, found {labels.min()}", field="dataset.label")
    num_classes = int(labels.max()) + 1
    if num_classes < 2:
        raise InvalidArgument(f"{source}: classification needs at least 2 classes", field="dataset.label")
    return labels, num_classes
