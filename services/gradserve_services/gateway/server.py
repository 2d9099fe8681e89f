"""`create_server`: the gRPC server with the Gradserve service, health, reflection, auth, metrics."""

from __future__ import annotations

import logging
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from gradserve.rpc.methods import add_service
from gradserve.rpc.options import SERVER_OPTIONS
from gradserve.transfer import DEFAULT_MAX_REQUEST_BYTES
from gradserve.v1 import service_pb2

from gradserve_services import metrics

from . import wire
from .auth import AuthInterceptor, Authenticator
from .error_status import ErrorStatusInterceptor
from .observe import MetricsInterceptor
from .reflection import enable_reflection
from .servicer import GradserveServicer
from .sessions import SessionLimits, SessionRegistry

__all__ = ["GatewayServer", "create_server", "SERVICE_NAME"]

log = logging.getLogger(__name__)

SERVICE = service_pb2.DESCRIPTOR.services_by_name["Gradserve"]
SERVICE_NAME = SERVICE.full_name

class GatewayServer:
    """A started gRPC server plus what shutting it down gracefully needs."""

    def __init__(self, server: grpc.Server, health_servicer: health.HealthServicer, registry: SessionRegistry):
        self.grpc_server = server
        self.health = health_servicer
        self.sessions = registry

    def stop(self, grace: float | None = 10.0) -> None:
        """Health goes NOT_SERVING, new calls are refused, in-flight calls get `grace` seconds to
        finish; then every session is closed. Blocks until done."""
        self.health.enter_graceful_shutdown()
        self.grpc_server.stop(grace).wait()
        self.sessions.close_all()

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        return self.grpc_server.wait_for_termination(timeout)


def create_server(
    executor,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    max_concurrent_calls: int = 64,
    auth_tokens: dict[str, str] | None = None,
    tls: tuple[bytes, bytes] | None = None,
    checkpoint_dir: str | None = None,
    limits: SessionLimits = SessionLimits(),
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
) -> tuple[GatewayServer, int]:
    """Build and start the server; return it and the bound port (port 0 picks a free one).

    `auth_tokens`: {token: identity}, or None to run without authentication (local use only).
    `tls`: (certificate chain PEM, private key PEM) or None for plaintext.
    `max_concurrent_calls`: calls beyond it are answered RESOURCE_EXHAUSTED by gRPC itself.
    """
    authenticator = Authenticator(auth_tokens)
    metrics.declare_rpc_methods(m.name for m in SERVICE.methods)
    # outermost first: metrics see the final status; identity is established before any method
    # runs; errors become statuses innermost, where the method raised them
    interceptors = [MetricsInterceptor(), AuthInterceptor(authenticator), ErrorStatusInterceptor(SERVICE_NAME)]
    server = grpc.server(
        # Streaming calls hold a thread each; one per allowed call, the cap is the limit.
        futures.ThreadPoolExecutor(max_workers=max_concurrent_calls, thread_name_prefix="gateway"),
        interceptors=interceptors,
        options=SERVER_OPTIONS,
        maximum_concurrent_rpcs=max_concurrent_calls,
    )
    executor.watch_workers(metrics.set_workers_alive)
    registry = SessionRegistry(executor, checkpoint_dir=checkpoint_dir, limits=limits)
    recovered = registry.recover()  # sessions of an earlier gateway on the same checkpoint dir
    if recovered:
        log.info("recovered %d sessions from %s", recovered, checkpoint_dir)
    # undecodable bytes reach the servicer as a marker: INVALID_ARGUMENT, not gRPC's INTERNAL
    add_service(server, SERVICE, GradserveServicer(executor, registry, max_request_bytes),
                request_deserializer=wire.tolerant)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    enable_reflection((SERVICE_NAME, health.SERVICE_NAME), server)
    address = f"{host}:{port}"
    if tls is None:
        bound_port = server.add_insecure_port(address)
    else:
        certificate_chain, private_key = tls
        credentials = grpc.ssl_server_credentials([(private_key, certificate_chain)])
        bound_port = server.add_secure_port(address, credentials)
    if bound_port == 0:
        raise OSError(f"cannot bind {address}")
    server.start()
    for service in ("", SERVICE_NAME):
        health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    log.info("gateway listening on %s:%d (auth %s, tls %s)", host, bound_port,
             "on" if authenticator.enabled else "off", "on" if tls else "off")
    return GatewayServer(server, health_servicer, registry), bound_port
