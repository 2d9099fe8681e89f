"""`LocalBackend`: the worker and parameter-server classes called directly in this process.

For unit tests of other packages and for small jobs without Ray. Calls run when submitted (shards
one after another), so "async" here applies the shards' gradients in shard order; staleness rules
still apply since every shard was computed on the version current when the step started.
"""

from __future__ import annotations

from .parameter_server import ParameterServer
from .worker import GradientWorker

__all__ = ["LocalBackend"]


class _Done:
    """A completed call: its value, or the exception it raised."""

    __slots__ = ("value", "error")

    def __init__(self, value=None, error: BaseException | None = None):
        self.value, self.error = value, error


class LocalBackend:
    shared_area = None  # one process: snapshots and gradients are shared already
    pushes_gradients = False  # a call runs to its end when submitted: nothing could wait for pushes

    def __init__(self, num_workers: int = 1):
        # Workers in the caller's process must not change its BLAS thread count.
        self._workers = [GradientWorker(limit_threads=False) for _ in range(num_workers)]
        self._servers: list[ParameterServer] = []
        self._reserved: dict[str, int] = {}
        self._on_workers_alive = None

    def put(self, value):
        return _Done(value)

    def submit(self, handle, method: str, *args, num_returns: int = 1) -> list:
        try:
            value = getattr(handle, method)(*[_resolve(arg) for arg in args])
        except Exception as error:  # noqa: BLE001 - delivered when the future is read, as Ray does
            return [_Done(error=error) for _ in range(num_returns)]
        if num_returns == 1:
            return [_Done(value)]
        return [_Done(item) for item in value]

    def get(self, futures, timeout_s: float | None = None):
        # (every local call completed when it was submitted: there is nothing to wait for)
        if isinstance(futures, _Done):
            if futures.error is not None:
                raise futures.error
            return futures.value
        return [self.get(future) for future in futures]

    def wait_one(self, futures, timeout_s: float | None = None) -> int | None:
        return 0

    def workers(self, count: int) -> list:
        grown = len(self._workers) < count
        while len(self._workers) < count:
            self._workers.append(GradientWorker(limit_threads=False))
        if grown:
            self._report_workers()
        return self._workers[:count]

    def watch_workers(self, on_alive) -> None:
        self._on_workers_alive = on_alive
        self._report_workers()

    def _report_workers(self) -> None:
        if self._on_workers_alive is not None:
            self._on_workers_alive(len(self._workers))

    def reserve_workers(self, owner: str, count: int) -> None:
        self._reserved[owner] = count
        self.workers(count)

    def release_workers(self, owner: str) -> None:
        self._reserved.pop(owner, None)

    def shares_memory(self, worker) -> bool:
        return False  # no area: nothing to map

    def node_id(self) -> str:
        return "local"

    def servers(self, count: int) -> list:
        while len(self._servers) < count:
            self._servers.append(ParameterServer())
        return self._servers[:count]

    def replace_worker(self, position: int, lost):
        return self._workers[position]

    def replace_server(self, position: int, lost):
        return self._servers[position]

    def is_lost(self, error: BaseException) -> bool:
        return False  # nothing here can die without taking the caller with it

    def died(self, error: BaseException, handle) -> bool:
        return False

    def cause(self, error: BaseException) -> BaseException:
        return error

    def shutdown(self) -> None:
        self._workers, self._servers = [], []
        self._report_workers()


def _resolve(arg):
    """Top-level futures and lists of futures (parameter boxes) arrive as their values."""
    if isinstance(arg, _Done):
        if arg.error is not None:
            raise arg.error
        return arg.value
    if isinstance(arg, list):
        return [_resolve(item) for item in arg]
    return arg
