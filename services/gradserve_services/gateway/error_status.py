"""The one way failures leave the Gradserve service's methods (kserve's
ExceptionToStatusInterceptor): a request the gateway refused to decode, or any GradserveError,
becomes its status (status.py); anything else is logged and answered INTERNAL without internals.
Servicer methods therefore only decode, delegate and encode."""

from __future__ import annotations

import contextlib

import grpc

from gradserve.rpc.methods import behavior_of, rewrapped

from gradserve_services.errors import GradserveError

from . import wire
from .status import abort_internal, abort_with

__all__ = ["ErrorStatusInterceptor"]


class ErrorStatusInterceptor(grpc.ServerInterceptor):
    """Wraps every method of the service `service_name` (health and reflection keep gRPC's own
    handling)."""

    def __init__(self, service_name: str):
        self._prefix = f"/{service_name}/"

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith(self._prefix):
            return handler
        method = handler_call_details.method[len(self._prefix):]
        return rewrapped(handler, _answering(behavior_of(handler), method, handler.response_streaming))


def _answering(behavior, method: str, response_streaming: bool):
    # A handler that streams its replies must itself be a generator to catch what they raise.
    if response_streaming:
        def answering_stream(request, context):
            with _statuses(context, method):
                yield from behavior(wire.decoded(request), context)
        return answering_stream

    def answering_unary(request, context):
        with _statuses(context, method):
            return behavior(wire.decoded(request), context)
    return answering_unary


@contextlib.contextmanager
def _statuses(context, method: str):
    try:
        yield
    except GradserveError as error:
        abort_with(context, error)
    except Exception as error:  # noqa: BLE001 - the one catch-all, logged
        if _is_abort(context) or _ended_by_grpc(context, error):
            raise
        abort_internal(context, method, error)


def _is_abort(context) -> bool:
    """context.abort raises a plain Exception after setting the code; let it through as is."""
    return context.code() not in (None, grpc.StatusCode.OK)


def _ended_by_grpc(context, error: Exception) -> bool:
    """The request stream raises RpcError once gRPC has ended the call (the caller cancelled, its
    deadline passed, a message was over gRPC's limit): the caller has its status already, there
    is nothing to answer and nothing went wrong here."""
    return isinstance(error, grpc.RpcError) and not context.is_active()
