"""Transport throughput of the gRPC API against a bare gRPC bytes stream (the ceiling).

Cases: ComputeGradients on a 784-1024-1024-10 MLP (7.45 MB of parameters in, 7.45 MB of gradients
out; the executor's own compute time is subtracted), and pushing (CreateSession) and pulling
(PullParameters) a 100M-parameter float32 model. The ceiling is a servicer defined here that moves
raw 1 MiB `bytes` messages with no protobuf at all, measured in the same run, in the same process
layout (client and server in this process), for the same byte counts and directions. Like any real
transfer (and like the SDK), its sender slices the bytes out of an array and its receiver copies
them into a preallocated buffer: one copy each side, no more.
Each number is the best of `--repeats` runs: the machine is shared, and the best run is the one
least disturbed by other work. Every run of a case is followed by a run of its ceiling, so load
that comes and goes falls on both alike. Work the service does besides transport (compute for
ComputeGradients; validating and copying parameters into a trainer for a push; snapshotting them
for a pull) is measured and subtracted, and reported in the line.
"""

from __future__ import annotations

import json
import time
from concurrent import futures

import grpc
import numpy as np

__all__ = ["add_arguments", "run"]

MIB = 1 << 20
BARE_SERVICE = "gradserve.bench.BareBytes"


def add_arguments(parser) -> None:
    parser.add_argument("--repeats", type=int, default=3, help="runs per case; the best is reported")
    parser.add_argument("--big-parameters", type=int, default=100_000_000,
                        help="parameters of the push/pull model (float32)")
    parser.add_argument("--batch", type=int, default=64, help="rows of the ComputeGradients batch")


def run(args) -> int:
    from gradserve import Client, mlp
    from gradserve_services.cluster import LocalExecutor
    from gradserve_services.gateway import create_server

    executor = LocalExecutor(num_workers=1)
    gateway, port = create_server(executor, max_concurrent_calls=8)
    bare_server, bare_port = _start_bare_server()
    target = f"127.0.0.1:{port}"
    try:
        with Client(target, timeout=600, retries=0) as client, _BareClient(f"127.0.0.1:{bare_port}") as bare:
            for line in (
                _compute_gradients_case(client, bare, executor, mlp(784, [1024, 1024], 10), args),
                *_model_cases(client, bare, executor, args),
            ):
                print(json.dumps(line), flush=True)
    finally:
        gateway.stop(grace=1)
        bare_server.stop(grace=1).wait()
        executor.shutdown()
    return 0


# ----- cases --------------------------------------------------------------------------------------

def _compute_gradients_case(client, bare, executor, spec, args) -> dict:
    from gradserve_services.engine import Model

    params = Model(spec).init_parameters(seed=0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.batch, 784)).astype(np.float32)
    y = (np.arange(args.batch) % 10).astype(np.int64)
    bytes_in = sum(p.nbytes for p in params.values()) + x.nbytes + y.nbytes
    bytes_out = sum(p.nbytes for p in params.values())
    transfer, compute, bare_seconds = [], [], []
    for _ in range(args.repeats):  # interleaved with the ceiling, so both see the same load
        started = time.perf_counter()
        result = client.compute_gradients(spec, params, x, y)
        elapsed = time.perf_counter() - started
        compute_s = result.timings_ms["total"] / 1e3
        transfer.append(elapsed - compute_s)
        compute.append(compute_s)
        bare_seconds.append(bare.upload(bytes_in) + bare.download(bytes_out))
    best = int(np.argmin(transfer))
    ceiling = min(bare_seconds)
    line = _line("compute_gradients_784-1024-1024-10", bytes_in + bytes_out, transfer[best], ceiling)
    line["compute_seconds"] = round(compute[best], 6)
    return line


