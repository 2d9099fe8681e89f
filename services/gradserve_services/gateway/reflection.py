"""Server reflection under both names clients ask for: grpc.reflection.v1alpha (what grpcio-reflection
ships) and grpc.reflection.v1 (what grpcurl and newer tools try first). The v1 protocol is the
v1alpha one under a new package name, field for field, so one servicer answers both."""

from __future__ import annotations

import grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

__all__ = ["V1_SERVICE_NAME", "enable_reflection"]

V1_SERVICE_NAME = "grpc.reflection.v1.ServerReflection"
_METHOD = "ServerReflectionInfo"


def enable_reflection(service_names, server: grpc.Server) -> None:
    """Reflection of `service_names` (and both reflection services) on `server`."""
    names = (*service_names, reflection.SERVICE_NAME, V1_SERVICE_NAME)
    servicer = reflection.ReflectionServicer(names)
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    for service in (reflection.SERVICE_NAME, V1_SERVICE_NAME):
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, {_METHOD: handler}),))
