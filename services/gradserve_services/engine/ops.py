"""The ops: one class per op, its forward, backward and tangent (forward-mode) rules side by side.

Every op works on 2-D `(batch, features)` arrays in the parameter dtype, except the lookups, which
read a batch input of ids (`embedding`) or bags (`embedding_bag`) and write 2-D float arrays. A
table's gradient goes to `param_grads.add_rows` as one row per lookup; the sums per id are formed
there (see `sparse_rows.py`). The rules share one
calling convention (see `Op`); the engine in `model.py` walks the graph and owns the bookkeeping:

- `forward` returns the output and whatever the other two rules need later (`saved`);
- `backward` receives the gradient of the loss w.r.t. this node's output, adds the gradients of its
  parameters into `param_grads` and returns one gradient per input (None where `wants` is False);
  the engine sums gradients arriving from several consumers (`+=`), so a rule never accumulates;
- `tangent` carries a forward-mode tangent (a JVP) through the node: input tangents (None means
  zero) and parameter tangents in, the output's tangent out (None when it is zero).

Arrays a rule receives are read-only for it; it writes only into buffers from `ctx.buffer`, which
belong to this node and are reused by the next pass. All arithmetic goes through `ctx.xp`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping

import numpy

from gradserve_services.errors import InvalidArgument, SpecError

from .inputs import BAG, FLOAT, IDS
from .sparse_rows import gather_rows

__all__ = ["Op", "OPS", "MAX_TABLE_ROWS"]

MAX_TABLE_ROWS = 1 << 31


class Attribute:
    """One attribute of an op: its kind, default (`REQUIRED` if none) and allowed range."""

    REQUIRED = object()

    def __init__(self, kind: type, default=REQUIRED, low=None, high=None, low_open=False, high_open=False):
        self.kind, self.default = kind, default
        self.low, self.high, self.low_open, self.high_open = low, high, low_open, high_open

    def parse(self, node_name: str, key: str, value):
        if value is None and self.default is not Attribute.REQUIRED:
            return self.default
        if isinstance(value, bool) != (self.kind is bool) or not isinstance(value, (int, float)):
            raise SpecError(f"attribute {key!r} must be a {self.kind.__name__}, got {value!r}", field=node_name)
        if self.kind is int and not isinstance(value, int):
            raise SpecError(f"attribute {key!r} must be an integer, got {value!r}", field=node_name)
        if self.kind is float and not math.isfinite(value):
            raise SpecError(f"attribute {key!r} must be finite, got {value!r}", field=node_name)
        below = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        above = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        if below or above:
            lo = "(" if self.low_open else "["
            hi = ")" if self.high_open else "]"
            raise SpecError(f"attribute {key!r} = {value!r} is outside {lo}{self.low}, {self.high}{hi}", field=node_name)
        return self.kind(value)


class Choice(Attribute):
    """A string attribute taking one of a few values."""

    def __init__(self, choices: tuple[str, ...], default=Attribute.REQUIRED):
        super().__init__(str, default)
        self.choices = choices

    def parse(self, node_name: str, key: str, value):
        if value is None and self.default is not Attribute.REQUIRED:
            return self.default
        if value not in self.choices:
            raise SpecError(f"attribute {key!r} must be one of {', '.join(self.choices)}; got {value!r}", field=node_name)
        return value


class Op:
    kind = ""
    arity: tuple[int, int | None] = (1, 1)  # (fewest, most) inputs; None: no upper bound
    attributes: Mapping[str, Attribute] = {}
    reads = FLOAT  # the kind of input every source must be (see inputs.py); node outputs are float

    def parse_attrs(self, node_name: str, raw: Mapping[str, object]) -> dict[str, object]:
        unknown = sorted(set(raw) - set(self.attributes))
        if unknown:
            raise SpecError(f"op {self.kind!r} has no attribute {unknown[0]!r}", field=node_name)
        parsed = {}
        for key, attribute in self.attributes.items():
            if key not in raw and attribute.default is Attribute.REQUIRED:
                raise SpecError(f"op {self.kind!r} needs attribute {key!r}", field=node_name)
            parsed[key] = attribute.parse(node_name, key, raw.get(key))
        return parsed

    def output_width(self, node, input_widths: list[int]) -> int:
        return input_widths[0]

    def parameter_suffixes(self, node) -> tuple[str, ...]:
        return ()

    def parameter_shapes(self, node, input_widths: list[int]) -> dict[str, tuple[int, ...]]:
        return {}

    def table_names(self, node) -> tuple[str, ...]:
        """Parameters that are tables: read by rows, their gradient `SparseRows`."""
        return ()

    def check_sources(self, node, sources) -> None:
        """Spec-time check of the declared inputs read (`InputDecl`, None for a node); SpecError."""

    def check_batch(self, node, xp, inputs, sources) -> None:
        """Batch-time check of the values of declared inputs beyond their kind (ids within the
        table, ...); InvalidArgument naming the tensor. `sources` as in `check_sources`."""

    def forward(self, node, ctx, inputs, params):
        raise NotImplementedError

    def backward(self, node, ctx, grad_out, saved, params, param_grads, wants):
        raise NotImplementedError

    def tangent(self, node, ctx, inputs, tangents, out, saved, params, param_tangents):
        raise NotImplementedError


class Dense(Op):
    """z = x @ W + b. W is (in, units): `x @ W` and `x.T @ dz` run as BLAS calls without copies."""

    kind = "dense"
    attributes = {"units": Attribute(int, low=1, high=1 << 20), "bias": Attribute(bool, default=True)}

    def output_width(self, node, input_widths):
        return node.attrs["units"]

    def parameter_suffixes(self, node):
        return ("weight", "bias") if node.attrs["bias"] else ("weight",)

    def parameter_shapes(self, node, input_widths):
        shapes = {f"{node.name}.weight": (input_widths[0], node.attrs["units"])}
        if node.attrs["bias"]:
            shapes[f"{node.name}.bias"] = (node.attrs["units"],)
        return shapes

    def forward(self, node, ctx, inputs, params):
        (x,) = inputs
        z = ctx.buffer(node.name, "out", (x.shape[0], node.attrs["units"]))
        ctx.xp.matmul(x, params[f"{node.name}.weight"], out=z)
        if node.attrs["bias"]:
            z += params[f"{node.name}.bias"]
        return z, x

    def backward(self, node, ctx, grad_out, saved, params, param_grads, wants):
        xp, x = ctx.xp, saved
        param_grads.write(f"{node.name}.weight", lambda out: xp.matmul(x.T, grad_out, out=out))
        if node.attrs["bias"]:  # the column sums of grad_out, as a BLAS gemv: ones @ grad_out
            ones = ctx.filled(1, grad_out.shape[0])
            param_grads.write(f"{node.name}.bias", lambda out: xp.matmul(ones, grad_out, out=out))
        if not wants[0]:  # e.g. the batch input: nothing consumes its gradient
            return [None]
        dx = ctx.buffer(node.name, "grad_in", x.shape)
        return [xp.matmul(grad_out, params[f"{node.name}.weight"].T, out=dx)]

    def tangent(self, node, ctx, inputs, tangents, out, saved, params, param_tangents):
        xp, (x,), (dx,) = ctx.xp, inputs, tangents
        dz = ctx.buffer(node.name, "tangent", out.shape)
        xp.matmul(x, param_tangents[f"{node.name}.weight"], out=dz)
        if dx is not None:
            dz += xp.matmul(dx, params[f"{node.name}.weight"], out=ctx.buffer(node.name, "tangent_in", out.shape))
        if node.attrs["bias"]:
            dz += param_tangents[f"{node.name}.bias"]
        return dz


class Elementwise(Op):
    """y = f(x) element by element. Backward and tangent are the chain rule with f'(x) (`slope`):
    a subclass gives `value` (which may keep what `slope` needs) and `slope`."""

    def value(self, xp, x, out, attrs):
        """Write f(x) into out; return what `slope` needs."""
        raise NotImplementedError

    def slope(self, xp, saved, attrs, out):
        """Write f'(x) into out and return it."""
        raise NotImplementedError

    def forward(self, node, ctx, inputs, params):
        out = ctx.buffer(node.name, "out", inputs[0].shape)
        return out, self.value(ctx.xp, inputs[0], out, node.attrs)

    def backward(self, node, ctx, grad_out, saved, params, param_grads, wants):
        dx = self.slope(ctx.xp, saved, node.attrs, ctx.buffer(node.name, "grad_in", grad_out.shape))
        return [ctx.xp.multiply(dx, grad_out, out=dx)]

    def tangent(self, node, ctx, inputs, tangents, out, saved, params, param_tangents):
        if tangents[0] is None:
            return None
        dy = self.slope(ctx.xp, saved, node.attrs, ctx.buffer(node.name, "tangent", out.shape))
        return ctx.xp.multiply(dy, tangents[0], out=dy)


