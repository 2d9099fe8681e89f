"""`Client`: the service's RPCs with numpy arrays in and out; chunking, retries and deadlines inside."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping

import grpc
import numpy as np

from gradserve.v1 import describe_pb2, service_pb2

from .errors import FailedPrecondition
from .fields import build
from .messages import message_dict
from .requests import (batch_arrays, optimizer_message, outgoing_tensors, spec_message, step_messages,
                       table_optimizer_message)
from .results import (TABLE_STEP_FIELDS, Checkpoint, ForwardStep, Gradients, SessionInfo, StepResult, TableRows,
                      gradients_by_parameter, single_answer, step_result, strip_prefix)
from .retrying import with_retries
from .rpc.methods import stub
from .rpc.options import open_channel
from .rpc.status import from_rpc_error
from .step_ids import StepIds
from .step_stream import stream_steps
from .tensor_names import GRADIENTS, INPUT_GRADIENTS, OUTPUT_GRADIENT, OUTPUTS, PARAMETERS, TANGENT

__all__ = ["Client", "Gradients", "StepResult", "ForwardStep", "SessionInfo", "Checkpoint", "TableRows"]

SERVICE = service_pb2.DESCRIPTOR.services_by_name["Gradserve"]


class Client:
    """A connection to a gradserve service.

    `token`: bearer token sent with every call. `tls`: None for plaintext, PEM root certificate
    bytes to trust (e.g. a self-signed server certificate), or True for the system roots.
    `timeout`: seconds per call, retries included. `retries`: extra attempts after UNAVAILABLE;
    a retried step reuses its step id, and the service applies each step id at most once.
    """

    def __init__(
        self,
        target: str,
        token: str | None = None,
        tls: bytes | bool | None = None,
        timeout: float = 60.0,
        *,
        retries: int = 3,
        retry_backoff_s: float = 0.25,
    ):
        self._channel = open_channel(target, tls)
        self._stub = stub(self._channel, SERVICE)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.timeout = timeout
        self.retries = retries
        self.retry_backoff_s = retry_backoff_s
        self._step_ids = StepIds()

    # ----- lifecycle ----------------------------------------------------------------------------

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # ----- stateless ----------------------------------------------------------------------------

    def compute_gradients(
        self,
        spec,
        parameters: Mapping[str, np.ndarray],
        x: np.ndarray,
        y: np.ndarray,
        *,
        micro_batch_size: int | None = None,
        tangent: Mapping[str, np.ndarray] | None = None,
        seed: int = 0,
        timeout: float | None = None,
    ) -> Gradients:
        """Mean loss and gradients of `spec` at `parameters` on (x, y); with `tangent`, the JVP."""
        arrays = {PARAMETERS + name: value for name, value in parameters.items()}
        arrays.update(batch_arrays(x, y))
        arrays.update({TANGENT + name: value for name, value in (tangent or {}).items()})
        outgoing = outgoing_tensors(arrays)
        header = build(service_pb2.ComputeGradientsHeader, model=spec_message(spec), tensors=outgoing.entries,
                       micro_batch_size=micro_batch_size or 0, seed=seed)
        return self._compute_gradients(header, outgoing, timeout)

    def vjp(self, spec, parameters: Mapping[str, np.ndarray], x: np.ndarray, output_gradient: np.ndarray, *,
            input_gradient: bool = False, micro_batch_size: int | None = None,
            timeout: float | None = None) -> Gradients:
        """The vector-Jacobian product of `output_gradient` (dL/d output, shape (rows, output width),
        the parameters' dtype): `.gradients` dL/dw and, with `input_gradient`, `.input_gradient`
        dL/dx. Summed, never averaged: a mean loss puts its 1/rows into `output_gradient`.
        Computed in inference mode (dropout off), like `forward`, so the two compose. For a model
        with named inputs `x` is a mapping and `.input_gradient` maps each float input's tensor
        name to its gradient (ids and bags have none)."""
        arrays = {PARAMETERS + name: value for name, value in parameters.items()}
        arrays.update(batch_arrays(x, None))
        arrays[OUTPUT_GRADIENT] = output_gradient
        outgoing = outgoing_tensors(arrays)
        header = build(service_pb2.ComputeGradientsHeader, model=spec_message(spec), tensors=outgoing.entries,
                       micro_batch_size=micro_batch_size or 0, input_gradient=input_gradient)
        return self._compute_gradients(header, outgoing, timeout)

    def vjp_session(self, session_id: str, x, output_gradient: np.ndarray, *, input_gradient: bool = False,
                    micro_batch_size: int | None = None, timeout: float | None = None) -> Gradients:
        """`vjp` at a session's current parameters (`.version` says which); nothing is applied.
        For a model in the middle of a chain: the dL/dx to hand further upstream."""
        arrays = batch_arrays(x, None)
        arrays[OUTPUT_GRADIENT] = output_gradient
        outgoing = outgoing_tensors(arrays)
        header = build(service_pb2.ComputeGradientsHeader, session_id=session_id, tensors=outgoing.entries,
                       micro_batch_size=micro_batch_size or 0, input_gradient=input_gradient)
        return self._compute_gradients(header, outgoing, timeout)

    def _compute_gradients(self, header, outgoing, timeout: float | None) -> Gradients:
        """One ComputeGradients call (retried on UNAVAILABLE) and its answer: a loss and gradients,
        a JVP, or a VJP with the input gradient."""
        wrap = service_pb2.ComputeGradientsRequest

        def attempt(deadline_s: float) -> Gradients:
            requests = itertools.chain([wrap(header=header)], outgoing.chunks())
            responses = self._stub.ComputeGradients(requests, timeout=deadline_s, metadata=self._metadata)
            result, arrays = single_answer(responses)
            has_jvp = result.HasField("jvp")
            return Gradients(
                loss=result.loss,
                gradients=None if has_jvp else gradients_by_parameter(strip_prefix(arrays, GRADIENTS)),
                jvp=result.jvp if has_jvp else None,
                count=result.count,
                timings_ms=dict(result.timings_ms),
                retries=result.retries,
                worker_failures=result.worker_failures,
                input_gradient=_input_gradient(strip_prefix(arrays, INPUT_GRADIENTS)),
                version=result.version,
            )

        return self._with_retries(attempt, timeout)

    def loss_gradients(self, spec, parameters: Mapping[str, np.ndarray], x: np.ndarray, loss: Callable, *,
                       input_gradient: bool = False, timeout: float | None = None) -> Gradients:
        """Gradients of a loss the service does not know: `loss(output)` returns (loss value,
        dL/d output) in numpy; the service runs the forward pass, then pulls that gradient back
        (`vjp`). Two calls; the second recomputes the forward (deterministic: inference mode), so
        no activations are held on the service between them."""
        output = self.forward(spec, parameters, x, timeout=timeout)
        value, output_gradient = loss(output)
        result = self.vjp(spec, parameters, x, np.asarray(output_gradient, dtype=output.dtype),
                          input_gradient=input_gradient, timeout=timeout)
        return dataclasses.replace(result, loss=float(value))

    def forward(self, spec, parameters: Mapping[str, np.ndarray], x: np.ndarray, *,
                nodes: Iterable[str] | None = None, timeout: float | None = None):
        """The output node's values for `x` at `parameters` (inference mode); with `nodes`, a
        {node: values} dict of those nodes instead. For a model with named inputs `x` maps tensor
        names to arrays, as in `step`."""
        arrays = {PARAMETERS + name: value for name, value in parameters.items()}
        arrays.update(batch_arrays(x, None))
        return self._forward(arrays, nodes, timeout, model=spec_message(spec))[1]

    def forward_session(self, session_id: str, x: np.ndarray, *, nodes: Iterable[str] | None = None,
                        timeout: float | None = None):
        """`forward` at a session's current parameters: (version, values)."""
        return self._forward(batch_arrays(x, None), nodes, timeout, session_id=session_id)

    def _forward(self, arrays, nodes, timeout, **header_fields):
        outgoing = outgoing_tensors(arrays)
        names = list(nodes or ())
        header = build(service_pb2.ForwardHeader, tensors=outgoing.entries, nodes=names, **header_fields)
        wrap = service_pb2.ForwardRequest

        def attempt(deadline_s: float):
            requests = itertools.chain([wrap(header=header)], outgoing.chunks())
            responses = self._stub.Forward(requests, timeout=deadline_s, metadata=self._metadata)
            result, arrays = single_answer(responses)
            values = strip_prefix(arrays, OUTPUTS)
            return result.version, (values if names else next(iter(values.values())))

        return self._with_retries(attempt, timeout)

    # ----- sessions -----------------------------------------------------------------------------

    def create_session(
        self,
        spec,
        parameters: Mapping[str, np.ndarray] | None = None,
        *,
        optimizer: Mapping | None = None,
        seed: int = 0,
        dtype: str = "float32",
        consistency: str = "sync",
        staleness: int = 0,
        stale_policy: str = "drop",
        num_workers: int = 0,
        ps_shards: int = 1,
        compression: str = "none",
        micro_batch_size: int | None = None,
        checkpoint_every_steps: int = 0,
        table_optimizer: Mapping | None = None,
        local_steps: int | None = None,
        inner_optimizer: Mapping | None = None,
        powersgd_rank: int | None = None,
        timeout: float | None = None,
    ) -> str:
        """Start a training session; returns its id. Without `parameters`, they start from `seed`
        (a model's tables then start on the service, never sent). `table_optimizer`: the tables'
        per-row rule, {"name": "sgd" | "adagrad" | "sparse_adam", "lr", ...}.

        `consistency="local"`: each step is a round of `local_steps` inner steps (default 10) of
        `inner_optimizer` (default adamw, lr 0.001) on every worker, its batch the round's inner
        batches one after the other; `optimizer` is the servers' outer one (DiLoCo's: nesterov,
        lr 0.7, momentum 0.9). `compression="powersgd"` (sync): rank `powersgd_rank` (default 4)."""
        config = build(
            service_pb2.SessionConfig,
            model=spec_message(spec),
            optimizer=optimizer_message(optimizer),
            consistency=consistency,
            staleness=staleness,
            stale_policy=stale_policy,
            num_workers=num_workers,
            ps_shards=ps_shards,
            compression=compression,
            micro_batch_size=micro_batch_size or 0,
            seed=seed,
            init=build(service_pb2.ParameterInit, seed=seed, dtype=dtype),
            checkpoint_every_steps=checkpoint_every_steps,
            **_unless_none(local_steps=local_steps, powersgd_rank=powersgd_rank,
                           inner_optimizer=None if inner_optimizer is None else optimizer_message(inner_optimizer)),
        )
        if table_optimizer is not None:
            config.table_optimizer.CopyFrom(table_optimizer_message(table_optimizer))
        outgoing = outgoing_tensors({PARAMETERS + name: value for name, value in (parameters or {}).items()})
        wrap = service_pb2.CreateSessionRequest
        requests = itertools.chain(
            [wrap(header=build(service_pb2.CreateSessionHeader, config=config, tensors=outgoing.entries))],
            outgoing.chunks(),
        )
        # Not retried: after UNAVAILABLE the first attempt may have created a session already.
        try:
            reply = self._stub.CreateSession(requests, timeout=timeout or self.timeout, metadata=self._metadata)
        except grpc.RpcError as failed:
            raise from_rpc_error(failed) from None
        self._step_ids.opened(reply.session_id)
        return reply.session_id

    def step(self, session_id: str, x: np.ndarray, y: np.ndarray, *, step_id: int | None = None,
             timeout: float | None = None) -> StepResult:
        """One training step; `step_id` defaults to this client's next id for the session."""
        step_id = self._step_ids.claim(session_id, step_id)
        messages = step_messages(session_id, step_id, x, y)

        def attempt(deadline_s: float) -> StepResult:
            reply = self._stub.Step(iter(messages), timeout=deadline_s, metadata=self._metadata)
            return step_result(reply)

        return self._with_retries(attempt, timeout)

    def step_forward(self, session_id: str, x, *, step_id: int | None = None,
                     timeout: float | None = None) -> ForwardStep:
        """Phase one of a two-phase step: the session's output for `x` (training mode); the
        service holds the activations under the step id until `step_backward`."""
        step_id = self._step_ids.claim(session_id, step_id)
        outgoing = outgoing_tensors(batch_arrays(x, None))
        header = build(service_pb2.StepForwardHeader, session_id=session_id, step_id=step_id,
                       tensors=outgoing.entries)

        def attempt(deadline_s: float) -> ForwardStep:
            requests = itertools.chain([service_pb2.StepForwardRequest(header=header)], outgoing.chunks())
            result, arrays = single_answer(self._stub.StepForward(requests, timeout=deadline_s, metadata=self._metadata))
            output = next(iter(strip_prefix(arrays, OUTPUTS).values()), None)
            return ForwardStep(result.step_id, result.version, output, result.duplicate)

        return self._with_retries(attempt, timeout)

    def step_backward(self, session_id: str, step_id: int, output_gradient, loss: float, *,
                      input_gradient: bool = False, timeout: float | None = None) -> StepResult:
        """Phase two: apply the vector-Jacobian product of `output_gradient` (dL/d output of the
        caller's loss, never divided by the rows here: a mean loss has its 1/rows in it) through
        the held forward of `step_id`, once; `loss` is reported back. A retried or repeated id
        answers the recorded result (`duplicate`). With `input_gradient`, `.input_gradient` is
        dL/dx through the same forward (a model in the middle of a chain hands it upstream)."""
        arrays = {} if output_gradient is None else {OUTPUT_GRADIENT: output_gradient}
        outgoing = outgoing_tensors(arrays)
        header = build(service_pb2.StepBackwardHeader, session_id=session_id, step_id=step_id, loss=loss,
                       input_gradient=input_gradient, tensors=outgoing.entries)

        def attempt(deadline_s: float) -> StepResult:
            requests = itertools.chain([service_pb2.StepBackwardRequest(header=header)], outgoing.chunks())
            answer, arrays = single_answer(self._stub.StepBackward(requests, timeout=deadline_s,
                                                                   metadata=self._metadata))
            return dataclasses.replace(step_result(answer.step),
                                       input_gradient=_input_gradient(strip_prefix(arrays, INPUT_GRADIENTS)))

        return self._with_retries(attempt, timeout)

    def train_step(self, session_id: str, x, loss: Callable, *, step_id: int | None = None,
                   timeout: float | None = None) -> StepResult:
        """One training step with a loss the service does not know: `loss(output)` returns (loss
        value, dL/d output) in numpy. `step_forward`, the loss here, `step_backward`, under one
        step id (retries reuse it, so the update applies once); the service keeps the forward's
        activations in between, so nothing is recomputed. If they were evicted, or (sync) another
        step moved the parameters meanwhile, the forward and the loss run once more."""
        step_id = self._step_ids.claim(session_id, step_id)
        for attempt_number in range(2):
            forward = self.step_forward(session_id, x, step_id=step_id, timeout=timeout)
            if forward.duplicate:  # applied before (a re-run of this client): the recorded result
                return self.step_backward(session_id, step_id, None, 0.0, timeout=timeout)
            value, output_gradient = loss(forward.output)
            try:
                return self.step_backward(session_id, step_id, np.asarray(output_gradient, forward.output.dtype),
                                          float(value), timeout=timeout)
            except FailedPrecondition as refused:
                if refused.field != "step_id" or attempt_number:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises

    def describe_model(self, spec, *, dtype: str = "float32", timeout: float | None = None) -> dict:
        """The model's inputs, parameters (name, shape, dtype, layout), counts, FLOPs and
        activation bytes per row, as describe.proto's DescribeModelResponse fields."""
        request = build(describe_pb2.DescribeModelRequest, model=spec_message(spec), dtype=dtype)
        return message_dict(self._unary(self._stub.DescribeModel, request, timeout))

    def server_info(self, *, timeout: float | None = None) -> dict:
        """What the service accepts: version, ops with attributes and ranges, losses, optimizers,
        consistency modes, compression methods, dtypes, limits (GetServerInfoResponse's fields)."""
        return message_dict(self._unary(self._stub.GetServerInfo, describe_pb2.GetServerInfoRequest(), timeout))

    def stream_steps(
        self, session_id: str, batches: Iterable, *, timeout: float | None = None
    ) -> Iterator[StepResult]:
        """Steps over one stream: `batches` yields (x, y) or (step_id, x, y); one result per step,
        in order. After UNAVAILABLE the unanswered steps are sent again with the same ids."""
        numbered = (self._step_ids.numbered(session_id, batch) for batch in batches)
        yield from stream_steps(self._stub.StreamSteps, session_id, numbered, timeout=timeout,
                                metadata=self._metadata, retries=self.retries, backoff_s=self.retry_backoff_s)

    def pull_rows(self, session_id: str, table: str, ids, *, timeout: float | None = None) -> tuple[int, np.ndarray]:
        """(version, rows): rows `ids` (int64, any order, repeats allowed) of a session's table
        `table` (e.g. "emb.weight"), as the service holds them now; for lookups by a serving system."""
        outgoing = outgoing_tensors({"ids": np.asarray(ids, dtype=np.int64) if not isinstance(ids, np.ndarray) else ids})
        header = build(service_pb2.PullRowsHeader, session_id=session_id, table=table, tensors=outgoing.entries)
        wrap = service_pb2.PullRowsRequest

        def attempt(deadline_s: float):
            requests = itertools.chain([wrap(header=header)], outgoing.chunks())
            responses = self._stub.PullRows(requests, timeout=deadline_s, metadata=self._metadata)
            result, arrays = single_answer(responses)
            return result.version, arrays["rows"]

        return self._with_retries(attempt, timeout)

    def pull_parameters(self, session_id: str, *, timeout: float | None = None) -> tuple[int, dict[str, np.ndarray]]:
        """(version, parameters) of the session, as the service holds them now."""
        request = build(service_pb2.PullParametersRequest, session_id=session_id)

        def attempt(deadline_s: float):
            responses = self._stub.PullParameters(request, timeout=deadline_s, metadata=self._metadata)
            header, arrays = single_answer(responses)
            return header.version, {name[len(PARAMETERS):]: value for name, value in arrays.items()}

        return self._with_retries(attempt, timeout)

    def save_checkpoint(self, session_id: str, *, timeout: float | None = None) -> Checkpoint:
        request = build(service_pb2.SaveCheckpointRequest, session_id=session_id)
        reply = self._unary(self._stub.SaveCheckpoint, request, timeout)
        return Checkpoint(reply.checkpoint, reply.version)

    def restore_checkpoint(self, session_id: str, checkpoint: str = "", *, timeout: float | None = None) -> Checkpoint:
        """Restore one of the session's checkpoints (default: its latest); returns what was restored."""
        request = build(service_pb2.RestoreCheckpointRequest, session_id=session_id, checkpoint=checkpoint)
        reply = self._unary(self._stub.RestoreCheckpoint, request, timeout)
        return Checkpoint(reply.checkpoint, reply.version)

    def close_session(self, session_id: str, *, timeout: float | None = None) -> int:
        """Close the session; returns its final parameter version."""
        reply = self._unary(self._stub.CloseSession, build(service_pb2.CloseSessionRequest, session_id=session_id),
                            timeout)
        self._step_ids.closed(session_id)
        return reply.version

    def list_sessions(self, *, timeout: float | None = None) -> list[SessionInfo]:
        reply = self._unary(self._stub.ListSessions, service_pb2.ListSessionsRequest(), timeout)
        return [
            SessionInfo(s.session_id, s.version, s.steps, s.consistency, s.num_workers, s.created_unix_s)
            for s in reply.sessions
        ]

    # ----- plumbing -----------------------------------------------------------------------------

    def _unary(self, method, request, timeout):
        return self._with_retries(
            lambda deadline_s: method(request, timeout=deadline_s, metadata=self._metadata), timeout
        )

    def _with_retries(self, attempt, timeout: float | None):
        return with_retries(attempt, timeout or self.timeout, self.retries, self.retry_backoff_s)


def _input_gradient(gradients: dict):
    """dL/dx of the single input `x`, a {tensor: dL/d tensor} mapping for named inputs, or None."""
    if not gradients:
        return None
    return gradients["x"] if set(gradients) == {"x"} else gradients


def _unless_none(**values) -> dict:
    """The optional fields a caller set (unset ones take the service's defaults)."""
    return {name: value for name, value in values.items() if value is not None}
