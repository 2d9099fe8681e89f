"""Connecting to Ray: an embedded runtime started here, or an existing cluster by address.

Executors in one process share the connection; it is counted, and only an embedded runtime this
module started is shut down, when its last user disconnects. A runtime someone else initialised is
left alone.

An embedded runtime announces itself in one line on the `gradserve.ray` logger (what starts, where
it listens, its auth mode) in place of Ray's own notice. `confine_embedded_ray_to_loopback()`,
called before Ray is imported, keeps every Ray listener of this machine's runtime on 127.0.0.1.
"""

from __future__ import annotations

import logging
import os
import sys
import threading

__all__ = ["RayRuntime", "DEFAULT_OBJECT_STORE_BYTES", "confine_embedded_ray_to_loopback",
           "embedded_ray_confined_to_loopback"]

# Enough for many parameter versions and gradients in flight, small enough for a laptop or CI box.
DEFAULT_OBJECT_STORE_BYTES = 512 * 1024 * 1024
LOOPBACK = "127.0.0.1"
# On Linux Ray replaces a node address of 127.0.0.1 by the machine's routable address and its C++
# servers (GCS, raylet, object manager, workers) listen on every interface; they listen on loopback
# only when the node address stays 127.0.0.1, which is Ray's single-machine mode (the default on
# macOS and Windows). Ray reads this switch once, when `ray` is imported.
_SINGLE_MACHINE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
# Ray's defaults when RAY_AUTH_MODE is unset: a new local runtime turns token authentication on and
# says so in a warning from this logger, which the announcement below replaces.
_AUTH_MODE_ENV = "RAY_AUTH_MODE"
_AUTH_NOTICE_LOGGER = "ray._private.authentication.authentication_token_setup"
announce = logging.getLogger("gradserve.ray")
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


def confine_embedded_ray_to_loopback() -> bool:
    """Make a runtime this process embeds later bind and advertise 127.0.0.1 only (no other machine
    can reach it or join it). Works only before `ray` is imported: returns whether it took effect."""
    if os.environ.get(_SINGLE_MACHINE_ENV) != "0":
        if "ray" in sys.modules:
            return False
        os.environ[_SINGLE_MACHINE_ENV] = "0"
    return True


def embedded_ray_confined_to_loopback() -> bool:
    return os.environ.get(_SINGLE_MACHINE_ENV) == "0"


def _auth_mode() -> str:
    mode = os.environ.get(_AUTH_MODE_ENV, "token").lower()
    return "token authentication" if mode == "token" else f"authentication {mode} ({_AUTH_MODE_ENV}={mode})"


def _start_embedded(ray, num_cpus: int, object_store_memory: int) -> None:
    confined = embedded_ray_confined_to_loopback()
    announce.info("starting the embedded Ray runtime: %d CPUs, %d MiB object store, listening on %s, %s "
                  "(takes a few seconds)", num_cpus, object_store_memory >> 20,
                  f"{LOOPBACK} only" if confined else "all interfaces", _auth_mode())
    notice = logging.getLogger(_AUTH_NOTICE_LOGGER)
    level = notice.level
    notice.setLevel(logging.ERROR)  # the mode is in the line above; Ray's default is kept
    try:
        ray.init(address="local", num_cpus=num_cpus, object_store_memory=object_store_memory,
                 include_dashboard=False, log_to_driver=False, configure_logging=False)
    finally:
        notice.setLevel(level)
    node_address = ray.get_runtime_context().gcs_address.rsplit(":", 1)[0]
    if confined and node_address != LOOPBACK:
        ray.shutdown()  # fail closed: a runtime asked to stay on loopback must not serve the network
        raise RuntimeError(f"the embedded Ray runtime advertises {node_address}, not {LOOPBACK}: "
                           "ray was imported before confine_embedded_ray_to_loopback()")
