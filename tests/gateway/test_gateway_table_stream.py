"""PullParameters streams a model's tables out of the parameter-server shards one range of rows
at a time (cluster/table_stream.py): the streamed table is the assembled one, row for row, on one
and two shards; and the gateway's process holds a few parts of it at once, never the table, which
tracemalloc shows against the same measurement of a pull that does assemble it."""

from __future__ import annotations

import json
import tracemalloc

import grpc
import numpy as np
import pytest

from gradserve import Client
from gradserve.rpc.options import CHANNEL_OPTIONS
from gradserve.transfer import CHUNK_BYTES, OutgoingTensors, StreamedTensor, TensorAssembler
from gradserve.codec import TensorFormatError
from gradserve.v1 import service_pb2, service_pb2_grpc
from gradserve_services.cluster import LocalExecutor
from gradserve_services.cluster.table_stream import PART_BYTES, part_rows
from gradserve_services.engine.table_init import table_rows
from tests.support.gateway import serving

TABLE = "big.weight"


def table_spec(rows: int, dim: int) -> dict:
    return {"inputs": [{"name": "cats", "kind": "ids", "fields": 1}],
            "nodes": [{"name": "big", "op": "embedding", "inputs": ["cats"], "rows": rows, "dim": dim},
                      {"name": "logit", "op": "dense", "inputs": ["big"], "units": 1}],
            "output": "logit", "loss": "binary_cross_entropy"}


def edge_ids(rows: int, per_part: int, seed: int) -> np.ndarray:
    """Ids at both ends of the table and of every part, and some between."""
    edges = [0, rows - 1] + [r for start in range(per_part, rows, per_part) for r in (start - 1, start)]
    drawn = np.random.default_rng(seed).integers(0, rows, 64).tolist()
    return np.array(edges + drawn, dtype=np.int64)


