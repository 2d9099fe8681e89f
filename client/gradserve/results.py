"""What the service answers, as the SDK hands it back: result records and their decoding from the
response messages."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from gradserve.v1 import service_pb2

from .codec import TensorFormatError
from .errors import GradserveError
from .transfer import DEFAULT_MAX_REQUEST_BYTES, read_messages

__all__ = ["TABLE_STEP_FIELDS", "TableRows", "Gradients", "StepResult", "ForwardStep", "SessionInfo",
           "Checkpoint", "gradients_by_parameter", "step_result", "strip_prefix", "single_answer"]

# StepResponse's table traffic fields, StepResult's under the same names.
TABLE_STEP_FIELDS = ("rows_pulled", "rows_pushed", "rows_updated", "row_lookups", "bytes_pulled",
                     "bytes_pushed", "dense_table_bytes", "table_rows", "table_bytes")


@dataclass(frozen=True)
class TableRows:
    """Some rows of a table: a table's gradient as the service answers it (the sorted unique ids
    the batch read and one row each, summed over that id's lookups), never the whole table."""

    ids: np.ndarray  # int64 (n,)
    rows: np.ndarray  # (n, dim)

    def dense(self, num_rows: int) -> np.ndarray:
        """The whole (num_rows, dim) table: these rows in place, zeros elsewhere."""
        table = np.zeros((num_rows, self.rows.shape[1]), dtype=self.rows.dtype)
        table[self.ids] = self.rows
        return table


@dataclass(frozen=True)
class Gradients:
    loss: float  # mean loss over the batch
    gradients: dict[str, np.ndarray] | None  # mean gradient per parameter (None in forward mode)
    jvp: float | None  # directional derivative along the tangent (forward mode only)
    count: int  # rows averaged over
    timings_ms: dict[str, float] = field(default_factory=dict)  # milliseconds per phase
    retries: int = 0  # shards run again on another worker because theirs was lost
    worker_failures: int = 0  # worker actors lost (and replaced) during the call
    # vjp(..., input_gradient=True) only: dL/dx (named inputs: {float input tensor: its gradient})
    input_gradient: np.ndarray | dict | None = None
    version: int = 0  # session forms (vjp_session): the parameter version the answer was computed at


@dataclass(frozen=True)
class StepResult:
    step_id: int
    loss: float
    version: int
    duplicate: bool
    applied: bool
    samples: int
    grad_norm: float
    lr: float
    timings_ms: dict[str, float] = field(default_factory=dict)  # milliseconds per phase
    retries: int = 0  # shards run again on another worker because theirs was lost
    worker_failures: int = 0  # worker actors lost (and replaced) during the step
    noise_scale: float = math.nan  # B_simple smoothed over the session's steps; NaN until known
    shard_cosines: tuple = ()  # cosine of each shard's gradient with the aggregate
    update_ratios: dict[str, float] = field(default_factory=dict)  # |update| / |weight| per parameter
    compute_spread: float = math.nan  # slowest worker's compute time / the median one
    slowest_worker: int = -1  # pool position of the slowest worker
    # A model with tables: their row traffic (service.proto, StepResponse); wire bytes of the
    # tables per step are bytes_pulled + bytes_pushed.
    rows_pulled: int = 0
    rows_pushed: int = 0
    rows_updated: int = 0
    row_lookups: int = 0
    bytes_pulled: int = 0
    bytes_pushed: int = 0
    dense_table_bytes: int = 0
    table_rows: int = 0
    table_bytes: int = 0
    # step_backward(..., input_gradient=True) only: dL/dx through the held forward (named inputs:
    # {float input tensor: its gradient}); None for a repeat's recorded answer
    input_gradient: np.ndarray | dict | None = None


@dataclass(frozen=True)
class ForwardStep:
    """Phase one of a two-phase step (`Client.step_forward`)."""

    step_id: int
    version: int  # the parameter version the output was computed at
    output: np.ndarray | None  # (rows, output width); None when duplicate
    duplicate: bool  # the step id was applied already: its backward answers the recorded result


@dataclass(frozen=True)
class SessionInfo:
    session_id: str
    version: int
    steps: int
    consistency: str
    num_workers: int
    created_unix_s: float


@dataclass(frozen=True)
class Checkpoint:
    name: str
    version: int


def gradients_by_parameter(arrays: dict) -> dict:
    """Gradients by parameter; a table's `<table>.ids` + `<table>.rows` pair as one `TableRows`."""
    out = {}
    for name, value in arrays.items():
        if name.endswith(".ids") and name[:-4] + ".rows" in arrays:
            out[name[:-4]] = TableRows(value, arrays[name[:-4] + ".rows"])
        elif not (name.endswith(".rows") and name[:-5] + ".ids" in arrays):
            out[name] = value
    return out


def step_result(reply: service_pb2.StepResponse) -> StepResult:
    return StepResult(
        step_id=reply.step_id,
        loss=reply.loss,
        version=reply.version,
        duplicate=reply.duplicate,
        applied=reply.applied,
        samples=reply.samples,
        grad_norm=reply.grad_norm,
        lr=reply.lr,
        timings_ms=dict(reply.timings_ms),
        retries=reply.retries,
        worker_failures=reply.worker_failures,
        noise_scale=reply.noise_scale,
        shard_cosines=tuple(reply.shard_cosines),
        update_ratios=dict(reply.update_ratios),
        compute_spread=reply.compute_spread,
        slowest_worker=reply.slowest_worker,
        **{name: getattr(reply, name) for name in TABLE_STEP_FIELDS},
    )


def strip_prefix(arrays: Mapping[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    return {name[len(prefix):]: value for name, value in arrays.items() if name.startswith(prefix)}


def single_answer(responses) -> tuple[object, dict[str, np.ndarray]]:
    """The one (header, arrays) of a response stream; a malformed stream is the service's fault."""
    try:
        (parts,) = list(read_messages(responses, DEFAULT_MAX_REQUEST_BYTES * 4, single=True))
        return parts
    except TensorFormatError as bad:
        responses.cancel()
        raise GradserveError(f"malformed response from the service: {bad}") from None
