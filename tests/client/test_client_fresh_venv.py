"""The SDK installs into a fresh venv holding only grpcio, protobuf and numpy, and works there."""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from gradserve import mlp
from gradserve_services.cluster import LocalExecutor
from gradserve_services.engine import Model
from gradserve_services.gateway import create_server

REPO = pathlib.Path(__file__).resolve().parents[2]
SPEC = mlp(5, [7], 3)

PROBE = textwrap.dedent("""
    import importlib.util, json, sys
    import numpy as np
    import gradserve
    from gradserve import Client
    absent = [name for name in ("ray", "grpc_status", "google.rpc", "grpc_tools", "torch")
              if importlib.util.find_spec(name.split(".")[0]) is not None
              and importlib.util.find_spec(name) is not None]
    spec, target = json.loads(sys.argv[1]), sys.argv[2]
    rng = np.random.default_rng(0)
    params = {k: np.asarray(v, dtype=np.float32) for k, v in json.loads(sys.argv[3]).items()}
    x = rng.standard_normal((8, 5)).astype(np.float32)
    y = np.arange(8) % 3
    with Client(target, retries=0) as client:
        result = client.compute_gradients(spec, params, x, y)
        session = client.create_session(spec, params, num_workers=1)
        step = client.step(session, x, y)
        try:
            client.step(session, x, y + 7)
            error = None
        except gradserve.InvalidArgument as bad:
            error = [type(bad).__name__, str(bad), list(bad.field_violations)]
    print(json.dumps({"present": absent, "loss": result.loss, "version": step.version, "error": error,
                      "services_loaded": [m for m in sys.modules if m.startswith("gradserve_services")]}))
""")


@pytest.mark.slow
def test_sdk_in_fresh_venv(tmp_path):
    venv = tmp_path / "venv"
    python = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", "grpcio", "protobuf", "numpy"],
                   check=True, timeout=90)
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for name in ("client", "services"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", str(source)], check=True, timeout=90)

    executor = LocalExecutor(num_workers=1)
    server, port = create_server(executor)
    try:
        params = Model(SPEC).init_parameters(seed=2)
        probe = subprocess.run(
            [str(python), "-I", "-c", PROBE, json.dumps(SPEC), f"127.0.0.1:{port}",
             json.dumps({k: v.tolist() for k, v in params.items()})],
            cwd=tmp_path, capture_output=True, text=True, timeout=60,
        )
        assert probe.returncode == 0, probe.stderr
        report = json.loads(probe.stdout)
        rng = np.random.default_rng(0)
        x, y = rng.standard_normal((8, 5)).astype(np.float32), np.arange(8) % 3
        expected_loss = executor.compute_gradients(SPEC, params, x, y)["loss"]
    finally:
        server.stop(grace=1)
        executor.shutdown()

    assert report["present"] == [] and report["services_loaded"] == []
    assert report["loss"] == expected_loss
    assert report["version"] == 1
    name, message, violations = report["error"]
    assert name == "InvalidArgument" and "batch.y" in message
    assert violations == []  # details need googleapis-common-protos, which this venv lacks
