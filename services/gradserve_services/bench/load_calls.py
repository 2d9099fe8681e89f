"""The client side of the load suites: one session's life (create, steps, pull, close), every call
counted by its answer's status code, calls the server's cap refused (RESOURCE_EXHAUSTED) retried
after a short backoff, step latencies kept."""

from __future__ import annotations

import collections
import threading
import time

__all__ = ["Tally", "call", "train_session", "client_thread", "percentile", "BACKOFF_S", "FEATURES"]

BACKOFF_S = 0.02  # after RESOURCE_EXHAUSTED: the cap frees within one step's time
FEATURES, HIDDEN, CLASSES = 32, 64, 10  # the model every load client trains: small, so the service is measured


class Tally:
    """Answers by code and latencies of successful steps, shared by the client threads."""

    def __init__(self):
        self.lock = threading.Lock()
        self.codes: collections.Counter = collections.Counter()
        self.step_ms: list[float] = []
        self.steps_ok = 0

    def count(self, code: str) -> None:
        with self.lock:
            self.codes[code] += 1

    def step_done(self, began: float) -> None:
        with self.lock:
            self.step_ms.append((time.perf_counter() - began) * 1e3)
            self.steps_ok += 1

    def errors_by_code(self) -> dict[str, int]:
        with self.lock:
            return {code: n for code, n in self.codes.items() if code != "OK"}


def client_thread(tally: Tally, body, *args) -> threading.Thread:
    """A daemon thread running `body(*args)`; an exception that ends it early is counted under its
    type's name (so a broken client shows in `calls_by_code`, never as a quiet shortfall)."""

    def run() -> None:
        try:
            body(*args)
        except Exception as error:  # noqa: BLE001 - reported, not raised in a thread nobody joins on
            tally.count(type(error).__name__)

    return threading.Thread(target=run, daemon=True)


def call(tally: Tally, deadline: float, attempt):
    """`attempt()` until it succeeds or fails with anything but RESOURCE_EXHAUSTED (retried: the
    cap refused the call before it ran). Every answer is counted by its code; None on failure."""
    import gradserve

    while True:
        try:
            result = attempt()
        except gradserve.GradserveError as error:
            code = error.code.name if error.code is not None else "CLIENT"
            tally.count(code)
            if code != "RESOURCE_EXHAUSTED" or time.monotonic() > deadline:
                return None
            time.sleep(BACKOFF_S)
            continue
        tally.count("OK")
        return result


def train_session(client, tally: Tally, deadline: float, *, steps: int, workers: int, rows: int, seed: int,
                  rng) -> bool:
    """One session on `client`: create it, take `steps` steps of random batches from `rng`, pull its
    parameters, close it. False when it could not be created."""
    import numpy as np

    from gradserve import mlp

    session = call(tally, deadline, lambda: client.create_session(mlp(FEATURES, [HIDDEN], CLASSES), seed=seed,
                                                                  num_workers=workers))
    if session is None:
        return False
    for step_id in range(1, steps + 1):
        x = rng.standard_normal((rows, FEATURES)).astype(np.float32)
        y = rng.integers(0, CLASSES, rows)
        began = time.perf_counter()
        if call(tally, deadline, lambda: client.step(session, x, y, step_id=step_id)) is not None:
            tally.step_done(began)
    call(tally, deadline, lambda: client.pull_parameters(session))
    call(tally, deadline, lambda: client.close_session(session))
    return True


def percentile(sorted_values: list[float], fraction: float) -> float | None:
    if not sorted_values:
        return None
    index = min(len(sorted_values) - 1, max(0, round(fraction * (len(sorted_values) - 1))))
    return sorted_values[index]
