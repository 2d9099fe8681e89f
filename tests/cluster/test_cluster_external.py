"""RayExecutor attached to a separate Ray cluster started with `ray start --head` (its own
processes), stopped by process group in a finally, bounded in time.

The driver runs in a child process with the cluster's environment (its auth token): Ray keeps
authentication state per process, so driving a second cluster from the test process would leak
into every later test that starts an embedded runtime.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from gradserve_services.cluster import LocalExecutor, TrainerConfig
from gradserve_services.engine import Model
from tests.support.ray_cluster import running_cluster

from .helpers import MLP_SPEC, batches

pytestmark = pytest.mark.integration  # hangs are caught by the suite-wide timeout (pyproject)

DRIVER = r"""
import json, os, sys
import ray
from gradserve_services.cluster import RayExecutor, TrainerConfig
from gradserve_services.engine import Model
from tests.cluster.helpers import MLP_SPEC, batches

address = sys.argv[1]
params = Model(MLP_SPEC).init_parameters(seed=1, dtype="float64")
executor = RayExecutor(address=address, num_workers=2)
try:
    connected_to = ray.get_runtime_context().gcs_address
    trainer = executor.create_trainer(
        TrainerConfig(MLP_SPEC, {"name": "adam", "lr": 0.01}, num_workers=2), params)
    results = [trainer.step(i, x, y) for i, (x, y) in enumerate(batches(4, 30))]
    version, trained = trainer.parameters()
    pids = sorted({executor._backend.get(w.pid.remote()) for w in executor._backend.workers(2)})
finally:
    executor.shutdown()
print(json.dumps({"address": connected_to, "version": version, "pids": pids,
                  "driver_pid": os.getpid(), "still_connected": ray.is_initialized(),
                  "samples": [r.samples for r in results],
                  "params": {name: value.tolist() for name, value in trained.items()}}))
"""


def test_training_on_an_existing_cluster():
    with running_cluster(num_cpus=2) as cluster:
        finished = subprocess.run(
            [sys.executable, "-c", DRIVER, cluster.address], capture_output=True, text=True,
            timeout=180, cwd=os.getcwd(), env={**os.environ, **cluster.env,
                                               "PYTHONPATH": os.getcwd()})
    assert finished.returncode == 0, finished.stderr[-3000:]
    report = json.loads(finished.stdout.strip().splitlines()[-1])
    assert report["address"] == cluster.address and not report["still_connected"]
    assert report["version"] == 4 and report["samples"] == [30] * 4
    assert len(report["pids"]) == 2 and report["driver_pid"] not in report["pids"]
    params = Model(MLP_SPEC).init_parameters(seed=1, dtype="float64")
    with LocalExecutor(2) as local:
        trainer = local.create_trainer(
            TrainerConfig(MLP_SPEC, {"name": "adam", "lr": 0.01}, num_workers=2), params)
        for i, (x, y) in enumerate(batches(4, 30)):
            trainer.step(i, x, y)
        _, expected = trainer.parameters()
    for name, value in expected.items():
        np.testing.assert_allclose(np.array(report["params"][name]), value, rtol=1e-12, atol=1e-15)
