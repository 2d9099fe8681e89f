"""Handed-over arrays become the parameter server's own (no copy); every other array is copied,
so a caller's arrays never change under it."""

import numpy as np

from gradserve_services.cluster import LocalExecutor, TrainerConfig
from gradserve_services.cluster.handover import hand_over, take
from gradserve_services.engine import Model

SPEC = {"input_features": 5, "nodes": [{"name": "fc", "op": "dense", "inputs": ["input"], "units": 3}],
        "output": "fc", "loss": "mse"}


def _batch():
    rng = np.random.default_rng(0)
    return rng.standard_normal((8, 5)).astype(np.float32), rng.standard_normal((8, 3)).astype(np.float32)


def _tables(executor):
    return [table for server in executor._backend._servers for table in server.tables.values()]


def test_a_handed_over_array_is_taken_once():
    array = np.zeros(4)
    assert not take(array)  # never handed over
    hand_over({"a": array})
    assert take(array) and not take(array)


def test_only_writable_contiguous_arrays_are_taken():
    read_only, strided = np.zeros(4), np.zeros((4, 4))[:, 1]
    read_only.flags.writeable = False
    hand_over({"r": read_only, "s": strided})
    assert not take(read_only) and not take(strided)


def test_the_server_keeps_handed_over_parameters_and_trains_them_in_place():
    executor = LocalExecutor(num_workers=1)
    try:
        params = Model(SPEC).init_parameters(seed=1)
        expected = {name: value.copy() for name, value in params.items()}
        trainer = executor.create_trainer(TrainerConfig(SPEC, {"name": "sgd", "lr": 0.1}, num_workers=1),
                                          hand_over(params))
        (table,) = _tables(executor)
        assert all(table.params[name] is params[name] for name in params)
        trainer.step(0, *_batch())
        version, pulled = trainer.parameters()
        assert version == 1 and not np.array_equal(pulled["fc.weight"], expected["fc.weight"])
        np.testing.assert_array_equal(params["fc.weight"], pulled["fc.weight"])  # the same memory
        trainer.close()
    finally:
        executor.shutdown()


def test_parameters_not_handed_over_are_copied_and_stay_the_callers():
    executor = LocalExecutor(num_workers=1)
    try:
        params = Model(SPEC).init_parameters(seed=1)
        before = {name: value.copy() for name, value in params.items()}
        trainer = executor.create_trainer(TrainerConfig(SPEC, {"name": "sgd", "lr": 0.1}, num_workers=1), params)
        (table,) = _tables(executor)
        assert not any(np.shares_memory(table.params[name], params[name]) for name in params)
        trainer.step(0, *_batch())
        for name in params:
            np.testing.assert_array_equal(params[name], before[name])
        trainer.close()
    finally:
        executor.shutdown()


# ----- received blocks: parameters decoded into the shared-memory area a server process maps ------

import gc  # noqa: E402
import os  # noqa: E402

import pytest  # noqa: E402

from gradserve_services.cluster.handover import Landing, Received, received  # noqa: E402
from gradserve_services.cluster.parameter_server import ParameterServer  # noqa: E402
from gradserve_services.cluster.shared import Attachments, BlockRef, SharedArea  # noqa: E402
from gradserve_services.errors import InvalidArgument  # noqa: E402

SGD = {"name": "sgd", "lr": 0.5}
RULE = {"bound": 0, "policy": "drop"}


@pytest.fixture()
def area():
    made = SharedArea.create()
    assert made is not None, "this machine has a tmpfs at /dev/shm"
    yield made
    made.remove()


def _files(area) -> list[str]:
    return sorted(name for name in os.listdir(area.path) if name != "area")


def _landed(landing, params) -> dict:
    """`params` decoded into `landing`'s block, as the gateway's assembler does."""
    views = landing.allocate({name: (value.dtype, value.shape) for name, value in params.items()})
    assert set(views) == set(params)
    for name, value in params.items():
        np.copyto(views[name], value)
    return views


def _inode(path: str) -> int:
    return os.stat(path).st_ino


def test_a_received_block_becomes_the_tables_parameter_block_without_a_copy(area):
    params = Model(SPEC).init_parameters(seed=2)
    server = ParameterServer(shared_area=(area.path, area.token))
    with Landing((area.path, area.token)) as landing:
        views = _landed(landing, params)
        (incoming,) = _files(area)
        sent = received(views)
        assert isinstance(sent, Received) and received(views) is None  # given once
        version, block = server.create_table("t", sent, SGD, RULE, True)
        assert version == 0 and isinstance(block, BlockRef) and block.path != sent.block.path
        # the same pages under the table's own name: what the gateway decoded is what it trains
        assert _inode(block.path) == _inode(os.path.join(area.path, incoming))
        views["fc.bias"][0] = 7.0
        assert server.tables["t"].params["fc.bias"][0] == 7.0
        views["fc.bias"][0] = params["fc.bias"][0]
    assert _files(area) == [os.path.basename(block.path)]  # the gateway's name is gone with the request
    grads = {name: np.ones_like(value) for name, value in params.items()}
    _, report = server.apply("t", "1", 2, 0, None, {"kind": "dense", "grads": grads})
    assert report["version"] == 1
    held = Attachments().arrays(server.published("t")[1])
    for name, value in params.items():
        np.testing.assert_array_equal(held[name], value - 0.25)  # lr 0.5 * 1 / 2 samples
    server.drop_table("t")
    assert _files(area) == []


