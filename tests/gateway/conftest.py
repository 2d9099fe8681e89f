"""A real gRPC server on 127.0.0.1 (port 0) over the in-process LocalExecutor, and clients for it."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from gradserve import Client, mlp
from gradserve.rpc.options import CHANNEL_OPTIONS
from gradserve.v1 import service_pb2_grpc
from gradserve_services.cluster import LocalExecutor
from gradserve_services.engine import Model
from gradserve_services.gateway import create_server

SPEC = mlp(6, [16], 3)
TOKENS = {"alice-token-0123456789": "alice", "bob-token-0123456789abc": "bob"}


def batch(rows: int = 12, seed: int = 0, spec: dict = SPEC):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, spec["input_features"])).astype(np.float32)
    y = (np.arange(rows) % 3).astype(np.int64)
    return x, y


def initial_parameters(spec: dict = SPEC, seed: int = 1, dtype: str = "float32"):
    return Model(spec).init_parameters(seed=seed, dtype=dtype)


@pytest.fixture(scope="module")
def executor():
    executor = LocalExecutor(num_workers=2)
    yield executor
    executor.shutdown()


@pytest.fixture(scope="module")
def gateway(executor, tmp_path_factory):
    """(server, target) without auth; sessions of every test module share it."""
    server, port = create_server(executor, checkpoint_dir=str(tmp_path_factory.mktemp("checkpoints")))
    yield server, f"127.0.0.1:{port}"
    server.stop(grace=1)


@pytest.fixture(scope="module")
def client(gateway):
    with Client(gateway[1], timeout=60, retries=0) as client:
        yield client


@pytest.fixture(scope="module")
def stub(gateway):
    """The raw generated stub, for requests the SDK would never build."""
    channel = grpc.insecure_channel(gateway[1], options=CHANNEL_OPTIONS)
    yield service_pb2_grpc.GradserveStub(channel)
    channel.close()


@pytest.fixture()
def session(client):
    """A fresh session with known parameters; closed afterwards."""
    session_id = client.create_session(SPEC, initial_parameters(), optimizer={"name": "sgd", "lr": 0.1},
                                       num_workers=2)
    yield session_id
    try:
        client.close_session(session_id)
    except Exception:  # noqa: BLE001 - a test may have closed it
        pass
