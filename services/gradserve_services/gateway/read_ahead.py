"""A request stream read one item ahead, in a thread of its own, so a handler can see whether the
next request has arrived while it still works on this one (StreamSteps begins the next step before
this one's end is waited for: cluster/trainer.py)."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

__all__ = ["ReadAhead"]

_PUT_POLL_S = 0.5  # how often a reader with a full queue looks whether its handler is gone


class ReadAhead:
    """Iterate it as `items` (an error `items` raised comes in its turn); `arrived()` is the next
    item where it has been read already, else None, without waiting. At most two items are held
    beyond the one the handler works on (and one in the reader's hands). `close()` (the handler
    is done) ends the reader."""

    def __init__(self, items: Iterator):
        # two: when the handler takes an item, the next one is in the queue already (one slot
        # would be refilled only once the reader thread runs again, after the handler looked)
        self._queue: queue.Queue = queue.Queue(maxsize=2)
        self._held: tuple | None = None  # taken from the queue by `arrived`, not yet iterated
        self._closed = threading.Event()
        self._reader = threading.Thread(target=self._read, args=(items,), name="read-ahead", daemon=True)
        self._reader.start()

    def _read(self, items: Iterator) -> None:
        try:
            for item in items:
                if not self._put(("item", item)):
                    return
        except BaseException as error:  # noqa: BLE001 - raised to the handler in its turn
            self._put(("error", error))
            return
        self._put(("end", None))

    def _put(self, entry: tuple) -> bool:
        while not self._closed.is_set():
            try:
                self._queue.put(entry, timeout=_PUT_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self):
        while True:
            kind, value = self._held if self._held is not None else self._queue.get()
            self._held = None
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value

    def arrived(self):
        """The next item if it is here already, else None (an error or the end: None too)."""
        if self._held is None:
            try:
                self._held = self._queue.get_nowait()
            except queue.Empty:
                return None
        kind, value = self._held
        return value if kind == "item" else None

    def close(self) -> None:
        self._closed.set()
