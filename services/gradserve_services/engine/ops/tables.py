"""Lookups in embedding tables: one id per field (`embedding`) or a bag of ids per row
(`embedding_bag`). A table's gradient goes to `param_grads.add_rows`, one row per lookup; for a
table given as `SparseRows` (a worker's pulled rows) the forward's positions of the ids among the
rows are kept, and the backward sums the gradient by them (`SparseRows.from_positions`: a radix
sort of small positions, not a sort of the ids) into `param_grads.add_row_sums`."""

from __future__ import annotations

from gradserve_services.errors import InvalidArgument, SpecError

from ..inputs import BAG, IDS
from ..sparse_rows import SparseRows, gather_rows, row_positions
from .base import Attribute, Choice, Op

__all__ = ["MAX_TABLE_ROWS", "Lookup", "Embedding", "EmbeddingBag"]


MAX_TABLE_ROWS = 1 << 31
# Up to this many rows, a lookup in a table given as SparseRows finds its ids through a slot per
# table row (sparse_rows.row_positions), kept in the workspace: 16 MB per table at most, of which
# only the pages of ids looked up are ever backed. Larger tables binary-search.
MAX_SLOT_ROWS = 1 << 22


class Lookup(Op):
    """Shared by the table lookups: the table `NODE.weight` (rows, dim), like torch's."""

    attributes = {"rows": Attribute(int, low=1, high=MAX_TABLE_ROWS), "dim": Attribute(int, low=1, high=1 << 20)}

    def parameter_suffixes(self, node):
        return ("weight",)

    def parameter_shapes(self, node, input_widths):
        return {f"{node.name}.weight": (node.attrs["rows"], node.attrs["dim"])}

    def table_names(self, node):
        return (f"{node.name}.weight",)

    def check_ids(self, node, xp, ids, field: str, what: str) -> None:
        rows = node.attrs["rows"]
        if ids.size and int(ids.max()) >= rows:
            raise InvalidArgument(
                f"{what} must lie in [0, {rows}) (the rows of {node.name}.weight), got {int(ids.max())}", field=field
            )

    def rows_of(self, node, ctx, table, ids, field_prefix: str):
        return gather_rows(ctx.xp, table, ids, f"{field_prefix}.{node.name}.weight")

    def lookup(self, node, ctx, table, ids, field_prefix: str):
        """`(rows, positions)`: the rows of `ids` (a fresh array) and, for a table given as
        `SparseRows`, where each id is among its rows (else None), for `add_gradient`."""
        if not isinstance(table, SparseRows):
            return ctx.xp.take(table, ids, axis=0), None
        rows = table.shape[0]
        scratch = ctx.buffer(node.name, "row_slots", (rows,), ctx.xp.int32) if rows <= MAX_SLOT_ROWS else None
        positions = row_positions(ctx.xp, table, ids, f"{field_prefix}.{node.name}.weight", scratch)
        return ctx.xp.take(table.rows, positions, axis=0), positions

    def add_gradient(self, node, ctx, params, param_grads, ids, positions, rows) -> None:
        """`rows[i]` is the gradient of the lookup of `ids[i]` (`positions[i]` among the rows of a
        `SparseRows` table, or None)."""
        name = f"{node.name}.weight"
        if positions is None:
            param_grads.add_rows(name, ids, rows)
        else:
            param_grads.add_row_sums(name, SparseRows.from_positions(ctx.xp, params[name].ids, positions, rows,
                                                                     params[name].shape))


