"""An interceptor recording every RPC's method, final status code, duration and message bytes."""

from __future__ import annotations

import time

import grpc

from gradserve_services import metrics

__all__ = ["MetricsInterceptor"]


class MetricsInterceptor(grpc.ServerInterceptor):
    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method.rsplit("/", 1)[-1]
        kinds = {
            (False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler,
        }
        streaming = (handler.request_streaming, handler.response_streaming)
        behavior = {
            (False, False): handler.unary_unary,
            (False, True): handler.unary_stream,
            (True, False): handler.stream_unary,
            (True, True): handler.stream_stream,
        }[streaming]
        wrapped = _observed(behavior, method, *streaming)
        return kinds[streaming](
            wrapped,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


class _Call:
    """Byte counts and clock of one RPC."""

    def __init__(self, method: str):
        self.method = method
        self.started = time.perf_counter()
        self.received = 0
        self.sent = 0

    def count_in(self, messages):
        for message in messages:
            self.received += _size(message)
            yield message

    def finish(self, context, failed: bool) -> None:
        code = context.code() if hasattr(context, "code") else None
        if code is None:
            code = grpc.StatusCode.UNKNOWN if failed else grpc.StatusCode.OK
        metrics.record_rpc(self.method, code.name, time.perf_counter() - self.started, self.received, self.sent)


def _size(message) -> int:
    return message.ByteSize() if hasattr(message, "ByteSize") else len(message)


def _observed(behavior, method: str, request_streaming: bool, response_streaming: bool):
    if response_streaming:
        def observed_stream(request, context):
            call = _Call(method)
            if request_streaming:
                request = call.count_in(request)
            else:
                call.received = _size(request)
            failed = True
            try:
                for reply in behavior(request, context):
                    call.sent += _size(reply)
                    yield reply
                failed = False
            finally:
                call.finish(context, failed)
        return observed_stream

    def observed_unary(request, context):
        call = _Call(method)
        if request_streaming:
            request = call.count_in(request)
        else:
            call.received = _size(request)
        failed = True
        try:
            reply = behavior(request, context)
            call.sent = _size(reply) if reply is not None else 0
            failed = False
            return reply
        finally:
            call.finish(context, failed)
    return observed_unary