def test_a_shards_part_of_a_block_and_a_table_outside_shared_memory_copy_it(area):
    params = Model(SPEC).init_parameters(seed=3)
    server = ParameterServer(shared_area=(area.path, area.token))
    with Landing((area.path, area.token)) as landing:
        views = _landed(landing, params)
        part = received(views, ["fc.weight"])  # one shard's part: the block holds more
        assert part.others == {"fc.bias": views["fc.bias"]}
        _, block = server.create_table("part", {"fc.weight": part}["fc.weight"], SGD, RULE, True)
        assert _inode(block.path) != _inode(part.block.path)
        views = _landed(landing, params)
        _, copies = server.create_table("async", received(views), SGD, RULE, False)
        views["fc.weight"][:] = 0.0  # the request's buffer, not the table's
    np.testing.assert_array_equal(Attachments().arrays(block)["fc.weight"], params["fc.weight"])
    for name, value in params.items():
        np.testing.assert_array_equal(copies[name], value)
    server.drop_table("part")
    server.drop_table("async")
    assert _files(area) == []


def test_a_failed_create_keeps_the_old_table_and_leaves_no_block(area):
    params = Model(SPEC).init_parameters(seed=4)
    server = ParameterServer(shared_area=(area.path, area.token))
    _, old = server.create_table("t", params, SGD, RULE, True)
    with Landing((area.path, area.token)) as landing:
        sent = received(_landed(landing, {name: value + 1 for name, value in params.items()}))
        with pytest.raises(InvalidArgument):
            server.create_table("t", sent, {"name": "no-such-optimizer"}, RULE, True)
        assert len(_files(area)) == 2  # the old block and the request's, nothing adopted
    assert server.published("t")[1] == old and _files(area) == [os.path.basename(old.path)]
    for name, value in Attachments().arrays(old).items():
        np.testing.assert_array_equal(value, params[name])
    server.drop_table("t")
    assert _files(area) == []


def test_a_loaded_state_adopts_its_received_parameters(area):
    params = Model(SPEC).init_parameters(seed=5)
    server = ParameterServer(shared_area=(area.path, area.token))
    server.create_table("t", params, {"name": "momentum", "lr": 0.1, "momentum": 0.9}, RULE, True)
    grads = {name: np.ones_like(value) for name, value in params.items()}
    server.apply("t", "1", 1, 0, None, {"kind": "dense", "grads": grads})
    arrays, meta = server.state("t")
    arrays = {key: np.array(value) for key, value in arrays.items()}
    with Landing((area.path, area.token)) as landing:
        names = [key for key in arrays if key.startswith("param/")]
        views = _landed(landing, {key: arrays[key] for key in names})
        sent = received({**arrays, **views}, names, "param/")
        assert set(sent.others) == set(arrays) - set(names)
        assert [entry[0] for entry in sent.block.layout] == list(params)  # as the table names them
        version, block = server.load_table("t", sent, meta, list(params), True)
        assert version == 1 and _inode(block.path) == _inode(sent.block.path)
        assert [entry[0] for entry in block.layout] == list(params)  # what the workers read by name
    assert _files(area) == [os.path.basename(block.path)]  # the replaced table's block removed
    restored, _ = server.state("t")
    for key, value in arrays.items():
        np.testing.assert_array_equal(restored[key], value, err_msg=key)
    server.drop_table("t")


def test_without_room_or_an_area_nothing_lands(area, monkeypatch):
    from gradserve_services.cluster import shared

    spec = {"w": (np.dtype(np.float32), (4, 4))}
    assert Landing(None).allocate(spec) == {}
    monkeypatch.setattr(shared, "RESERVE_BYTES", 1 << 62)
    with Landing((area.path, area.token)) as landing:
        assert landing.allocate(spec) == {}
    assert _files(area) == []


def test_received_bytes_are_written_into_the_block_and_a_half_written_one_is_removed(area):
    params = Model(SPEC).init_parameters(seed=6)
    gc.collect()  # what earlier tests left to collect (a worker's bell socket) closes now, not below
    descriptors = len(os.listdir("/proc/self/fd"))
    with Landing((area.path, area.token)) as landing:
        placed = landing.receive({name: (value.dtype, value.shape) for name, value in params.items()})
        for name, value in params.items():
            view, write = placed[name]
            raw = value.reshape(-1).view(np.uint8)
            write(0, raw[:5])
            write(5, raw[5:])  # in pieces, as chunks arrive
            np.testing.assert_array_equal(view, value)
        sent = received({name: view for name, (view, _) in placed.items()})
        _, block = ParameterServer(shared_area=(area.path, area.token)).create_table("t", sent, SGD, RULE, True)
        assert _inode(block.path) == _inode(sent.block.path)
        half = landing.receive({"w": (np.dtype(np.float32), (1 << 20,))})
        half["w"][1](0, np.ones(1 << 10, np.float32))  # the stream breaks off here
    assert _files(area) == [os.path.basename(block.path)]
    del placed, sent, half, view
    gc.collect()  # a map keeps a descriptor of its own while it lives
    assert len(os.listdir("/proc/self/fd")) == descriptors
