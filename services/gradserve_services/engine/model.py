"""`Model`: a validated spec plus the passes over it (forward, reverse mode, forward mode).

Reverse mode runs the forward pass keeping what each op saved, seeds the loss gradient, then walks
the nodes ONCE in reverse topological order. A node's gradient is complete when it is reached: every
consumer comes later in topological order, so has already added its share (`+=`, fan-out).
Forward mode carries a tangent beside each value instead and needs one pass per direction.

The batch is one float array `x` for an `input_features` spec, or a mapping of tensor name to array
for a spec with named inputs (see `inputs.py`); both become a `Batch` the passes slice by rows.
A table parameter's gradient is `SparseRows` (its touched rows); every other one is an array.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping
from dataclasses import dataclass

import numpy

from gradserve_services.errors import InvalidArgument

from .batch import FLOAT_DTYPES, Batch, check_named_batch
from .context import PassContext
from .finite import all_finite
from .grad_sums import GradSums
from .inputs import FLOAT, INPUT
from .losses import LOSSES
from .sparse_rows import SparseRows
from .spec import parse_spec
from .table_init import init_table
from .workspace import Workspace

__all__ = ["Model", "GradSum", "FLOAT_DTYPES"]

_FLOAT_DTYPES = frozenset(numpy.dtype(name) for name in FLOAT_DTYPES)  # `dtype.name` is slow per call


@dataclass(frozen=True)
class GradSum:
    """Gradient of the SUM of per-sample losses over `count` samples (divide by the total count
    after summing shards, so uneven shards aggregate exactly)."""

    loss_sum: float
    grad_sum: dict
    count: int


class Model:
    """A model spec ready to run. Not for concurrent use from threads without its lock: every
    compute method takes `self._lock`, because passes share one `Workspace`."""

    def __init__(self, spec, xp=numpy):
        self.graph = parse_spec(spec)
        self.xp = xp
        self.loss = LOSSES[self.graph.loss]
        self._workspace = Workspace(xp)
        self._lock = threading.Lock()
        self._single_input = INPUT in self.graph.inputs  # an `input_features` spec: x is one array
        # each node's own dense parameters: final once its backward ran in the last micro-batch
        self._node_parameters = {
            node.name: tuple(name for name in node.op.parameter_shapes(
                node, [self.graph.widths[source] for source in node.inputs]) if name not in self.graph.tables)
            for node in self.graph.nodes}

    # ----- description -------------------------------------------------------------------------

    def parameter_shapes(self) -> dict[str, tuple[int, ...]]:
        """Ordered like the nodes run (topological, ties in listed order), weight before bias."""
        return dict(self.graph.parameter_shapes)

    def init_parameters(self, seed: int = 0, dtype="float32", *, tables: bool = True) -> dict:
        """He-normal dense weights (suits ReLU), zero biases, layernorm weight 1 and bias 0; tables
        from `table_init` (a function of seed, table and row; they draw nothing from the stream the
        dense weights come from, so adding a table leaves those unchanged). `tables=False` leaves
        them out (a parameter server makes their rows where they live)."""
        dtype = _float_dtype(dtype, "dtype")
        rng = numpy.random.default_rng(seed)
        params = {}
        for name, shape in self.graph.parameter_shapes.items():
            if name in self.graph.tables:
                if tables:
                    params[name] = init_table(self.xp, seed, name, shape, dtype)
                continue
            if len(shape) == 2:
                value = rng.standard_normal(shape) * math.sqrt(2.0 / shape[0])
            elif name.endswith(".weight"):
                value = numpy.ones(shape)
            else:
                value = numpy.zeros(shape)
            params[name] = self.xp.asarray(value.astype(dtype))
        return params

    def release_buffers(self) -> None:
        """Free the workspace (scratch and recycled result arrays); the next call reallocates."""
        with self._lock:
            self._workspace.release()

    def workspace_nbytes(self) -> int:
        """Bytes held between calls: scratch buffers plus recycled gradient arrays."""
        return self._workspace.nbytes

    # ----- validation --------------------------------------------------------------------------

    def validate_parameters(self, params, *, field_prefix: str = "parameters", check_values: bool = True):
        """Raise InvalidArgument(field=f"{field_prefix}.NAME") unless `params` holds exactly this
        model's parameters with the right shapes, one float dtype, and (if `check_values`) finite
        values. A table may come whole or as `SparseRows` holding the rows a batch will read.
        Returns the dtype."""
        if not isinstance(params, Mapping):
            raise InvalidArgument("parameters must be a mapping of name to array", field=field_prefix)
        shapes = self.graph.parameter_shapes
        for name in shapes:
            if name not in params:
                raise InvalidArgument(f"missing parameter {name!r}", field=f"{field_prefix}.{name}")
        for name in params:
            if name not in shapes:
                raise InvalidArgument(f"{name!r} is not a parameter of this model", field=f"{field_prefix}.{name}")
        dtype = None
        for name, shape in shapes.items():
            value, field = params[name], f"{field_prefix}.{name}"
            if isinstance(value, SparseRows) and name in self.graph.tables:
                value = self._checked_rows(value, shape, field)
            if not isinstance(value, self.xp.ndarray):
                raise InvalidArgument(f"expected an array, got {type(value).__name__}", field=field)
            if value.dtype not in _FLOAT_DTYPES:
                raise InvalidArgument(f"dtype must be float32 or float64, got {value.dtype}", field=field)
            if dtype is not None and value.dtype != dtype:
                raise InvalidArgument(f"dtype {value.dtype} differs from the other parameters' {dtype}", field=field)
            dtype = value.dtype
            if tuple(value.shape) != shape and not isinstance(params[name], SparseRows):
                raise InvalidArgument(f"shape must be {shape}, got {tuple(value.shape)}", field=field)
            if check_values and not all_finite(self.xp, value):
                raise InvalidArgument("contains NaN or infinity", field=field)
        return dtype

    def _checked_rows(self, value: SparseRows, shape, field: str):
        """The rows array of a table given as SparseRows, once its ids and shape are checked."""
        if value.shape != shape:
            raise InvalidArgument(f"shape must be {shape}, got {value.shape}", field=field)
        ids, rows = value.ids, value.rows
        if not isinstance(ids, self.xp.ndarray) or ids.dtype != self.xp.int64 or ids.ndim != 1:
            raise InvalidArgument("row ids must be a 1-D int64 array", field=field)
        if not isinstance(rows, self.xp.ndarray) or rows.shape != (ids.shape[0], shape[1]):
            raise InvalidArgument(f"rows must be an array of shape ({ids.shape[0]}, {shape[1]})", field=field)
        if ids.size and (int(ids[0]) < 0 or int(ids[-1]) >= shape[0] or not bool((ids[1:] > ids[:-1]).all())):
            raise InvalidArgument(f"row ids must be sorted, unique and in [0, {shape[0]})", field=field)
        return rows

    def validate_batch(self, x, y=None, *, dtype=None):
        """Raise InvalidArgument(field="batch.x" / "batch.y") unless `x` is a non-empty finite
        (rows, input_features) float array (of `dtype`, when given) and `y` fits the loss and the
        output width. Returns (x, y) with float targets in x's dtype. For a spec with named inputs,
        `x` maps tensor names to arrays, errors name `batch.<tensor>`, and the (x, y) returned
        holds a `Batch` (sliceable by rows) as x."""
        batch, y, _ = self._checked_batch_and_targets(x, y, dtype)
        return (batch.feeds[INPUT] if self._single_input else batch), y

    def _checked_batch_and_targets(self, x, y, dtype):
        """(Batch, targets, pass dtype): the parameters' dtype, else the batch's floats'."""
        if self._single_input:
            batch, dtype = Batch({INPUT: self._checked_x(x, dtype)}, x.shape[0]), x.dtype
        else:
            batch, dtype = self._checked_named(x, dtype)
        if y is None:
            return batch, None, dtype
        if not isinstance(y, self.xp.ndarray):
            raise InvalidArgument(f"expected an array, got {type(y).__name__}", field="batch.y")
        width = self.graph.widths[self.graph.output]
        return batch, self.loss.check_targets(self.xp, y, batch.rows, width, dtype), dtype

    def _checked_named(self, x, dtype):
        if isinstance(x, Batch):  # made by validate_batch (and perhaps sliced into shards): checked
            return x, dtype if dtype is not None else numpy.dtype("float64")
        batch, found_dtype = check_named_batch(self.xp, self.graph.inputs, x, dtype)
        for node in self.graph.nodes:
            sources = [self.graph.inputs.get(source) for source in node.inputs]
            if any(decl is not None and decl.kind != FLOAT for decl in sources):
                node.op.check_batch(node, self.xp, [batch.feeds.get(source) for source in node.inputs], sources)
        return batch, found_dtype if found_dtype is not None else numpy.dtype("float64")

    def _checked_x(self, x, dtype):
        if not isinstance(x, self.xp.ndarray):
            raise InvalidArgument(f"expected an array, got {type(x).__name__}", field="batch.x")
        if x.dtype not in _FLOAT_DTYPES:
            raise InvalidArgument(f"dtype must be float32 or float64, got {x.dtype}", field="batch.x")
        if dtype is not None and x.dtype != dtype:
            raise InvalidArgument(f"dtype {x.dtype} differs from the parameters' {dtype}", field="batch.x")
        if x.ndim != 2 or x.shape[1] != self.graph.input_features:
            raise InvalidArgument(
                f"shape must be (batch, {self.graph.input_features}), got {tuple(x.shape)}", field="batch.x"
            )
        if x.shape[0] == 0:
            raise InvalidArgument("the batch is empty", field="batch.x")
        if not all_finite(self.xp, x):
            raise InvalidArgument("contains NaN or infinity", field="batch.x")
        return x

    # ----- passes ------------------------------------------------------------------------------

    def forward(self, params, x, *, train: bool = False, seed: int = 0, sample_offset: int = 0):
        """The output node's values, a fresh array."""
        _check_options(None, seed, sample_offset)
        with self._lock:
            dtype = self.validate_parameters(params, check_values=False)
            batch, _, pass_dtype = self._checked_batch_and_targets(x, None, dtype)
            out, _ = self._forward(self._context(pass_dtype, train, seed, sample_offset), params, batch)
            return out.copy()

    def loss_and_grad_sum(
        self, params, x, y, *, micro_batch_size=None, train=True, seed=0, sample_offset=0, on_ready=None,
        out=None,
    ) -> GradSum:
        """Loss and gradient of the SUM of per-sample losses; memory bounded by the micro-batch.

        `on_ready(grads)`, if given, is called during the last micro-batch's backward pass with
        `{name: gradient sum}` of the dense parameters whose sums just became final, last layers
        first (a caller may send them on while the layers below are still computed). It must not
        write into them; parameters no pass reached are not announced (their gradient is zero).
        `out`: `{name: array}` (C-contiguous, the parameter's shape and dtype) that dense sums are
        accumulated in instead of new arrays (the result then holds them; one no pass reached is
        returned as zeros elsewhere, its array left as it was)."""
        _check_options(micro_batch_size, seed, sample_offset)
        with self._lock:
            batch, y, dtype = self._checked_batch(params, x, y)
            loss_sum, grad_sum = self._reverse(params, batch, y, dtype, 1.0, micro_batch_size, train, seed,
                                               sample_offset, on_ready, _checked_out(out, self.graph.parameter_shapes, dtype))
        return GradSum(loss_sum, grad_sum, batch.rows)

    def loss_and_grad(self, params, x, y, *, micro_batch_size=None, train=True, seed=0, sample_offset=0):
        """(mean loss, mean gradients). The 1/count is applied to the loss gradient before the
        backward pass (as PyTorch does), which saves a pass over every parameter gradient.
        Tables' gradients are `SparseRows`; `dense_gradients` makes them whole."""
        _check_options(micro_batch_size, seed, sample_offset)
        with self._lock:
            batch, y, dtype = self._checked_batch(params, x, y)
            count = batch.rows
            loss_sum, grads = self._reverse(params, batch, y, dtype, 1.0 / count, micro_batch_size, train, seed, sample_offset)
        return loss_sum / count, grads

    def jvp(self, params, tangent, x, y, *, micro_batch_size=None, train=True, seed=0, sample_offset=0):
        """(mean loss, directional derivative of the mean loss along `tangent`), forward mode:
        `tangent` has one array per parameter; the derivative equals <mean gradient, tangent>."""
        _check_options(micro_batch_size, seed, sample_offset)
        with self._lock:
            batch, y, pass_dtype = self._checked_batch(params, x, y)
            dtype = self.validate_parameters(tangent, field_prefix="tangent")
            if dtype is not None and dtype != pass_dtype:
                raise InvalidArgument(f"dtype {dtype} differs from the parameters' {pass_dtype}", field="tangent")
            loss_sum = derivative_sum = 0.0
            for start, stop in _micro_batches(batch.rows, micro_batch_size):
                ctx = self._context(pass_dtype, train, seed, sample_offset + start)
                out, out_tangent = self._forward_with_tangent(ctx, params, tangent, batch.slice(self.xp, start, stop))
                loss_grad = ctx.buffer(self.graph.output, "loss_grad", out.shape)
                loss_sum += self.loss.value_and_grad(self.xp, out, y[start:stop], 1.0, loss_grad)
                if out_tangent is not None:
                    derivative_sum += float(self.xp.vdot(loss_grad, out_tangent))
            self._explain_non_finite(loss_sum, params)
        return loss_sum / batch.rows, derivative_sum / batch.rows

    # ----- internals ---------------------------------------------------------------------------

    def _checked_batch(self, params, x, y):
        # Parameter values are checked where parameters arrive (validate_parameters): scanning
        # every weight on every step would cost more than the elementwise work of the step.
        dtype = self.validate_parameters(params, check_values=False)
        if y is None:
            raise InvalidArgument("targets are required", field="batch.y")
        return self._checked_batch_and_targets(x, y, dtype)

    def _context(self, dtype, train, seed, first_sample) -> PassContext:
        return PassContext(self.xp, dtype, self._workspace, bool(train), int(seed), int(first_sample))

    def _reverse(self, params, batch, y, dtype, scale, micro_batch_size, train, seed, sample_offset,
                 on_ready=None, out=None):
        sums = GradSums(self.xp, self.graph.parameter_shapes, dtype, self._workspace, self.graph.tables, out)
        loss_sum = 0.0
        for start, stop in _micro_batches(batch.rows, micro_batch_size):
            ctx = self._context(dtype, train, seed, sample_offset + start)
            out, saved = self._forward(ctx, params, batch.slice(self.xp, start, stop))
            loss_grad = ctx.buffer(self.graph.output, "loss_grad", out.shape)
            loss_sum += self.loss.value_and_grad(self.xp, out, y[start:stop], scale, loss_grad)
            last = on_ready is not None and stop == batch.rows
            self._backward(ctx, params, loss_grad, saved, sums, on_ready=on_ready if last else None)
        self._explain_non_finite(loss_sum, params)
        return loss_sum, sums.result()

    def _forward(self, ctx, params, batch: Batch):
        values, saved = dict(batch.feeds), {}
        for node in self.graph.nodes:
            inputs = [values[source] for source in node.inputs]
            values[node.name], saved[node.name] = node.op.forward(node, ctx, inputs, params)
        return values[self.graph.output], saved

    def _backward(self, ctx, params, loss_grad, saved, sums: GradSums, needs_grad=None, on_ready=None) -> dict:
        """Returns the gradients left unconsumed: those of the batch inputs `needs_grad` marks
        (the graph's own marks none; `vjp.py` marks the float inputs to get dL/dx)."""
        needs_grad = self.graph.needs_grad if needs_grad is None else needs_grad
        grads = {self.graph.output: loss_grad} if needs_grad[self.graph.output] else {}
        owned = set()  # nodes whose gradient lives in their own "grad_sum" buffer
        for node in reversed(self.graph.nodes):
            grad_out = grads.pop(node.name, None)
            if grad_out is None:  # nothing downstream depends on a parameter through this node
                continue
            wants = [needs_grad[source] for source in node.inputs]
            input_grads = node.op.backward(node, ctx, grad_out, saved[node.name], params, sums, wants)
            if on_ready is not None:
                ready = {name: sums.sums[name] for name in self._node_parameters[node.name] if name in sums.sums}
                if ready:
                    on_ready(ready)
            for source, grad in zip(node.inputs, input_grads):
                if grad is None:
                    continue
                if source not in grads:
                    grads[source] = grad  # borrowed: never written into
                elif source in owned:
                    grads[source] += grad
                else:
                    total = ctx.buffer(source, "grad_sum", grad.shape)
                    grads[source] = self.xp.add(grads[source], grad, out=total)
                    owned.add(source)
        return grads

    def _forward_with_tangent(self, ctx, params, param_tangents, batch: Batch):
        values = dict(batch.feeds)
        tangents = {name: None for name in batch.feeds}  # the batch inputs do not move
        for node in self.graph.nodes:
            inputs = [values[source] for source in node.inputs]
            out, saved = node.op.forward(node, ctx, inputs, params)
            in_tangents = [tangents[source] for source in node.inputs]
            tangents[node.name] = node.op.tangent(node, ctx, inputs, in_tangents, out, saved, params, param_tangents)
            values[node.name] = out
        return values[self.graph.output], tangents[self.graph.output]

    def _explain_non_finite(self, loss_sum: float, params) -> None:
        """A non-finite loss usually means non-finite parameters: name the first one."""
        if not math.isfinite(loss_sum):
            self.validate_parameters(params, check_values=True)


