"""What every fault case shares: the gateway process, the seeded training run, the audit of the
server's own records, and finding the real processes of Ray actors.

The audit reads what the service itself recorded, never what the client believes: a checkpoint of
the session holds the parameter server's apply log (one report per update key, with the version it
produced) and the final version. In sync mode each applied step bumps the version by exactly one,
so `updates_lost` (steps with no applied record) and `updates_applied_twice` (versions beyond the
distinct steps applied) are both read off that log.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import gradserve
from gradserve import mlp
from gradserve_services import procfs
from gradserve_services.checkpoint import load_checkpoint

from tests.support.serve_process import start_serve

__all__ = [
    "SPEC", "STEPS", "OPTIMIZER", "TOKEN", "OTHER_TOKEN", "Gateway", "batch", "train", "Audit", "audit",
    "actor_pids", "wait_for_proctitle", "when_computing", "wait_until", "kill_pid", "assert_same_parameters",
]

# Large enough that a worker's shard takes a few hundred ms (a window to kill it mid-step), small
# enough that a run of STEPS steps takes a couple of seconds. float64: equality is exact.
SPEC = mlp(32, [256, 256], 8)
ROWS = 4096
STEPS = 8
OPTIMIZER = {"name": "adam", "lr": 0.01}  # optimizer state must survive every fault too
SEED = 11
TOKEN = "faults-token-7c1d0e5b93a2"
OTHER_TOKEN = "faults-other-token-41e9a7c2"
_MIXING = np.random.default_rng(99).standard_normal((32, 8))


class Gateway:
    """The gateway process; `restart` kills it and starts a new one on the same port and folders."""

    def __init__(self, cluster, work_dir: Path, extra_args=()):
        self.cluster = cluster
        self.extra_args = list(extra_args)
        self.checkpoint_dir = work_dir / "checkpoints"
        self.tokens = work_dir / "tokens"
        self.tokens.write_text(f"trainer:{TOKEN}\nother:{OTHER_TOKEN}\n")
        self.log_path = work_dir / "serve.log"
        self.server = self._start(port=0)

    def _start(self, port: int):
        return start_serve(self.log_path, [
            "--ray-address", self.cluster.address, "--workers", "2", "--auth-tokens-file", str(self.tokens),
            "--checkpoint-dir", str(self.checkpoint_dir), "--grace-s", "5", *self.extra_args,
        ], env=self.cluster.env, port=port)

    @property
    def target(self) -> str:
        return self.server.target

    def client(self, target: str | None = None, **options) -> gradserve.Client:
        return gradserve.Client(target or self.target, token=TOKEN, timeout=120, **options)

    def restart_after_kill(self) -> None:
        port = self.server.serving["port"]
        self.server.kill()
        self.server = self._start(port=port)

    def metric(self, name: str) -> float:
        """Sum of a counter's samples on the current gateway's exporter."""
        url = f"http://127.0.0.1:{self.server.serving['metrics_port']}/metrics"
        body = urllib.request.urlopen(url, timeout=10).read().decode()
        return sum(float(line.rsplit(" ", 1)[1]) for line in body.splitlines()
                   if line.startswith(name) and not line.startswith("#"))


def batch(step_id: int):
    rng = np.random.default_rng(1000 + step_id)
    x = rng.standard_normal((ROWS, SPEC["input_features"]))
    return x, np.argmax(x @ _MIXING, axis=1).astype(np.int64)


def new_session(client: gradserve.Client, *, num_workers: int = 2, checkpoint_every_steps: int = 0) -> str:
    return client.create_session(SPEC, optimizer=OPTIMIZER, seed=SEED, dtype="float64",
                                 num_workers=num_workers, checkpoint_every_steps=checkpoint_every_steps)


def train(client: gradserve.Client, session: str, *, fault_at: int | None = None, fault=None,
          first: int = 1, last: int = STEPS, make_batch=None) -> dict[int, gradserve.StepResult]:
    """Steps first..last, one batch each, step id = step number. From `fault_at` on, a step runs in
    a thread while `fault()` strikes, until it has struck once (a fault that returns False found
    nothing in flight to strike, e.g. the shards were done before it looked); the step must still
    complete (the SDK retries UNAVAILABLE with the same step id). `make_batch(step_id)`: another
    model's batches."""
    results = {}
    pending = fault is not None
    for step_id in range(first, last + 1):
        x, y = (make_batch or batch)(step_id)
        if not pending or fault_at is None or step_id < fault_at:
            results[step_id] = client.step(session, x, y, step_id=step_id)
            continue
        outcome: dict = {}

        def run_step():
            try:
                outcome["result"] = client.step(session, x, y, step_id=step_id)
            except BaseException as error:  # noqa: BLE001 - re-raised in the test thread
                outcome["error"] = error

        runner = threading.Thread(target=run_step)
        runner.start()
        pending = fault() is False
        runner.join(timeout=300)
        assert not runner.is_alive(), f"step {step_id} did not finish after the fault"
        if "error" in outcome:
            raise outcome["error"]
        results[step_id] = outcome["result"]
    assert not pending, f"the fault found no step in flight in steps {fault_at}..{last}"
    return results


