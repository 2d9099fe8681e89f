"""End to end, real parts only: a separate Ray cluster (`ray start --head` plus a second node),
`gradserve serve --ray-address` as its own process, a real Prometheus scraping it, and a short
`gradserve train --target` job. Afterwards Prometheus' HTTP API shows the samples processed and
every dashboard query returns data. Everything is stopped by pid, bounded in time."""

from __future__ import annotations

import json
import threading
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import gradserve

from tests.support import prometheus
from tests.support.dashboard import dashboard_queries, expand_grafana_variables
from tests.support.ray_cluster import running_cluster

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
GRADSERVE = str(Path(sys.executable).with_name("gradserve"))
TOKEN = "e2e-token-5f0c2a9d41b7e3"
SERVE_START_TIMEOUT_S = 180
TRAIN_TIMEOUT_S = 420
EPOCHS = 2
BATCH_SIZE = 64


def start_gateway(ray_env: dict, ray_address: str, tmp_path: Path) -> tuple[subprocess.Popen, dict]:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"e2e:{TOKEN}\n")
    process = subprocess.Popen(
        [GRADSERVE, "serve", "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0",
         "--ray-address", ray_address, "--workers", "2", "--auth-tokens-file", str(tokens),
         "--checkpoint-dir", str(tmp_path / "server-checkpoints"), "--grace-s", "10"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=open(tmp_path / "serve.log", "wb"), text=True,
        env={**os.environ, **ray_env}, start_new_session=True,
    )
    # readline blocks; a timer kills the process if start-up hangs, which ends the read.
    watchdog = threading.Timer(SERVE_START_TIMEOUT_S, process.kill)
    watchdog.start()
    try:
        line = process.stdout.readline()
    finally:
        watchdog.cancel()
    if not line:
        stop_gateway(process)
        pytest.fail(f"gradserve serve did not start:\n{(tmp_path / 'serve.log').read_text()[-4000:]}")
    return process, json.loads(line)


def stop_gateway(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


def test_training_job_on_a_separate_cluster_is_visible_in_prometheus(tmp_path):
    with running_cluster(num_cpus=2, extra_nodes=1) as cluster:
        gateway, serving = start_gateway(cluster.env, cluster.address, tmp_path)
        try:
            assert serving["host"] == "127.0.0.1"
            target = f"127.0.0.1:{serving['port']}"
            with prometheus.running([f"127.0.0.1:{serving['metrics_port']}"]) as prom:
                # Rates need samples from during the job: start it only once Prometheus scrapes.
                prometheus.wait_for_data(prom.url, "up == 1", timeout_s=60)
                job = subprocess.run(
                    [GRADSERVE, "train", "examples/digits_mlp.yaml", "--target", target, "--token", TOKEN,
                     "--epochs", str(EPOCHS), "--batch-size", str(BATCH_SIZE), "--workers", "2",
                     "--out", str(tmp_path / "job"), "--checkpoint-dir", str(tmp_path / "job-checkpoints"),
                     "--no-progress"],
                    cwd=REPO, capture_output=True, text=True, timeout=TRAIN_TIMEOUT_S,
                )
                assert job.returncode == 0, job.stderr[-4000:]
                summary = json.loads(job.stdout.strip().splitlines()[-1])
                assert summary["epochs"] == EPOCHS and summary["steps"] > 0
                # Two epochs of a seeded MLP on digits are already far better than chance (0.1).
                assert summary["test_accuracy"] > 0.5

                # One caller mistake, so the "RPC errors by code" panel has something real to show.
                with gradserve.Client(target, token=TOKEN, timeout=30) as client:
                    with pytest.raises(gradserve.NotFound):
                        client.pull_parameters("no-such-session")

                train_rows = round(1797 * 0.8)
                # Every training sample of every epoch went through the cluster (the filter keeps the
                # series only once a scrape after the job's last step shows the full count).
                expected = EPOCHS * (train_rows - BATCH_SIZE)
                prometheus.wait_for_data(prom.url, f"gradserve_samples_processed_total >= {expected}", timeout_s=60)
                for title, expr in dashboard_queries():
                    result = prometheus.wait_for_data(prom.url, expand_grafana_variables(expr), timeout_s=60)
                    assert prometheus.has_finite_value(result), f"dashboard panel {title!r}: {expr}"
        finally:
            stop_gateway(gateway)
        assert gateway.returncode == 0, (tmp_path / "serve.log").read_text()[-4000:]
