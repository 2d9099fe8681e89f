"""The model spec: parse the JSON-able dict, validate it, sort it topologically, infer every width.

A spec is data (see docs/ARCHITECTURE.md). `parse_spec` turns it into a `Graph`: its batch inputs
(the single `input` of an `input_features` spec, or the named `inputs`, see `inputs.py`), nodes in
the order the engine runs them, the width of every node's output, and the ordered parameter shapes.
Every problem raises `SpecError` whose `field` names the node or input (or the top-level key) at
fault.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from gradserve_services.errors import SpecError

from .inputs import FLOAT, INPUT, InputDecl, parse_inputs, single_input
from .losses import LOSSES
from .ops import OPS, Op

__all__ = ["INPUT", "MAX_NODES", "MAX_WIDTH", "MAX_PARAMETERS", "Node", "Graph", "parse_spec"]

MAX_NODES = 10_000
MAX_WIDTH = 1 << 20  # features of any node, input included
MAX_PARAMETERS = 1 << 31  # elements over all parameters (8 GiB of float32)
MAX_NAME_LENGTH = 256
TOP_LEVEL_KEYS = frozenset({"input_features", "inputs", "nodes", "output", "loss"})


@dataclass(frozen=True)
class Node:
    name: str
    op: Op
    inputs: tuple[str, ...]
    attrs: Mapping[str, object]  # every attribute of the op, defaults filled in


@dataclass(frozen=True)
class Graph:
    input_features: int  # features of one batch row over the inputs of fixed width (float and ids)
    nodes: tuple[Node, ...]  # topological order: every node after all of its inputs
    output: str
    loss: str
    widths: Mapping[str, int | None]  # output features of every node and input (a bag: None)
    parameter_shapes: Mapping[str, tuple[int, ...]]  # ordered like `nodes`, then as the op lists them
    needs_grad: Mapping[str, bool]  # whether a node's output depends on any parameter
    inputs: Mapping[str, InputDecl]  # the batch inputs in declared order ({INPUT: ...} if single)
    tables: Mapping[str, tuple[int, int]]  # the parameters that are tables (gradient: SparseRows)


def parse_spec(spec) -> Graph:
    """Validate `spec` (a dict, or a protobuf message mirroring it) and build its `Graph`."""
    spec = as_plain_data(spec)
    if not isinstance(spec, Mapping):
        raise SpecError(f"a model spec is a mapping, got {type(spec).__name__}", field="spec")
    unknown = sorted(set(spec) - TOP_LEVEL_KEYS)
    if unknown:
        raise SpecError(f"unknown key {unknown[0]!r}", field=str(unknown[0]))
    inputs = _parse_batch_inputs(spec)
    raw_nodes = spec.get("nodes")
    if not isinstance(raw_nodes, (list, tuple)) or not raw_nodes:
        raise SpecError("nodes must be a non-empty list", field="nodes")
    if len(raw_nodes) > MAX_NODES:
        raise SpecError(f"{len(raw_nodes)} nodes; at most {MAX_NODES} are allowed", field="nodes")
    listed = _parse_nodes(raw_nodes, inputs)
    output = spec.get("output")
    if not isinstance(output, str) or output not in listed:
        raise SpecError(f"output {output!r} is not a node of the spec", field="output")
    loss = spec.get("loss")
    if not isinstance(loss, str) or loss not in LOSSES:
        raise SpecError(f"unknown loss {loss!r}; known: {', '.join(LOSSES)}", field="loss")
    ordered = _topological_order(listed)
    reaching = _reject_nodes_not_feeding(output, listed)
    widths = _infer_widths(ordered, inputs)  # before unused inputs: a wrong source is the cause
    for name in inputs:  # a declared input no node reads would still have to be sent
        if name not in reaching and name != INPUT:
            raise SpecError(f"input does not feed the output {output!r} (unused input)", field=name)
    shapes = _parameter_shapes(ordered, widths)
    tables = {name: shapes[name] for node in ordered for name in node.op.table_names(node)}
    return Graph(
        input_features=sum(decl.width for decl in inputs.values() if decl.width is not None),
        nodes=tuple(ordered),
        output=output,
        loss=loss,
        widths=MappingProxyType(widths),
        parameter_shapes=MappingProxyType(shapes),
        needs_grad=MappingProxyType(_needs_grad(ordered, inputs)),
        inputs=MappingProxyType(inputs),
        tables=MappingProxyType(tables),
    )


def _parse_batch_inputs(spec: Mapping) -> dict[str, InputDecl]:
    if "inputs" not in spec:
        return single_input(_parse_width(spec.get("input_features"), "input_features", "input_features"))
    if "input_features" in spec:
        raise SpecError("give either input_features (one input) or inputs (named inputs), not both",
                        field="input_features")
    return parse_inputs(spec["inputs"], MAX_WIDTH)


def as_plain_data(value):
    """Dicts/lists as they are; a protobuf message (duck-typed: `ListFields`) becomes a dict of the
    fields that are set, so optional attributes keep their defaults. Nothing here imports protobuf."""
    if hasattr(value, "ListFields"):
        return {field.name: as_plain_data(item) for field, item in value.ListFields()}
    if isinstance(value, Mapping):
        return {key: as_plain_data(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)) or type(value).__name__.startswith("Repeated"):
        return [as_plain_data(item) for item in value]
    return value


def _parse_width(value, field: str, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(f"{what} must be an integer, got {value!r}", field=field)
    if not 1 <= value <= MAX_WIDTH:
        raise SpecError(f"{what} = {value} is outside [1, {MAX_WIDTH}]", field=field)
    return value


def _parse_nodes(raw_nodes, declared: Mapping[str, InputDecl]) -> dict[str, Node]:
    listed: dict[str, Node] = {}
    for index, raw in enumerate(raw_nodes):
        if not isinstance(raw, Mapping):
            raise SpecError(f"node {index} is not a mapping", field=f"nodes[{index}]")
        name = raw.get("name")
        if not isinstance(name, str) or not name or len(name) > MAX_NAME_LENGTH:
            raise SpecError(
                f"node {index} needs a name of 1..{MAX_NAME_LENGTH} characters", field=f"nodes[{index}]"
            )
        if name == INPUT:
            raise SpecError(f"{INPUT!r} is reserved for the batch input", field=name)
        if name in declared:
            raise SpecError(f"{name!r} is the name of a batch input", field=name)
        if name in listed:
            raise SpecError(f"node name {name!r} is used twice", field=name)
        op_name = raw.get("op")
        op = OPS.get(op_name) if isinstance(op_name, str) else None
        if op is None:
            raise SpecError(f"unknown op {raw.get('op')!r}; known: {', '.join(OPS)}", field=name)
        inputs = raw.get("inputs")
        if not isinstance(inputs, (list, tuple)) or not all(isinstance(i, str) for i in inputs):
            raise SpecError("inputs must be a list of node names", field=name)
        low, high = op.arity
        if len(inputs) < low or (high is not None and len(inputs) > high):
            wanted = f"exactly {low}" if low == high else f"at least {low}"
            raise SpecError(f"op {op.kind!r} takes {wanted} input(s), got {len(inputs)}", field=name)
        attrs = {key: value for key, value in raw.items() if key not in ("name", "op", "inputs")}
        listed[name] = Node(name, op, tuple(inputs), MappingProxyType(op.parse_attrs(name, attrs)))
    for node in listed.values():
        for source in node.inputs:
            if source not in declared and source not in listed:
                raise SpecError(f"input {source!r} is not a node of the spec", field=node.name)
            if source == node.name:
                raise SpecError("a node cannot be its own input (cycle)", field=node.name)
    return listed


def _topological_order(listed: dict[str, Node]) -> list[Node]:
    """Kahn's algorithm; ties keep the listed order, so the result is deterministic."""
    consumers: dict[str, list[str]] = {name: [] for name in listed}
    missing = {name: 0 for name in listed}
    for node in listed.values():
        for source in {s for s in node.inputs if s in listed}:
            consumers[source].append(node.name)
            missing[node.name] += 1
    position = {name: index for index, name in enumerate(listed)}
    ready = [name for name in listed if missing[name] == 0]
    ordered: list[Node] = []
    while ready:
        ready.sort(key=position.__getitem__, reverse=True)
        name = ready.pop()
        ordered.append(listed[name])
        for consumer in consumers[name]:
            missing[consumer] -= 1
            if missing[consumer] == 0:
                ready.append(consumer)
    if len(ordered) < len(listed):
        stuck = next(name for name in listed if missing[name] > 0)
        raise SpecError("the graph has a cycle through this node", field=_node_on_cycle(stuck, listed, missing))
    return ordered


