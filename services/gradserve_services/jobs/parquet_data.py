"""`.parquet` files for jobs, read with pyarrow: numeric feature and label columns, and categorical
columns of any type (strings, integers, ...) and bag columns (lists, bags.py) handed on raw for
hashing.

A null in a feature or label column is a missing value (refused, or dropped with
`dataset.drop_missing`, as for CSV); a null in a categorical column is a category of its own.
"""

from __future__ import annotations

import numpy as np

from gradserve_services.errors import InvalidArgument

from .jobfile import DatasetConfig

__all__ = ["load_parquet"]


def load_parquet(config: DatasetConfig):
    """(x float64 (n, features) with NaN where missing, y (n,), feature names, raw categorical
    columns, raw bags)."""
    from .bags import parquet_bag
    from .datasets import check_column_roles

    try:
        import pyarrow.parquet as parquet
    except ImportError:  # pragma: no cover - pyarrow is a server dependency
        raise InvalidArgument("reading .parquet needs pyarrow (pip install 'gradserve[server]')",
                              field="dataset.path") from None
    try:
        table = parquet.read_table(config.path)
    except FileNotFoundError:
        raise InvalidArgument(f"no such file: {config.path}", field="dataset.path") from None
    except Exception as failure:  # pyarrow raises its own ArrowInvalid / OSError kinds
        raise InvalidArgument(f"{config.path} is not a readable .parquet file ({failure})",
                              field="dataset.path") from None
    header = table.column_names
    _require(config.label in header, config, config.label, "dataset.label", header)
    for column in config.categorical:
        _require(column in header, config, column, "dataset.categorical", header)
    for column in config.bags:
        _require(column in header, config, column, "dataset.bags", header)
    check_column_roles(config)
    features = list(config.features) if config.features else [
        c for c in header if c != config.label and c not in config.categorical and c not in config.bags]
    for column in features:
        _require(column in header, config, column, "dataset.features", header)
    if config.label in features:
        raise InvalidArgument(f"the label column {config.label!r} is also a feature", field="dataset.features")
    if not features and not config.categorical and not config.bags:
        raise InvalidArgument(f"{config.path} has no feature columns besides the label", field="dataset.features")
    x = np.empty((table.num_rows, len(features)), dtype=np.float64)
    for index, column in enumerate(features):
        x[:, index] = _numeric(table, column, config, "dataset.features")
    y = _numeric(table, config.label, config, "dataset.label", keep_integers=True)
    raw = [table.column(column).to_numpy(zero_copy_only=False) for column in config.categorical]
    return x, y, features, raw, [parquet_bag(table, name, config.path) for name in config.bags]


def _require(present: bool, config: DatasetConfig, column: str, field: str, header) -> None:
    if not present:
        raise InvalidArgument(f"column {column!r} is not in {config.path} (columns: {', '.join(header)})", field=field)


def _numeric(table, column: str, config: DatasetConfig, field: str, *, keep_integers: bool = False) -> np.ndarray:
    import pyarrow as arrow

    data = table.column(column)
    kind = data.type
    if not (arrow.types.is_integer(kind) or arrow.types.is_floating(kind) or arrow.types.is_boolean(kind)):
        raise InvalidArgument(f"column {column!r} of {config.path} must be numeric, got {kind}", field=field)
    if keep_integers and data.null_count == 0 and (arrow.types.is_integer(kind) or arrow.types.is_boolean(kind)):
        return data.to_numpy().astype(np.int64)  # integer labels: a classification task by default
    return data.cast(arrow.float64()).fill_null(float("nan")).to_numpy()
