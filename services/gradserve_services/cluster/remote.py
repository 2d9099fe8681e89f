"""The one place `ray.remote` is applied: `GradientWorker` and `ParameterServer` become actors here,
`RayCalls` is what an actor calls other actors with, and `RayBackend` manages the pools for the
coordinator, recording each actor's metadata when it starts."""

from __future__ import annotations

import threading

import ray
from ray import exceptions as ray_errors
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from gradserve_services.errors import Unavailable

from .backend import CallTimedOut
from .parameter_server import ParameterServer
from .shared import SharedArea
from .worker import GradientWorker

__all__ = ["RayBackend", "RayCalls", "RemoteWorker", "RemoteServer"]

RemoteWorker = ray.remote(GradientWorker)
# A server runs its calls one at a time, in order, on its main thread, except `outcome`, a wait
# for pushed gradients, which gets threads of its own so that it never holds up the pushes.
WAITING_GROUP = "waiting"
RemoteServer = ray.remote(concurrency_groups={WAITING_GROUP: 16})(ParameterServer)

# How long new actors may take to start (process spawn, imports) before the cluster is "too small".
START_TIMEOUT_S = 120.0
_LOST_ERRORS = (ray_errors.RayActorError, ray_errors.WorkerCrashedError,
                ray_errors.ObjectLostError, ray_errors.NodeDiedError)


# Ray records an event per task for its dashboard, kept in the GCS up to 100,000 tasks: a few tasks
# per step made the GCS grow by about 10 MB per 1,000 steps in `gradserve bench soak` (0.9 MB
# without). The service's own metrics say what those events would.
_NO_TASK_EVENTS = {"enable_task_events": False}


