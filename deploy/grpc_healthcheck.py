#!/usr/bin/env python3
"""Container health check: exit 0 when the gRPC server at ADDRESS answers SERVING on the standard
grpc.health.v1 Health service, 1 otherwise (NOT_SERVING while draining, unreachable, timeout).

Installed in the image as `gradserve-healthcheck` and used by docker-compose.yml's healthcheck, so
no separate grpc_health_probe binary is needed. Exit codes follow Docker's HEALTHCHECK contract.
"""

from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="gradserve-healthcheck", description=__doc__.splitlines()[0])
    parser.add_argument("address", nargs="?", default="127.0.0.1:50051", help="host:port of the gateway")
    parser.add_argument("--service", default="", help="service name to check; '' is the whole server")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds before giving up")
    parser.add_argument("--tls-ca", help="PEM file of the CA that signed the server certificate (TLS)")
    return parser.parse_args(argv)


def open_channel(address: str, tls_ca: str | None) -> grpc.Channel:
    if tls_ca is None:
        return grpc.insecure_channel(address)
    with open(tls_ca, "rb") as ca_file:
        return grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=ca_file.read()))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    request = health_pb2.HealthCheckRequest(service=args.service)
    try:
        with open_channel(args.address, args.tls_ca) as channel:
            response = health_pb2_grpc.HealthStub(channel).Check(request, timeout=args.timeout)
    except grpc.RpcError as error:
        print(f"unhealthy: {error.code().name}: {error.details()}", file=sys.stderr)
        return 1
    status_name = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    if response.status != health_pb2.HealthCheckResponse.SERVING:
        print(f"unhealthy: {status_name}", file=sys.stderr)
        return 1
    print(status_name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