class ReLU(Elementwise):
    kind = "relu"

    def forward(self, node, ctx, inputs, params):
        (x,) = inputs
        # A zero row, not the scalar 0: numpy's broadcast scalar misses the vectorised loop.
        out = ctx.xp.maximum(x, ctx.filled(0, x.shape[1]), out=ctx.buffer(node.name, "out", x.shape))
        return out, out

    def slope(self, xp, y, attrs, out):
        # Like PyTorch: slope 0 at x == 0. `y > 0` read back as 0/1 in the parameter dtype.
        return xp.greater(y, 0, out=out)

    def backward(self, node, ctx, grad_out, saved, params, param_grads, wants):
        # Hot path of the benchmark models: a bool mask times grad_out measures faster than the
        # generic rule (0/1 written in the float dtype, then multiplied).
        dx = ctx.buffer(node.name, "grad_in", grad_out.shape)
        mask = ctx.xp.greater(saved, 0, out=ctx.buffer(node.name, "mask", grad_out.shape, dtype=bool))
        return [ctx.xp.multiply(grad_out, mask, out=dx)]


class LeakyReLU(Elementwise):
    kind = "leaky_relu"
    attributes = {"alpha": Attribute(float, default=0.01)}

    def value(self, xp, x, out, attrs):
        xp.multiply(x, attrs["alpha"], out=out)
        positive = x > 0
        out[positive] = x[positive]
        return x

    def slope(self, xp, x, attrs, out):
        out.fill(attrs["alpha"])
        out[x > 0] = 1
        return out


