"""`gradserve bench links` runs end to end over shaped namespace links (a short run: the figures
are the benchmark's; the fields, the byte accounting and the clean-up are checked here). Skipped,
with the reason, where namespaces cannot be made."""

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gradserve_services import procfs
from gradserve_services.bench.links_site import SiteUnavailable, harness

pytestmark = [pytest.mark.integration, pytest.mark.slow]

FIELDS = {"suite", "config", "rate_mbit", "workers", "samples", "updates", "bytes_per_sample",
          "bytes_ratio_vs_sync", "link_bytes_per_sample", "link_bytes_ratio_vs_sync", "train_seconds",
          "target_loss", "seconds_to_target", "speedup_vs_sync", "eval_loss",
          "eval_loss_ratio_vs_sync", "test_accuracy", "test_accuracy_vs_sync_points"}


def _namespaces_here():
    """The namespace harness (tests/support/netns.py), or the test skipped with the reason
    namespaces cannot be made here."""
    try:
        netns, _ = harness()
    except SiteUnavailable as reason:
        pytest.skip(str(reason))
    try:
        netns.create().remove()  # can this machine make one?
    except netns.NamespacesUnavailable as reason:
        pytest.skip(f"cannot make network namespaces here: {reason}")
    return netns


def test_links_suite_runs_every_kind_of_configuration(tmp_path):
    netns = _namespaces_here()
    before = set(netns.namespace_names())
    # (a stuck call, seen under load, is re-run after 60 s, well inside the run's bound)
    with _bench_links(tmp_path, netns, "--json", "--steps", "10", "--configs", "sync,sync_powersgd_r4,local_h10",
                      "--eval-every", "5", "--eval-rows", "256", "--rate-mbit", "400",
                      "--call-timeout-s", "60") as (bench, _, log):
        try:
            code = bench.wait(timeout=RUN_BOUND_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running after {RUN_BOUND_S:.0f} s:\n{_stacks(bench, log)}")
    assert code == 0, log.read_text()[-3000:]
    lines = [json.loads(line) for line in (tmp_path / "stdout").read_text().splitlines() if line.startswith("{")]
    assert [line["config"] for line in lines] == ["sync", "sync_powersgd_r4", "local_h10"]
    sync, powersgd, local = lines
    for line in lines:
        assert set(line) == FIELDS and line["suite"] == "links" and line["samples"] == 2560
        assert line["link_bytes_per_sample"] > 0 and line["train_seconds"] > 0
    assert sync["bytes_ratio_vs_sync"] == 1.0 and sync["updates"] == 10
    # a round sends one delta where sync sends H gradients
    assert local["bytes_ratio_vs_sync"] == 10.0 and local["updates"] == 1
    # 784x512, 512x512 and 512x10 as rank-4 factors, 1,034 bias values as they are (float32)
    assert powersgd["bytes_ratio_vs_sync"] == round(669_706 / (4 * (1296 + 1024 + 522) + 1034), 2)
    assert set(netns.namespace_names()) <= before  # the run removed its namespaces


# ----- stopped by a signal ---------------------------------------------------------------------

RUN_MARK = "GRADSERVE_LINKS_TEST_RUN"  # in the environment of the run and of all it starts
STOP_BOUND_S = 120.0  # signal to exit, clean-up included
START_BOUND_S = 600.0  # the site built (and, for "training", the first configuration started)
RUN_BOUND_S = 420.0  # a short run to its end (34 s on a quiet machine), leaving the test's timeout
# room to stop what it started


def _marked_pids(mark: str) -> list[int]:
    """Live processes whose environment carries `RUN_MARK=mark`: the run and all it started, Ray's
    nodes and workers in the namespaces included (they inherit it), wherever they were reparented."""
    wanted = f"{RUN_MARK}={mark}".encode()
    found = []
    for pid in procfs.pids():
        try:
            with open(f"/proc/{pid}/environ", "rb") as handle:
                if wanted in handle.read().split(b"\0"):
                    found.append(pid)
        except OSError:
            continue
    return found


def _owned_namespaces(netns, pid: int) -> set[str]:
    """The namespaces whose owner marker (tests/support/netns.py) process `pid` holds open."""
    owned = set()
    try:
        entries = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return owned
    for entry in entries:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{entry}")
        except OSError:
            continue
        parent, name = os.path.split(os.path.dirname(target))
        if parent == netns.OWNERS_ROOT and os.path.basename(target) == "owner":
            owned.add(name)
    return owned


def _stacks(bench: subprocess.Popen, log: Path) -> str:
    """The run's log ending with every thread's stack (SIGUSR1: bench links writes them): where a
    stuck run waits."""
    before = len(log.read_text())
    try:
        os.kill(bench.pid, signal.SIGUSR1)
    except ProcessLookupError:  # it ended after all, between the wait giving up and now
        return log.read_text()[-3000:]
    deadline = time.monotonic() + 10.0
    while len(log.read_text()) == before and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)  # the rest of the dump
    text = log.read_text()
    return text[:before][-2000:] + text[before:][-8000:]


