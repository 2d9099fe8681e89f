"""A hypothesis fuzzer against a live `gradserve serve` process (embedded Ray, bearer auth), at the
protobuf message level through real gRPC: thousands of malformed requests -- corrupt tensors, wrong
shapes and dtypes, NaN/Inf, huge dims, broken chunk streams, deep and cyclic graphs, unknown ops,
empty and absurd batches, bad configs, bad or foreign session ids, undecodable bytes.

What must hold for every one: the answer is an explicit client-error status (never INTERNAL,
UNKNOWN, or UNAVAILABLE, which would mean the server fell over); requests aimed at a session never
change it. At the end the server process is alive, healthy, and both sessions hold the parameters
and version they had before the first request.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gradserve
from gradserve import mlp
from gradserve.rpc.options import CHANNEL_OPTIONS
from gradserve.spec import spec_to_proto
from gradserve.v1 import model_pb2, service_pb2, service_pb2_grpc, tensor_pb2

from tests.support.serve_process import start_serve

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ALICE, BOB = "fuzz-alice-token-3b8e61f0", "fuzz-bob-token-9a02cd7e"
SPEC = mlp(6, [8], 3)
ROWS = 12
TIMEOUT_S = 30  # per request: nothing malformed may keep the server busy this long
# A client's mistake is answered with one of these; OK only where the request may be valid.
CLIENT_ERRORS = {
    grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.OUT_OF_RANGE,
}
# Derandomized so CI runs the same requests every time; GRADSERVE_FUZZ_RANDOM=1 explores afresh.
SETTINGS = dict(deadline=None, database=None, derandomize=not os.environ.get("GRADSERVE_FUZZ_RANDOM"),
                print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])
REQUESTS_PER_TEST = {"step": 800, "stream": 200, "compute": 550, "create": 250, "session": 200, "raw": 100}
sent = {"requests": 0}


class Live:
    """The server process, raw stubs for both identities, and the two sessions under guard."""

    def __init__(self, work_dir: Path):
        tokens = work_dir / "tokens"
        tokens.write_text(f"alice:{ALICE}\nbob:{BOB}\n")
        self.server = start_serve(work_dir / "serve.log", [
            "--workers", "1", "--auth-tokens-file", str(tokens), "--checkpoint-dir", str(work_dir / "ckpt")])
        self.channel = grpc.insecure_channel(self.server.target, options=CHANNEL_OPTIONS)
        self.stub = service_pb2_grpc.GradserveStub(self.channel)
        with gradserve.Client(self.server.target, token=ALICE) as alice, \
                gradserve.Client(self.server.target, token=BOB) as bob:
            self.victim = alice.create_session(SPEC, seed=1, num_workers=1)
            alice.step(self.victim, *valid_batch())
            self.foreign = bob.create_session(SPEC, seed=2, num_workers=1)
            bob.step(self.foreign, *valid_batch())
            self.before = {"alice": alice.pull_parameters(self.victim), "bob": bob.pull_parameters(self.foreign)}

    def call(self, method: str, request, token: str | None = ALICE):
        """One request; returns the status code (OK or the error's)."""
        sent["requests"] += 1
        metadata = (("authorization", f"Bearer {token}"),) if token else ()
        try:
            reply = getattr(self.stub, method)(request, timeout=TIMEOUT_S, metadata=metadata)
            if hasattr(reply, "__iter__") and not hasattr(reply, "ByteSize"):
                replies = list(reply)
                return grpc.StatusCode.OK, replies
            return grpc.StatusCode.OK, reply
        except grpc.RpcError as error:
            return error.code(), error.details()


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    live = Live(tmp_path_factory.mktemp("fuzz"))
    try:
        yield live
    finally:
        live.channel.close()
        live.server.stop()


def valid_batch(rows: int = ROWS, seed: int = 0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((rows, SPEC["input_features"])).astype(np.float32),
            (np.arange(rows) % 3).astype(np.int64))


def tensor(name: str, dtype: str, shape, data: bytes = b"", chunked: bool = False) -> tensor_pb2.NamedTensor:
    return tensor_pb2.NamedTensor(name=name, tensor=tensor_pb2.Tensor(dtype=dtype, shape=list(shape), data=data),
                                  chunked=chunked)


def array_tensor(name: str, array: np.ndarray) -> tensor_pb2.NamedTensor:
    return tensor(name, array.dtype.name, array.shape, array.tobytes())


def assert_client_error(code, detail, what) -> None:
    assert code in CLIENT_ERRORS, f"{what}: answered {code} ({detail!r})"


# ----- strategies: every request below is wrong in at least one way ------------------------------

INT64 = st.integers(-(1 << 63), (1 << 63) - 1)
DIMS = st.one_of(st.integers(-3, 20), st.sampled_from([1 << 20, 1 << 31, 1 << 40, (1 << 63) - 1, -(1 << 63)]))
BAD_DTYPES = st.one_of(st.sampled_from(["", "complex64", "float16", "uint8", "bool", "object", "FLOAT32",
                                         "float32 ", "<f4", "str", "float128"]), st.text(max_size=12))
WIRE_DTYPES = ["float32", "float64", "int64", "int32"]
SPECIALS = [np.nan, np.inf, -np.inf]


@st.composite
def malformed_batch(draw) -> tuple[str, list, list]:
    """(kind, header tensors, chunk messages) of a Step for the victim: always malformed."""
    x, y = valid_batch(draw(st.integers(1, 40)), seed=draw(st.integers(0, 3)))
    good_x, good_y = array_tensor("batch.x", x), array_tensor("batch.y", y)
    kind = draw(st.sampled_from(["dtype", "shape", "length", "special", "labels", "empty", "huge",
                                 "names", "chunks"]))
    chunks: list = []
    if kind == "dtype":
        which = draw(st.sampled_from(["x", "y", "x-wire", "y-wire"]))
        if which == "x":
            good_x = tensor("batch.x", draw(BAD_DTYPES.filter(lambda d: d not in WIRE_DTYPES)), x.shape, x.tobytes())
        elif which == "y":
            good_y = tensor("batch.y", draw(BAD_DTYPES.filter(lambda d: d not in WIRE_DTYPES)), y.shape, y.tobytes())
        elif which == "x-wire":  # a wire dtype, but not the session's float32
            good_x = array_tensor("batch.x", x.astype(draw(st.sampled_from(["float64", "int64", "int32"]))))
        else:  # class labels must be integers
            good_y = array_tensor("batch.y", y.astype(draw(st.sampled_from(["float32", "float64"]))))
    elif kind == "shape":
        shape = draw(st.lists(DIMS, max_size=10))
        if len(shape) == 2 and shape[1] == SPEC["input_features"] and shape[0] >= 1:
            shape[1] += draw(st.integers(1, 5))  # the right shape would make a valid batch
        count = math.prod(shape) if all(d >= 0 for d in shape) else 0
        size = count * 4 if 0 <= count * 4 <= 4096 else draw(st.integers(0, 64))
        good_x = tensor("batch.x", "float32", shape, draw(st.binary(min_size=size, max_size=size)))
    elif kind == "length":
        delta = draw(st.integers(-x.nbytes, 64).filter(lambda d: d != 0))
        raw = x.tobytes()
        good_x = tensor("batch.x", "float32", x.shape, raw[:len(raw) + delta] if delta < 0 else raw + b"\0" * delta)
    elif kind == "special":
        flat = x.reshape(-1).copy()
        for index in draw(st.lists(st.integers(0, flat.size - 1), min_size=1, max_size=4)):
            flat[index] = draw(st.sampled_from(SPECIALS))
        good_x = array_tensor("batch.x", flat.reshape(x.shape))
    elif kind == "labels":
        which = draw(st.sampled_from(["range", "count", "rank"]))
        if which == "range":
            bad = y.copy()
            bad[draw(st.integers(0, len(y) - 1))] = draw(st.one_of(st.integers(3, 1 << 40), st.integers(-(1 << 40), -1)))
            good_y = array_tensor("batch.y", bad)
        elif which == "count":
            rows = draw(st.integers(0, 60).filter(lambda r: r != len(y)))
            good_y = array_tensor("batch.y", (np.arange(rows) % 3).astype(np.int64))
        else:
            good_y = array_tensor("batch.y", np.zeros((len(y), 1), np.int64))
    elif kind == "empty":
        good_x, good_y = array_tensor("batch.x", x[:0]), array_tensor("batch.y", y[:0])
    elif kind == "huge":  # absurd batches declared, not sent
        rows = draw(st.sampled_from([1 << 24, 1 << 30, 1 << 40, (1 << 62) // 6]))
        good_x = tensor("batch.x", "float32", (rows, 6), b"", chunked=draw(st.booleans()))
        good_y = tensor("batch.y", "int64", (rows,), b"", chunked=True)
    elif kind == "names":
        which = draw(st.sampled_from(["no-x", "no-y", "extra", "twice", "empty", "param"]))
        if which == "no-x":
            return kind, [good_y], []
        if which == "no-y":
            return kind, [good_x], []
        if which == "extra":
            extra = draw(st.text(min_size=1, max_size=20).filter(lambda n: n not in ("batch.x", "batch.y")))
            return kind, [good_x, good_y, array_tensor(extra, x)], []
        if which == "twice":
            return kind, [good_x, good_y, good_y], []
        if which == "empty":
            return kind, [good_x, good_y, array_tensor("", x)], []
        return kind, [good_x, good_y, array_tensor("parameters.fc1.weight", np.zeros((6, 8), np.float32))], []
    else:  # chunk streams that do not add up
        raw = x.tobytes()
        good_x = tensor("batch.x", "float32", x.shape, b"", chunked=True)
        which = draw(st.sampled_from(["missing", "index", "offset", "overflow", "inline", "empty-chunk"]))
        cut = draw(st.integers(1, len(raw)))
        if which == "missing":
            chunks = [tensor_pb2.TensorChunk(index=0, offset=0, data=raw[:cut - 1])] if cut > 1 else []
        elif which == "index":
            chunks = [tensor_pb2.TensorChunk(index=draw(st.integers(1, (1 << 32) - 1)), offset=0, data=raw)]
        elif which == "offset":
            chunks = [tensor_pb2.TensorChunk(index=0, offset=draw(st.integers(1, (1 << 64) - 1)), data=raw)]
        elif which == "overflow":
            chunks = [tensor_pb2.TensorChunk(index=0, offset=0, data=raw + b"\0" * draw(st.integers(1, 4096)))]
        elif which == "inline":
            good_x = tensor("batch.x", "float32", x.shape, raw, chunked=True)
            chunks = [tensor_pb2.TensorChunk(index=0, offset=0, data=raw)]
        else:
            chunks = [tensor_pb2.TensorChunk(index=0, offset=0, data=b"")]
    return kind, [good_x, good_y], chunks


def step_messages(session_id: str, step_id: int, tensors: list, chunks: list) -> list:
    header = service_pb2.StepHeader(session_id=session_id, step_id=step_id, tensors=tensors)
    return [service_pb2.StepRequest(header=header)] + [service_pb2.StepRequest(chunk=c) for c in chunks]


NAMES = st.one_of(st.sampled_from(["input", "fc1", "act1", "fc2", "a", "b", ""]), st.text(max_size=8))
OPS = st.one_of(st.sampled_from(["dense", "relu", "leaky_relu", "sigmoid", "tanh", "gelu", "add", "concat",
                                 "layernorm", "dropout"]),
                st.sampled_from(["conv2d", "softmax", "eval", "__import__", "", "Dense", "lambda"]))
LOSSES = st.one_of(st.sampled_from(["softmax_cross_entropy", "binary_cross_entropy", "mse"]),
                   st.sampled_from(["", "hinge", "pickle"]))
FLOATS = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, -1.0, 1.0, 0.5]))
UNITS = st.one_of(st.integers(-2, 16), st.sampled_from([(1 << 20) + 1, 1 << 31, (1 << 63) - 1, -(1 << 63)]))


@st.composite
def fuzzed_node(draw) -> model_pb2.Node:
    node = model_pb2.Node(name=draw(NAMES), op=draw(OPS), inputs=draw(st.lists(NAMES, max_size=4)))
    for attribute, values in (("units", UNITS), ("bias", st.booleans()), ("alpha", FLOATS), ("eps", FLOATS),
                              ("rate", FLOATS)):
        if draw(st.booleans()):
            setattr(node, attribute, draw(values))
    return node


@st.composite
def fuzzed_spec(draw) -> model_pb2.ModelSpec:
    """Random graphs, deep chains, cycles and absurd widths; most are invalid, a few may not be."""
    kind = draw(st.sampled_from(["random", "random", "deep", "cycle", "wide", "valid-mutated"]))
    if kind == "random":
        return model_pb2.ModelSpec(input_features=draw(st.one_of(st.integers(-2, 16), INT64)),
                                   nodes=draw(st.lists(fuzzed_node(), max_size=8)),
                                   output=draw(NAMES), loss=draw(LOSSES))
    if kind == "deep":  # long chains, around the engine's node limit
        depth = draw(st.sampled_from([2_000, 9_999, 10_001, 30_000]))
        nodes = [model_pb2.Node(name="n0", op="dense", inputs=["input"], units=3)]
        nodes += [model_pb2.Node(name=f"n{i}", op=draw(st.sampled_from(["relu", "tanh"])), inputs=[f"n{i - 1}"])
                  for i in range(1, depth)]
        return model_pb2.ModelSpec(input_features=6, nodes=nodes, output=f"n{depth - 1}", loss="softmax_cross_entropy")
    if kind == "cycle":
        length = draw(st.integers(1, 50))
        nodes = [model_pb2.Node(name=f"c{i}", op="relu", inputs=[f"c{(i + 1) % length}"]) for i in range(length)]
        nodes.append(model_pb2.Node(name="out", op="add", inputs=["c0", "input"]))
        return model_pb2.ModelSpec(input_features=6, nodes=nodes, output="out", loss="mse")
    if kind == "wide":  # huge layers: parameters or activations beyond every limit
        return model_pb2.ModelSpec(
            input_features=draw(st.sampled_from([1 << 12, 1 << 20])),
            nodes=[model_pb2.Node(name="w", op="dense", inputs=["input"],
                                  units=draw(st.sampled_from([1 << 20, (1 << 20) + 1, 1 << 30])))],
            output="w", loss="mse")
    spec = spec_to_proto(SPEC)
    node = spec.nodes[draw(st.integers(0, len(spec.nodes) - 1))]
    change = draw(st.sampled_from(["op", "inputs", "units", "attr", "output", "loss", "features"]))
    if change == "op":
        node.op = draw(st.sampled_from(["conv2d", "", "eval", "Relu"]))
    elif change == "inputs":
        node.inputs[:] = draw(st.lists(st.sampled_from(["nowhere", node.name, "", "logits"]), min_size=1, max_size=3))
    elif change == "units":
        node.units = draw(st.sampled_from([0, -1, (1 << 20) + 1, -(1 << 63)]))
    elif change == "attr":
        node.rate = draw(FLOATS)  # dense and relu take no rate
    elif change == "output":
        spec.output = draw(st.sampled_from(["", "nowhere", "input"]))
    elif change == "loss":
        spec.loss = draw(st.sampled_from(["", "hinge", "__del__"]))
    else:
        spec.input_features = draw(st.sampled_from([0, -6, 1 << 21, -(1 << 63)]))
    return spec


@st.composite
def fuzzed_config(draw) -> tuple[service_pb2.CreateSessionHeader, bool]:
    """A session config with at least one bad value, or bad initial parameters, or a fuzzed model
    (which the second item says may happen to be valid)."""
    config = service_pb2.SessionConfig(model=spec_to_proto(SPEC), num_workers=1)
    change = draw(st.sampled_from(["optimizer", "schedule", "consistency", "workers", "shards", "compression",
                                   "dtype", "model", "parameters", "micro"]))
    tensors = []
    if change == "optimizer":
        config.optimizer.name = draw(st.sampled_from(["sgd", "adam", "adamw", "momentum", "nesterov", "lbfgs", ""]))
        field = draw(st.sampled_from(["lr", "momentum", "beta1", "beta2", "eps", "weight_decay", "clip_norm"]))
        bad = {"lr": st.sampled_from([0.0, -1.0, math.nan, math.inf]),
               "momentum": st.sampled_from([-0.5, 1.5, math.nan]),
               "beta1": st.sampled_from([1.0, -0.1, math.nan, math.inf]),
               "beta2": st.sampled_from([1.0, 2.0, math.nan]),
               "eps": st.sampled_from([-1e-8, math.nan, math.inf]),
               "weight_decay": st.sampled_from([-1.0, math.nan, math.inf]),
               "clip_norm": st.sampled_from([0.0, -1.0, math.nan, math.inf])}[field]
        setattr(config.optimizer, field, draw(bad))
        if config.optimizer.name == "lbfgs" or config.optimizer.name == "":
            config.optimizer.lr = -1.0  # keeps it wrong whatever the name means
    elif change == "schedule":
        schedule = config.optimizer.schedule
        field = draw(st.sampled_from(["name", "warmup_steps", "step_size", "gamma", "total_steps", "min_lr"]))
        bad = {"name": st.sampled_from(["linear", "", "exp"]), "warmup_steps": st.integers(-(1 << 63), -1),
               "step_size": st.integers(-(1 << 63), 0), "gamma": st.sampled_from([math.nan, -1.0, math.inf]),
               "total_steps": st.integers(-(1 << 63), -1), "min_lr": st.sampled_from([math.nan, -1.0, math.inf])}[field]
        if field in ("step_size", "gamma"):
            schedule.name = "step"
        elif field in ("total_steps", "min_lr"):
            schedule.name = "cosine"
        setattr(schedule, field, draw(bad))
    elif change == "consistency":
        config.consistency = draw(st.text(min_size=1, max_size=10).filter(lambda c: c not in ("sync", "async", "bounded")))
    elif change == "workers":
        config.num_workers = draw(st.sampled_from([17, 1000, 1 << 40, (1 << 64) - 1]))
    elif change == "shards":
        config.ps_shards = draw(st.sampled_from([17, 1 << 32, (1 << 64) - 1]))
    elif change == "compression":
        config.compression = draw(st.sampled_from(["zip", "pickle", "FP16", "top-k"]))
    elif change == "dtype":
        config.init.dtype = draw(BAD_DTYPES.filter(lambda d: d not in ("float32", "float64", "")))
    elif change == "model":
        config.model.CopyFrom(draw(fuzzed_spec()))
    elif change == "parameters":
        _, bad_batch, _ = draw(malformed_batch())  # malformed tensors under parameter names
        for entry in bad_batch:
            entry.name = draw(st.sampled_from(["parameters.fc1.weight", "parameters.fc1.bias",
                                               "parameters.logits.weight", "parameters.nothing", "batch.x"]))
        tensors = bad_batch
    else:
        config.micro_batch_size = (1 << 64) - 1  # accepted only if the service bounds it; then harmless
        config.consistency = "eventually"
    return service_pb2.CreateSessionHeader(config=config, tensors=tensors), change == "model"


# ----- the fuzz tests ----------------------------------------------------------------------------

@settings(max_examples=REQUESTS_PER_TEST["step"], **SETTINGS)
@given(request=malformed_batch(), step_id=st.integers(2, (1 << 64) - 1))
def test_malformed_steps(live, request, step_id):
    # Step id 1 is taken: a repeated id is answered from the step log, whatever the batch.
    kind, tensors, chunks = request
    code, detail = live.call("Step", iter(step_messages(live.victim, step_id, tensors, chunks)))
    assert_client_error(code, detail, f"Step {kind}")


@settings(max_examples=REQUESTS_PER_TEST["stream"], **SETTINGS)
@given(request=malformed_batch(), shape=st.sampled_from(["chunk-first", "empty-message", "as-is", "after-valid-chunks"]))
def test_malformed_step_streams(live, request, shape):
    kind, tensors, chunks = request
    messages = step_messages(live.victim, 10_000, tensors, chunks)
    if shape == "chunk-first":
        messages.insert(0, service_pb2.StepRequest(chunk=tensor_pb2.TensorChunk(index=0, offset=0, data=b"\0" * 8)))
    elif shape == "empty-message":
        messages.insert(0, service_pb2.StepRequest())
    elif shape == "after-valid-chunks":
        messages.append(service_pb2.StepRequest(chunk=tensor_pb2.TensorChunk(index=0, offset=0, data=b"\0")))
    for method in ("StreamSteps", "Step"):
        code, detail = live.call(method, iter(messages))
        assert_client_error(code, detail, f"{method} {shape} {kind}")


@settings(max_examples=REQUESTS_PER_TEST["compute"], **SETTINGS)
@given(spec=fuzzed_spec(), batch=malformed_batch(), with_parameters=st.booleans(), micro=st.one_of(
    st.just(0), st.integers(1, (1 << 64) - 1)), seed=st.integers(0, (1 << 64) - 1))
def test_fuzzed_compute_gradients(live, spec, batch, with_parameters, micro, seed):
    """Stateless, so a request that happens to be valid may be answered OK; nothing else but
    client errors."""
    _, tensors, chunks = batch
    if with_parameters:
        rng = np.random.default_rng(0)
        tensors = tensors + [array_tensor("parameters.fc1.weight", rng.standard_normal((6, 8)).astype(np.float32)),
                             array_tensor("parameters.fc1.bias", np.zeros(8, np.float32))]
    header = service_pb2.ComputeGradientsHeader(model=spec, tensors=tensors, micro_batch_size=micro, seed=seed)
    messages = [service_pb2.ComputeGradientsRequest(header=header)]
    messages += [service_pb2.ComputeGradientsRequest(chunk=c) for c in chunks]
    code, detail = live.call("ComputeGradients", iter(messages))
    if code != grpc.StatusCode.OK:
        assert_client_error(code, detail, f"ComputeGradients {spec.loss!r} {len(spec.nodes)} nodes")


@settings(max_examples=REQUESTS_PER_TEST["create"], **SETTINGS)
@given(fuzzed=fuzzed_config())
def test_fuzzed_create_session(live, fuzzed):
    header, may_be_valid = fuzzed
    messages = iter([service_pb2.CreateSessionRequest(header=header)])
    code, reply = live.call("CreateSession", messages)
    if code == grpc.StatusCode.OK:  # close it at once: the guarded sessions must stay alice's only
        live.call("CloseSession", service_pb2.CloseSessionRequest(session_id=reply.session_id))
        assert may_be_valid, f"a malformed config was accepted: {header.config}"
        return
    assert_client_error(code, reply, "CreateSession")


SESSION_IDS = st.one_of(st.text(max_size=64), st.sampled_from(["", "../ckpt", "*", "%s", "\0"]),
                        st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_",
                                min_size=32, max_size=32))