class Embedding(Lookup):
    """One table row per id. Reads an ids input (batch, fields): with `field`, that column's ids,
    out (batch, dim); without, every column through the one table, rows side by side, out
    (batch, fields * dim). A table per field is a node per field (`field` set on each)."""

    kind = "embedding"
    reads = IDS
    attributes = {**Lookup.attributes, "field": Attribute(int, default=None, low=0)}

    def output_width(self, node, input_widths):
        field, fields = node.attrs["field"], input_widths[0]
        if field is not None and field >= fields:
            raise SpecError(f"field {field} is outside the input's {fields} fields", field=node.name)
        return node.attrs["dim"] * (1 if field is not None else fields)

    def check_batch(self, node, xp, inputs, sources):
        field = node.attrs["field"]
        ids = inputs[0] if field is None else inputs[0][:, field]
        what = "ids" if field is None else f"ids of field {field}"
        self.check_ids(node, xp, ids, f"batch.{sources[0].tensor}", what)

    def _ids(self, node, ids):
        field = node.attrs["field"]
        return ids.reshape(-1) if field is None else ids[:, field]

    def forward(self, node, ctx, inputs, params):
        (ids,) = inputs
        looked_up = self._ids(node, ids)  # row-major: lookup b * fields + f is ids[b, f]
        rows, positions = self.lookup(node, ctx, params[f"{node.name}.weight"], looked_up, "parameters")
        return rows.reshape(ids.shape[0], -1), (looked_up, positions)

    def backward(self, node, ctx, grad_out, saved, params, param_grads, wants):
        looked_up, positions = saved
        self.add_gradient(node, ctx, params, param_grads, looked_up, positions,
                          grad_out.reshape(-1, node.attrs["dim"]))
        return [None]  # ids have no gradient

    def tangent(self, node, ctx, inputs, tangents, out, saved, params, param_tangents):
        return self.rows_of(node, ctx, param_tangents[f"{node.name}.weight"], saved[0], "tangent").reshape(out.shape)


class EmbeddingBag(Lookup):
    """Per row, the sum (mode "sum") or mean (mode "mean") of the table rows of its bag; a weighted
    bag input scales each row by its value's weight first (torch's per_sample_weights, which torch
    takes with mode "sum" only, and so does this op). An empty bag gives zeros."""

    kind = "embedding_bag"
    reads = BAG
    attributes = {**Lookup.attributes, "mode": Choice(("sum", "mean"), default="sum")}

    def output_width(self, node, input_widths):
        return node.attrs["dim"]

    def check_sources(self, node, sources):
        if sources[0].weighted and node.attrs["mode"] != "sum":
            raise SpecError(f"a weighted bag ({sources[0].name!r}) takes mode 'sum'", field=node.name)

    def check_batch(self, node, xp, inputs, sources):
        self.check_ids(node, xp, inputs[0].values, f"batch.{sources[0].name}.values", "ids")

    def _value_scale(self, node, ctx, bag):
        """What each looked-up row is multiplied by before the sum: weights, 1 / bag length, or None."""
        if bag.weights is not None:
            return bag.weights
        if node.attrs["mode"] == "mean":
            per_row = ctx.xp.divide(1, ctx.xp.maximum(bag.lengths, 1), dtype=ctx.dtype)
            return per_row[bag.row_of_value]
        return None

    def _bag_sums(self, node, ctx, table, bag, scale, role: str, field_prefix: str):
        """`(sums per row, positions of the values among a SparseRows table's rows or None)`."""
        rows, positions = self.lookup(node, ctx, table, bag.values, field_prefix)  # a fresh (n, dim) array
        if scale is not None:
            rows *= scale[:, None]
        out = ctx.buffer(node.name, role, (bag.rows, node.attrs["dim"]))
        return bag.sum_per_row(ctx.xp, rows, out), positions

    def forward(self, node, ctx, inputs, params):
        (bag,) = inputs
        scale = self._value_scale(node, ctx, bag)
        out, positions = self._bag_sums(node, ctx, params[f"{node.name}.weight"], bag, scale, "out", "parameters")
        return out, (bag, scale, positions)

    def backward(self, node, ctx, grad_out, saved, params, param_grads, wants):
        bag, scale, positions = saved
        row_grads = ctx.xp.take(grad_out, bag.row_of_value, axis=0)  # every value of a row gets that row's gradient
        if scale is not None:
            row_grads *= scale[:, None]
        self.add_gradient(node, ctx, params, param_grads, bag.values, positions, row_grads)
        return [None]

    def tangent(self, node, ctx, inputs, tangents, out, saved, params, param_tangents):
        bag, scale, _ = saved
        return self._bag_sums(node, ctx, param_tangents[f"{node.name}.weight"], bag, scale, "tangent", "tangent")[0]