def _model_cases(client, bare, executor, args) -> list[dict]:
    from gradserve_services.cluster import TrainerConfig
    from gradserve_services.cluster.handover import hand_over
    from gradserve_services.engine import Model

    features = int(round(args.big_parameters ** 0.5))
    spec = {"input_features": features, "nodes": [
        {"name": "dense", "op": "dense", "inputs": ["input"], "units": features, "bias": False}],
        "output": "dense", "loss": "mse"}
    params = {"dense.weight": np.random.default_rng(0).standard_normal((features, features), dtype=np.float32)}
    nbytes = params["dense.weight"].nbytes

    # Work the service does besides moving bytes, measured here in process and subtracted so the
    # numbers are the transport alone: a push validates the parameters and makes a trainer of them
    # (which keeps the received buffers, handed over, as its parameters: so is the copy here, made
    # before the clock starts); a pull streams the parameters from where the servers keep them
    # (Trainer.parameters_in_place: it only takes the trainer's lock and views the arrays).
    def push_server_work() -> float:
        received = hand_over({name: value.copy() for name, value in params.items()})
        started = time.perf_counter()
        Model(spec).validate_parameters(received)
        executor.create_trainer(TrainerConfig(spec, num_workers=1), received).close()
        return time.perf_counter() - started

    trainer = executor.create_trainer(TrainerConfig(spec, num_workers=1), params)

    def pull_server_work() -> float:
        started = time.perf_counter()
        with trainer.parameters_in_place():
            pass
        return time.perf_counter() - started

    push_server, push_times, bare_up, sessions = [], [], [], []
    for _ in range(args.repeats):  # each run next to its ceiling run, so both see the same load
        push_server.append(push_server_work())
        started = time.perf_counter()
        sessions.append(client.create_session(spec, params, num_workers=1))
        push_times.append(time.perf_counter() - started)
        bare_up.append(bare.upload(nbytes))
        if len(sessions) > 1:
            client.close_session(sessions.pop(0))
    pull_server, pull_times, bare_down = [], [], []
    for _ in range(args.repeats):
        pull_server.append(pull_server_work())
        started = time.perf_counter()
        client.pull_parameters(sessions[-1])
        pull_times.append(time.perf_counter() - started)
        bare_down.append(bare.download(nbytes))
    client.close_session(sessions[-1])
    trainer.close()
    label = f"{features * features / 1e6:.0f}M_float32"
    lines = []
    for case, times, server, ceiling in (("push", push_times, push_server, bare_up),
                                         ("pull", pull_times, pull_server, bare_down)):
        server_s = min(server)
        line = _line(f"{case}_{label}", nbytes, min(times) - server_s, min(ceiling))
        line["server_seconds_subtracted"] = round(server_s, 6)
        lines.append(line)
    return lines


def _line(case: str, nbytes: int, seconds: float, ceiling_seconds: float) -> dict:
    rate = nbytes / seconds / 1e9
    ceiling = nbytes / ceiling_seconds / 1e9
    return {"case": case, "bytes": nbytes, "seconds": round(seconds, 6), "gb_per_s": round(rate, 4),
            "ceiling_gb_per_s": round(ceiling, 4), "fraction_of_ceiling": round(rate / ceiling, 4)}


# ----- the ceiling: raw bytes, 1 MiB per message, no protobuf ------------------------------------

def _start_bare_server():
    from gradserve.rpc.options import CHANNEL_OPTIONS

    def upload(chunks, context):
        nbytes = int(dict(context.invocation_metadata())["nbytes"])
        received, offset = np.empty(nbytes, np.uint8), 0
        for chunk in chunks:
            received[offset: offset + len(chunk)] = np.frombuffer(chunk, np.uint8)
            offset += len(chunk)
        return offset.to_bytes(8, "little")

    def download(request, context):
        nbytes = int.from_bytes(request, "little")
        source = memoryview(np.zeros(nbytes, np.uint8))
        for offset in range(0, nbytes, MIB):
            yield source[offset: offset + MIB].tobytes()

    handler = grpc.method_handlers_generic_handler(BARE_SERVICE, {
        "Upload": grpc.stream_unary_rpc_method_handler(upload),
        "Download": grpc.unary_stream_rpc_method_handler(download),
    })
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=CHANNEL_OPTIONS)
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


class _BareClient:
    def __init__(self, target: str):
        from gradserve.rpc.options import CHANNEL_OPTIONS

        self._channel = grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
        self._upload = self._channel.stream_unary(f"/{BARE_SERVICE}/Upload")
        self._download = self._channel.unary_stream(f"/{BARE_SERVICE}/Download")

    def upload(self, nbytes: int) -> float:
        """Seconds to send `nbytes` (slices of an array, as the SDK sends tensors)."""
        source = memoryview(np.zeros(nbytes, np.uint8))
        started = time.perf_counter()
        chunks = (source[offset: offset + MIB].tobytes() for offset in range(0, nbytes, MIB))
        reply = self._upload(chunks, timeout=600, metadata=(("nbytes", str(nbytes)),))
        received = int.from_bytes(reply, "little")
        assert received == nbytes
        return time.perf_counter() - started

    def download(self, nbytes: int) -> float:
        """Seconds to receive `nbytes` into a preallocated buffer (as the SDK reassembles)."""
        target = np.empty(nbytes, np.uint8)
        started = time.perf_counter()
        offset = 0
        for chunk in self._download(nbytes.to_bytes(8, "little"), timeout=600):
            target[offset: offset + len(chunk)] = np.frombuffer(chunk, np.uint8)
            offset += len(chunk)
        assert offset == nbytes
        return time.perf_counter() - started

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self._channel.close()
