"""A batch as the passes see it: every declared input by name, sliceable by rows.

Float and ids inputs are arrays; a bag is a `Bag` (values, offsets, optional weights). Slicing rows
`[start, stop)` (micro-batches, shards) keeps every input aligned: a bag's slice holds the values of
exactly those rows, its offsets rebased to 0. `check_named_batch` validates a mapping of tensors
against the declared inputs; errors name the tensor as `batch.<tensor>`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from gradserve_services.errors import InvalidArgument

from .inputs import BAG, FLOAT, IDS, InputDecl

__all__ = ["Bag", "Batch", "check_named_batch", "FLOAT_DTYPES"]

FLOAT_DTYPES = ("float32", "float64")


@dataclass(frozen=True)
class Bag:
    """Row r's ids are values[offsets[r]:offsets[r + 1]] (the last row's run to the end)."""

    values: object  # int64 (n,)
    offsets: object  # int64 (rows,), offsets[0] == 0, non-decreasing, <= n
    weights: object | None  # (n,) in the pass dtype, or None
    lengths: object  # int64 (rows,): ids per row
    row_of_value: object  # int64 (n,): the row each value belongs to

    @classmethod
    def of(cls, xp, values, offsets, weights=None) -> Bag:
        ends = xp.concatenate([offsets[1:], xp.asarray([values.shape[0]], dtype=offsets.dtype)])
        lengths = ends - offsets
        row_of_value = xp.repeat(xp.arange(offsets.shape[0], dtype=xp.int64), lengths)
        return cls(values, offsets, weights, lengths, row_of_value)

    @property
    def rows(self) -> int:
        return int(self.offsets.shape[0])

    def slice(self, xp, start: int, stop: int) -> Bag:
        low = int(self.offsets[start]) if start < self.rows else int(self.values.shape[0])
        high = int(self.offsets[stop]) if stop < self.rows else int(self.values.shape[0])
        weights = None if self.weights is None else self.weights[low:high]
        return Bag.of(xp, self.values[low:high], self.offsets[start:stop] - low, weights)

    def sum_per_row(self, xp, per_value, out):
        """out[r] = sum of per_value over row r's values; an empty row gets zeros."""
        out.fill(0)
        filled = self.lengths > 0
        if bool(filled.any()):
            # reduceat over strictly increasing starts only: it would return a lone element for
            # an empty run, and an offset equal to n is out of its range.
            out[filled] = xp.add.reduceat(per_value, self.offsets[filled], axis=0)
        return out


class Batch:
    """`feeds`: input name -> array or Bag, all with `rows` rows."""

    def __init__(self, feeds: Mapping[str, object], rows: int):
        self.feeds, self.rows = dict(feeds), int(rows)

    def slice(self, xp, start: int, stop: int) -> Batch:
        if start == 0 and stop >= self.rows:
            return self
        return Batch(
            {name: value.slice(xp, start, stop) if isinstance(value, Bag) else value[start:stop]
             for name, value in self.feeds.items()},
            min(stop, self.rows) - start,
        )


def check_named_batch(xp, inputs: Mapping[str, InputDecl], tensors, dtype) -> tuple[Batch, object]:
    """The Batch of `tensors` (a mapping of tensor name to array) and its float dtype (`dtype`, or
    the first float tensor's when None), or InvalidArgument naming `batch.<tensor>`."""
    if not isinstance(tensors, Mapping):
        raise InvalidArgument(f"named inputs come as a mapping of tensor name to array, got {type(tensors).__name__}",
                              field="batch")
    expected = [tensor for decl in inputs.values() for tensor in decl.tensor_names()]
    for key in tensors:
        if key not in expected:
            raise InvalidArgument(f"{key!r} is not an input of this model; inputs: {', '.join(expected)}",
                                  field=f"batch.{key}")
    for tensor in expected:
        if tensor not in tensors:
            raise InvalidArgument("missing input", field=f"batch.{tensor}")
    checker = _Checker(xp, tensors, dtype)
    feeds = {name: checker.input(decl) for name, decl in inputs.items()}
    return Batch(feeds, checker.rows), checker.dtype


