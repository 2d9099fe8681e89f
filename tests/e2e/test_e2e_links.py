"""Training over a real slow link: two Ray worker nodes, each in a network namespace of its own
behind a tc token bucket (bench/links_site.py over tests/support/netns.py), the coordinator and
the parameter servers on this machine. Sync and local rounds both train the same task; what the
links carried (their interface counters) shows local rounds moving parameters and deltas once a
round, the batches' rows every step; the namespaces are gone afterwards. Skipped, with the reason,
where namespaces cannot be made.

The driver runs in a child process with the cluster's environment (its auth token): Ray keeps
authentication state per process, so driving this cluster from the test process would fail after
any earlier test's embedded runtime, and leak into every later one."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from gradserve_services.bench.links_site import SiteUnavailable, far_site, harness

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

RATE_MBIT = 20.0
PARAMETERS = 9476  # mlp(32, [256], 4): 37 KB a float32 copy
ROWS, H, ROUNDS = 64, 8, 3  # samples per inner step, inner steps per round, rounds

# A call of a step that outlives this is stuck (a worker node that missed Ray's health checks under
# load, a replacement with no CPU to start on) and is re-run elsewhere, well inside the run's bound.
CALL_TIMEOUT_S = 60
RUN_TIMEOUT_S = 480
DUMP_AFTER_S = RUN_TIMEOUT_S - 30  # every thread's stack to stderr, for the failure to show

DRIVER = r"""
import faulthandler, json, sys
import numpy as np
from gradserve import mlp
from gradserve_services.bench.links_site import FarSite
from gradserve_services.cluster import RayExecutor, TrainerConfig
from gradserve_services.cluster.config import OUTER_OPTIMIZER
from gradserve_services.engine import Model

site = FarSite(**json.loads(sys.argv[1]))
ROWS, H, ROUNDS, CALL_TIMEOUT_S, DUMP_AFTER_S = (int(value) for value in sys.argv[2:7])
faulthandler.dump_traceback_later(DUMP_AFTER_S)
SPEC = mlp(32, [256], 4)


def batches(count, seed=0):
    rng = np.random.default_rng(seed)
    teacher = rng.standard_normal((32, 4))
    out = []
    for _ in range(count):
        x = rng.standard_normal((ROWS, 32)).astype(np.float32)
        out.append((x, np.argmax(x @ teacher, axis=1).astype(np.int64)))
    return out


def train(executor, config, steps):
    params = Model(SPEC).init_parameters(seed=0, dtype="float32")
    trainer = executor.create_trainer(config, params)
    try:
        before = site.link_bytes()
        results = [trainer.step(index, *batch) for index, batch in enumerate(steps)]
        return results, site.link_bytes() - before, trainer.parameters()[1]
    finally:
        trainer.close()


executor = RayExecutor(address=site.address, num_workers=2)
try:
    inner = batches(H * ROUNDS)
    sync, sync_link, _ = train(
        executor, TrainerConfig(SPEC, {"name": "adamw", "lr": 0.01}, num_workers=2,
                                call_timeout_s=CALL_TIMEOUT_S), inner)
    rounds = [(np.concatenate([x for x, _ in inner[r * H:(r + 1) * H]]),
               np.concatenate([y for _, y in inner[r * H:(r + 1) * H]])) for r in range(ROUNDS)]
    local, local_link, params = train(
        executor, TrainerConfig(SPEC, OUTER_OPTIMIZER, consistency="local", local_steps=H,
                                inner_optimizer={"name": "adamw", "lr": 0.01}, num_workers=2,
                                call_timeout_s=CALL_TIMEOUT_S),
        rounds)
finally:
    executor.shutdown()
print(json.dumps({
    "sync_link": sync_link, "local_link": local_link,
    "local_versions": [r.version for r in local], "local_losses": [r.loss for r in local],
    "params_finite": all(bool(np.isfinite(value).all()) for value in params.values()),
    "sync_samples": sum(r.samples for r in sync), "local_samples": sum(r.samples for r in local),
    "sync_bytes": sum(r.bytes_compressed for r in sync),
    "local_bytes": sum(r.bytes_compressed for r in local)}))
"""


def test_sync_and_local_rounds_over_shaped_links():
    netns, _ = harness()
    others = set(netns.namespace_names())
    try:
        with far_site(workers=2, rate_mbit=RATE_MBIT) as site:
            made = set(netns.namespace_names()) - others
            described = {"address": site.address, "env": site.env, "rate_mbit": site.rate_mbit,
                         "interfaces": site.interfaces}
            try:
                finished = subprocess.run(
                    [sys.executable, "-c", DRIVER, json.dumps(described),
                     *map(str, (ROWS, H, ROUNDS, CALL_TIMEOUT_S, DUMP_AFTER_S))],
                    capture_output=True, text=True, timeout=RUN_TIMEOUT_S, cwd=os.getcwd(),
                    env={**os.environ, **site.env})
            except subprocess.TimeoutExpired as late:  # killed: its stacks say where it waited
                stderr = late.stderr.decode(errors="replace") if isinstance(late.stderr, bytes) else late.stderr
                pytest.fail(f"the run took over {RUN_TIMEOUT_S} s; its stderr ends:\n{(stderr or '')[-6000:]}")
    except SiteUnavailable as reason:
        pytest.skip(str(reason))
    assert finished.returncode == 0, finished.stderr[-3000:]
    report = json.loads(finished.stdout.strip().splitlines()[-1])
    assert len(made) == 2 and not made & set(netns.namespace_names())  # removed after
    assert report["local_versions"] == [1, 2, 3]
    assert report["local_losses"][-1] < report["local_losses"][0]
    assert report["params_finite"]
    assert report["sync_samples"] == report["local_samples"] == ROWS * H * ROUNDS
    # sync: parameters down and a gradient up per worker and step; local: once per round
    assert report["local_bytes"] * H == report["sync_bytes"]
    assert report["sync_link"] > 2 * 2 * PARAMETERS * 4 * H * ROUNDS  # both workers, both ways, every step
    assert report["local_link"] < report["sync_link"] / 2
