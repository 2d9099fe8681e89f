"""`Model`: a validated spec plus the passes over it (forward, reverse mode, forward mode).

Reverse mode runs the forward pass keeping what each op saved, seeds the loss gradient, then walks
the nodes ONCE in reverse topological order. A node's gradient is complete when it is reached: every
consumer comes later in topological order, so has already added its share (`+=`, fan-out).
Forward mode carries a tangent beside each value instead and needs one pass per direction.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping
from dataclasses import dataclass

import numpy

from gradserve_services.errors import InvalidArgument

from .context import PassContext
from .grad_sums import GradSums
from .losses import LOSSES
from .spec import INPUT, parse_spec
from .workspace import Workspace

__all__ = ["Model", "GradSum", "FLOAT_DTYPES"]

FLOAT_DTYPES = ("float32", "float64")
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

    # ----- description -------------------------------------------------------------------------

    def parameter_shapes(self) -> dict[str, tuple[int, ...]]:
        """Ordered like the nodes run (topological, ties in listed order), weight before bias."""
        return dict(self.graph.parameter_shapes)

    def init_parameters(self, seed: int = 0, dtype="float32") -> dict:
        """He-normal dense weights (suits ReLU), zero biases, layernorm weight 1 and bias 0."""
        dtype = _float_dtype(dtype, "dtype")
        rng = numpy.random.default_rng(seed)
        params = {}
        for name, shape in self.graph.parameter_shapes.items():
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
        values. Returns the dtype."""
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
            if not isinstance(value, self.xp.ndarray):
                raise InvalidArgument(f"expected an array, got {type(value).__name__}", field=field)
            if value.dtype not in _FLOAT_DTYPES:
                raise InvalidArgument(f"dtype must be float32 or float64, got {value.dtype}", field=field)
            if dtype is not None and value.dtype != dtype:
                raise InvalidArgument(f"dtype {value.dtype} differs from the other parameters' {dtype}", field=field)
            dtype = value.dtype
            if tuple(value.shape) != shape:
                raise InvalidArgument(f"shape must be {shape}, got {tuple(value.shape)}", field=field)
            if check_values and not bool(self.xp.isfinite(value).all()):
                raise InvalidArgument("contains NaN or infinity", field=field)
        return dtype

    def validate_batch(self, x, y=None, *, dtype=None):
        """Raise InvalidArgument(field="batch.x" / "batch.y") unless `x` is a non-empty finite
        (rows, input_features) float array (of `dtype`, when given) and `y` fits the loss and the
        output width. Returns (x, y) with float targets in x's dtype."""
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
        if not bool(self.xp.isfinite(x).all()):
            raise InvalidArgument("contains NaN or infinity", field="batch.x")
        if y is None:
            return x, None
        if not isinstance(y, self.xp.ndarray):
            raise InvalidArgument(f"expected an array, got {type(y).__name__}", field="batch.y")
        width = self.graph.widths[self.graph.output]
        return x, self.loss.check_targets(self.xp, y, x.shape[0], width, x.dtype)

    # ----- passes ------------------------------------------------------------------------------

    def forward(self, params, x, *, train: bool = False, seed: int = 0, sample_offset: int = 0):
        """The output node's values, a fresh array."""
        _check_options(None, seed, sample_offset)
        with self._lock:
            dtype = self.validate_parameters(params, check_values=False)
            x, _ = self.validate_batch(x, dtype=dtype)
            out, _ = self._forward(self._context(dtype, train, seed, sample_offset), params, x)
            return out.copy()

    def loss_and_grad_sum(
        self, params, x, y, *, micro_batch_size=None, train=True, seed=0, sample_offset=0
    ) -> GradSum:
        """Loss and gradient of the SUM of per-sample losses; memory bounded by the micro-batch."""
        _check_options(micro_batch_size, seed, sample_offset)
        with self._lock:
            x, y = self._checked_batch(params, x, y)
            loss_sum, grad_sum = self._reverse(params, x, y, 1.0, micro_batch_size, train, seed, sample_offset)
        return GradSum(loss_sum, grad_sum, x.shape[0])

    def loss_and_grad(self, params, x, y, *, micro_batch_size=None, train=True, seed=0, sample_offset=0):
        """(mean loss, mean gradients). The 1/count is applied to the loss gradient before the
        backward pass (as PyTorch does), which saves a pass over every parameter gradient."""
        _check_options(micro_batch_size, seed, sample_offset)
        with self._lock:
            x, y = self._checked_batch(params, x, y)
            count = x.shape[0]
            loss_sum, grads = self._reverse(params, x, y, 1.0 / count, micro_batch_size, train, seed, sample_offset)
        return loss_sum / count, grads

    def jvp(self, params, tangent, x, y, *, micro_batch_size=None, train=True, seed=0, sample_offset=0):
        """(mean loss, directional derivative of the mean loss along `tangent`), forward mode:
        `tangent` has one array per parameter; the derivative equals <mean gradient, tangent>."""
        _check_options(micro_batch_size, seed, sample_offset)
        with self._lock:
            x, y = self._checked_batch(params, x, y)
            dtype = self.validate_parameters(tangent, field_prefix="tangent")
            if dtype is not None and dtype != x.dtype:
                raise InvalidArgument(f"dtype {dtype} differs from the parameters' {x.dtype}", field="tangent")
            loss_sum = derivative_sum = 0.0
            for start, stop in _micro_batches(x.shape[0], micro_batch_size):
                ctx = self._context(x.dtype, train, seed, sample_offset + start)
                out, out_tangent = self._forward_with_tangent(ctx, params, tangent, x[start:stop])
                loss_grad = ctx.buffer(self.graph.output, "loss_grad", out.shape)
                loss_sum += self.loss.value_and_grad(self.xp, out, y[start:stop], 1.0, loss_grad)
                if out_tangent is not None:
                    derivative_sum += float(self.xp.vdot(loss_grad, out_tangent))
            self._explain_non_finite(loss_sum, params)
        return loss_sum / x.shape[0], derivative_sum / x.shape[0]

    # ----- internals ---------------------------------------------------------------------------

    def _checked_batch(self, params, x, y):
        # Parameter values are checked where parameters arrive (validate_parameters): scanning
        # every weight on every step would cost more than the elementwise work of the step.
        dtype = self.validate_parameters(params, check_values=False)
        if y is None:
            raise InvalidArgument("targets are required", field="batch.y")
        return self.validate_batch(x, y, dtype=dtype)

    def _context(self, dtype, train, seed, first_sample) -> PassContext:
        return PassContext(self.xp, dtype, self._workspace, bool(train), int(seed), int(first_sample))

    def _reverse(self, params, x, y, scale, micro_batch_size, train, seed, sample_offset):
        sums = GradSums(self.xp, self.graph.parameter_shapes, x.dtype, self._workspace)
        loss_sum = 0.0
        for start, stop in _micro_batches(x.shape[0], micro_batch_size):
            ctx = self._context(x.dtype, train, seed, sample_offset + start)
            out, saved = self._forward(ctx, params, x[start:stop])
            loss_grad = ctx.buffer(self.graph.output, "loss_grad", out.shape)
            loss_sum += self.loss.value_and_grad(self.xp, out, y[start:stop], scale, loss_grad)
            self._backward(ctx, params, loss_grad, saved, sums)
        self._explain_non_finite(loss_sum, params)
        return loss_sum, sums.result()

    def _forward(self, ctx, params, x):
        values, saved = {INPUT: x}, {}
        for node in self.graph.nodes:
            inputs = [values[source] for source in node.inputs]
            values[node.name], saved[node.name] = node.op.forward(node, ctx, inputs, params)
        return values[self.graph.output], saved

    def _backward(self, ctx, params, loss_grad, saved, sums: GradSums) -> None:
        needs_grad = self.graph.needs_grad
        grads = {self.graph.output: loss_grad} if needs_grad[self.graph.output] else {}
        owned = set()  # nodes whose gradient lives in their own "grad_sum" buffer
        for node in reversed(self.graph.nodes):
            grad_out = grads.pop(node.name, None)
            if grad_out is None:  # nothing downstream depends on a parameter through this node
                continue
            wants = [needs_grad[source] for source in node.inputs]
            input_grads = node.op.backward(node, ctx, grad_out, saved[node.name], params, sums, wants)
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

    def _forward_with_tangent(self, ctx, params, param_tangents, x):
        values, tangents = {INPUT: x}, {INPUT: None}  # the batch input does not move
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
