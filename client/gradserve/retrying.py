"""The SDK's one retry policy: UNAVAILABLE is tried again with exponential backoff while the call's
time lasts; every other failure is raised at once as the exception tree's class."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable

import grpc

from .errors import Unavailable
from .rpc.status import from_rpc_error

__all__ = ["with_retries"]


def with_retries(attempt: Callable[[float], object], seconds: float, retries: int, backoff_s: float):
    """Run `attempt(seconds_left)` within `seconds`; up to `retries` more attempts after UNAVAILABLE."""
    deadline = time.monotonic() + seconds
    for attempt_number in itertools.count():
        try:
            return attempt(max(deadline - time.monotonic(), 0.001))
        except grpc.RpcError as failed:
            error = from_rpc_error(failed)
        pause = backoff_s * 2**attempt_number
        if not isinstance(error, Unavailable) or attempt_number >= retries or time.monotonic() + pause >= deadline:
            raise error
        time.sleep(pause)
