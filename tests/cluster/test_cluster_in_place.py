"""Trainer.parameters_in_place: the servers' parameters as read-only views, equal to the copies
`parameters()` makes, from in-process tables, from shared-memory blocks (Ray, sync) and from the
object store (Ray, async); no step runs while they are held."""

import threading

import numpy as np
import pytest

from gradserve_services.cluster import LocalExecutor, RayExecutor, TrainerConfig
from gradserve_services.engine import Model

SPEC = {"input_features": 5, "nodes": [
    {"name": "fc1", "op": "dense", "inputs": ["input"], "units": 7},
    {"name": "act", "op": "relu", "inputs": ["fc1"]},
    {"name": "fc2", "op": "dense", "inputs": ["act"], "units": 3}], "output": "fc2", "loss": "mse"}


def _batch(seed):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((8, 5)).astype(np.float32), rng.standard_normal((8, 3)).astype(np.float32)


def _check_in_place_equals_copies(executor, **config):
    params = Model(SPEC).init_parameters(seed=1)
    trainer = executor.create_trainer(TrainerConfig(SPEC, {"name": "sgd", "lr": 0.1}, **config), params)
    try:
        for step in range(2):
            trainer.step(step, *_batch(step))
        version, copies = trainer.parameters()
        with trainer.parameters_in_place() as (held_version, held):
            assert held_version == version > 0 and list(held) == list(copies)
            for name, value in held.items():
                assert not value.flags.writeable
                np.testing.assert_array_equal(value, copies[name])
        trainer.step(2, *_batch(2))
        assert trainer.parameters()[0] > version
    finally:
        trainer.close()


def test_local_tables_in_place():
    executor = LocalExecutor(num_workers=2)
    try:
        _check_in_place_equals_copies(executor, num_workers=2, ps_shards=2)
    finally:
        executor.shutdown()


def test_no_step_runs_while_the_parameters_are_held():
    executor = LocalExecutor(num_workers=1)
    trainer = executor.create_trainer(TrainerConfig(SPEC, {"name": "sgd", "lr": 0.1}, num_workers=1),
                                      Model(SPEC).init_parameters(seed=1))
    try:
        stepped = threading.Event()
        with trainer.parameters_in_place() as (_, held):
            before = {name: value.copy() for name, value in held.items()}
            worker = threading.Thread(target=lambda: (trainer.step(0, *_batch(0)), stepped.set()))
            worker.start()
            assert not stepped.wait(0.5)  # the step waits for the block to end
            for name, value in held.items():
                np.testing.assert_array_equal(value, before[name])
        worker.join(60)
        assert stepped.is_set() and trainer.parameters()[0] == 1
    finally:
        trainer.close()
        executor.shutdown()


@pytest.mark.integration
@pytest.mark.parametrize("consistency", ["sync", "async"])
def test_ray_parameters_in_place(consistency):
    executor = RayExecutor(num_workers=2, num_cpus=2, object_store_memory=128 * 1024 * 1024)
    try:
        _check_in_place_equals_copies(executor, num_workers=2, ps_shards=2, consistency=consistency)
    finally:
        executor.shutdown()


# ----- received in place: CreateSession's parameters land in the server's block (Ray, one machine) --

@pytest.fixture(scope="module")
def ray_gateway(tmp_path_factory):
    """(executor, client, generated stub, checkpoint folder) of a gateway on an embedded Ray executor."""
    import grpc

    from gradserve import Client
    from gradserve.rpc.options import CHANNEL_OPTIONS
    from gradserve.v1 import service_pb2_grpc
    from gradserve_services.gateway import create_server

    executor = RayExecutor(num_workers=1, num_cpus=2, object_store_memory=256 * 1024 * 1024)
    checkpoints = str(tmp_path_factory.mktemp("checkpoints"))
    server, port = create_server(executor, max_concurrent_calls=4, checkpoint_dir=checkpoints)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS)
    try:
        with Client(f"127.0.0.1:{port}", timeout=120, retries=0) as client:
            yield executor, client, service_pb2_grpc.GradserveStub(channel), checkpoints
    finally:
        channel.close()
        server.stop(grace=1)
        executor.shutdown()


BIG = {"input_features": 1024, "nodes": [{"name": "fc", "op": "dense", "inputs": ["input"], "units": 1024}],
       "output": "fc", "loss": "mse"}  # 4 MiB of weights: chunked, and enough pages to count


def _area_files(executor) -> list[str]:
    import os

    return sorted(name for name in os.listdir(executor.shared_area[0]) if name != "area")


def _server_pid(executor) -> int:
    trainer = executor.create_trainer(TrainerConfig(SPEC, {"name": "sgd", "lr": 0.1}, num_workers=1),
                                      Model(SPEC).init_parameters(seed=0))
    try:
        (pid,) = trainer.server_pids()  # the pool's one server: every session's table is there
        return pid
    finally:
        trainer.close()


