"""An interceptor recording every RPC's method, final status code, duration and message bytes."""

from __future__ import annotations

import time

import grpc

from gradserve.rpc.methods import behavior_of, rewrapped

from gradserve_services import metrics

__all__ = ["MetricsInterceptor"]


class MetricsInterceptor(grpc.ServerInterceptor):
    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method.rsplit("/", 1)[-1]
        wrapped = _observed(behavior_of(handler), method, handler.request_streaming, handler.response_streaming)
        return rewrapped(handler, wrapped)


class _Call:
    """Byte counts and clock of one RPC; as a context manager, records it when the handler ends."""

    def __init__(self, method: str, request, request_streaming: bool):
        self.method = method
        self.started = time.perf_counter()
        self.received = 0
        self.sent = 0
        if request_streaming:
            self.request = self._count_in(request)
        else:
            self.request, self.received = request, _size(request)

    def _count_in(self, messages):
        for message in messages:
            self.received += _size(message)
            yield message

    def recording(self, context):
        return _Recording(self, context)


class _Recording:
    def __init__(self, call: _Call, context):
        self.call, self.context = call, context

    def __enter__(self):
        return self.call

    def __exit__(self, exc_type, exc, traceback) -> bool:
        code = self.context.code() if hasattr(self.context, "code") else None
        if code is None:
            code = _code_without_status(self.context, failed=exc_type is not None)
        call = self.call
        metrics.record_rpc(call.method, code.name, time.perf_counter() - call.started, call.received, call.sent)
        return False


def _code_without_status(context, *, failed: bool) -> grpc.StatusCode:
    """The code a call ended with when its handler set none."""
    if not failed:
        return grpc.StatusCode.OK
    if context.is_active():
        return grpc.StatusCode.UNKNOWN  # what gRPC answers for an exception it is handed
    # gRPC ended the call under the handler: the caller's deadline passed, or it cancelled (or a
    # message was over gRPC's own limit, which looks the same from here; see server.py).
    remaining = context.time_remaining()
    return grpc.StatusCode.DEADLINE_EXCEEDED if remaining is not None and remaining <= 0 \
        else grpc.StatusCode.CANCELLED


def _size(message) -> int:
    return message.ByteSize() if hasattr(message, "ByteSize") else len(message)


def _observed(behavior, method: str, request_streaming: bool, response_streaming: bool):
    # A handler that streams its replies must itself be a generator, hence two wrappers.
    if response_streaming:
        def observed_stream(request, context):
            with _Call(method, request, request_streaming).recording(context) as call:
                for reply in behavior(call.request, context):
                    call.sent += _size(reply)
                    yield reply
        return observed_stream

    def observed_unary(request, context):
        with _Call(method, request, request_streaming).recording(context) as call:
            reply = behavior(call.request, context)
            call.sent = _size(reply) if reply is not None else 0
            return reply
    return observed_unary
