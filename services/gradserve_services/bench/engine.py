"""Engine speed: one fwd+bwd step of gradserve vs PyTorch and vs the GEMM ceiling; reverse vs forward mode.

One JSON line per (model, threads): `gradserve_ms` and `torch_ms` are medians over `--repeats`
after a warm-up, same data, dtype and BLAS thread count, the three measurements taking turns. `gemm_ceiling_gflops` times, in this
same run, numpy matmul on exactly the GEMMs the step needs (forward `a @ W`, `a.T @ dz` for every
weight, `dz @ W.T` for every layer but the first) and `fraction_of_ceiling` is the step's
`achieved_gflops` over it: 1.0 would mean everything besides the GEMMs is free. A last line
(`"suite": "modes"`) times the full gradient of a small model by reverse mode and by forward mode
(one JVP per parameter element).
"""

from __future__ import annotations

import json
import statistics
import time

import numpy

from gradserve.builders import mlp
from gradserve_services.engine import Model
from gradserve_services.bench import significant

__all__ = ["add_arguments", "run", "mlp_spec"]

DEFAULT_MODELS = {"784-128-10": 64, "784-1024-1024-10": 256, "4096-4096-4096-10": 512}


def add_arguments(parser) -> None:
    parser.add_argument(
        "--models",
        default=",".join(DEFAULT_MODELS),
        help="comma-separated layer sizes, each optionally with :BATCH (default: the three issue models)",
    )
    parser.add_argument("--threads", default="1,2", help="comma-separated BLAS thread counts")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per measurement (median)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs before each measurement")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    parser.add_argument("--modes-model", default="64-32-10", help="model for the reverse vs forward mode line")
    parser.add_argument("--modes-batch", type=int, default=32)
    parser.add_argument("--no-modes", action="store_true", help="skip the reverse vs forward mode line")


def run(args) -> int:
    import torch
    from threadpoolctl import threadpool_limits

    torch_threads = torch.get_num_threads()
    for sizes, batch in _parse_models(args.models):
        for threads in (int(t) for t in args.threads.split(",")):
            with threadpool_limits(limits=threads, user_api="blas"):
                torch.set_num_threads(threads)
                line = measure_step(sizes, batch, threads, args.dtype, args.repeats, args.warmup)
            print(json.dumps(line), flush=True)
    torch.set_num_threads(torch_threads)
    if not args.no_modes:
        with threadpool_limits(limits=1, user_api="blas"):
            sizes = [int(s) for s in args.modes_model.split("-")]
            print(json.dumps(measure_modes(sizes, args.modes_batch, args.dtype, args.repeats)), flush=True)
    return 0


def mlp_spec(sizes: list[int], activation: str = "relu", loss: str = "softmax_cross_entropy") -> dict:
    """The SDK's MLP of layer widths `sizes` (input, hidden..., output)."""
    return mlp(sizes[0], list(sizes[1:-1]), sizes[-1], activation=activation, loss=loss)


def measure_step(sizes, batch, threads, dtype, repeats, warmup) -> dict:
    model = Model(mlp_spec(sizes))
    params = model.init_parameters(seed=0, dtype=dtype)
    rng = numpy.random.default_rng(0)
    x = rng.standard_normal((batch, sizes[0])).astype(dtype)
    y = rng.integers(0, sizes[-1], size=batch)

    gradserve_s, torch_s, gemm_s = _interleaved_medians(
        [lambda: model.loss_and_grad(params, x, y), _torch_step(sizes, params, x, y), _gemm_sequence(sizes, batch, dtype)],
        repeats,
        warmup,
    )
    flops = step_flops(sizes, batch)
    achieved = flops / gradserve_s / 1e9
    ceiling = flops / gemm_s / 1e9
    return {
        "model": "-".join(map(str, sizes)),
        "batch": batch,
        "threads": threads,
        "dtype": dtype,
        "gradserve_ms": significant(gradserve_s * 1e3),
        "torch_ms": significant(torch_s * 1e3),
        "ratio_vs_torch": significant(gradserve_s / torch_s),
        "achieved_gflops": significant(achieved),
        "gemm_ceiling_gflops": significant(ceiling),
        "fraction_of_ceiling": significant(achieved / ceiling),
    }


def step_flops(sizes, batch) -> int:
    """2*m*n*k for each GEMM of a step: forward, weight gradient, and input gradient except for the
    first layer (nothing consumes the gradient w.r.t. the batch)."""
    layers = list(zip(sizes[:-1], sizes[1:]))
    per_layer = [2 * batch * fan_in * fan_out for fan_in, fan_out in layers]
    return 3 * sum(per_layer) - per_layer[0]


