"""The Gradserve servicer: each method decodes, delegates (executor or session registry), encodes.

Failures leave through one place, the ErrorStatusInterceptor (error_status.py), which also hands
each method its request decoded; the caller's identity arrives as `context.identity` (auth.py).
"""

from __future__ import annotations

import logging
import time

import grpc

from gradserve.results import TABLE_STEP_FIELDS
from gradserve.transfer import Placement
from gradserve.spec import spec_from_proto
from gradserve.v1 import service_pb2, service_pb2_grpc

from gradserve_services.cluster.handover import hand_over
from gradserve_services.errors import DeadlineExceeded, InvalidArgument

from . import wire
from .describe import describe_reply, server_info_reply
from .functions import INPUT_GRADIENTS, OUTPUT_GRADIENT, OUTPUTS, ModelFunctions
from .read_ahead import ReadAhead
from .sessions import SessionRegistry, activation_features, check_activations

__all__ = ["GradserveServicer"]

log = logging.getLogger(__name__)


def _seconds_left(context: grpc.ServicerContext):
    return lambda: context.time_remaining()


def _check_deadline(context: grpc.ServicerContext) -> None:
    """Refuse to start work for a caller that is gone or out of time."""
    remaining = context.time_remaining()
    if not context.is_active() or (remaining is not None and remaining <= 0):
        raise DeadlineExceeded("the caller's deadline passed before the work could start", "deadline")