def _node_on_cycle(start: str, listed: dict[str, Node], missing: dict[str, int]) -> str:
    """Walk unsorted inputs from a node stuck behind a cycle until a node repeats: it is on the cycle."""
    seen: set[str] = set()
    name = start
    while name not in seen:
        seen.add(name)
        name = next(s for s in listed[name].inputs if s in listed and missing[s] > 0)
    return name


def _reject_nodes_not_feeding(output: str, listed: dict[str, Node]) -> set[str]:
    """The nodes and inputs the output depends on; SpecError for a node not among them."""
    reaching = {output}
    pending = [output]
    while pending:
        for source in listed[pending.pop()].inputs:
            if source not in reaching:
                reaching.add(source)
                if source in listed:
                    pending.append(source)
    for name in listed:
        if name not in reaching:
            raise SpecError(f"node does not feed the output {output!r} (dangling node)", field=name)
    return reaching


def _infer_widths(ordered: list[Node], inputs: Mapping[str, InputDecl]) -> dict[str, int | None]:
    widths = {name: decl.width for name, decl in inputs.items()}
    for node in ordered:
        for source in node.inputs:
            kind = inputs[source].kind if source in inputs else FLOAT
            if kind != node.op.reads:
                raise SpecError(
                    f"op {node.op.kind!r} reads {node.op.reads} inputs; {source!r} holds {kind}", field=node.name
                )
        node.op.check_sources(node, [inputs.get(source) for source in node.inputs])
        width = node.op.output_width(node, [widths[source] for source in node.inputs])
        if not 1 <= width <= MAX_WIDTH:
            raise SpecError(f"output width {width} is outside [1, {MAX_WIDTH}]", field=node.name)
        widths[node.name] = width
    return widths


def _parameter_shapes(ordered: list[Node], widths: dict[str, int]) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    total = 0
    for node in ordered:
        for name, shape in node.op.parameter_shapes(node, [widths[s] for s in node.inputs]).items():
            shapes[name] = shape
            total += _product(shape)
        if total > MAX_PARAMETERS:
            raise SpecError(f"more than {MAX_PARAMETERS} parameter elements", field=node.name)
    return shapes


def _needs_grad(ordered: list[Node], inputs: Mapping[str, InputDecl]) -> dict[str, bool]:
    needs = {name: False for name in inputs}
    for node in ordered:
        has_parameters = bool(node.op.parameter_suffixes(node))
        needs[node.name] = has_parameters or any(needs[source] for source in node.inputs)
    return needs


def _product(shape: tuple[int, ...]) -> int:
    size = 1
    for extent in shape:
        size *= extent
    return size
