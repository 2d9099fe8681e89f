"""Connecting to Ray: an embedded runtime started here, or an existing cluster by address.

Executors in one process share the connection; it is counted, and only an embedded runtime this
module started is shut down, when its last user disconnects. A runtime someone else initialised is
left alone.
"""

from __future__ import annotations

import os
import threading

__all__ = ["RayRuntime", "DEFAULT_OBJECT_STORE_BYTES"]

# Enough for many parameter versions and gradients in flight, small enough for a laptop or CI box.
DEFAULT_OBJECT_STORE_BYTES = 512 * 1024 * 1024
_lock = threading.Lock()
_users = 0
_started_here = False


class RayRuntime:
    def __init__(self, address: str):
        self.address = address
        self._connected = True

    @classmethod
    def connect(cls, address: str | None = None, *, num_cpus: int = 0, min_cpus: int = 1,
                object_store_memory: int | None = None) -> "RayRuntime":
        """`address` None (and no RAY_ADDRESS) or "local": start an embedded runtime with
        `max(num_cpus or os.cpu_count(), min_cpus)` CPUs; otherwise connect to that cluster."""
        global _users, _started_here
        import ray

        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        with _lock:
            if not ray.is_initialized():
                target = address if address is not None else os.environ.get("RAY_ADDRESS") or "local"
                if target == "local":
                    _start_embedded(ray, max(num_cpus or os.cpu_count() or 1, min_cpus),
                                    object_store_memory or DEFAULT_OBJECT_STORE_BYTES)
                else:
                    ray.init(address=target, log_to_driver=False, configure_logging=False)
                _started_here = True
            _users += 1
            return cls(ray.get_runtime_context().gcs_address)

    def disconnect(self) -> None:
        global _users, _started_here
        import ray

        with _lock:
            if not self._connected:
                return
            self._connected = False
            _users -= 1
            if _users == 0 and _started_here:
                ray.shutdown()
                _started_here = False


def _start_embedded(ray, num_cpus: int, object_store_memory: int) -> None:
    options = dict(address="local", num_cpus=num_cpus, object_store_memory=object_store_memory,
                   include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        # Keep Ray's own listeners on loopback where this Ray version allows it.
        ray.init(_node_ip_address="127.0.0.1", **options)
    except (TypeError, ValueError):
        ray.init(**options)
