"""The HTTP exporter of `REGISTRY`, started by the gateway process (`gradserve serve --metrics-port`)."""

from __future__ import annotations

from prometheus_client import start_http_server

from .definitions import REGISTRY

__all__ = ["start_metrics_server", "stop_metrics_server"]

# Exporters started in this process, by bound port, so tests (and `serve` on shutdown) stop them.
_servers: dict[int, object] = {}


def start_metrics_server(port: int, host: str = "127.0.0.1") -> int:
    """Serve `REGISTRY` at http://host:port/metrics in a daemon thread; return the bound port.

    Port 0 binds a free port (tests). The default host is loopback: exposing metrics on all
    interfaces is a deployment decision (`--metrics-host 0.0.0.0` in the container image).
    """
    server, _thread = start_http_server(port, addr=host, registry=REGISTRY)
    bound_port = server.server_port
    _servers[bound_port] = server
    return bound_port


def stop_metrics_server(port: int) -> None:
    """Stop the exporter started on `port` by `start_metrics_server` and release its socket."""
    server = _servers.pop(port)
    server.shutdown()
    server.server_close()
