"""SIGTERM and SIGINT as an exception, so that a run stopped by either leaves the way a finished
one does: through its `finally` blocks and context managers, which remove what it made (network
namespaces, Ray nodes: by pid, each step bounded in time). Python's default ends the process at
SIGTERM without them, and `ray.init` puts in a SIGTERM handler of its own (`install()` again after
connecting to Ray).

The first signal raises in the main thread, wherever it is; further ones are ignored, so that
they cannot cut the clean-up short (SIGKILL still ends the process). Ray turns an exception raised
in its blocking calls into one of its own (KeyboardInterrupt, SystemExit(0)), so the block ends,
whatever is propagating, with `Stopped`: a SystemExit whose code is 128 + the signal's number, as
a shell reports a process the signal ended.
"""

from __future__ import annotations

import signal
import sys
from contextlib import contextmanager

__all__ = ["Stopped", "StopSignals", "stop_signals_raise", "STOP_SIGNALS"]

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stopped(SystemExit):
    def __init__(self, signum: int):
        super().__init__(128 + signum)
        self.signum = signum


class StopSignals:
    def __init__(self, what: str):
        self.what = what  # for the line on stderr
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        """Handle STOP_SIGNALS here (again, after something else replaced the handlers)."""
        for signum in STOP_SIGNALS:
            previous = signal.signal(signum, self._handle)
            self._previous.setdefault(signum, previous)

    def restore(self) -> None:
        for signum, previous in self._previous.items():
            if previous is not None:  # None: a handler not set from Python, which cannot be put back
                signal.signal(signum, previous)

    def _handle(self, signum, frame) -> None:
        if self.received is not None:
            return  # cleaning up already
        self.received = signum
        print(f"{self.what}: {signal.Signals(signum).name}: stopping, removing what the run made",
              file=sys.stderr, flush=True)
        raise Stopped(signum)


@contextmanager
def stop_signals_raise(what: str):
    """A block that SIGTERM and SIGINT stop with `Stopped` (raised into it, re-raised at its end)."""
    stop = StopSignals(what)
    stop.install()
    try:
        yield stop
    except BaseException:
        if stop.received is None:
            raise
        raise Stopped(stop.received) from None
    finally:
        stop.restore()
    if stop.received is not None:  # a call swallowed the exception: the run still stops
        raise Stopped(stop.received)