def _gemm_sequence(sizes, batch, dtype):
    """The step's GEMMs with the step's operand layouts, into preallocated outputs."""
    rng = numpy.random.default_rng(1)
    calls = []
    for index, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        a = rng.standard_normal((batch, fan_in)).astype(dtype)
        w = rng.standard_normal((fan_in, fan_out)).astype(dtype)
        dz = rng.standard_normal((batch, fan_out)).astype(dtype)
        z, dw, da = numpy.empty_like(dz), numpy.empty_like(w), numpy.empty_like(a)
        calls.append((a, w, z))
        calls.append((a.T, dz, dw))
        if index > 0:
            calls.append((dz, w.T, da))

    def run_all():
        for left, right, out in calls:
            numpy.matmul(left, right, out=out)

    return run_all


def _torch_step(sizes, params, x, y):
    """The same MLP as idiomatic PyTorch (nn.Linear, F.cross_entropy), weights copied over."""
    import torch

    layers = []
    dense_layers = [name[:-len(".weight")] for name in params if name.endswith(".weight")]  # in order
    for index, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:]), start=1):
        linear = torch.nn.Linear(fan_in, fan_out, dtype=getattr(torch, str(x.dtype)))
        layer = dense_layers[index - 1]
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(params[f"{layer}.weight"].T.copy()))
            linear.bias.copy_(torch.from_numpy(params[f"{layer}.bias"]))
        layers.append(linear)
        if index < len(sizes) - 1:
            layers.append(torch.nn.ReLU())
    net = torch.nn.Sequential(*layers)
    inputs, labels = torch.from_numpy(x), torch.from_numpy(y)

    def step():
        net.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(net(inputs), labels).backward()

    return step


def measure_modes(sizes, batch, dtype, repeats) -> dict:
    """Full gradient by one reverse pass vs by one forward-mode JVP per parameter element."""
    model = Model(mlp_spec(sizes))
    params = model.init_parameters(seed=0, dtype=dtype)
    rng = numpy.random.default_rng(0)
    x = rng.standard_normal((batch, sizes[0])).astype(dtype)
    y = rng.integers(0, sizes[-1], size=batch)

    (reverse_s,) = _interleaved_medians([lambda: model.loss_and_grad(params, x, y)], repeats, 1)
    started = time.perf_counter()
    forward_grads = _gradient_by_forward_mode(model, params, x, y)
    forward_s = time.perf_counter() - started
    _, reverse_grads = model.loss_and_grad(params, x, y)
    disagreement = max(float(numpy.max(numpy.abs(forward_grads[k] - reverse_grads[k]))) for k in params)
    return {
        "suite": "modes",
        "model": "-".join(map(str, sizes)),
        "batch": batch,
        "dtype": dtype,
        "n_params": sum(int(p.size) for p in params.values()),
        "reverse_ms": round(reverse_s * 1e3, 3),
        "forward_ms": round(forward_s * 1e3, 3),
        "forward_over_reverse": round(forward_s / reverse_s, 1),
        "max_abs_diff": disagreement,
    }


def _gradient_by_forward_mode(model, params, x, y) -> dict:
    tangent = {name: numpy.zeros_like(value) for name, value in params.items()}
    grads = {name: numpy.empty_like(value) for name, value in params.items()}
    for name in params:
        direction, grad = tangent[name].reshape(-1), grads[name].reshape(-1)
        for index in range(direction.size):
            direction[index] = 1
            grad[index] = model.jvp(params, tangent, x, y)[1]
            direction[index] = 0
    return grads


# Pause between turns: PyTorch's OpenMP pool and OpenBLAS's threads keep spinning for a while
# after their last call, and with 2 threads on 2 cores that steals the next turn's cores (it
# showed as a GEMM ceiling below what the step itself reached).
SETTLE_S = 0.3


def _interleaved_medians(steps, repeats: int, warmup: int) -> list[float]:
    """Median seconds of each step, taking turns so that load from other processes on the machine
    falls on all of them alike rather than on whichever ran during it."""
    for step in steps:
        for _ in range(warmup):
            step()
        time.sleep(SETTLE_S)
    times = [[] for _ in steps]
    for _ in range(max(repeats, 1)):
        for step, samples in zip(steps, times):
            step()  # once untimed: the turn starts with warm caches and awake threads
            started = time.perf_counter()
            step()
            samples.append(time.perf_counter() - started)
            time.sleep(SETTLE_S)
    return [statistics.median(samples) for samples in times]


def _parse_models(text: str):
    for item in text.split(","):
        sizes_text, _, batch_text = item.strip().partition(":")
        sizes = [int(s) for s in sizes_text.split("-")]
        yield sizes, int(batch_text) if batch_text else DEFAULT_MODELS.get(sizes_text, 64)
