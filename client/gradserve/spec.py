"""Model spec and optimizer config: the JSON-able dicts of docs/ARCHITECTURE.md <-> their messages.

The one place these conversions live. Dicts are what users write and what the engine reads; the
messages mirror them field for field, with unset optional fields meaning "the default".
"""

from __future__ import annotations

from collections.abc import Mapping

from google.protobuf import message as protobuf_message

from gradserve.v1 import model_pb2

__all__ = ["SpecFormatError", "spec_to_proto", "spec_from_proto", "optimizer_to_proto", "optimizer_from_proto",
           "table_optimizer_to_proto", "table_optimizer_from_proto"]

NODE_KEYS = ("name", "op", "inputs")
NODE_ATTRIBUTES = ("units", "bias", "alpha", "eps", "rate", "rows", "dim", "field", "mode",
                   "self_interaction", "concat_first")
SPEC_KEYS = ("input_features", "inputs", "nodes", "output", "loss")
INPUT_KEYS = ("name", "kind", "features", "fields", "weighted")
TABLE_OPTIMIZER_KEYS = ("name", "lr", "beta1", "beta2", "eps", "initial_accumulator_value")
OPTIMIZER_KEYS = ("name", "lr", "momentum", "beta1", "beta2", "eps", "weight_decay", "clip_norm")
SCHEDULE_KEYS = ("name", "warmup_steps", "step_size", "gamma", "total_steps", "min_lr")


class SpecFormatError(ValueError):
    """A dict cannot be expressed as the message (unknown key, wrong type). `field` names it."""

    def __init__(self, message: str, field: str):
        super().__init__(f"{field}: {message}")
        self.message = message
        self.field = field


def spec_to_proto(spec: Mapping) -> model_pb2.ModelSpec:
    if isinstance(spec, model_pb2.ModelSpec):
        return spec
    _reject_unknown(spec, SPEC_KEYS, "spec")
    message = model_pb2.ModelSpec()
    _assign(message, "input_features", spec.get("input_features"), "input_features")
    _assign(message, "output", spec.get("output"), "output")
    _assign(message, "loss", spec.get("loss"), "loss")
    for index, declared in enumerate(spec.get("inputs") or ()):
        where = f"inputs[{index}]"
        _reject_unknown(declared, INPUT_KEYS, where)
        entry = message.inputs.add()
        for key in INPUT_KEYS:
            _assign(entry, key, declared.get(key), declared.get("name") or where)
    for index, node in enumerate(spec.get("nodes") or ()):
        where = f"nodes[{index}]"
        if not isinstance(node, Mapping):
            raise SpecFormatError("a node is a mapping", where)
        _reject_unknown(node, NODE_KEYS + NODE_ATTRIBUTES, node.get("name") or where)
        entry = message.nodes.add()
        for key in NODE_KEYS + NODE_ATTRIBUTES:
            if key == "inputs":
                inputs = node.get("inputs") or ()
                if isinstance(inputs, str):
                    raise SpecFormatError("inputs is a list of node names", node.get("name") or where)
                _assign(entry.inputs, None, list(inputs), node.get("name") or where)
            else:
                _assign(entry, key, node.get(key), node.get("name") or where)
    return message


def spec_from_proto(message: model_pb2.ModelSpec) -> dict:
    nodes = []
    for node in message.nodes:
        entry = {"name": node.name, "op": node.op, "inputs": list(node.inputs)}
        for key in NODE_ATTRIBUTES:
            if node.HasField(key):
                entry[key] = getattr(node, key)
        nodes.append(entry)
    spec = {"nodes": nodes, "output": message.output, "loss": message.loss}
    if message.inputs:  # named inputs: input_features stays out (the engine takes one or the other)
        spec["inputs"] = [{key: getattr(declared, key) for key in INPUT_KEYS
                           if key in ("name", "kind") or declared.HasField(key)}
                          for declared in message.inputs]
    else:
        spec["input_features"] = message.input_features
    return spec


def optimizer_to_proto(config: Mapping | None) -> model_pb2.OptimizerConfig:
    if isinstance(config, model_pb2.OptimizerConfig):
        return config
    config = dict(config or {})
    schedule = config.pop("schedule", None)
    _reject_unknown(config, OPTIMIZER_KEYS, "optimizer")
    message = model_pb2.OptimizerConfig()
    for key in OPTIMIZER_KEYS:
        _assign(message, key, config.get(key), f"optimizer.{key}")
    if schedule is not None:
        _reject_unknown(schedule, SCHEDULE_KEYS, "optimizer.schedule")
        message.schedule.SetInParent()
        for key in SCHEDULE_KEYS:
            _assign(message.schedule, key, schedule.get(key), f"optimizer.schedule.{key}")
    return message


def optimizer_from_proto(message: model_pb2.OptimizerConfig) -> dict:
    config = {key: getattr(message, key) for key in OPTIMIZER_KEYS if message.HasField(key)}
    if message.HasField("schedule"):
        config["schedule"] = {
            key: getattr(message.schedule, key) for key in SCHEDULE_KEYS if message.schedule.HasField(key)
        }
    return config


def table_optimizer_to_proto(config: Mapping | None) -> model_pb2.TableOptimizerConfig:
    if isinstance(config, model_pb2.TableOptimizerConfig):
        return config
    config = dict(config or {})
    _reject_unknown(config, TABLE_OPTIMIZER_KEYS, "table_optimizer")
    message = model_pb2.TableOptimizerConfig()
    for key in TABLE_OPTIMIZER_KEYS:
        _assign(message, key, config.get(key), f"table_optimizer.{key}")
    return message


def table_optimizer_from_proto(message: model_pb2.TableOptimizerConfig) -> dict:
    return {key: getattr(message, key) for key in TABLE_OPTIMIZER_KEYS if message.HasField(key)}


def _reject_unknown(mapping: Mapping, known: tuple[str, ...], where: str) -> None:
    if not isinstance(mapping, Mapping):
        raise SpecFormatError(f"expected a mapping, got {type(mapping).__name__}", where)
    for key in mapping:
        if key not in known:
            raise SpecFormatError(f"unknown key {key!r}", f"{where}.{key}" if where != "spec" else str(key))


def _assign(message, key, value, field: str) -> None:
    """Set one field (None leaves it unset); protobuf's own type checks become SpecFormatError."""
    if value is None:
        return
    try:
        if key is None:
            message.extend(value)
        else:
            setattr(message, key, value)
    except (TypeError, ValueError, protobuf_message.EncodeError) as bad:
        raise SpecFormatError(f"{key or 'value'} = {value!r} has the wrong type ({bad})", field) from None
