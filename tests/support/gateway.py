"""A real gRPC gateway on 127.0.0.1 (port 0) over an executor, stopped when the block ends."""

from __future__ import annotations

from contextlib import contextmanager

from gradserve_services.gateway import create_server


@contextmanager
def serving(executor):
    """`"127.0.0.1:PORT"` of a gateway serving `executor`; the server, then the executor, stop
    when the block ends."""
    try:
        server, port = create_server(executor)
        try:
            yield f"127.0.0.1:{port}"
        finally:
            server.stop(grace=1)
    finally:
        executor.shutdown()
