"""Multi-hot bag columns of a job's data (`dataset.bags`): each row holds a bag of raw values,
hashed into table rows as single categorical values are (hashing.py) and kept as torch's
`EmbeddingBag` takes them: `values` (every row's ids one after another) and `offsets` (where each
row's ids start). A bag may be empty. The model reads bag `NAME` as the bag input `NAME`, whose
tensors travel as `batch.NAME.values` and `batch.NAME.offsets` (engine/inputs.py).

Where the raw bags come from:

- CSV: one cell per row, the values separated by `dataset.bag_separator` (`|` unless set), each
  stripped of surrounding blanks; an empty cell is an empty bag, an empty value between
  separators (`a||b`, `a|`) is refused;
- Parquet: a list column (`list<string>`, `list<int64>`, ...); a null list is an empty bag, a null
  value inside a list is refused;
- `.npz`: the arrays `NAME.values` (integers or strings, 1-D) and `NAME.offsets` (integers, one per
  row, starting at 0, non-decreasing, none past the end of the values).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from gradserve_services.errors import InvalidArgument

__all__ = ["BagColumn", "RawBag", "bag_tensor_names", "slice_inputs", "csv_bag", "npz_bag", "parquet_bag"]

FIELD = "dataset.bags"


def bag_tensor_names(name: str) -> tuple[str, str]:
    """The batch tensors of bag input `name` (engine/inputs.py names them so)."""
    return f"{name}.values", f"{name}.offsets"


@dataclass(frozen=True)
class RawBag:
    """A bag column as read from its file: every row's raw values one after another, and how many
    each row holds."""

    values: np.ndarray  # 1-D, integers, strings or objects
    lengths: np.ndarray  # int64 (rows,)


@dataclass(frozen=True)
class BagColumn:
    """Hashed bags: row r's ids are values[offsets[r] : offsets[r] + lengths[r]]."""

    values: np.ndarray  # int64 (total,)
    offsets: np.ndarray  # int64 (rows,)

    @classmethod
    def of_lengths(cls, values: np.ndarray, lengths: np.ndarray) -> "BagColumn":
        lengths = np.asarray(lengths, dtype=np.int64)
        offsets = np.zeros(lengths.shape[0], dtype=np.int64)
        np.cumsum(lengths[:-1], out=offsets[1:])
        return cls(np.asarray(values, dtype=np.int64), offsets)

    @property
    def rows(self) -> int:
        return int(self.offsets.shape[0])

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets, append=self.values.shape[0])

    def take(self, rows) -> "BagColumn":
        """The bags of `rows` (indices, a mask or a slice), in that order."""
        rows = np.arange(self.rows)[rows]
        starts, lengths = self.offsets[rows], self.lengths[rows]
        taken = BagColumn.of_lengths(np.zeros(0, np.int64), lengths)
        # value k of the result comes from starts[row] + (k - its new offset)
        source = np.repeat(starts - taken.offsets, lengths) + np.arange(int(lengths.sum()), dtype=np.int64)
        return BagColumn(np.ascontiguousarray(self.values[source]), taken.offsets)

    def tensors(self, name: str) -> dict[str, np.ndarray]:
        values_name, offsets_name = bag_tensor_names(name)
        return {values_name: self.values, offsets_name: self.offsets}


def slice_inputs(named: Mapping[str, np.ndarray], start: int, stop: int) -> dict[str, np.ndarray]:
    """Rows [start, stop) of a batch of named inputs: arrays by row, bags by their offsets."""
    out = {}
    for name, value in named.items():
        if name.endswith(".values") and name[: -len(".values")] + ".offsets" in named:
            continue  # taken with its offsets below
        if name.endswith(".offsets") and name[: -len(".offsets")] + ".values" in named:
            bag = name[: -len(".offsets")]
            values_name, _ = bag_tensor_names(bag)
            out.update(BagColumn(named[values_name], value).take(slice(start, stop)).tensors(bag))
        else:
            out[name] = value[start:stop]
    return out


# ----- reading ------------------------------------------------------------------------------------

