"""The shared-memory lane between workers and parameter servers on one machine, on real Ray actors:
a server publishes a block instead of a copy, a worker that sees the area writes its gradient into a
block, a worker that does not (`GRADSERVE_SHARED_MEMORY=off`, as on another machine) reads a copy
and returns a dense gradient; both give the engine's gradient and the same update. Sync training
with the lane equals training without it, bit for bit, and an executor leaves no block behind."""

from __future__ import annotations

import os

import numpy as np
import pytest
import ray

from gradserve_services.cluster import LocalExecutor, RayExecutor, TrainerConfig
from gradserve_services.cluster.remote import RayCalls, RemoteServer, RemoteWorker
from gradserve_services.cluster.shared import Attachments, BlockRef, SharedArea
from gradserve_services.engine import Model

from .helpers import MLP_SPEC, batches

pytestmark = pytest.mark.integration  # hangs are caught by the suite-wide timeout (pyproject)

OPTIMIZER = {"name": "momentum", "lr": 0.05, "momentum": 0.9}
RULE = {"bound": 0, "policy": "drop"}


@pytest.fixture(scope="module")
def executor():
    started = RayExecutor(num_workers=2, num_cpus=4, object_store_memory=256 * 1024 * 1024)
    yield started
    started.shutdown()


def test_near_and_far_workers_feed_one_shared_server(executor):
    area = SharedArea.create()
    assert area is not None, "this machine has a tmpfs at /dev/shm"
    model = Model(MLP_SPEC)
    params = model.init_parameters(seed=3, dtype="float64")
    (x, y), = batches(1, rows=96, seed=5)
    lane = {"shared_area": (area.path, area.token)}
    server = RemoteServer.remote(**lane)
    near = RemoteWorker.remote(**lane, calls=RayCalls())
    far = RemoteWorker.options(runtime_env={"env_vars": {"GRADSERVE_SHARED_MEMORY": "off"}}).remote(
        **lane, calls=RayCalls())
    try:
        published = server.create_table.remote("t", params, OPTIMIZER, RULE, True)
        version, block = ray.get(published)
        assert version == 0 and isinstance(block, BlockRef) and os.path.exists(block.path)
        x_ref, y_ref = ray.put(x), ray.put(y)
        task = {"spec": MLP_SPEC, "table": "t", "partition": [list(params)], "shared_memory": True,
                "servers": [server]}
        outputs = {name: worker.compute.options(num_returns=2).remote(
                       dict(task, start=start, stop=stop, batch_shard=shard), [published], x_ref, y_ref)
                   for name, worker, start, stop, shard in (("near", near, 0, 40, 0), ("far", far, 40, 96, 1))}
        parts = {name: ray.get(part) for name, (part, _) in outputs.items()}
        assert parts["near"]["kind"] == "shared" and parts["far"]["kind"] == "dense"

        near_grad = Attachments().arrays(parts["near"]["block"])  # the block holds the sum
        for name, (start, stop) in (("near", (0, 40)), ("far", (40, 96))):
            got = near_grad if name == "near" else parts["far"]["grads"]
            expected = model.loss_and_grad_sum(params, x[start:stop], y[start:stop], seed=0,
                                               sample_offset=start).grad_sum
            for key, value in expected.items():
                np.testing.assert_array_equal(got[key], value, err_msg=f"{name} {key}")

        new_published, report = server.apply.options(num_returns=2).remote(
            "t", "1", 96, 0, None, outputs["near"][0], outputs["far"][0])
        assert ray.get(report)["version"] == 1
        _, applied = ray.get(server.snapshot.remote("t"))
    finally:
        for handle in (server, near, far):
            ray.kill(handle)
        area.remove()

    reference = LocalExecutor(num_workers=2)
    trainer = reference.create_trainer(TrainerConfig(MLP_SPEC, OPTIMIZER, num_workers=2), params)
    trainer.step(1, x, y)
    _, expected_params = trainer.parameters()
    reference.shutdown()
    for name, value in expected_params.items():
        np.testing.assert_allclose(applied[name], value, rtol=1e-12, atol=1e-15, err_msg=name)