def _worker_options() -> dict:
    # A worker is one core: it reserves one CPU and runs one BLAS thread. The worker limits its
    # threads with threadpoolctl; without it, the environment does.
    options = {"num_cpus": 1, "max_restarts": 0, "max_task_retries": 0,
               "scheduling_strategy": "SPREAD", **_NO_TASK_EVENTS}
    try:
        import threadpoolctl  # noqa: F401
    except ImportError:
        options["runtime_env"] = {"env_vars": {name: "1" for name in (
            "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}}
    return options


def _server_options() -> dict:
    # Parameter servers reserve no CPU: in sync mode they work while the workers wait. They run on
    # the coordinator's own node, so they share its fate: the loss of any other node costs only
    # workers, whose shards are re-run, never the parameters. (A driver always has a local node,
    # and a zero-CPU actor always fits on it; soft affinity was seen placing them elsewhere.)
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return {"num_cpus": 0, "max_restarts": 0, "max_task_retries": 0, "scheduling_strategy": here,
            **_NO_TASK_EVENTS}


class RayCalls:
    """`ActorCalls` over Ray: the coordinator's, and each worker's (it travels to the actor)."""

    def put(self, value):
        return ray.put(value)

    def submit(self, handle, method: str, *args, num_returns: int = 1) -> list:
        futures = getattr(handle, method).options(num_returns=num_returns).remote(*args)
        return list(futures) if num_returns > 1 else [futures]

    def submit_waiting(self, server, method: str, *args, num_returns: int = 1) -> list:
        futures = getattr(server, method).options(num_returns=num_returns,
                                                  concurrency_group=WAITING_GROUP).remote(*args)
        return list(futures) if num_returns > 1 else [futures]

    def get(self, futures, timeout_s: float | None = None):
        try:
            return ray.get(futures, timeout=timeout_s)
        except ray_errors.GetTimeoutError:
            raise CallTimedOut(f"no answer within {timeout_s:g} s", "workers") from None

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()


class RayBackend(RayCalls):
    pushes_gradients = True

    def __init__(self):
        self._lock = threading.RLock()
        self._workers: list = []
        self._servers: list = []
        self._reserved: dict[str, int] = {}
        self._starting: set = set()  # replacement workers not yet running
        self._metadata: dict = {}  # actor handle -> what it said when it started
        self._on_workers_alive = None
        # The fast lane for actors on this machine (parameter servers always are: see below).
        self._shared_folder = SharedArea.create()
        self.shared_area = None if self._shared_folder is None else \
            (self._shared_folder.path, self._shared_folder.token)
        self._worker_args = {"shared_area": self.shared_area, "calls": RayCalls()}
        self._server_args = {"shared_area": self.shared_area}

    def wait_one(self, futures, timeout_s: float | None = None) -> int | None:
        ready, _ = ray.wait(list(futures), num_returns=1, timeout=timeout_s)
        return list(futures).index(ready[0]) if ready else None

    def workers(self, count: int) -> list:
        with self._lock:
            self._grow(self._workers, count, RemoteWorker, _worker_options(), self._worker_args)
            self._report_workers()
            return list(self._workers[:count])

    def reserve_workers(self, owner: str, count: int) -> None:
        with self._lock:
            self._reserved[owner] = count
            self._grow(self._workers, count, RemoteWorker, _worker_options(), self._worker_args)
            self._report_workers()

    def release_workers(self, owner: str) -> None:
        with self._lock:
            self._reserved.pop(owner, None)
            needed = max(self._reserved.values(), default=0)
            while len(self._workers) > needed:
                lost = self._workers.pop()
                self._starting.discard(lost)
                self._metadata.pop(lost, None)
                _kill(lost)
            self._report_workers()

    def watch_workers(self, on_alive) -> None:
        with self._lock:
            self._on_workers_alive = on_alive
            self._report_workers()

    def servers(self, count: int) -> list:
        with self._lock:
            self._grow(self._servers, count, RemoteServer, _server_options(), self._server_args)
            return list(self._servers[:count])

    def shares_memory(self, worker) -> bool:
        with self._lock:
            metadata = self._metadata.get(worker)
        return metadata is not None and metadata["shared_memory"]

    def replace_worker(self, position: int, lost):
        with self._lock:
            handle = self._replace(self._workers, position, lost, RemoteWorker, _worker_options(),
                                   self._worker_args)
            if handle is not lost and handle not in self._starting:
                # Alive once it answers; the count shows the loss until then.
                self._starting.add(handle)
                self._starting.discard(lost)
                handle.metadata.remote().future().add_done_callback(
                    lambda answer, handle=handle: self._worker_started(handle, answer))
            self._report_workers()
            return handle

    def replace_server(self, position: int, lost):
        return self._replace(self._servers, position, lost, RemoteServer, _server_options(),
                             self._server_args)

    def is_lost(self, error: BaseException) -> bool:
        return isinstance(error, _LOST_ERRORS)

    def died(self, error: BaseException, handle) -> bool:
        return isinstance(error, ray_errors.RayActorError) and \
            getattr(error, "actor_id", None) == handle._actor_id.hex()

    def cause(self, error: BaseException) -> BaseException:
        cause = getattr(error, "cause", None) if isinstance(error, ray_errors.RayTaskError) else None
        return cause if isinstance(cause, BaseException) else error

    def shutdown(self) -> None:
        with self._lock:
            for handle in self._workers + self._servers:
                _kill(handle)
            self._workers, self._servers, self._reserved = [], [], {}
            self._starting.clear()
            self._metadata.clear()
            self._report_workers()
            if self._shared_folder is not None:
                self._shared_folder.remove()

    def _worker_started(self, handle, answer) -> None:
        if answer.cancelled() or answer.exception() is not None:
            return  # it died too: still not alive, and replaced when a call finds it gone
        with self._lock:
            if handle in self._starting:
                self._starting.discard(handle)
                self._metadata[handle] = answer.result()
                self._report_workers()

    def _report_workers(self) -> None:
        """Tell the watcher how many pool workers run: all but replacements still starting. A
        worker that died is noticed by the first call that reaches it (then it is replaced)."""
        if self._on_workers_alive is not None:
            self._on_workers_alive(len(self._workers) - len(self._starting))

    def _grow(self, pool: list, count: int, actor_class, options: dict, args: dict) -> None:
        """Start actors up to `count` and wait until they run (recording their metadata), so a
        cluster too small for them fails here, with a clear error, rather than hanging a step."""
        started = [actor_class.options(**options).remote(**args) for _ in range(count - len(pool))]
        if not started:
            return
        try:
            metadata = ray.get([handle.metadata.remote() for handle in started], timeout=START_TIMEOUT_S)
        except ray_errors.GetTimeoutError:
            for handle in started:
                _kill(handle)
            raise Unavailable(f"could not start {len(started)} more actors within "
                              f"{START_TIMEOUT_S:.0f}s; the cluster has {ray.cluster_resources()}",
                              "workers") from None
        pool.extend(started)
        self._metadata.update(zip(started, metadata))

    def _replace(self, pool: list, position: int, lost, actor_class, options: dict, args: dict):
        # Not waited for: the coordinator re-runs the lost shard on a live worker meanwhile, and
        # calls queued on the new actor run once it has started.
        with self._lock:
            if position < len(pool) and pool[position] is lost:
                _kill(lost)
                self._metadata.pop(lost, None)
                pool[position] = actor_class.options(**options).remote(**args)
            return pool[position]


def _kill(handle) -> None:
    try:
        ray.kill(handle, no_restart=True)
    except Exception:  # noqa: BLE001 - already gone is fine
        pass