class Sigmoid(Elementwise):
    kind = "sigmoid"

    def value(self, xp, x, out, attrs):
        return stable_sigmoid(xp, x, out)

    def slope(self, xp, y, attrs, out):
        xp.subtract(1, y, out=out)
        return xp.multiply(out, y, out=out)


class Tanh(Elementwise):
    kind = "tanh"

    def value(self, xp, x, out, attrs):
        return xp.tanh(x, out=out)

    def slope(self, xp, y, attrs, out):
        xp.multiply(y, y, out=out)
        return xp.subtract(1, out, out=out)


class GELU(Elementwise):
    """The tanh approximation: 0.5 x (1 + tanh(k (x + c x^3))), k = sqrt(2 / pi), c = 0.044715."""

    kind = "gelu"
    K = math.sqrt(2.0 / math.pi)
    C = 0.044715

    def value(self, xp, x, out, attrs):
        inner = self.K * (x + self.C * x**3)
        xp.multiply(0.5 * x, 1 + xp.tanh(inner), out=out)
        return x

    def slope(self, xp, x, attrs, out):
        t = xp.tanh(self.K * (x + self.C * x**3))
        d_inner = self.K * (1 + 3 * self.C * x * x)
        out[...] = 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * d_inner
        return out


class Add(Op):
    """Residual sum of >= 2 inputs of equal width; the gradient reaches every input unchanged."""

    kind = "add"
    arity = (2, None)

    def output_width(self, node, input_widths):
        if len(set(input_widths)) != 1:
            raise SpecError(f"add needs inputs of equal width, got {input_widths}", field=node.name)
        return input_widths[0]

    def forward(self, node, ctx, inputs, params):
        out = ctx.xp.add(inputs[0], inputs[1], out=ctx.buffer(node.name, "out", inputs[0].shape))
        for x in inputs[2:]:
            out += x
        return out, None

    def backward(self, node, ctx, grad_out, saved, params, param_grads, wants):
        # Shared read-only: the engine never accumulates into an array it did not allocate.
        return [grad_out if wanted else None for wanted in wants]

    def tangent(self, node, ctx, inputs, tangents, out, saved, params, param_tangents):
        present = [t for t in tangents if t is not None]
        if not present:
            return None
        total = ctx.buffer(node.name, "tangent", out.shape)
        total[...] = present[0]
        for t in present[1:]:
            total += t
        return total