@pytest.mark.parametrize("compression", ["none", "fp16"])
def test_sync_training_with_the_lane_equals_without(executor, monkeypatch, compression):
    params = Model(MLP_SPEC).init_parameters(seed=0, dtype="float64")
    data = batches(5, rows=90, seed=2)
    config = TrainerConfig(MLP_SPEC, {"name": "adam", "lr": 0.01}, num_workers=3, compression=compression)
    assert executor._backend.shared_area is not None

    def train():
        trainer = executor.create_trainer(config, params)
        try:
            for step, (x, y) in enumerate(data):
                trainer.step(step, x, y)
            return trainer.parameters()
        finally:
            trainer.close()

    version, shared = train()
    monkeypatch.setattr(executor._backend, "shared_area", None)  # this trainer: the object store only
    plain_version, plain = train()
    assert version == plain_version == len(data)
    for name in plain:
        np.testing.assert_array_equal(shared[name], plain[name], err_msg=name)


def test_executor_removes_its_area():
    started = RayExecutor(num_workers=1, num_cpus=2, object_store_memory=128 * 1024 * 1024)
    folder = started._backend.shared_area[0]
    trainer = started.create_trainer(TrainerConfig(MLP_SPEC, OPTIMIZER, num_workers=1),
                                     Model(MLP_SPEC).init_parameters(seed=0, dtype="float64"))
    (x, y), = batches(1, rows=16, seed=1)
    trainer.step(1, x, y)
    assert any("params" in name for name in os.listdir(folder))
    assert any("grad" in name for name in os.listdir(folder))
    trainer.close()
    started.shutdown()
    assert not os.path.exists(folder)


def test_an_area_in_the_configured_root_carries_the_step_and_goes_with_the_executor(monkeypatch):
    import shutil
    import tempfile

    from gradserve_services.cluster.shared import ROOT_ENV

    root = tempfile.mkdtemp(prefix="root-", dir="/dev/shm")  # a tmpfs the operator chose
    monkeypatch.setenv(ROOT_ENV, root)
    try:
        started = RayExecutor(num_workers=1, num_cpus=2, object_store_memory=128 * 1024 * 1024)
        folder = started._backend.shared_area[0]
        assert os.path.dirname(folder) == root
        try:
            params = Model(MLP_SPEC).init_parameters(seed=0, dtype="float64")
            trainer = started.create_trainer(TrainerConfig(MLP_SPEC, OPTIMIZER, num_workers=1), params)
            (x, y), = batches(1, rows=16, seed=1)
            trainer.step(1, x, y)
            names = os.listdir(folder)  # the server's parameters and the worker's gradient lie there
            assert any("params" in name for name in names) and any("grad" in name for name in names)
            trainer.close()
        finally:
            started.shutdown()
        assert os.listdir(root) == []
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("compression", ["none", "fp16"])
def test_a_far_worker_joining_mid_training_gets_batches_by_store(executor, monkeypatch, compression):
    """A worker that cannot map the area (a replacement on another machine) gets the batch and the
    parameters through the object store from its first step, never a block it cannot read, and the
    step's result is the one without the lane."""
    params = Model(MLP_SPEC).init_parameters(seed=4, dtype="float64")
    data = batches(4, rows=64, seed=6)
    config = TrainerConfig(MLP_SPEC, {"name": "sgd", "lr": 0.1}, num_workers=2, compression=compression)
    backend = executor._backend

    def train(swap_in_far_worker_after: int | None):
        trainer = executor.create_trainer(config, params)
        far = None
        try:
            for step, (x, y) in enumerate(data):
                if step == swap_in_far_worker_after:
                    far = RemoteWorker.options(
                        num_cpus=1, runtime_env={"env_vars": {"GRADSERVE_SHARED_MEMORY": "off"}}).remote(
                        shared_area=backend.shared_area, calls=RayCalls())
                    backend._metadata[far] = ray.get(far.metadata.remote())  # as the pool records a start
                    assert not backend._metadata[far]["shared_memory"]
                    backend._workers[1], near = far, backend._workers[1]
                result = trainer.step(step, x, y)
                if step == swap_in_far_worker_after:
                    assert result.retries == 0 and result.worker_failures == 0  # nothing sent twice
            return trainer.parameters()
        finally:
            trainer.close()
            if far is not None:
                backend._workers[1] = near
                ray.kill(far)

    version, mixed = train(swap_in_far_worker_after=2)
    monkeypatch.setattr(backend, "shared_area", None)
    plain_version, plain = train(swap_in_far_worker_after=None)
    assert version == plain_version == len(data)
    for name in plain:
        np.testing.assert_array_equal(mixed[name], plain[name], err_msg=name)