@dataclass
class Audit:
    version: int
    updates_lost: int
    updates_applied_twice: int
    applied_versions: dict[int, int]  # step id -> version its update produced
    parameters: dict[str, np.ndarray]


def audit(client: gradserve.Client, session: str, checkpoint_dir: Path, steps: int = STEPS) -> Audit:
    """The session's own records, from a checkpoint the service writes now."""
    saved = client.save_checkpoint(session)
    arrays, meta = load_checkpoint(checkpoint_dir / session / saved.name)
    server_log = meta["table"]["log"]  # the parameter server's apply log (ps_shards=1)
    applied = {int(key): report["version"] for key, report in server_log.items() if report["applied"]}
    lost = sum(1 for step_id in range(1, steps + 1) if step_id not in applied)
    twice = meta["version"] - len(applied)
    parameters = {key[len("param/"):]: value for key, value in arrays.items() if key.startswith("param/")}
    return Audit(meta["version"], lost, twice, applied, parameters)


def assert_exactly_once(result: Audit, steps: int = STEPS) -> None:
    assert result.updates_lost == 0
    assert result.updates_applied_twice == 0
    assert result.version == steps
    # sync mode: step n's update produced version n, whatever happened in between
    assert result.applied_versions == {step_id: step_id for step_id in range(1, steps + 1)}


def assert_same_parameters(got: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert set(got) == set(expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)


# ----- real processes ----------------------------------------------------------------------------

def actor_pids(actor_class: str, ray_sid: int) -> list[int]:
    """Pids of the live Ray actor processes of `actor_class` started by the `ray start` whose
    process-session id is `ray_sid` (a raylet's workers stay in its session)."""
    return sorted(pid for pid in procfs.pids()
                  if procfs.cmdline(pid).startswith(f"ray::{actor_class}") and procfs.session_id(pid) == ray_sid)


def wait_for_proctitle(pids, fragment: str, timeout_s: float = 60.0) -> int:
    """The first process whose title contains `fragment` (Ray titles an actor process
    `ray::Class.method` while the method runs): how a test knows a step is in flight there.
    `pids` is a list, or a callable listing the candidates afresh on every poll (an actor pool
    that may still be changing: actors of a closed session exiting, new ones starting)."""
    listing = pids if callable(pids) else (lambda: pids)
    deadline = time.monotonic() + timeout_s
    candidates, listed_at = listing(), time.monotonic()
    while time.monotonic() < deadline:
        for pid in candidates:
            if fragment in procfs.cmdline(pid):
                return pid
        time.sleep(0.002)
        # a listing scans /proc: refreshed now and then, titles polled in between
        if callable(pids) and time.monotonic() - listed_at > 0.05:
            candidates, listed_at = listing(), time.monotonic()
    raise AssertionError(f"none of {candidates} showed {fragment!r} within {timeout_s} s")


def when_computing(pids, action, timeout_s: float = 10.0) -> bool:
    """Run `action(pid)` as soon as one of `pids` (a list, or a callable listing them afresh)
    computes a shard; False if none did within `timeout_s` (for `train`: strike at a later step)."""
    try:
        pid = wait_for_proctitle(pids, "GradientWorker.compute", timeout_s)
    except AssertionError:
        return False
    action(pid)
    return True


def wait_until(condition, timeout_s: float, what: str) -> None:
    """Poll `condition()` until it holds; AssertionError naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s} s: {what}")
        time.sleep(0.1)


def kill_pid(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and procfs.cmdline(pid):
        time.sleep(0.02)