class Concat(Op):
    """Inputs side by side on the feature axis; the same input may appear several times."""

    kind = "concat"
    arity = (2, None)

    def output_width(self, node, input_widths):
        return sum(input_widths)

    def forward(self, node, ctx, inputs, params):
        out = ctx.buffer(node.name, "out", (inputs[0].shape[0], sum(x.shape[1] for x in inputs)))
        start = 0
        for x in inputs:
            out[:, start : start + x.shape[1]] = x
            start += x.shape[1]
        return out, [x.shape[1] for x in inputs]

    def backward(self, node, ctx, grad_out, saved, params, param_grads, wants):
        grads, start = [], 0
        for width, wanted in zip(saved, wants):
            grads.append(grad_out[:, start : start + width] if wanted else None)
            start += width
        return grads

    def tangent(self, node, ctx, inputs, tangents, out, saved, params, param_tangents):
        if all(t is None for t in tangents):
            return None
        total, start = ctx.buffer(node.name, "tangent", out.shape), 0
        for width, t in zip(saved, tangents):
            total[:, start : start + width] = 0 if t is None else t
            start += width
        return total


class LayerNorm(Op):
    """y = (x - mean) / sqrt(var + eps) * weight + bias over the feature axis (biased variance)."""

    kind = "layernorm"
    attributes = {"eps": Attribute(float, default=1e-5, low=0, high=1, low_open=True)}

    def parameter_suffixes(self, node):
        return ("weight", "bias")

    def parameter_shapes(self, node, input_widths):
        return {f"{node.name}.weight": (input_widths[0],), f"{node.name}.bias": (input_widths[0],)}

    def forward(self, node, ctx, inputs, params):
        xp, (x,) = ctx.xp, inputs
        centered = x - x.mean(axis=1, keepdims=True)
        inv_std = 1 / xp.sqrt((centered * centered).mean(axis=1, keepdims=True) + node.attrs["eps"])
        normed = centered * inv_std
        out = ctx.buffer(node.name, "out", x.shape)
        xp.multiply(normed, params[f"{node.name}.weight"], out=out)
        out += params[f"{node.name}.bias"]
        return out, (normed, inv_std)

    def backward(self, node, ctx, grad_out, saved, params, param_grads, wants):
        xp, (normed, inv_std) = ctx.xp, saved
        param_grads.write(f"{node.name}.weight", lambda out: xp.sum(grad_out * normed, axis=0, out=out))
        param_grads.write(f"{node.name}.bias", lambda out: xp.sum(grad_out, axis=0, out=out))
        if not wants[0]:
            return [None]
        d_normed = grad_out * params[f"{node.name}.weight"]
        mean_d = d_normed.mean(axis=1, keepdims=True)
        mean_d_normed = (d_normed * normed).mean(axis=1, keepdims=True)
        dx = ctx.buffer(node.name, "grad_in", grad_out.shape)
        xp.multiply(d_normed - mean_d - normed * mean_d_normed, inv_std, out=dx)
        return [dx]

    def tangent(self, node, ctx, inputs, tangents, out, saved, params, param_tangents):
        xp, (normed, inv_std), (dx,) = ctx.xp, saved, tangents
        dy = ctx.buffer(node.name, "tangent", out.shape)
        xp.multiply(normed, param_tangents[f"{node.name}.weight"], out=dy)
        dy += param_tangents[f"{node.name}.bias"]
        if dx is not None:
            d_centered = dx - dx.mean(axis=1, keepdims=True)
            # d(normed) = inv_std * (d_centered - normed * mean(normed * d_centered))
            d_normed = inv_std * (d_centered - normed * (normed * d_centered).mean(axis=1, keepdims=True))
            dy += d_normed * params[f"{node.name}.weight"]
        return dy