class GradserveServicer(service_pb2_grpc.GradserveServicer):
    def __init__(self, executor, registry: SessionRegistry, max_request_bytes: int):
        self._executor = executor
        self._sessions = registry
        self._max_bytes = max_request_bytes
        self._functions = ModelFunctions()

    def ComputeGradients(self, request_iterator, context):
        header, arrays = wire.read_one(request_iterator, self._max_bytes)
        spec, tensors, version = self._gradients_request(header, arrays, context)
        if OUTPUT_GRADIENT in tensors:
            yield from self._vjp(spec, header, tensors, version)
            return
        result = self._executor.compute_gradients(
            spec,
            tensors[wire.PARAMETERS],
            tensors["batch.x"],
            tensors["batch.y"],
            micro_batch_size=header.micro_batch_size or None,
            tangent=tensors[wire.TANGENT] or None,
            seed=header.seed,
        )
        yield from wire.send(*_gradients_answer(result, version), service_pb2.ComputeGradientsResponse)

    def _gradients_request(self, header, arrays, context) -> tuple[dict, dict, int]:
        """(spec, tensors, version) of a ComputeGradients request, checked: labels or an output
        gradient (vector-Jacobian mode, where `batch.y` is left out), activations within the
        limit, the caller still waiting."""
        tensors = wire.group(arrays, (wire.PARAMETERS, wire.TANGENT, wire.BATCH_PREFIX), exact=(OUTPUT_GRADIENT,))
        spec, tensors[wire.PARAMETERS], version = self._model_and_parameters(header, tensors, context)
        x, y = wire.batch_tensors(tensors[wire.BATCH_PREFIX], spec)  # named inputs: a mapping
        if y is None and OUTPUT_GRADIENT not in tensors:
            raise InvalidArgument("missing tensor: send batch.y (a built-in loss) or output_gradient "
                                  "(a vector-Jacobian product)", "batch.y")
        tensors["batch.x"], tensors["batch.y"] = x, y
        check_activations(activation_features(spec), tensors["batch.x"], header.micro_batch_size,
                          self._sessions.limits.activation_elements_per_call)
        _check_deadline(context)
        if OUTPUT_GRADIENT in tensors:
            if y is None:
                del tensors["batch.y"]
        elif header.input_gradient:
            raise InvalidArgument("an input gradient is answered in vector-Jacobian mode only "
                                  "(send output_gradient instead of batch.y)", "input_gradient")
        return spec, tensors, version

    def _model_and_parameters(self, header, tensors, context) -> tuple[dict, dict, int]:
        """(spec, parameters, version): a session's model at its current parameters when the
        header names one (the caller's own; parameters sent then are an error), else the request's
        model and parameters at version 0."""
        if not header.session_id:
            return spec_from_proto(header.model), tensors[wire.PARAMETERS], 0
        session = self._sessions.get(context.identity, header.session_id)
        if tensors[wire.PARAMETERS]:
            name = next(iter(tensors[wire.PARAMETERS]))
            raise InvalidArgument("a session's computation runs at its own parameters; send none",
                                  wire.PARAMETERS + name)
        version, params = self._sessions.parameters(session)
        return session.config.spec, params, version

    def _vjp(self, spec, header, tensors, version: int):
        if tensors[wire.TANGENT]:
            raise InvalidArgument("a tangent (forward mode) and an output gradient exclude each other", "tangent")
        started = time.perf_counter()
        result = self._functions.vjp(spec, tensors[wire.PARAMETERS], tensors["batch.x"], tensors.get("batch.y"),
                                     tensors[OUTPUT_GRADIENT], input_gradient=header.input_gradient,
                                     micro_batch_size=header.micro_batch_size or None)
        reply = service_pb2.ComputeGradientsResult(loss=0.0, count=tensors[OUTPUT_GRADIENT].shape[0],
                                                   version=version)
        reply.timings_ms["total"] = (time.perf_counter() - started) * 1e3
        arrays = wire.gradient_arrays(result.gradients)
        arrays.update({INPUT_GRADIENTS + name: value for name, value in (result.input_gradients or {}).items()})
        yield from wire.send(reply, arrays, service_pb2.ComputeGradientsResponse)

    def Forward(self, request_iterator, context):
        header, arrays = wire.read_one(request_iterator, self._max_bytes)
        tensors = wire.group(arrays, (wire.PARAMETERS, wire.BATCH_PREFIX))
        spec, params, version = self._model_and_parameters(header, tensors, context)
        x, y = wire.batch_tensors(tensors[wire.BATCH_PREFIX], spec)  # named inputs: a mapping
        if y is not None:
            raise InvalidArgument("a forward takes no labels", "batch.y")
        check_activations(activation_features(spec), x, 0, self._sessions.limits.activation_elements_per_call)
        _check_deadline(context)
        values = self._functions.forward(spec, params, x, list(header.nodes))
        outputs = {OUTPUTS + name: value for name, value in values.items()}
        yield from wire.send(service_pb2.ForwardResult(version=version), outputs, service_pb2.ForwardResponse)

    def CreateSession(self, request_iterator, context):
        owner = context.identity
        # the received buffers are nobody else's: the parameter server keeps them (handover.py),
        # decoded where its process maps them when it shares this machine (the landing's block)
        with self._sessions.landing() as landing:
            header, arrays = wire.read_one(request_iterator, self._max_bytes, allocate=lambda tensors: {
                name: Placement(*placed) for name, placed in landing.receive(
                    {name: spec for name, spec in tensors.items() if name.startswith(wire.PARAMETERS)}).items()})
            params = hand_over(wire.group(arrays, (wire.PARAMETERS,))[wire.PARAMETERS])
            config = wire.trainer_config(header.config, default_workers=self._sessions.default_workers)
            _check_deadline(context)
            session = self._sessions.create(
                owner, config, params,
                init_seed=header.config.init.seed,
                init_dtype=header.config.init.dtype,
                checkpoint_every_steps=header.config.checkpoint_every_steps,
            )
        return service_pb2.CreateSessionResponse(session_id=session.session_id, version=session.version)

    def Step(self, request_iterator, context):
        owner = context.identity
        header, arrays = wire.read_one(request_iterator, self._max_bytes)
        return self._step(owner, header, arrays, context)

    def StreamSteps(self, request_iterator, context):
        # read one step ahead: a step whose successor has arrived begins it before its own end
        steps = ReadAhead(wire.read_each(request_iterator, self._max_bytes))
        try:
            for header, arrays in steps:
                yield self._step(context.identity, header, arrays, context, following=steps.arrived())
        finally:
            steps.close()

    def _step(self, owner, header, arrays, context, following=None) -> service_pb2.StepResponse:
        session = self._sessions.get(owner, header.session_id)
        x, y = _batch(session, arrays)
        then = None
        if following is not None and following[0].session_id == header.session_id:
            try:  # a bad next step is refused in its own turn, by this same code
                then = (following[0].step_id, *_batch(session, following[1]))
            except InvalidArgument:
                pass
        result = self._sessions.step(session, header.step_id, x, y, _seconds_left(context), then=then)
        return _step_response(header.step_id, result)

    def StepForward(self, request_iterator, context):
        header, arrays = wire.read_one(request_iterator, self._max_bytes)
        session = self._sessions.get(context.identity, header.session_id)
        x, y = wire.batch_tensors(wire.group(arrays, (wire.BATCH_PREFIX,))[wire.BATCH_PREFIX], session.config.spec)
        if y is not None:
            raise InvalidArgument("a two-phase step takes no labels: its loss is the caller's", "batch.y")
        _check_deadline(context)
        phase = self._sessions.forward_step(session, header.step_id, x)
        outputs = {} if phase.duplicate else {OUTPUTS + session.config.spec["output"]: phase.output}
        reply = service_pb2.StepForwardResult(step_id=header.step_id, version=phase.version,
                                              duplicate=phase.duplicate)
        yield from wire.send(reply, outputs, service_pb2.StepForwardResponse)

    def StepBackward(self, request_iterator, context):
        header, arrays = wire.read_one(request_iterator, self._max_bytes)
        session = self._sessions.get(context.identity, header.session_id)
        tensors = wire.group(arrays, (), exact=(OUTPUT_GRADIENT,))
        _check_deadline(context)  # a caller gone before the update starts gets none applied
        result, inputs = self._sessions.backward_step(session, header.step_id, tensors.get(OUTPUT_GRADIENT),
                                                      header.loss, input_gradient=header.input_gradient)
        reply = service_pb2.StepBackwardResult(step=_step_response(header.step_id, result))
        arrays = {INPUT_GRADIENTS + name: value for name, value in (inputs or {}).items()}
        yield from wire.send(reply, arrays, service_pb2.StepBackwardResponse)

    def DescribeModel(self, request, context):
        return describe_reply(spec_from_proto(request.model), request.dtype)

    def GetServerInfo(self, request, context):
        return server_info_reply(self._sessions.limits, self._max_bytes)

    def PullParameters(self, request, context):
        session = self._sessions.get(context.identity, request.session_id)
        # streamed from where the servers keep them (no copy first); no step runs meanwhile
        with self._sessions.parameters_in_place(session) as (version, params):
            arrays = wire.parameter_arrays(params)  # tables a range of rows at a time
            yield from wire.send(service_pb2.ParametersHeader(version=version), arrays,
                                 service_pb2.PullParametersResponse)

    def PullRows(self, request_iterator, context):
        header, arrays = wire.read_one(request_iterator, self._max_bytes)
        session = self._sessions.get(context.identity, header.session_id)
        tensors = wire.group(arrays, (), exact=("ids",))
        _require(tensors, ("ids",))
        version, rows = self._sessions.table_rows(session, header.table, tensors["ids"])
        yield from wire.send(service_pb2.PullRowsResult(version=version), {"rows": rows},
                             service_pb2.PullRowsResponse)

    def SaveCheckpoint(self, request, context):
        session = self._sessions.get(context.identity, request.session_id)
        name, version = self._sessions.save_checkpoint(session)
        return service_pb2.SaveCheckpointResponse(checkpoint=name, version=version)

    def RestoreCheckpoint(self, request, context):
        session = self._sessions.get(context.identity, request.session_id)
        name, version = self._sessions.restore_checkpoint(session, request.checkpoint)
        return service_pb2.RestoreCheckpointResponse(checkpoint=name, version=version)

    def CloseSession(self, request, context):
        version = self._sessions.close(context.identity, request.session_id)
        return service_pb2.CloseSessionResponse(version=version)

    def ListSessions(self, request, context):
        sessions = self._sessions.list(context.identity)
        return service_pb2.ListSessionsResponse(sessions=[
            service_pb2.SessionInfo(
                session_id=s.session_id, version=s.version, steps=s.steps, consistency=s.config.consistency,
                num_workers=s.config.num_workers, created_unix_s=s.created_unix_s,
            )
            for s in sessions
        ])