class _Checker:
    """Checks tensors one by one, agreeing on the row count and the float dtype as it goes."""

    def __init__(self, xp, tensors, dtype):
        self.xp, self.tensors, self.dtype = xp, tensors, dtype
        self.rows = None
        self.rows_from = ""

    def input(self, decl: InputDecl):
        if decl.kind == FLOAT:
            return self._float_matrix(decl.tensor, decl.width)
        if decl.kind == IDS:
            return self._ids_matrix(decl.tensor, decl.width)
        assert decl.kind == BAG
        return self._bag(decl)

    def _array(self, tensor: str):
        value = self.tensors[tensor]
        if not isinstance(value, self.xp.ndarray):
            raise InvalidArgument(f"expected an array, got {type(value).__name__}", field=f"batch.{tensor}")
        return value

    def _float_array(self, tensor: str):
        value, field = self._array(tensor), f"batch.{tensor}"
        if value.dtype.name not in FLOAT_DTYPES:
            raise InvalidArgument(f"dtype must be float32 or float64, got {value.dtype}", field=field)
        if self.dtype is not None and value.dtype != self.dtype:
            raise InvalidArgument(f"dtype {value.dtype} differs from the parameters' {self.dtype}", field=field)
        self.dtype = value.dtype
        if not bool(self.xp.isfinite(value).all()):
            raise InvalidArgument("contains NaN or infinity", field=field)
        return value

    def _int64_array(self, tensor: str, what: str):
        value = self._array(tensor)
        if value.dtype != self.xp.int64:
            raise InvalidArgument(f"{what} must be int64, got {value.dtype}", field=f"batch.{tensor}")
        return value

    def _count_rows(self, tensor: str, rows: int) -> None:
        if self.rows is None:
            if rows == 0:
                raise InvalidArgument("the batch is empty", field=f"batch.{tensor}")
            self.rows, self.rows_from = rows, tensor
        elif rows != self.rows:
            raise InvalidArgument(f"has {rows} rows but batch.{self.rows_from} has {self.rows}", field=f"batch.{tensor}")

    def _float_matrix(self, tensor: str, features: int):
        value = self._float_array(tensor)
        if value.ndim != 2 or value.shape[1] != features:
            raise InvalidArgument(f"shape must be (batch, {features}), got {tuple(value.shape)}", field=f"batch.{tensor}")
        self._count_rows(tensor, value.shape[0])
        return value

    def _ids_matrix(self, tensor: str, fields: int):
        value = self._int64_array(tensor, "ids")
        if value.ndim != 2 or value.shape[1] != fields:
            raise InvalidArgument(f"shape must be (batch, {fields}), got {tuple(value.shape)}", field=f"batch.{tensor}")
        self._count_rows(tensor, value.shape[0])
        _check_non_negative(value, f"batch.{tensor}")
        return value

    def _bag(self, decl: InputDecl) -> Bag:
        values_name, offsets_name = decl.tensor_names()[:2]
        values = self._int64_array(values_name, "ids")
        if values.ndim != 1:
            raise InvalidArgument(f"values must be 1-D, got shape {tuple(values.shape)}", field=f"batch.{values_name}")
        _check_non_negative(values, f"batch.{values_name}")
        offsets = self._int64_array(offsets_name, "offsets")
        field = f"batch.{offsets_name}"
        if offsets.ndim != 1:
            raise InvalidArgument(f"offsets must be 1-D (batch,), got shape {tuple(offsets.shape)}", field=field)
        self._count_rows(offsets_name, offsets.shape[0])
        if int(offsets[0]) != 0:
            raise InvalidArgument(f"offsets must start at 0, got {int(offsets[0])}", field=field)
        steps = offsets[1:] - offsets[:-1]
        if steps.size and int(steps.min()) < 0:
            where = int(self.xp.argmax(steps < 0)) + 1
            raise InvalidArgument(f"offsets must not decrease; offsets[{where}] < offsets[{where - 1}]", field=field)
        if int(offsets[-1]) > values.shape[0]:
            raise InvalidArgument(f"offsets run past the end of the {values.shape[0]} values", field=field)
        weights = None
        if decl.weighted:
            weights_name = decl.tensor_names()[2]
            weights = self._float_array(weights_name)
            if weights.shape != values.shape:
                raise InvalidArgument(f"weights must have the values' shape {tuple(values.shape)}, got "
                                      f"{tuple(weights.shape)}", field=f"batch.{weights_name}")
        return Bag.of(self.xp, values, offsets, weights)


def _check_non_negative(ids, field: str) -> None:
    if ids.size and int(ids.min()) < 0:
        raise InvalidArgument(f"ids must be non-negative, got {int(ids.min())}", field=field)