class Dropout(Op):
    """Inverted dropout: in training, kept features are scaled by 1 / (1 - rate); identity in eval.
    The mask comes from `ctx.dropout_mask`, a function of (seed, node, global sample, feature)."""

    kind = "dropout"
    attributes = {"rate": Attribute(float, low=0, high=1, high_open=True)}

    def forward(self, node, ctx, inputs, params):
        (x,) = inputs
        if not ctx.train or node.attrs["rate"] == 0:
            return x, None
        mask = ctx.dropout_mask(node.name, x.shape, node.attrs["rate"])
        return ctx.xp.multiply(x, mask, out=ctx.buffer(node.name, "out", x.shape)), mask

    def backward(self, node, ctx, grad_out, saved, params, param_grads, wants):
        if saved is None:
            return [grad_out]
        return [ctx.xp.multiply(grad_out, saved, out=ctx.buffer(node.name, "grad_in", grad_out.shape))]

    def tangent(self, node, ctx, inputs, tangents, out, saved, params, param_tangents):
        if saved is None or tangents[0] is None:
            return tangents[0]
        return ctx.xp.multiply(tangents[0], saved, out=ctx.buffer(node.name, "tangent", out.shape))


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
        rows = self.rows_of(node, ctx, params[f"{node.name}.weight"], looked_up, "parameters")
        return rows.reshape(ids.shape[0], -1), looked_up

    def backward(self, node, ctx, grad_out, saved, params, param_grads, wants):
        param_grads.add_rows(f"{node.name}.weight", saved, grad_out.reshape(-1, node.attrs["dim"]))
        return [None]  # ids have no gradient

    def tangent(self, node, ctx, inputs, tangents, out, saved, params, param_tangents):
        return self.rows_of(node, ctx, param_tangents[f"{node.name}.weight"], saved, "tangent").reshape(out.shape)


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
        rows = self.rows_of(node, ctx, table, bag.values, field_prefix)  # a fresh (n, dim) array
        if scale is not None:
            rows *= scale[:, None]
        out = ctx.buffer(node.name, role, (bag.rows, node.attrs["dim"]))
        return bag.sum_per_row(ctx.xp, rows, out)

    def forward(self, node, ctx, inputs, params):
        (bag,) = inputs
        scale = self._value_scale(node, ctx, bag)
        return self._bag_sums(node, ctx, params[f"{node.name}.weight"], bag, scale, "out", "parameters"), (bag, scale)

    def backward(self, node, ctx, grad_out, saved, params, param_grads, wants):
        bag, scale = saved
        row_grads = grad_out[bag.row_of_value]  # every value of a row gets that row's gradient
        if scale is not None:
            row_grads *= scale[:, None]
        param_grads.add_rows(f"{node.name}.weight", bag.values, row_grads)
        return [None]

    def tangent(self, node, ctx, inputs, tangents, out, saved, params, param_tangents):
        bag, scale = saved
        return self._bag_sums(node, ctx, param_tangents[f"{node.name}.weight"], bag, scale, "tangent", "tangent")