def test_a_streamed_tensor_arrives_as_the_array_its_parts_make():
    whole = np.arange(3 * CHUNK_BYTES // 8 + 5, dtype=np.float64).reshape(-1, 1)
    cuts = [0, 7, CHUNK_BYTES // 8 + 3, CHUNK_BYTES // 8 + 3, len(whole)]  # one part empty, none chunk-aligned
    streamed = StreamedTensor(whole.dtype, whole.shape, lambda: (whole[a:b] for a, b in zip(cuts, cuts[1:])))
    outgoing = OutgoingTensors({"t": streamed})
    assembler = TensorAssembler(outgoing.entries, 1 << 30)
    for chunk in outgoing.chunks():
        assembler.add(chunk)
    assert assembler.complete
    np.testing.assert_array_equal(assembler.arrays["t"], whole)
    short = OutgoingTensors({"t": StreamedTensor(whole.dtype, whole.shape, lambda: [whole[:4]])})
    with pytest.raises(TensorFormatError, match="declared"):
        list(short.chunks())


@pytest.fixture(scope="module")
def target():
    """A real gRPC gateway on 127.0.0.1 (port 0) over in-process parameter servers and workers."""
    with serving(LocalExecutor(num_workers=2)) as address:
        yield address


@pytest.fixture(scope="module")
def client(target):
    with Client(target, timeout=120, retries=0) as client:
        yield client


@pytest.mark.parametrize("shards", [1, 2])
def test_the_streamed_table_is_the_assembled_one(client, shards):
    dim = 4
    per_part = part_rows(dim, "float64")
    rows = 2 * per_part + 3  # three parts, the last of three rows
    spec = table_spec(rows, dim)
    session = client.create_session(spec, optimizer={"name": "sgd", "lr": 5.0}, seed=7, dtype="float64",
                                    num_workers=2, ps_shards=shards)
    try:
        trained = []
        for step in range(3):
            ids = edge_ids(rows, per_part, step)
            y = (np.arange(len(ids)) % 2).astype(np.float64).reshape(-1, 1)
            client.step(session, {"cats": ids.reshape(-1, 1)}, y)
            trained.append(ids)
        _, params = client.pull_parameters(session)
        streamed = params[TABLE]
        _, assembled = client.pull_rows(session, TABLE, np.arange(rows, dtype=np.int64))  # row by row
        assert streamed.shape == (rows, dim)
        np.testing.assert_array_equal(streamed, assembled)
        initial = table_rows(np, 7, TABLE, np.arange(rows, dtype=np.int64), (rows, dim), np.float64)
        touched = np.unique(np.concatenate(trained))
        assert np.all(np.any(streamed[touched] != initial[touched], axis=1))  # trained rows, in their places
        untouched = np.setdiff1d(np.arange(rows), touched)
        np.testing.assert_array_equal(streamed[untouched], initial[untouched])
    finally:
        client.close_session(session)


def traced_peak(action) -> int:
    """Peak bytes the Python heap (numpy's arrays included) held above its level at the start,
    while `action` ran in this process (the gateway's and its servers')."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        action()
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


def streamed_pull(target: str, session: str, dim: int) -> tuple[int, dict]:
    """The traced peak of a PullParameters read by a caller that keeps no chunk, and what came:
    the table's bytes, chunks and last row."""
    received = {"bytes": 0, "chunks": 0, "last": None, "index": None}

    def read_and_drop():
        request = service_pb2.PullParametersRequest(session_id=session)
        for reply in stub.PullParameters(request, timeout=300):
            if reply.WhichOneof("part") == "header":
                received["index"] = [entry.name for entry in reply.header.tensors].index("parameters." + TABLE)
            elif reply.chunk.index == received["index"]:
                received["bytes"] += len(reply.chunk.data)
                received["chunks"] += 1
                received["last"] = np.frombuffer(reply.chunk.data, np.float32)[-dim:].copy()

    channel = grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
    try:
        stub = service_pb2_grpc.GradserveStub(channel)
        return traced_peak(read_and_drop), received
    finally:
        channel.close()


def measured_pulls(client, target: str, sizes, dim: int = 8) -> dict:
    """For a table of each row count in `sizes` (two shards): the traced peak of a streamed read
    that keeps no chunk, checked to carry the whole table; for the first, also the peak of the
    SDK's pull, which assembles the table on its side of this process."""
    figures = {"part_bytes": PART_BYTES, "tables": []}
    for rows in sizes:
        table_bytes = rows * dim * 4
        session = client.create_session(table_spec(rows, dim), optimizer={"name": "sgd", "lr": 0.1}, seed=3,
                                        num_workers=1, ps_shards=2)
        try:
            peak, received = streamed_pull(target, session, dim)
            if "assembled_peak_bytes" not in figures:
                figures["assembled_peak_bytes"] = traced_peak(lambda: client.pull_parameters(session))
                assert figures["assembled_peak_bytes"] >= table_bytes  # the measurement sees a table held whole
        finally:
            client.close_session(session)
        assert received["bytes"] == table_bytes  # the whole table went out
        last_row = table_rows(np, 3, TABLE, np.array([rows - 1]), (rows, dim), np.float32)[0]
        np.testing.assert_array_equal(received["last"], last_row)
        figures["tables"].append({"table_bytes": table_bytes, "streamed_peak_bytes": peak})
    print(json.dumps(figures))
    return figures


def test_the_gateway_holds_a_few_parts_of_a_table_never_the_table(client, target):
    """Tables of 64 and 256 MB: the process's traced peak while streaming (the gateway's, and here
    its in-process servers' scratch for making rows) is the same few parts for both, well below
    either table."""
    small, large = measured_pulls(client, target, (2_000_000, 8_000_000))["tables"]
    assert small["streamed_peak_bytes"] < small["table_bytes"] / 2
    # four times the table, no more memory: O(part)
    assert large["streamed_peak_bytes"] < 1.25 * small["streamed_peak_bytes"] + CHUNK_BYTES


@pytest.mark.integration
def test_on_ray_the_gateway_process_holds_a_few_parts():
    """The servers in their own Ray processes: what this process traces is the gateway's alone
    (the shards' answers arrive in Ray's shared object store): a few parts of a 64 MB table."""
    from gradserve_services.cluster import RayExecutor

    with serving(RayExecutor(num_workers=1, num_cpus=2, object_store_memory=256 * 1024 * 1024)) as address:
        with Client(address, timeout=300, retries=0) as client:
            (table,) = measured_pulls(client, address, (2_000_000,))["tables"]
    assert table["streamed_peak_bytes"] < 4 * PART_BYTES < table["table_bytes"] / 4
