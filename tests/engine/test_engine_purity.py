"""The engine is pure numpy: importing and running it loads no grpc, ray, prometheus_client or torch."""

import json
import subprocess
import sys

FORBIDDEN = ("grpc", "ray", "prometheus_client", "torch", "google.protobuf")

PROGRAM = """
import json, sys
import numpy as np
import gradserve_services.engine as engine
model = engine.Model({"input_features": 3, "nodes": [
    {"name": "fc", "op": "dense", "inputs": ["input"], "units": 2}], "output": "fc", "loss": "mse"})
params = model.init_parameters()
model.loss_and_grad(params, np.ones((2, 3), np.float32), np.zeros((2, 2), np.float32))
print(json.dumps(sorted(sys.modules)))
"""


def test_engine_imports_no_io_or_framework_packages():
    result = subprocess.run([sys.executable, "-c", PROGRAM], capture_output=True, text=True, check=True)
    loaded = json.loads(result.stdout)
    assert "gradserve_services.engine" in loaded
    offenders = [m for m in loaded if any(m == f or m.startswith(f + ".") for f in FORBIDDEN)]
    assert offenders == []


def test_engine_exports_an_explicit_public_api():
    import gradserve_services.engine as engine

    assert {"Model", "GradSum", "parse_spec", "gradcheck", "OPS", "LOSSES"} <= set(engine.__all__)
    assert all(hasattr(engine, name) for name in engine.__all__)
