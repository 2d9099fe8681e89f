"""Reflection answers under grpc.reflection.v1 as well as v1alpha: the services and the file
descriptors a client in another language generates its stubs from."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha import reflection_pb2

from gradserve.rpc.options import CHANNEL_OPTIONS


@pytest.mark.parametrize("package", ["grpc.reflection.v1", "grpc.reflection.v1alpha"])
def test_reflection_lists_services_and_serves_descriptors(gateway, package):
    channel = grpc.insecure_channel(gateway[1], options=CHANNEL_OPTIONS)
    try:
        call = channel.stream_stream(
            f"/{package}.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        requests = [reflection_pb2.ServerReflectionRequest(list_services=""),
                    reflection_pb2.ServerReflectionRequest(file_containing_symbol="gradserve.v1.Gradserve")]
        listed, described = list(call(iter(requests), timeout=30))
    finally:
        channel.close()
    names = {service.name for service in listed.list_services_response.service}
    assert {"gradserve.v1.Gradserve", "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection"} <= names
    files = [descriptor_pb2.FileDescriptorProto.FromString(raw)
             for raw in described.file_descriptor_response.file_descriptor_proto]
    service_file = next(f for f in files if f.name == "gradserve/v1/service.proto")
    methods = {m.name for s in service_file.service for m in s.method}
    assert {"ComputeGradients", "Forward", "Step"} <= methods
