"""What a lost call means, and getting the parameter servers back.

A call to the parameter servers can fail because a server is gone (its table with it: the trainer
is restored from its last checkpoint) or because an input it was handed is gone (a worker's
gradient, lost with the worker's node: the step is resent, its id applies at most once). The
servers are asked whether they live to tell the two apart. `load_replacing_lost` puts a table on a
server, replacing the server once if it is lost: that is how `Trainer.restore` recovers.
"""

from __future__ import annotations

from typing import Callable

from gradserve_services.errors import ParameterServerLost, Unavailable

from .backend import Backend

__all__ = ["server_lost", "servers_alive", "get_from_servers", "load_replacing_lost"]


def server_lost(error) -> ParameterServerLost:
    return ParameterServerLost("a parameter server was lost; restore this trainer from its last "
                               f"checkpoint ({error})")


def servers_alive(backend: Backend, servers: list) -> bool:
    try:
        backend.get([backend.submit(server, "pid")[0] for server in servers])
        return True
    except Exception as error:  # noqa: BLE001 - classified by the backend
        if backend.is_lost(error):
            return False
        raise


def get_from_servers(backend: Backend, servers: list, futures):
    """The values of the servers' `futures`; a loss raised as what it means (see above)."""
    try:
        return backend.get(futures)
    except Exception as error:  # noqa: BLE001 - classified by the backend
        if backend.is_lost(error):
            if servers_alive(backend, servers):  # what was lost is an input: a gradient, with its node
                raise Unavailable("a shard's gradient was lost with its worker before the "
                                  "parameter servers read it; resend the step (its step id "
                                  f"applies at most once) ({error})", "workers") from None
            raise server_lost(error) from None
        raise backend.cause(error) from None


def load_replacing_lost(backend: Backend, position: int, load: Callable[[object], object]):
    """`load(server)` (a future) on the server at `position`, on a new server if that one is lost;
    returns the completed future."""
    server = backend.servers(position + 1)[position]
    for _ in range(2):
        future = load(server)
        try:
            backend.get(future)
            return future
        except Exception as error:  # noqa: BLE001 - classified by the backend
            if not backend.is_lost(error):
                raise backend.cause(error) from None
            server = backend.replace_server(position, server)
    raise ParameterServerLost("could not start a parameter server")