def test_no_room_in_the_tmpfs_means_copies(monkeypatch):
    """Where the tmpfs is too small for a block, the server keeps plain arrays and publishes copies
    (touching a file's pages beyond the tmpfs would kill the process)."""
    from gradserve_services.cluster import shared
    from gradserve_services.cluster.parameter_server import ParameterServer

    area = SharedArea.create()
    params = Model(MLP_SPEC).init_parameters(seed=0, dtype="float64")
    try:
        roomy = ParameterServer(shared_area=(area.path, area.token)).create_table("t", params, OPTIMIZER, RULE, True)
        assert isinstance(roomy[1], BlockRef)
        monkeypatch.setattr(shared, "RESERVE_BYTES", 1 << 62)
        cramped = ParameterServer(shared_area=(area.path, area.token)).create_table("t", params, OPTIMIZER, RULE, True)
        assert not isinstance(cramped[1], BlockRef)
        for name, value in params.items():
            np.testing.assert_array_equal(cramped[1][name], value)
    finally:
        area.remove()


def test_blocks_reserve_their_pages_and_a_failed_reallocation_forgets_the_old_block(monkeypatch):
    from gradserve_services.cluster import shared

    area = SharedArea.create()
    try:
        before = os.statvfs(area.path)
        ref, _ = shared.allocate_block(area.path, area.token, "reserved", {"a": ("float32", (8 << 20,))})
        after = os.statvfs(area.path)
        # reserved at allocation (a sparse file would fail only when written, with SIGBUS)
        assert (before.f_bavail - after.f_bavail) * after.f_frsize >= 32 << 20
        shared.remove_block(ref)

        cache: dict = {}
        first = shared.write_block(area.path, area.token, "batch", {"x": np.ones(4)}, cache)
        monkeypatch.setattr(shared, "RESERVE_BYTES", 1 << 62)
        with pytest.raises(OSError):
            shared.write_block(area.path, area.token, "batch", {"x": np.ones(5)}, cache)
        monkeypatch.undo()
        again = shared.write_block(area.path, area.token, "batch", {"x": np.ones(4)}, cache)
        assert not os.path.exists(first.path) and os.path.exists(again.path) and again.path != first.path
    finally:
        area.remove()


def test_only_areas_whose_owner_is_gone_are_removed(tmp_path, monkeypatch):
    from gradserve_services.cluster import shared

    monkeypatch.setattr(shared, "ROOT_CANDIDATES", (str(tmp_path),))
    alive = SharedArea.create()
    orphan = tmp_path / "gradserve-999999-0123456789ab"  # its owner was killed: nobody holds the lock
    orphan.mkdir()
    (orphan / "area").write_text("token")
    newcomer = SharedArea.create()
    try:
        assert not orphan.exists()
        assert os.path.isdir(alive.path) and os.path.isdir(newcomer.path)
    finally:
        alive.remove()
        newcomer.remove()
