"""Steps over one StreamSteps call, resumed after UNAVAILABLE: the unanswered steps are sent again
with the same ids (the service applies each step id at most once)."""

from __future__ import annotations

import collections
import itertools
import time
from collections.abc import Callable, Iterator

import grpc

from .requests import step_messages
from .results import StepResult, step_result
from .rpc.status import from_rpc_error

__all__ = ["stream_steps"]


def stream_steps(call: Callable, session_id: str, numbered: Iterator[tuple], *, timeout, metadata,
                 retries: int, backoff_s: float) -> Iterator[StepResult]:
    """One result per `(step_id, x, y)` of `numbered`, in order, over `call` (the stub's StreamSteps)."""
    unanswered: collections.deque = collections.deque()
    attempts_left = retries
    refused: list[Exception] = []
    while True:
        replay = list(unanswered)

        def requests():
            # gRPC reads this in a thread of its own, where an exception only cancels the call:
            # a bad step (or whatever `batches` raised) ends the stream before any of its
            # messages, and is raised to the caller once the steps before it are answered.
            try:
                for step in itertools.chain(replay, _record(numbered, unanswered)):
                    yield from step_messages(session_id, *step)
            except Exception as error:  # noqa: BLE001 - re-raised below, in the caller's thread
                refused.append(error)

        try:
            for reply in call(requests(), timeout=timeout, metadata=metadata):
                if unanswered and unanswered[0][0] == reply.step_id:
                    unanswered.popleft()
                yield step_result(reply)
            if refused:
                raise refused[0]
            return
        except grpc.RpcError as failed:
            if failed.code() != grpc.StatusCode.UNAVAILABLE or attempts_left <= 0:
                raise from_rpc_error(failed) from None
            attempts_left -= 1
            time.sleep(backoff_s)


def _record(steps: Iterator[tuple], unanswered: collections.deque) -> Iterator[tuple]:
    for step in steps:
        unanswered.append(step)
        yield step
