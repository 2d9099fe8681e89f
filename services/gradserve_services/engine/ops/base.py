"""What every op shares: its attributes (parsed and range-checked from the spec) and the rule
signatures of `Op` (the calling convention is described in `ops/__init__.py`)."""

from __future__ import annotations

import math
from collections.abc import Mapping

from gradserve_services.errors import SpecError

from ..inputs import FLOAT

__all__ = ["Attribute", "Choice", "Op"]


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
