"""`gradserve serve` as a real process on embedded Ray: gRPC -> Ray workers -> parameter server,
metrics exported, SIGTERM drains in-flight calls and exits 0."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np
import pytest

import gradserve
from gradserve import mlp
from gradserve_services.cluster import LocalExecutor, TrainerConfig
from gradserve_services.engine import Model

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = pathlib.Path(__file__).resolve().parents[2]
SPEC = mlp(8, [16], 3)
TOKEN = "ray-test-token-0123456789"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tokens = tmp_path_factory.mktemp("auth") / "tokens"
    tokens.write_text(f"tester:{TOKEN}\n")
    process = subprocess.Popen(
        [str(pathlib.Path(sys.executable).parent / "gradserve"), "serve", "--port", "0", "--metrics-port", "0",
         "--workers", "2", "--auth-tokens-file", str(tokens), "--grace-s", "60",
         "--checkpoint-dir", str(tmp_path_factory.mktemp("checkpoints"))],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "RAY_DASHBOARD_ENABLED": "0"},
    )
    line = process.stdout.readline()
    if not line:
        process.kill()
        pytest.fail(f"serve exited: {process.stderr.read()[-3000:]}")
    event = json.loads(line)
    assert event["event"] == "serving" and event["port"] > 0
    yield process, event
    if process.poll() is None:
        process.kill()
        process.wait()


def data(rows=32, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((rows, 8)).astype(np.float32), (np.arange(rows) % 3).astype(np.int64)


def test_gradients_and_steps_on_ray_equal_in_process(served):
    _, event = served
    params = Model(SPEC).init_parameters(seed=5)
    local = LocalExecutor(num_workers=2)  # same sharding as the served RayExecutor
    with gradserve.Client(f"127.0.0.1:{event['port']}", token=TOKEN, timeout=120) as client:
        x, y = data()
        remote = client.compute_gradients(SPEC, params, x, y)
        expected = local.compute_gradients(SPEC, params, x, y)
        assert remote.loss == expected["loss"]
        for name, gradient in expected["grads"].items():
            np.testing.assert_array_equal(remote.gradients[name], gradient)

        optimizer = {"name": "adam", "lr": 0.01}
        session = client.create_session(SPEC, params, optimizer=optimizer, num_workers=2)
        trainer = local.create_trainer(TrainerConfig(SPEC, optimizer, num_workers=2), params)
        for step in range(1, 4):
            assert client.step(session, *data(seed=step)).loss == trainer.step(step, *data(seed=step)).loss
        assert client.step(session, *data(seed=3), step_id=3).duplicate
        version, pulled = client.pull_parameters(session)
        assert version == 3
        for name, value in trainer.parameters()[1].items():
            np.testing.assert_array_equal(pulled[name], value)
        assert client.save_checkpoint(session).version == 3
        client.close_session(session)
    local.shutdown()


def test_metrics_exported(served):
    _, event = served
    body = urllib.request.urlopen(f"http://127.0.0.1:{event['metrics_port']}/metrics", timeout=10).read().decode()
    assert 'gradserve_rpc_requests_total{code="OK",method="Step"}' in body
    assert "gradserve_step_duration_seconds_count" in body


def test_sigterm_finishes_in_flight_call_then_exits_zero(served):
    process, event = served
    target = f"127.0.0.1:{event['port']}"
    spec = mlp(256, [1024, 1024], 10)
    params = Model(spec).init_parameters(seed=0)
    x = np.random.default_rng(0).standard_normal((4096, 256)).astype(np.float32)
    y = np.arange(4096) % 10
    outcome = {}
    started = threading.Event()

    def long_call():
        with gradserve.Client(target, token=TOKEN, timeout=120, retries=0) as client:
            started.set()
            outcome["result"] = client.compute_gradients(spec, params, x, y)

    caller = threading.Thread(target=long_call)
    caller.start()
    started.wait()
    time.sleep(0.3)  # the call is on the server now
    process.send_signal(signal.SIGTERM)
    caller.join(timeout=480)
    assert np.isfinite(outcome["result"].loss)
    assert process.wait(timeout=120) == 0
