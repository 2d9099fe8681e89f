"""Decoding requests into numpy arrays and plain dicts, and encoding replies: the servicers' only
contact with message layouts beyond single fields. Codec errors become domain errors here."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import numpy as np

from gradserve.codec import TensorFormatError, TensorTooLarge
from gradserve.spec import optimizer_from_proto, spec_from_proto, table_optimizer_from_proto
from gradserve.tensor_names import GRADIENTS, PARAMETERS, TANGENT
from gradserve.transfer import INLINE_TENSOR_BYTES, MAX_MESSAGE_BYTES, OutgoingTensors, StreamedTensor, read_messages
from gradserve.v1 import service_pb2

from gradserve_services.cluster import TrainerConfig
from gradserve_services.cluster.table_stream import TableStream
from gradserve_services.engine import SparseRows
from gradserve_services.errors import GradserveError, InvalidArgument, ResourceExhausted

__all__ = [
    "PARAMETERS",
    "GRADIENTS",
    "TANGENT",
    "read_one",
    "read_each",
    "group",
    "send",
    "trainer_config",
    "RefusedRequest",
    "tolerant",
    "decoded",
]

BATCH = ("batch.x", "batch.y")
BATCH_PREFIX = "batch."


class RefusedRequest:
    """Stands in for a request message the gateway does not decode: bytes that do not parse, or more
    of them than one message may carry. gRPC answers INTERNAL when a deserializer raises (and cuts
    the call off under the servicer when a message is over its own limit), so the deserializer
    returns this marker and the servicer raises its error, answered and counted like any other
    (see `decoded`)."""

    def __init__(self, size: int, error: GradserveError):
        self.size, self.error = size, error

    def ByteSize(self) -> int:  # noqa: N802 - read by the metrics interceptor like a message's
        return self.size


def tolerant(deserialize: Callable[[bytes], object], message_name: str,
             max_bytes: int = MAX_MESSAGE_BYTES) -> Callable[[bytes], object]:
    """`deserialize`, but a message over `max_bytes` or undecodable bytes give a RefusedRequest
    instead of an exception."""
    def deserialize_or_mark(raw: bytes):
        if len(raw) > max_bytes:
            return RefusedRequest(len(raw), ResourceExhausted(
                f"a {message_name} message of {len(raw)} bytes is over the {max_bytes}-byte message "
                f"limit; tensors over {INLINE_TENSOR_BYTES} bytes travel as chunks", "request"))
        try:
            return deserialize(raw)
        except Exception as bad:  # noqa: BLE001 - protobuf's DecodeError and whatever its parser raises
            return RefusedRequest(len(raw), InvalidArgument(
                f"not a valid {message_name} message: {str(bad) or type(bad).__name__}", "request"))
    return deserialize_or_mark


def decoded(request):
    """The request (or request stream), raising the error of a RefusedRequest where it meets one."""
    if isinstance(request, RefusedRequest):
        raise request.error
    if hasattr(request, "ByteSize"):  # a single message
        return request
    return _decoded_stream(request)


def _decoded_stream(requests: Iterator) -> Iterator:
    for message in requests:
        if isinstance(message, RefusedRequest):
            raise message.error
        yield message


def read_one(requests: Iterator, max_bytes: int, *, allocate=None) -> tuple[object, dict[str, np.ndarray]]:
    """The header and assembled arrays of a single-request stream (`allocate`: where they are
    assembled, `transfer.TensorAssembler`)."""
    (parts,) = list(read_each(requests, max_bytes, single=True, allocate=allocate))
    return parts


def read_each(requests: Iterator, max_bytes: int, *, single: bool = False, allocate=None):
    """(header, arrays) per header of a request stream, as each completes."""
    parts = read_messages(requests, max_bytes, single=single, allocate=allocate)
    while True:
        try:
            yield next(parts)
        except StopIteration:
            return
        except TensorTooLarge as bad:
            raise ResourceExhausted(bad.message, bad.field) from None
        except TensorFormatError as bad:
            raise InvalidArgument(bad.message, bad.field) from None


def group(arrays: Mapping[str, np.ndarray], prefixes: tuple[str, ...], exact: tuple[str, ...] = ()) -> dict:
    """Split `arrays` by name prefix ({prefix: {rest: array}}); names in `exact` map to themselves.
    A name matching nothing is an error naming it, so a typo is never silently ignored."""
    grouped: dict[str, dict[str, np.ndarray]] = {prefix: {} for prefix in prefixes}
    for name, array in arrays.items():
        if name in exact:
            grouped[name] = array
            continue
        prefix = next((p for p in prefixes if name.startswith(p)), None)
        if prefix is None:
            expected = ", ".join([f"{p}<param>" for p in prefixes] + list(exact))
            raise InvalidArgument(f"unexpected tensor name; expected {expected}", name)
        grouped[prefix][name[len(prefix):]] = array
    return grouped


def batch_tensors(batch: Mapping[str, np.ndarray], spec) -> tuple[object, object]:
    """`(x, y)` of a request's `batch.*` tensors (prefix stripped; y None if absent). A spec with
    one input takes `batch.x`; one with named inputs takes every tensor but `batch.y` as the
    mapping the engine checks (naming a missing or unknown tensor `batch.<tensor>`)."""
    if "inputs" in spec:
        return {name: value for name, value in batch.items() if name != "y"}, batch.get("y")
    for name in batch:
        if name not in ("x", "y"):
            raise InvalidArgument("unexpected tensor name; expected batch.x, batch.y", BATCH_PREFIX + name)
    if "x" not in batch:
        raise InvalidArgument("missing tensor", "batch.x")
    return batch["x"], batch.get("y")


def parameter_arrays(params: Mapping) -> dict[str, object]:
    """`parameters.<param>` tensors; a table the servers read out a range of rows at a time
    (TableStream) is sent as its parts are read, never assembled here."""
    return {PARAMETERS + name: StreamedTensor(value.dtype, value.shape, value.parts)
            if isinstance(value, TableStream) else value for name, value in params.items()}


def gradient_arrays(grads: Mapping) -> dict[str, np.ndarray]:
    """`gradients.<param>` tensors; a table's gradient (SparseRows) as `gradients.<table>.ids` and
    `gradients.<table>.rows`, the rows the batch read, never the whole table."""
    arrays = {}
    for name, grad in grads.items():
        if isinstance(grad, SparseRows):
            arrays[f"{GRADIENTS}{name}.ids"], arrays[f"{GRADIENTS}{name}.rows"] = grad.ids, grad.rows
        else:
            arrays[GRADIENTS + name] = grad
    return arrays


def send(header, arrays: Mapping[str, np.ndarray], wrap: Callable[..., object]) -> Iterator:
    """The reply stream: `wrap(header=header)` carrying the descriptors, then the chunks (as
    `Chunk` views, which the method's PartCodec frames; see gradserve.rpc.methods)."""
    outgoing = OutgoingTensors(arrays)
    header.tensors.extend(outgoing.entries)
    yield wrap(header=header)
    yield from outgoing.chunks()


def trainer_config(config: service_pb2.SessionConfig, *, default_workers: int) -> TrainerConfig:
    """The cluster's TrainerConfig for a SessionConfig message; empty strings and zeros are the
    documented defaults. The cluster validates every value (errors name `config.X`)."""
    return TrainerConfig(
        spec=spec_from_proto(config.model),
        optimizer=optimizer_from_proto(config.optimizer),
        consistency=config.consistency or "sync",
        staleness=config.staleness,
        stale_policy=config.stale_policy or "drop",
        num_workers=config.num_workers or default_workers,
        ps_shards=config.ps_shards or 1,
        compression=config.compression or "none",
        micro_batch_size=config.micro_batch_size or None,
        seed=config.seed,
        table_optimizer=table_optimizer_from_proto(config.table_optimizer)
        if config.HasField("table_optimizer") else None,
        **_round_settings(config),
    )


def _round_settings(config: service_pb2.SessionConfig) -> dict:
    """local / powersgd settings a SessionConfig sets; unset ones keep TrainerConfig's defaults
    (an explicit 0 is passed on, for the cluster to refuse naming the field)."""
    settings = {}
    for name in ("local_steps", "powersgd_rank"):
        if config.HasField(name):
            settings[name] = getattr(config, name)
    if config.HasField("inner_optimizer"):
        settings["inner_optimizer"] = optimizer_from_proto(config.inner_optimizer)
    return settings
