"""What a lost call means, and getting the parameter servers back.

A call to the parameter servers can fail because a server is gone (its table with it: the trainer
is restored from its last checkpoint) or because an input it was handed is gone (a worker's
gradient, lost with the worker's node: the step is resent, its id applies at most once). The
servers are asked whether they live to tell the two apart. `load_replacing_lost` puts a table on a
server, replacing the server once if it is lost: that is how `Trainer.restore` recovers.

A server that does not answer within the trainer's bound is asked for its pid (`PROBE_S`): a server
runs its calls one at a time, so one stuck in a call cannot answer, and it is stopped and replaced
like a lost one (its tables are then gone: ParameterServerLost). One that answers is working, but
the call did not finish in time: Unavailable, and the caller reads the servers' state afresh.
"""

from __future__ import annotations

import time
from typing import Callable

from gradserve_services.errors import ParameterServerLost, Unavailable

from .backend import Backend, CallTimedOut, seconds_left

__all__ = ["server_lost", "servers_alive", "get_from_servers", "load_replacing_lost", "ServersSlow", "PROBE_S"]

# How long a server that did not answer in time has to answer a probe before it counts as stuck.
PROBE_S = 30.0


class ServersSlow(Unavailable):
    """The servers answer, but a call to them did not finish within its bound."""


def server_lost(error) -> ParameterServerLost:
    return ParameterServerLost("a parameter server was lost; restore this trainer from its last "
                               f"checkpoint ({error})")


def servers_alive(backend: Backend, servers: list, timeout_s: float | None = None) -> bool:
    """Whether every server is there (one that does not answer within `timeout_s` counts: it is
    busy, and the step's own bounded wait finds out whether it is stuck)."""
    try:
        backend.get([backend.submit(server, "pid")[0] for server in servers], timeout_s=timeout_s)
        return True
    except CallTimedOut:
        return True
    except Exception as error:  # noqa: BLE001 - classified by the backend
        if backend.is_lost(error):
            return False
        raise


def get_from_servers(backend: Backend, servers: list, futures, timeout_s: float | None = None):
    """The values of the servers' `futures`, waited for at most `timeout_s`; a loss or a stuck
    server raised as what it means (see above)."""
    try:
        return backend.get(futures, timeout_s=timeout_s)
    except CallTimedOut:
        stuck = stuck_servers(backend, servers, min(PROBE_S, timeout_s))
        for position, server in stuck:
            backend.replace_server(position, server)  # stops it: its tables are gone with it
        if stuck:
            raise server_lost(f"no answer within {timeout_s:g} s; stopped and replaced") from None
        raise ServersSlow(f"the parameter servers answer, but their call did not finish within "
                          f"{timeout_s:g} s", "parameter_server") from None
    except Exception as error:  # noqa: BLE001 - classified by the backend
        if backend.is_lost(error):
            if servers_alive(backend, servers, PROBE_S):  # what was lost is an input: a gradient, with its node
                raise Unavailable("a shard's gradient was lost with its worker before the "
                                  "parameter servers read it; resend the step (its step id "
                                  f"applies at most once) ({error})", "workers") from None
            raise server_lost(error) from None
        raise backend.cause(error) from None


def stuck_servers(backend: Backend, servers: list, probe_s: float) -> list[tuple[int, object]]:
    """`(position, server)` of each of `servers` that does not answer a probe within `probe_s`
    (one that is gone answers at once, with an error, and is not among them)."""
    probes = [backend.submit(server, "pid")[0] for server in servers]
    deadline = time.monotonic() + probe_s
    stuck = []
    for position, (server, probe) in enumerate(zip(servers, probes)):
        try:
            backend.get(probe, timeout_s=seconds_left(deadline))
        except CallTimedOut:
            stuck.append((position, server))
        except Exception:  # noqa: BLE001 - gone: the next call to it says so
            pass
    return stuck


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