@pytest.mark.integration
def test_pushed_parameters_land_in_the_servers_block_and_train(ray_gateway):
    from gradserve_services import procfs

    executor, client, _, _ = ray_gateway
    params = Model(BIG).init_parameters(seed=7)
    nbytes = sum(value.nbytes for value in params.values())
    server = _server_pid(executor)
    before = _area_files(executor)
    faults = procfs.minor_faults(server)
    session = client.create_session(BIG, params, optimizer={"name": "sgd", "lr": 0.1}, num_workers=1)
    # a copy into fresh pages faults every page of them in the server; landing in place, almost none
    assert procfs.minor_faults(server) - faults < nbytes // 4096 // 4
    added = sorted(set(_area_files(executor)) - set(before))
    assert len(added) == 1 and added[0].endswith(tuple("0123456789abcdef")) and "-params-" in added[0]
    assert not any(name.startswith("received-") for name in _area_files(executor))
    try:
        version, pulled = client.pull_parameters(session)
        assert version == 0
        for name, value in params.items():
            np.testing.assert_array_equal(pulled[name], value)
        rng = np.random.default_rng(8)
        x, y = rng.standard_normal((16, 1024)).astype(np.float32), rng.standard_normal((16, 1024)).astype(np.float32)
        client.step(session, x, y)
        reference = LocalExecutor(num_workers=1)
        try:
            trainer = reference.create_trainer(TrainerConfig(BIG, {"name": "sgd", "lr": 0.1}, num_workers=1), params)
            trainer.step(1, x, y)
            _, expected = trainer.parameters()
        finally:
            reference.shutdown()
        _, trained = client.pull_parameters(session)
        for name, value in expected.items():  # the step moved them; the worker's one BLAS thread sums its own way
            assert np.abs(value - params[name]).max() > 1e-4
            np.testing.assert_allclose(trained[name], value, rtol=1e-5, atol=1e-7, err_msg=name)
    finally:
        client.close_session(session)
    assert _area_files(executor) == before


@pytest.mark.integration
def test_a_refused_or_cut_off_push_leaves_nothing_behind(ray_gateway):
    import grpc

    from gradserve.errors import InvalidArgument
    from gradserve.requests import outgoing_tensors, spec_message
    from gradserve.v1 import service_pb2

    executor, client, stub, _ = ray_gateway
    params = Model(BIG).init_parameters(seed=9)
    before, sessions = _area_files(executor), client.list_sessions()
    poisoned = dict(params, **{"fc.weight": params["fc.weight"].copy()})
    poisoned["fc.weight"][5, 5] = np.nan
    with pytest.raises(InvalidArgument) as refused:
        client.create_session(BIG, poisoned, num_workers=1)
    assert "parameters.fc.weight" in str(refused.value)
    with pytest.raises(InvalidArgument):
        client.create_session(BIG, {"fc.weight": params["fc.weight"][:, :7].copy(), "fc.bias": params["fc.bias"]},
                              num_workers=1)
    outgoing = outgoing_tensors({f"parameters.{name}": value for name, value in params.items()})
    config = service_pb2.SessionConfig(model=spec_message(BIG), num_workers=1)
    messages = [service_pb2.CreateSessionRequest(header=service_pb2.CreateSessionHeader(
        config=config, tensors=outgoing.entries)), *outgoing.chunks(service_pb2.CreateSessionRequest)]
    with pytest.raises(grpc.RpcError) as cut:
        stub.CreateSession(iter(messages[:-1]), timeout=60)  # the stream ends a chunk short
    assert cut.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _area_files(executor) == before and len(client.list_sessions()) == len(sessions)


@pytest.mark.integration
def test_a_restored_checkpoint_lands_in_the_servers_block_and_a_refused_one_changes_nothing(ray_gateway):
    import os

    from gradserve.errors import InvalidArgument
    from gradserve_services import procfs
    from gradserve_services.checkpoint import load_checkpoint, save_checkpoint

    executor, client, _, checkpoints = ray_gateway
    params = Model(BIG).init_parameters(seed=11)
    nbytes = sum(value.nbytes for value in params.values())
    server = _server_pid(executor)
    rng = np.random.default_rng(12)
    x, y = rng.standard_normal((16, 1024)).astype(np.float32), rng.standard_normal((16, 1024)).astype(np.float32)
    # sgd: no optimizer state, which a restore copies into the optimizer's own arrays
    session = client.create_session(BIG, params, optimizer={"name": "sgd", "lr": 0.1}, num_workers=1)
    try:
        client.step(session, x, y)
        checkpoint = client.save_checkpoint(session)
        saved, version = checkpoint.name, checkpoint.version
        _, expected = client.pull_parameters(session)
        client.step(session, x, y)
        blocks = _area_files(executor)
        faults = procfs.minor_faults(server)
        assert client.restore_checkpoint(session, saved).version == version == 1
        assert procfs.minor_faults(server) - faults < nbytes // 4096 // 4  # read where the server keeps them
        after = _area_files(executor)
        assert len(after) == len(blocks) and after != blocks  # the table's block replaced, the old one removed
        _, restored = client.pull_parameters(session)
        for name, value in expected.items():
            np.testing.assert_array_equal(restored[name], value, err_msg=name)

        arrays, meta = load_checkpoint(os.path.join(checkpoints, session, saved))
        arrays["param/fc.weight"][0, 0] = np.inf
        save_checkpoint(os.path.join(checkpoints, session, "v999999999999.npz"), arrays, meta)
        with pytest.raises(InvalidArgument) as refused:
            client.restore_checkpoint(session, "v999999999999.npz")
        assert "fc.weight" in str(refused.value)
        assert _area_files(executor) == after  # nothing landed stays, the table keeps its block
        _, kept = client.pull_parameters(session)
        for name, value in expected.items():
            np.testing.assert_array_equal(kept[name], value, err_msg=name)
    finally:
        client.close_session(session)