class DotInteraction(Op):
    """DLRM's pairwise interaction. The inputs are cut into vectors of `dim` features (without
    `dim`: every input is one vector, all of equal width), k in all, the first input's first; out
    is the dot product of every pair (i, j), j < i (j <= i with `self_interaction`), in the order
    i = 0.., j = 0..; with `concat_first`, the first input (DLRM: the dense vector) comes before
    them. Backward: d(vectors) = (G + G^T) @ vectors, G the pair gradients placed in a k x k grid."""

    kind = "dot_interaction"
    arity = (1, None)
    attributes = {
        "dim": Attribute(int, default=None, low=1, high=1 << 20),
        "self_interaction": Attribute(bool, default=False),
        "concat_first": Attribute(bool, default=True),
    }

    def _vector_width(self, node, input_widths) -> int:
        dim = node.attrs["dim"]
        if dim is None:
            if len(set(input_widths)) != 1:
                raise SpecError(f"dot_interaction without dim needs inputs of equal width, got {input_widths}",
                                field=node.name)
            return input_widths[0]
        if any(width % dim for width in input_widths):
            raise SpecError(f"every input width must be a multiple of dim {dim}, got {input_widths}", field=node.name)
        return dim

    def output_width(self, node, input_widths):
        dim = self._vector_width(node, input_widths)
        pairs = len(pair_indices(sum(width // dim for width in input_widths), node.attrs["self_interaction"])[0])
        if pairs == 0:
            raise SpecError("dot_interaction needs at least two vectors (or self_interaction)", field=node.name)
        return pairs + (input_widths[0] if node.attrs["concat_first"] else 0)

    def forward(self, node, ctx, inputs, params):
        xp, rows = ctx.xp, inputs[0].shape[0]
        widths = [x.shape[1] for x in inputs]
        dim = node.attrs["dim"] or widths[0]
        vectors = _stack_vectors(ctx, node.name, "vectors", inputs, widths, dim)
        count = vectors.shape[1]
        gram = xp.matmul(vectors, vectors.transpose(0, 2, 1), out=ctx.buffer(node.name, "gram", (rows, count, count)))
        pairs = xp.asarray(flat_pair_indices(count, node.attrs["self_interaction"]))
        first = widths[0] if node.attrs["concat_first"] else 0
        out = ctx.buffer(node.name, "out", (rows, first + len(pairs)))
        out[:, :first] = inputs[0][:, :first]
        # One gather over the flattened grid: several times faster than gram[:, i, j].
        xp.take(gram.reshape(rows, count * count), pairs, axis=1, out=out[:, first:])
        return out, (vectors, widths, first)

    def backward(self, node, ctx, grad_out, saved, params, param_grads, wants):
        xp, (vectors, widths, first) = ctx.xp, saved
        rows, count, dim = vectors.shape
        cells, diagonal = symmetric_pair_cells(count, node.attrs["self_interaction"])
        pair_count = grad_out.shape[1] - first
        padded = ctx.buffer(node.name, "grad_pairs", (rows, pair_count + 1))  # last column: cells of no pair
        padded[:, :pair_count] = grad_out[:, first:]
        padded[:, pair_count] = 0
        # G + G^T gathered in one pass (a gather measures faster than scattering into a zeroed grid).
        symmetric = xp.take(padded, xp.asarray(cells), axis=1, out=ctx.buffer(node.name, "grad_gram", (rows, count * count)))
        if len(diagonal):
            symmetric[:, xp.asarray(diagonal)] *= 2
        symmetric = symmetric.reshape(rows, count, count)
        d_vectors = xp.matmul(symmetric, vectors, out=ctx.buffer(node.name, "grad_vectors", vectors.shape))
        grads, start = [], 0
        for index, (width, wanted) in enumerate(zip(widths, wants)):
            count_here = width // dim
            if wanted:
                grad = d_vectors[:, start : start + count_here, :].reshape(rows, width)
                if index == 0 and first:
                    grad = grad + grad_out[:, :first]
                grads.append(grad)
            else:
                grads.append(None)
            start += count_here
        return grads

    def tangent(self, node, ctx, inputs, tangents, out, saved, params, param_tangents):
        if all(t is None for t in tangents):
            return None
        xp, (vectors, widths, first) = ctx.xp, saved
        rows, count, dim = vectors.shape
        moved = _stack_vectors(ctx, node.name, "tangent_vectors", tangents, widths, dim)
        half = xp.matmul(moved, vectors.transpose(0, 2, 1), out=ctx.buffer(node.name, "tangent_gram", (rows, count, count)))
        xp.add(half, half.transpose(0, 2, 1), out=half)  # d<v_i, v_j> = <dv_i, v_j> + <v_i, dv_j>
        pairs = xp.asarray(flat_pair_indices(count, node.attrs["self_interaction"]))
        total = ctx.buffer(node.name, "tangent", out.shape)
        total[:, :first] = 0 if tangents[0] is None else tangents[0]
        total[:, first:] = half.reshape(rows, count * count)[:, pairs]
        return total


def _stack_vectors(ctx, owner: str, role: str, arrays, widths, dim):
    """(batch, k, dim): every input's vectors in order; a None array (zero tangent) gives zeros."""
    rows = next(a for a in arrays if a is not None).shape[0]
    count = sum(width // dim for width in widths)
    stacked = ctx.buffer(owner, role, (rows, count, dim))
    start = 0
    for array, width in zip(arrays, widths):
        here = width // dim
        stacked[:, start : start + here, :] = 0 if array is None else array.reshape(rows, here, dim)
        start += here
    return stacked


def pair_indices(count: int, self_interaction: bool):
    """(i, j) of every pair below the diagonal (on it too with `self_interaction`), row by row."""
    below = [i for i in range(count) for j in range(i + self_interaction)]
    left = [j for i in range(count) for j in range(i + self_interaction)]
    return below, left


@functools.lru_cache(maxsize=64)
def flat_pair_indices(count: int, self_interaction: bool):
    """The pairs of `pair_indices` as positions i * count + j in a flattened count x count grid."""
    below, left = pair_indices(count, self_interaction)
    flat = numpy.asarray(below, dtype=numpy.int64) * count + numpy.asarray(left, dtype=numpy.int64)
    flat.flags.writeable = False
    return flat


@functools.lru_cache(maxsize=64)
def symmetric_pair_cells(count: int, self_interaction: bool):
    """For each cell (i, j) of a count x count grid, the number of the pair (i, j) or (j, i), or the
    pair count where there is none; and the cells on the diagonal (pairs (i, i), counted twice in
    G + G^T)."""
    below, left = pair_indices(count, self_interaction)
    cells = numpy.full(count * count, len(below), dtype=numpy.int64)
    numbers = numpy.arange(len(below))
    cells[numpy.asarray(below) * count + numpy.asarray(left)] = numbers
    cells[numpy.asarray(left) * count + numpy.asarray(below)] = numbers
    diagonal = numpy.asarray([i * count + i for i, j in zip(below, left) if i == j], dtype=numpy.int64)
    for array in (cells, diagonal):
        array.flags.writeable = False
    return cells, diagonal


def stable_sigmoid(xp, x, out):
    """1 / (1 + exp(-x)) without overflow: exp only ever sees -|x|."""
    e = xp.exp(-xp.abs(x))
    positive = x >= 0
    xp.divide(xp.where(positive, 1, e), 1 + e, out=out)
    return out


OPS: Mapping[str, Op] = {
    op.kind: op
    for op in (
        Dense(), ReLU(), LeakyReLU(), Sigmoid(), Tanh(), GELU(), Add(), Concat(), LayerNorm(), Dropout(),
        Embedding(), EmbeddingBag(), DotInteraction(),
    )
}
