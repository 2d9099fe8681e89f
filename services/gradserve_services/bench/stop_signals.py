"""SIGTERM and SIGINT as an exception, so that a run stopped by either leaves the way a finished
one does: through its `finally` blocks and context managers, which remove what it made (network
namespaces, Ray nodes: by pid, each step bounded in time). Python's default ends the process at
SIGTERM without them, and `ray.init` puts in a SIGTERM handler of its own (`install()` again after
connecting to Ray).

The first signal raises in the main thread, wherever it is; further ones are ignored, so that they
cannot cut the clean-up short (SIGKILL still ends the process). Ray turns an exception raised in
its blocking calls into one of its own (KeyboardInterrupt, SystemExit(0)), so the block ends,
whatever is propagating, with `Stopped`: a SystemExit whose code is 128 + the signal's number, as a
shell reports a process the signal ended.

The way out may block: code the exception passes through can wait on Ray without a timeout (a step
reading its calls' outcomes before it re-raises). So the first signal also arms a last resort: if
the block is still running `grace_s` later, another thread calls the removals registered with
`last_resort` (they kill by pid, bounded in time) and ends the process with the same code.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from contextlib import contextmanager
from typing import Callable

__all__ = ["Stopped", "StopSignals", "stop_signals_raise", "STOP_SIGNALS", "STOP_GRACE_S"]

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# Long enough for the usual way out (trainers closed, Ray disconnected: 6-12 s on a busy 2-core
# machine), short enough that a stuck one does not keep a supervisor waiting. A removal already
# under way when it runs out is not cut short: the last resort waits for it (links_site.py).
STOP_GRACE_S = 20.0


class Stopped(SystemExit):
    def __init__(self, signum: int):
        super().__init__(128 + signum)
        self.signum = signum


class StopSignals:
    def __init__(self, what: str, grace_s: float = STOP_GRACE_S):
        self.what = what  # names the run in its lines on stderr
        self.grace_s = grace_s
        self.received: int | None = None
        self._previous: dict[int, object] = {}
        self._removals: list[Callable[[], None]] = []
        self._ended = threading.Event()

    def install(self) -> None:
        """Handle STOP_SIGNALS here (again, after something else replaced the handlers)."""
        for signum in STOP_SIGNALS:
            previous = signal.signal(signum, self._handle)
            self._previous.setdefault(signum, previous)

    def restore(self) -> None:
        for signum, previous in self._previous.items():
            if previous is not None:  # None: a handler not set from Python, which cannot be put back
                signal.signal(signum, previous)

    def last_resort(self, remove: Callable[[], None]) -> None:
        """`remove` (safe to call from another thread, and twice) runs if the block is still
        running `grace_s` after a stop signal; later registrations run first."""
        self._removals.append(remove)

    def _handle(self, signum, frame) -> None:
        if self.received is not None:
            return  # cleaning up already
        self.received = signum
        self._say(f"{signal.Signals(signum).name}: stopping, removing what the run made")
        threading.Thread(target=self._overdue, name="stop-last-resort", daemon=True).start()
        raise Stopped(signum)

    def _overdue(self) -> None:
        if self._ended.wait(self.grace_s) or not self._removals:
            return  # ended in time; or nothing to remove here, and the block's own steps are bounded
        self._say(f"still stopping after {self.grace_s:.0f} s: removing the rest by pid, then exiting")
        for remove in reversed(self._removals):
            try:
                remove()
            except BaseException as error:  # noqa: BLE001 - the others must run still
                self._say(f"last-resort removal failed: {error!r}")
        os._exit(128 + self.received)

    def _say(self, line: str) -> None:
        print(f"{self.what}: {line}", file=sys.stderr, flush=True)


@contextmanager
def stop_signals_raise(what: str, grace_s: float = STOP_GRACE_S):
    """A block that SIGTERM and SIGINT stop with `Stopped` (raised into it, re-raised at its end)."""
    stop = StopSignals(what, grace_s)
    stop.install()
    try:
        yield stop
    except BaseException:
        if stop.received is None:
            raise
        raise Stopped(stop.received) from None
    finally:
        stop._ended.set()
        stop.restore()
    if stop.received is not None:  # a call swallowed the exception: the run still stops
        raise Stopped(stop.received)