@settings(max_examples=REQUESTS_PER_TEST["session"], **SETTINGS)
@given(method=st.sampled_from(["PullParameters", "SaveCheckpoint", "RestoreCheckpoint", "CloseSession", "Step",
                               "StreamSteps", "Forward", "StepForward", "StepBackward"]),
       target=st.sampled_from(["random", "foreign", "victim-no-token", "victim-bad-token"]),
       session_id=SESSION_IDS,
       checkpoint=st.one_of(st.just(""), st.sampled_from(["../../etc/passwd", "/etc/passwd", "v1.npz",
                                                          "v999999999999.npz", "session.json", "."]),
                            st.text(max_size=30)))
def test_bad_session_ids_tokens_and_checkpoint_names(live, method, target, session_id, checkpoint):
    token = ALICE
    if target == "foreign":
        session_id = live.foreign  # bob's session, asked for with alice's token
    elif target == "victim-no-token":
        session_id, token = live.victim, None
    elif target == "victim-bad-token":
        session_id, token = live.victim, ALICE[:-1] + "x"
    if session_id in (live.victim, live.foreign) and target == "random":
        return
    x, y = valid_batch()
    requests = {
        "PullParameters": lambda: service_pb2.PullParametersRequest(session_id=session_id),
        "SaveCheckpoint": lambda: service_pb2.SaveCheckpointRequest(session_id=session_id),
        "RestoreCheckpoint": lambda: service_pb2.RestoreCheckpointRequest(session_id=session_id, checkpoint=checkpoint),
        "CloseSession": lambda: service_pb2.CloseSessionRequest(session_id=session_id),
        "Step": lambda: iter(step_messages(session_id, 20_000, [array_tensor("batch.x", x), array_tensor("batch.y", y)], [])),
        "StreamSteps": lambda: iter(step_messages(session_id, 20_000, [array_tensor("batch.x", x), array_tensor("batch.y", y)], [])),
        # the model as a function on a session: its forward, and both phases of a two-phase step
        "Forward": lambda: iter([service_pb2.ForwardRequest(header=service_pb2.ForwardHeader(
            session_id=session_id, tensors=[array_tensor("batch.x", x)]))]),
        "StepForward": lambda: iter([service_pb2.StepForwardRequest(header=service_pb2.StepForwardHeader(
            session_id=session_id, step_id=20_000, tensors=[array_tensor("batch.x", x)]))]),
        "StepBackward": lambda: iter([service_pb2.StepBackwardRequest(header=service_pb2.StepBackwardHeader(
            session_id=session_id, step_id=20_000, loss=0.5,
            tensors=[array_tensor("output_gradient", np.zeros((ROWS, 3), np.float32))]))]),
    }
    code, detail = live.call(method, requests[method](), token=token)
    assert_client_error(code, detail, f"{method} {target}")
    if target == "foreign":
        assert code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED), (method, code)
    elif target.startswith("victim"):
        assert code == grpc.StatusCode.UNAUTHENTICATED, (method, code)


