"""DescribeModel and GetServerInfo answers: the engine's, the optimizer's and the cluster's own
lists of names, ranges and limits, encoded as describe.proto's messages. Nothing here restates a
name: each list is imported from the package that validates it."""

from __future__ import annotations

import dataclasses
import json

from gradserve.transfer import CHUNK_BYTES, INLINE_TENSOR_BYTES, MAX_MESSAGE_BYTES
from gradserve.v1 import describe_pb2

from gradserve_services import __version__
from gradserve_services.cluster.config import COMPRESSIONS, CONSISTENCY_MODES, STALE_POLICIES
from gradserve_services.cluster.two_phase import MAX_HELD_BYTES, MAX_HELD_FORWARDS
from gradserve_services.engine import FLOAT_DTYPES, INPUT_KINDS, MAX_NODES, MAX_PARAMETERS, MAX_WIDTH
from gradserve_services.engine.describe import describe_model, loss_catalogue, op_catalogue
from gradserve_services.errors import InvalidArgument
from gradserve_services.optim import OPTIMIZER_NAMES, SCHEDULE_NAMES, OptimizerConfig, ScheduleConfig
from gradserve_services.optim.config import OPTIMIZER_RANGES, SCHEDULE_RANGES
from gradserve_services.optim.rows import TABLE_OPTIMIZER_NAMES

__all__ = ["describe_reply", "server_info_reply"]

DESCRIBE_DTYPES = ("", "float32", "float64")  # "" is float32, as ParameterInit.dtype


def describe_reply(spec: dict, dtype: str) -> describe_pb2.DescribeModelResponse:
    if dtype not in DESCRIBE_DTYPES:
        raise InvalidArgument(f"must be float32 or float64, got {dtype!r}", "dtype")
    described = describe_model(spec, dtype or "float32")
    reply = describe_pb2.DescribeModelResponse(
        inputs=[describe_pb2.InputDescription(**item) for item in described["inputs"]],
        parameters=[describe_pb2.ParameterDescription(**item) for item in described["parameters"]],
        nodes=[describe_pb2.NodeDescription(**item) for item in described["nodes"]],
        **{key: value for key, value in described.items() if key not in ("inputs", "parameters", "nodes")},
    )
    return reply


def server_info_reply(limits, max_request_bytes: int) -> describe_pb2.GetServerInfoResponse:
    """`limits`: the gateway's SessionLimits; `max_request_bytes`: its cap on one request's tensors."""
    numbers = dataclasses.asdict(limits)  # sessions_per_owner, ..., step_window
    numbers.update({
        "max_message_bytes": MAX_MESSAGE_BYTES, "chunk_bytes": CHUNK_BYTES,
        "inline_tensor_bytes": INLINE_TENSOR_BYTES, "max_request_bytes": max_request_bytes,
        "max_nodes": MAX_NODES, "max_width_features": MAX_WIDTH, "max_parameter_elements": MAX_PARAMETERS,
        "held_forwards_per_session": MAX_HELD_FORWARDS, "held_forward_bytes_per_session": MAX_HELD_BYTES,
    })
    return describe_pb2.GetServerInfoResponse(
        version=__version__,
        ops=[_op(op) for op in op_catalogue()],
        losses=[describe_pb2.LossInfo(**loss) for loss in loss_catalogue()],
        optimizers=OPTIMIZER_NAMES,
        optimizer_settings=_settings(OptimizerConfig(), OPTIMIZER_RANGES),
        schedules=SCHEDULE_NAMES,
        schedule_settings=_settings(ScheduleConfig(), SCHEDULE_RANGES),
        consistency_modes=CONSISTENCY_MODES,
        stale_policies=STALE_POLICIES,
        compression_methods=COMPRESSIONS,
        dtypes=[str(dtype) for dtype in FLOAT_DTYPES],
        input_kinds=INPUT_KINDS,
        limits=numbers,
        table_optimizers=TABLE_OPTIMIZER_NAMES,
    )


def _op(op: dict) -> describe_pb2.OpInfo:
    return describe_pb2.OpInfo(
        name=op["name"], min_inputs=op["min_inputs"], max_inputs=op["max_inputs"], reads=op["reads"],
        attributes=[_attribute(attribute) for attribute in op["attributes"]], parameters=op["parameters"],
        doc=op["doc"])


def _attribute(attribute: dict) -> describe_pb2.AttributeInfo:
    info = describe_pb2.AttributeInfo(
        name=attribute["name"], type=attribute["type"], required=attribute["required"],
        default_json="" if attribute["required"] else json.dumps(attribute["default"]),
        choices=attribute.get("choices", ()))
    if "low" in attribute:
        info.low, info.low_inclusive = attribute["low"], attribute["low_inclusive"]
    if "high" in attribute:
        info.high, info.high_inclusive = attribute["high"], attribute["high_inclusive"]
    return info


def _settings(defaults, ranges: dict) -> list[describe_pb2.AttributeInfo]:
    """Every field of an OptimizerConfig / ScheduleConfig but the nested schedule, its default
    from the dataclass and its range from the validation's table."""
    settings = []
    for field in dataclasses.fields(defaults):
        value = getattr(defaults, field.name)
        if dataclasses.is_dataclass(value):
            continue
        allowed = ranges.get(field.name)
        kind = "str" if isinstance(value, str) else "int" if isinstance(value, int) else "float"
        described = {"name": field.name, "type": kind, "required": False, "default": value}
        if allowed is not None:
            if allowed.low is not None:
                described.update(low=allowed.low, low_inclusive=allowed.low_inclusive)
            if allowed.high is not None:
                described.update(high=allowed.high, high_inclusive=allowed.high_inclusive)
        if field.name == "name":
            described["choices"] = OPTIMIZER_NAMES if isinstance(defaults, OptimizerConfig) else SCHEDULE_NAMES
        settings.append(_attribute(described))
    return settings

