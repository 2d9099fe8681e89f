"""What the coordinator needs from where actors run: the `Backend` interface.

`RayBackend` (remote.py) runs workers and parameter servers as Ray actors; `LocalBackend` (local.py)
calls the same plain classes in this process. The coordinator (`Trainer`, `compute_gradients`) is
written once against this interface, so both executors share every rule: sharding, exactly-once,
staleness, retries, timings.

Futures are opaque (Ray ObjectRefs, or completed local results). Actor handles are addressed by
their position in the backend's pool, which is stable: a replacement takes the dead one's place.

Actors learn where they run when they start (`metadata()`: pid, node, whether the process maps the
executor's shared-memory area), and the backend records it, as Ray Train's `WorkerMetadata`; the
coordinator sends shared-memory blocks only to workers whose record says they can map them.
A worker reaches other actors (a server's parameter copies) only through `ActorCalls`.

A wait may be bounded (`timeout_s`): a call that does not answer in time raises `CallTimedOut`,
and the coordinator then treats its actor as lost (shard_runner.py, recovery.py): a process that is
alive but stuck (stopped, deadlocked, swapping) would otherwise hold a step forever.
"""

from __future__ import annotations

import time
from typing import Any, Protocol, Sequence

from gradserve_services.errors import Unavailable

__all__ = ["Backend", "ActorCalls", "CallTimedOut", "seconds_left"]


class CallTimedOut(Unavailable):
    """A bounded wait for a call's result ran out before the call answered."""


def seconds_left(deadline: float | None) -> float | None:
    """The `timeout_s` of a wait that must end by `deadline` (time.monotonic(); None: no bound)."""
    return None if deadline is None else max(deadline - time.monotonic(), 0.0)


class ActorCalls(Protocol):
    """What an actor may call itself: other actors and the futures they hand it."""

    def submit(self, handle, method: str, *args, num_returns: int = 1) -> list:
        """Call `handle.method(*args)`; top-level future arguments arrive resolved. Always a list
        of `num_returns` futures."""

    def get(self, futures, timeout_s: float | None = None):
        """The value(s) of one future or a list of futures; raises what the call raised, or
        `CallTimedOut` where they are not all complete within `timeout_s` (None: no bound)."""

    def node_id(self) -> str:
        """The node this process runs on."""


class Backend(ActorCalls, Protocol):
    # `(folder, token)` of the shared-memory area for actors on the coordinator's machine, or None
    # (see shared.py).
    shared_area: tuple[str, str] | None
    # Whether workers can push gradient buckets to the servers during backward (they hold
    # `ActorCalls` of their own) and a server can wait for them on a thread of its own
    # (`submit_waiting`): Ray's actors can; this process's plain objects cannot.
    pushes_gradients: bool

    def submit_waiting(self, server, method: str, *args, num_returns: int = 1) -> list:
        """`submit` to a server's waiting threads: the call may block until other calls to the
        server (pushes) arrive, without holding up the server's own sequence of calls."""

    def put(self, value) -> Any:
        """A future holding `value`, shared by every call that receives it."""

    def wait_one(self, futures: Sequence, timeout_s: float | None = None) -> int | None:
        """Index in `futures` of one that is complete (blocks until there is one); None where none
        completed within `timeout_s`."""

    def workers(self, count: int) -> list:
        """The first `count` worker handles (pool positions 0..count-1), started if missing."""

    def reserve_workers(self, owner: str, count: int) -> None:
        """`owner` will use `count` workers: start them now (and wait until they run)."""

    def release_workers(self, owner: str) -> None:
        """`owner` needs no workers any more; workers beyond every remaining need may stop."""

    def watch_workers(self, on_alive) -> None:
        """Call `on_alive(number of pool workers running)` now and whenever that number changes:
        workers started or stopped, a lost one replaced (one fewer until its replacement runs)."""

    def shares_memory(self, worker) -> bool:
        """Whether `worker` maps the shared-memory area, as its metadata said when it started
        (False for one whose start was not recorded yet: it gets everything by store)."""

    def servers(self, count: int) -> list:
        """The first `count` parameter-server handles, started if missing."""

    def replace_worker(self, position: int, lost) -> Any:
        """The handle now at `position`: a new worker if `lost` is still there, else the one that
        already replaced it."""

    def replace_server(self, position: int, lost) -> Any:
        """Like `replace_worker`, for parameter servers (their tables are gone)."""

    def is_lost(self, error: BaseException) -> bool:
        """Whether `error` means the actor (its process or node) is gone, so a retry elsewhere may
        succeed."""

    def died(self, error: BaseException, handle) -> bool:
        """Whether `error` reports the death of the actor `handle` itself (not of an actor whose
        output its call needed)."""

    def cause(self, error: BaseException) -> BaseException:
        """The error to raise to the caller for a failed call (the domain error a task raised)."""

    def shutdown(self) -> None:
        """Stop every actor this backend started."""