def _checked_out(out, shapes, dtype):
    """`out` (see loss_and_grad_sum), refused where an array could not hold its sum in place."""
    if not out:
        return None
    for name, array in out.items():
        if name not in shapes or tuple(array.shape) != tuple(shapes[name]) or array.dtype != dtype \
                or not array.flags.c_contiguous or not array.flags.writeable:
            raise InvalidArgument(f"must be a writable C-contiguous {dtype} array of shape {shapes.get(name)}",
                                  field=f"out.{name}")
    return out


def _micro_batches(rows: int, micro_batch_size):
    step = rows if micro_batch_size is None else int(micro_batch_size)
    for start in range(0, rows, step):
        yield start, min(start + step, rows)


def _check_options(micro_batch_size, seed, sample_offset) -> None:
    if micro_batch_size is not None and (
        isinstance(micro_batch_size, bool)
        or not isinstance(micro_batch_size, (int, numpy.integer))
        or micro_batch_size < 1
    ):
        raise InvalidArgument(f"must be a positive integer, got {micro_batch_size!r}", field="micro_batch_size")
    if isinstance(seed, bool) or not isinstance(seed, (int, numpy.integer)):
        raise InvalidArgument(f"must be an integer, got {seed!r}", field="seed")
    if isinstance(sample_offset, bool) or not isinstance(sample_offset, (int, numpy.integer)) or sample_offset < 0:
        raise InvalidArgument(f"must be a non-negative integer, got {sample_offset!r}", field="sample_offset")


def _float_dtype(dtype, field: str):
    try:
        resolved = numpy.dtype(dtype)
    except TypeError:
        resolved = None
    if resolved is None or resolved.name not in FLOAT_DTYPES:
        raise InvalidArgument(f"dtype must be float32 or float64, got {dtype!r}", field=field)
    return resolved
