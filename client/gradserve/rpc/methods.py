"""The service's methods as gRPC sees them: per method its path, streaming kind and wire
(de)serializers, and the one table from streaming kind to gRPC's stub and handler constructors.

The SDK's stub (`stub`), the gateway's registration (`add_service`) and every server interceptor
that rewraps a handler (`rewrapped`) are built from here, so a method's kind is read in one place.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import NamedTuple

import grpc
from google.protobuf import message_factory

from gradserve.rpc.frames import PartCodec

__all__ = ["RpcCodec", "rpc_codecs", "stub", "add_service", "behavior_of", "rewrapped"]

# (request streaming, response streaming) -> (channel method, handler constructor, handler attribute)
_KINDS = {
    (False, False): ("unary_unary", grpc.unary_unary_rpc_method_handler, "unary_unary"),
    (False, True): ("unary_stream", grpc.unary_stream_rpc_method_handler, "unary_stream"),
    (True, False): ("stream_unary", grpc.stream_unary_rpc_method_handler, "stream_unary"),
    (True, True): ("stream_stream", grpc.stream_stream_rpc_method_handler, "stream_stream"),
}


class RpcCodec(NamedTuple):
    """One method of a service: its path, streaming kind and wire (de)serializers."""

    path: str
    request_streaming: bool
    response_streaming: bool
    request_serializer: Callable
    request_deserializer: Callable
    response_serializer: Callable
    response_deserializer: Callable


def rpc_codecs(service) -> dict[str, RpcCodec]:
    """{method name: RpcCodec} for a service descriptor: PartCodec for messages with a
    `oneof part` holding a TensorChunk, the generated protobuf (de)serializers for the rest.
    The SDK's stub and the gateway's handlers are both built from this table."""
    return {
        method.name: RpcCodec(
            f"/{service.full_name}/{method.name}", method.client_streaming, method.server_streaming,
            *_message_codec(method.input_type), *_message_codec(method.output_type),
        )
        for method in service.methods
    }


def _message_codec(descriptor) -> tuple[Callable, Callable]:
    message_class = message_factory.GetMessageClass(descriptor)
    part = descriptor.oneofs_by_name.get("part")
    if part is not None and any(field.name == "chunk" for field in part.fields):
        codec = PartCodec(message_class)
        return codec.serialize, codec.deserialize
    return message_class.SerializeToString, message_class.FromString


def stub(channel: grpc.Channel, service) -> types.SimpleNamespace:
    """The service's methods on `channel`, like the generated stub but with chunk messages framed
    by hand (`rpc_codecs`): the bytes of a large tensor are copied once on each side."""
    return types.SimpleNamespace(**{
        name: getattr(channel, _KINDS[rpc.request_streaming, rpc.response_streaming][0])(
            rpc.path, request_serializer=rpc.request_serializer, response_deserializer=rpc.response_deserializer)
        for name, rpc in rpc_codecs(service).items()
    })


def add_service(server: grpc.Server, service, servicer,
                request_deserializer: Callable[[Callable, str], Callable] = lambda deserialize, _: deserialize) -> None:
    """What a generated add_XServicer_to_server does, but with the (de)serializers of
    `rpc_codecs`. `request_deserializer(deserialize, message name)` may wrap each method's."""
    handlers = {
        name: _KINDS[rpc.request_streaming, rpc.response_streaming][1](
            getattr(servicer, name),
            request_deserializer=request_deserializer(rpc.request_deserializer,
                                                      service.methods_by_name[name].input_type.name),
            response_serializer=rpc.response_serializer,
        )
        for name, rpc in rpc_codecs(service).items()
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)


def behavior_of(handler: grpc.RpcMethodHandler) -> Callable:
    """The function a handler calls, whatever its streaming kind."""
    return getattr(handler, _KINDS[handler.request_streaming, handler.response_streaming][2])


def rewrapped(handler: grpc.RpcMethodHandler, behavior: Callable) -> grpc.RpcMethodHandler:
    """A handler of `handler`'s streaming kind and (de)serializers calling `behavior` instead."""
    return _KINDS[handler.request_streaming, handler.response_streaming][1](
        behavior,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