def _gradients_answer(result: dict, version: int) -> tuple:
    """(ComputeGradientsResult, gradient arrays) of an executor's compute_gradients result."""
    reply = service_pb2.ComputeGradientsResult(loss=result["loss"], count=result["count"],
                                               retries=result["retries"],
                                               worker_failures=result["worker_failures"], version=version)
    reply.timings_ms.update({k: float(v) for k, v in result["timings"].items()})
    if result["jvp"] is not None:
        reply.jvp = result["jvp"]
    return reply, wire.gradient_arrays(result["grads"] or {})  # tables as (ids, rows)


def _batch(session, arrays) -> tuple:
    x, y = wire.batch_tensors(wire.group(arrays, (wire.BATCH_PREFIX,))[wire.BATCH_PREFIX], session.config.spec)
    if y is None:
        raise InvalidArgument("missing tensor", "batch.y")
    return x, y


def _step_response(step_id: int, result) -> service_pb2.StepResponse:
    """The StepResponse of a cluster StepResult (Step, StreamSteps, StepBackward)."""
    reply = service_pb2.StepResponse(
        step_id=step_id, loss=result.loss, version=result.version, duplicate=result.duplicate,
        applied=result.applied and not result.duplicate, samples=result.samples,
        grad_norm=result.grad_norm, lr=result.lr, retries=result.retries,
        worker_failures=result.worker_failures, noise_scale=result.noise_scale,
        shard_cosines=result.shard_cosines, compute_spread=result.compute_spread,
        slowest_worker=result.slowest_worker,
        **{name: getattr(result, name) for name in TABLE_STEP_FIELDS},
    )
    reply.timings_ms.update({k: float(v) for k, v in result.timings.items()})
    reply.update_ratios.update({k: float(v) for k, v in result.update_ratios.items()})
    return reply


def _require(tensors: dict, names: tuple[str, ...]) -> None:
    for name in names:
        if name not in tensors:
            raise InvalidArgument("missing tensor", name)
