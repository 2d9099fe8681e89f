"""Transport throughput of the gRPC API against a bare gRPC bytes stream (the ceiling).

Cases: ComputeGradients on a 784-1024-1024-10 MLP (7.45 MB of parameters in, 7.45 MB of gradients
out; the executor's own compute time is subtracted), and pushing (CreateSession) and pulling
(PullParameters) a 100M-parameter float32 model. The ceiling is a servicer defined here that moves
raw 1 MiB `bytes` messages with no protobuf at all, measured in the same run, in the same process
layout (client and server in this process), for the same byte counts and directions. Like any real
transfer (and like the SDK), its sender slices the bytes out of an array and its receiver copies
them into a preallocated buffer: one copy each side, no more.
The push and pull cases run twice, on an in-process executor and on Ray (`--executors`; lines of
the Ray one end in `_ray`): there the parameter servers are actors in processes of their own, and
a push is measured to the moment the server holds the table (only the gateway's validation is
subtracted); its lines add the server's page faults and RSS growth per push (procfs.py), which
tell how many fresh pages the parameters landed in on their way to the server, and
`shared_huge_pages` the `huge=` option of the tmpfs they land in (GRADSERVE_SHARED_ROOT, shared.py).
Each number is the best of `--repeats` runs: the machine is shared, and the best run is the one
least disturbed by other work. Every run of a case is followed by a run of its ceiling, so load
that comes and goes falls on both alike. Work the service does besides transport (compute for
ComputeGradients; validating and copying parameters into a trainer for a push; snapshotting them
for a pull) is measured and subtracted, and reported in the line.
"""

from __future__ import annotations

import contextlib
import json
import time
from concurrent import futures

import grpc
import numpy as np

__all__ = ["add_arguments", "run"]

MIB = 1 << 20
BARE_SERVICE = "gradserve.bench.BareBytes"
EXECUTORS = ("local", "ray")
RAY_OBJECT_STORE_BYTES = 2 << 30  # room for a 100M-parameter push travelling through it


def add_arguments(parser) -> None:
    parser.add_argument("--repeats", type=int, default=3, help="runs per case; the best is reported")
    parser.add_argument("--big-parameters", type=int, default=100_000_000,
                        help="parameters of the push/pull model (float32)")
    parser.add_argument("--batch", type=int, default=64, help="rows of the ComputeGradients batch")
    parser.add_argument("--executors", default=",".join(EXECUTORS),
                        help="where the push/pull cases run, comma-separated: local (in process), ray")


def run(args) -> int:
    from gradserve_services.cluster import LocalExecutor

    executors = [name.strip() for name in args.executors.split(",") if name.strip()]
    unknown = sorted(set(executors) - set(EXECUTORS))
    if unknown:
        raise SystemExit(f"--executors: unknown {', '.join(unknown)}; choose from {', '.join(EXECUTORS)}")
    bare_server, bare_port = _start_bare_server()
    try:
        with _BareClient(f"127.0.0.1:{bare_port}") as bare:
            with _gateway(LocalExecutor(num_workers=1)) as (client, executor):
                _print(_compute_gradients_case(client, bare, executor, _mlp(), args))
                if "local" in executors:
                    _print(*_model_cases(client, bare, executor, args, ""))
            if "ray" in executors:
                with _gateway(_ray_executor()) as (client, executor):
                    _print(*_model_cases(client, bare, executor, args, "_ray"))
    finally:
        bare_server.stop(grace=1).wait()
    return 0


def _print(*lines) -> None:
    for line in lines:
        print(json.dumps(line), flush=True)


def _mlp():
    from gradserve import mlp

    return mlp(784, [1024, 1024], 10)


def _ray_executor():
    from gradserve_services.cluster import RayExecutor

    return RayExecutor("local", num_workers=1, num_cpus=2, object_store_memory=RAY_OBJECT_STORE_BYTES)


@contextlib.contextmanager
def _gateway(executor):
    """A gateway on `executor` and an SDK client of it; both stopped (and the executor shut down)
    on the way out."""
    from gradserve import Client
    from gradserve_services.gateway import create_server

    try:
        gateway, port = create_server(executor, max_concurrent_calls=8)
    except BaseException:
        executor.shutdown()
        raise
    try:
        with Client(f"127.0.0.1:{port}", timeout=600, retries=0) as client:
            yield client, executor
    finally:
        gateway.stop(grace=1)
        executor.shutdown()


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


def _model_cases(client, bare, executor, args, suffix: str) -> list[dict]:
    from gradserve_services import procfs
    from gradserve_services.cluster import TrainerConfig
    from gradserve_services.cluster.handover import hand_over
    from gradserve_services.cluster.shared import huge_pages
    from gradserve_services.engine import Model

    features = int(round(args.big_parameters ** 0.5))
    spec = {"input_features": features, "nodes": [
        {"name": "dense", "op": "dense", "inputs": ["input"], "units": features, "bias": False}],
        "output": "dense", "loss": "mse"}
    params = {"dense.weight": np.random.default_rng(0).standard_normal((features, features), dtype=np.float32)}
    nbytes = params["dense.weight"].nbytes
    in_process = not suffix  # the servers' tables live in this process

    # Work the service does besides moving bytes, measured here in process and subtracted so the
    # numbers are the transport alone: a push validates the parameters and, in process, makes a
    # trainer of them (which keeps the received buffers, handed over, as its parameters: so is the
    # copy here, made before the clock starts; over Ray, getting them into the server is the
    # transport's and stays in); a pull streams the parameters from where the servers keep them
    # (Trainer.parameters_in_place: it takes the trainer's lock and views the arrays).
    def push_server_work() -> float:
        received = hand_over({name: value.copy() for name, value in params.items()})
        started = time.perf_counter()
        Model(spec).validate_parameters(received)
        if in_process:
            executor.create_trainer(TrainerConfig(spec, num_workers=1), received).close()
        return time.perf_counter() - started

    trainer = executor.create_trainer(TrainerConfig(spec, num_workers=1), params)
    (server,) = trainer.server_pids()  # the pool's one server: every session's table lands there

    def pull_server_work() -> float:
        started = time.perf_counter()
        with trainer.parameters_in_place():
            pass
        return time.perf_counter() - started

    push_server, push_times, bare_up, sessions, faults, grown = [], [], [], [], [], []
    for _ in range(args.repeats):  # each run next to its ceiling run, so both see the same load
        push_server.append(push_server_work())
        faults_before, rss_before = procfs.minor_faults(server), procfs.rss_bytes(server)
        started = time.perf_counter()
        sessions.append(client.create_session(spec, params, num_workers=1))
        push_times.append(time.perf_counter() - started)
        faults.append(procfs.minor_faults(server) - faults_before)
        grown.append(procfs.rss_bytes(server) - rss_before)
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
    label = f"{features * features / 1e6:.0f}M_float32{suffix}"
    lines = []
    for case, times, server_work, ceiling in (("push", push_times, push_server, bare_up),
                                              ("pull", pull_times, pull_server, bare_down)):
        server_s = min(server_work)
        line = _line(f"{case}_{label}", nbytes, min(times) - server_s, min(ceiling))
        line["server_seconds_subtracted"] = round(server_s, 6)
        if case == "push" and not in_process:  # medians: every push lands the same bytes
            line["server_page_faults_per_push"] = int(np.median(faults))
            line["server_rss_growth_bytes_per_push"] = int(np.median(grown))
            area = getattr(executor, "shared_area", None)  # where pushed parameters land
            line["shared_huge_pages"] = huge_pages(area[0]) if area else "no area"
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