def csv_bag(cells: list[tuple[int, str]], separator: str, name: str, path) -> RawBag:
    """The bags of one CSV column from its (line, cell) texts."""
    values, lengths = [], np.zeros(len(cells), dtype=np.int64)
    for row, (line, cell) in enumerate(cells):
        text = cell.strip()
        if not text:
            continue  # an empty bag
        items = [item.strip() for item in text.split(separator)]
        if not all(items):
            raise InvalidArgument(
                f"{path} line {line}, column {name!r}: {cell!r} holds an empty value; a bag is values "
                f"separated by {separator!r} (an empty cell is an empty bag)", field=FIELD)
        values.extend(items)
        lengths[row] = len(items)
    return RawBag(np.array(values, dtype=object), lengths)


def npz_bag(archive, name: str, rows: int, path) -> RawBag:
    """Bag `name` of an open .npz archive: its `NAME.values` and `NAME.offsets` arrays."""
    values_name, offsets_name = bag_tensor_names(name)
    for key in (values_name, offsets_name):
        if key not in archive.files:
            raise InvalidArgument(f"{path} has no array {key!r} for bag {name!r} (arrays: {', '.join(archive.files)})",
                                  field=FIELD)
    try:
        values, offsets = archive[values_name], archive[offsets_name]
    except ValueError as failure:  # object arrays need pickle, which is refused
        raise InvalidArgument(f"{path}: {failure}", field=FIELD) from None
    if values.dtype.kind not in "iuUS" or values.ndim != 1:
        raise InvalidArgument(f"array {values_name!r} of {path} must hold integers or strings, shape (n,); "
                              f"got {values.dtype} {values.shape}", field=FIELD)
    if offsets.dtype.kind not in "iu" or offsets.shape != (rows,):
        raise InvalidArgument(f"array {offsets_name!r} of {path} must hold integers, one per row ({rows},); "
                              f"got {offsets.dtype} {offsets.shape}", field=FIELD)
    offsets = offsets.astype(np.int64)
    if rows and int(offsets[0]) != 0:
        raise InvalidArgument(f"array {offsets_name!r} of {path} must start at 0, got {int(offsets[0])}", field=FIELD)
    lengths = np.diff(offsets, append=values.shape[0])
    if rows and lengths[:-1].min(initial=0) < 0:
        where = int(np.flatnonzero(lengths[:-1] < 0)[0]) + 1
        raise InvalidArgument(f"array {offsets_name!r} of {path} must not decrease; offsets[{where}] < "
                              f"offsets[{where - 1}]", field=FIELD)
    if rows and int(offsets[-1]) > values.shape[0]:
        raise InvalidArgument(f"array {offsets_name!r} of {path} runs past the end of the {values.shape[0]} "
                              f"values of {values_name!r} (last offset {int(offsets[-1])})", field=FIELD)
    return RawBag(values, lengths)


def parquet_bag(table, name: str, path) -> RawBag:
    """Bag `name` of a pyarrow table: a list column."""
    import pyarrow as arrow
    import pyarrow.compute as compute

    column = table.column(name)
    kind = column.type
    if not (arrow.types.is_list(kind) or arrow.types.is_large_list(kind) or arrow.types.is_fixed_size_list(kind)):
        raise InvalidArgument(f"column {name!r} of {path} must be a list column (a bag of values per row), "
                              f"got {kind}", field=FIELD)
    element = kind.value_type
    if not (arrow.types.is_integer(element) or arrow.types.is_string(element) or arrow.types.is_large_string(element)):
        raise InvalidArgument(f"column {name!r} of {path} must hold lists of integers or strings, got {kind}",
                              field=FIELD)
    lists = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    lengths = compute.list_value_length(lists).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    flat = compute.list_flatten(lists)  # the values of the non-null lists, in row order
    if flat.null_count:
        raise InvalidArgument(f"column {name!r} of {path} holds a null value inside a bag (a null list is an "
                              "empty bag)", field=FIELD)
    return RawBag(flat.to_numpy(zero_copy_only=False), lengths)
