"""The step ids a client hands out per session: the next unused id, moved past every id used, so a
retried step reuses its id and the service applies it at most once."""

from __future__ import annotations

from gradserve.v1 import service_pb2

from .fields import build

__all__ = ["StepIds"]


class StepIds:
    def __init__(self):
        self._next: dict[str, int] = {}

    def opened(self, session_id: str) -> None:
        self._next[session_id] = 1

    def closed(self, session_id: str) -> None:
        self._next.pop(session_id, None)

    def claim(self, session_id: str, step_id: int | None) -> int:
        """`step_id`, or the session's next one when None; either way the next moves past it."""
        if step_id is None:
            step_id = self._next.get(session_id, 1)
        else:  # checked as the header will hold it, before it moves this client's next id
            step_id = build(service_pb2.StepHeader, step_id=step_id).step_id
        self._next[session_id] = max(self._next.get(session_id, 1), step_id + 1)
        return step_id

    def numbered(self, session_id: str, batch) -> tuple:
        """`(step_id, x, y)` of a `(x, y)` or `(step_id, x, y)` batch."""
        if len(batch) == 3:
            step_id, x, y = batch
        else:
            (x, y), step_id = batch, None
        return self.claim(session_id, step_id), x, y