def _wait_for(condition, bench: subprocess.Popen, log: Path, what: str) -> None:
    deadline = time.monotonic() + START_BOUND_S
    while not condition():
        tail = log.read_text()[-3000:]
        assert bench.poll() is None, f"the run exited {bench.returncode} before {what}:\n{tail}"
        assert time.monotonic() < deadline, f"no {what} after {START_BOUND_S:.0f} s:\n{tail}"
        time.sleep(0.2)


@pytest.mark.parametrize("phase, signum", [("building", signal.SIGTERM), ("training", signal.SIGTERM),
                                           ("training", signal.SIGINT)],
                         ids=["building-SIGTERM", "training-SIGTERM", "training-SIGINT"])
def test_a_signal_stops_the_run_and_removes_its_site(phase, signum, tmp_path):
    """Stopped while it builds its site (namespaces made, the head node up, worker nodes starting)
    or while it trains, the run removes its namespaces and stops every process it started, then
    exits with 128 + the signal's number."""
    netns = _namespaces_here()
    workers = 2
    with _bench_links(tmp_path, netns, "--json", "--steps", "100000", "--configs", "sync", "--eval-every",
                      "100000", "--eval-rows", "256", "--rate-mbit", "400", "--workers", str(workers)) \
            as (bench, mark, log):
        _wait_for(lambda: len(_owned_namespaces(netns, bench.pid)) == workers, bench, log, "namespaces")
        spaces = _owned_namespaces(netns, bench.pid)
        if phase == "building":  # the head node's raylet is up: the run is starting its workers' nodes
            _wait_for(lambda: any("raylet" in procfs.cmdline(pid) for pid in _marked_pids(mark)),
                      bench, log, "head node")
        else:
            _wait_for(lambda: "links: sync" in log.read_text(), bench, log, "training")
        assert set(_marked_pids(mark)) - {bench.pid}, "the run has started nothing to clean up"
        bench.send_signal(signum)
        try:
            code = bench.wait(timeout=STOP_BOUND_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running {STOP_BOUND_S:.0f} s after {signum.name}:\n{_stacks(bench, log)}")
        assert not spaces & set(netns.namespace_names()), "namespaces left behind"
        assert _marked_pids(mark) == [], "processes left behind"
        assert code == 128 + signum, log.read_text()[-3000:]


@contextlib.contextmanager
def _bench_links(tmp_path: Path, netns, *args: str):
    """`gradserve bench links *args` in a session of its own, its stdout and stderr in files under
    `tmp_path`; yields `(process, mark, stderr log)`. Whatever happens, nothing of the run outlives
    the block: the process group, every process carrying its mark, and its namespaces."""
    mark, log = secrets.token_hex(8), tmp_path / "stderr.log"
    with open(log, "wb") as stderr, open(tmp_path / "stdout", "wb") as stdout:
        bench = subprocess.Popen([str(Path(sys.executable).parent / "gradserve"), "bench", "links", *args],
                                 stdout=stdout, stderr=stderr, env={**os.environ, RUN_MARK: mark},
                                 start_new_session=True)
    try:
        yield bench, mark, log
    finally:
        if bench.poll() is None:
            os.killpg(bench.pid, signal.SIGKILL)
            bench.wait(timeout=30)
        for pid in _marked_pids(mark):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        netns.remove_leftovers()  # the run's, now ownerless; those of live runs stay
