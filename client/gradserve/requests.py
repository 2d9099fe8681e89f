"""Request messages and tensors built from the SDK's arguments; a value that cannot travel raises
the tree's InvalidArgument naming its field before anything is sent."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping

import numpy as np

from gradserve.v1 import model_pb2, service_pb2

from .codec import TensorFormatError
from .errors import InvalidArgument
from .fields import build
from .spec import SpecFormatError, optimizer_to_proto, spec_to_proto, table_optimizer_to_proto
from .transfer import OutgoingTensors

__all__ = ["spec_message", "optimizer_message", "table_optimizer_message", "batch_arrays",
           "outgoing_tensors", "step_messages"]


@contextlib.contextmanager
def _field_named():
    """The converters' and the codec's ValueErrors name a field: raised as InvalidArgument."""
    try:
        yield
    except (SpecFormatError, TensorFormatError) as bad:
        raise InvalidArgument.described(str(bad), ((bad.field, bad.message),)) from None


def spec_message(spec) -> model_pb2.ModelSpec:
    with _field_named():
        return spec_to_proto(spec)


def optimizer_message(config) -> model_pb2.OptimizerConfig:
    with _field_named():
        return optimizer_to_proto(config)


def table_optimizer_message(config) -> model_pb2.TableOptimizerConfig:
    with _field_named():
        return table_optimizer_to_proto(config)


def batch_arrays(x, y) -> dict:
    """`batch.x` (and `batch.y`), or for a model with named inputs a mapping of tensor name to
    array (`{"dense": ..., "cats": ..., "tags.values": ...}`) as `batch.<name>` each."""
    arrays = {f"batch.{name}": value for name, value in x.items()} if isinstance(x, Mapping) else {"batch.x": x}
    if y is not None:
        arrays["batch.y"] = y
    return arrays


def outgoing_tensors(arrays: Mapping[str, np.ndarray]) -> OutgoingTensors:
    with _field_named():
        return OutgoingTensors(arrays)


def step_messages(session_id: str, step_id: int, x, y) -> list:
    outgoing = outgoing_tensors(batch_arrays(x, y))
    header = build(service_pb2.StepHeader, session_id=session_id, step_id=step_id, tensors=outgoing.entries)
    wrap = service_pb2.StepRequest
    return [wrap(header=header), *outgoing.chunks()]