@settings(max_examples=REQUESTS_PER_TEST["raw"], **SETTINGS)
@given(method=st.sampled_from(["ComputeGradients", "CreateSession", "Step", "StreamSteps", "PullParameters",
                               "SaveCheckpoint", "RestoreCheckpoint", "CloseSession", "ListSessions",
                               "Forward", "StepForward", "StepBackward", "DescribeModel", "GetServerInfo"]),
       payload=st.one_of(st.binary(min_size=1, max_size=256),
                         st.sampled_from([b"\x0a\xff\xff\xff\xff\x0f", b"\x12\x05abc", b"\xff" * 16, b"\x08"])))
def test_undecodable_bytes(live, method, payload):
    """Bytes that are no protobuf message (or not this one): the server cannot even parse them."""
    rpc = service_pb2.DESCRIPTOR.services_by_name["Gradserve"].methods_by_name[method]
    path = f"/gradserve.v1.Gradserve/{method}"
    kinds = {(False, False): live.channel.unary_unary, (False, True): live.channel.unary_stream,
             (True, False): live.channel.stream_unary, (True, True): live.channel.stream_stream}
    call = kinds[rpc.client_streaming, rpc.server_streaming](path, request_serializer=bytes,
                                                             response_deserializer=bytes)
    request = iter([payload]) if rpc.client_streaming else payload
    sent["requests"] += 1
    try:
        reply = call(request, timeout=TIMEOUT_S, metadata=(("authorization", f"Bearer {ALICE}"),))
        if rpc.server_streaming:
            list(reply)
    except grpc.RpcError as error:
        assert_client_error(error.code(), error.details(), f"{method} raw bytes")


def test_server_alive_and_sessions_unchanged(live):
    """Runs last: the tally, the process, its health, and both guarded sessions."""
    expected = sum(REQUESTS_PER_TEST.values()) + REQUESTS_PER_TEST["stream"]  # streams send two calls
    assert sent["requests"] >= min(expected, 2000), sent
    print(f"fuzz requests sent: {sent['requests']}")
    assert live.server.process.poll() is None, live.server.log_tail()
    health = health_pb2_grpc.HealthStub(live.channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    with gradserve.Client(live.server.target, token=ALICE) as alice, \
            gradserve.Client(live.server.target, token=BOB) as bob:
        for (who, client, session) in (("alice", alice, live.victim), ("bob", bob, live.foreign)):
            version, params = client.pull_parameters(session)
            before_version, before_params = live.before[who]
            assert version == before_version == 1
            for name, value in before_params.items():
                np.testing.assert_array_equal(params[name], value)
            # and the session still trains
            assert client.step(session, *valid_batch(seed=5), step_id=2).version == 2
        assert [s.session_id for s in alice.list_sessions()] == [live.victim]
