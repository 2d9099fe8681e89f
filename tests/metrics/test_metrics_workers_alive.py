"""`gradserve_workers_alive` as a real scrape shows it while a real service trains: the gateway over
an embedded Ray runtime, a client over gRPC, the exporter over HTTP. The gauge follows the worker
pool (created, grown by a session, a worker SIGKILLed and replaced, shrunk, shut down) and equals
the number of Ray worker processes that are running."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gradserve import Client, mlp
from gradserve_services import metrics, procfs
from gradserve_services.cluster import RayExecutor
from gradserve_services.gateway import create_server
from tests.support.promtool import scrape

pytestmark = pytest.mark.integration  # hangs are caught by the suite-wide timeout (pyproject)

WAIT_S = 120.0  # actor start-up on a busy machine
SPEC = mlp(8, [16], 3)


def workers_alive(port: int) -> float:
    for family in text_string_to_metric_families(scrape(f"http://127.0.0.1:{port}/metrics")):
        if family.name == "gradserve_workers_alive":
            return family.samples[0].value
    raise AssertionError("gradserve_workers_alive not exposed")


def worker_processes() -> list[int]:
    """Pids of this process's Ray worker actors (Ray titles them `ray::GradientWorker...`)."""
    return [pid for pid in procfs.descendants(os.getpid()) if "ray::GradientWorker" in procfs.cmdline(pid)]


def settles_at(port: int, expected: int) -> bool:
    """Whether, within WAIT_S, the scraped gauge and the running worker processes both show `expected`."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if workers_alive(port) == expected and len(worker_processes()) == expected:
            return True
        time.sleep(0.1)
    return False


class Scraper(threading.Thread):
    """Scrapes the gauge as often as it can until stopped; keeps every value seen."""

    def __init__(self, port: int):
        super().__init__(daemon=True)
        self.port, self.seen, self.halt = port, [], threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            self.seen.append(workers_alive(self.port))

    def stop(self) -> list[float]:
        self.halt.set()
        self.join(timeout=30)
        return self.seen


def batch(rng, rows=12):
    return rng.standard_normal((rows, 8)).astype(np.float32), rng.integers(0, 3, rows)


def test_a_scrape_during_training_shows_the_workers_alive():
    rng = np.random.default_rng(0)
    metrics_port = metrics.start_metrics_server(0)
    executor = RayExecutor(num_workers=2, num_cpus=4, object_store_memory=256 * 1024 * 1024)
    server = None
    try:
        server, port = create_server(executor)
        assert workers_alive(metrics_port) == 2 == len(worker_processes())  # the pool as created

        with Client(f"127.0.0.1:{port}", timeout=WAIT_S) as client:
            session = client.create_session(SPEC, seed=0, num_workers=3)
            for step_id in range(1, 4):
                client.step(session, *batch(rng), step_id=step_id)
            assert workers_alive(metrics_port) == 3 == len(worker_processes())  # grown for the session

            victim = worker_processes()[0]
            os.kill(victim, signal.SIGKILL)
            deadline = time.monotonic() + WAIT_S
            while victim in procfs.pids() and time.monotonic() < deadline:
                time.sleep(0.01)
            scraper = Scraper(metrics_port)
            scraper.start()
            try:
                # The next step finds the worker gone, re-runs its shard, and the pool replaces it.
                result = client.step(session, *batch(rng), step_id=4)
                assert result.version == 4
                assert settles_at(metrics_port, 3)
            finally:
                seen = scraper.stop()
            assert 2 in seen and seen[-1] == 3, seen  # the loss showed until the replacement ran

            client.close_session(session)
        assert settles_at(metrics_port, 2)  # the session's extra worker stopped
    finally:
        if server is not None:
            server.stop(5)
        executor.shutdown()
        try:
            assert workers_alive(metrics_port) == 0
        finally:
            metrics.stop_metrics_server(metrics_port)
