"""training: gradserve sync training on Ray workers vs PyTorch (one process) and PyTorch DDP (gloo).

One run measures all three on the same model (784-1024-1024-10 MLP, float32), the same global batch
and synthetic data, so the ratios compare like with like on this machine at this moment:
gradserve with N worker actors (one BLAS thread each) and a parameter server; PyTorch in one process
with N threads; PyTorch DistributedDataParallel with N processes of one thread each.

`--repeats` repetitions (default 3) each measure the three systems in turn and print a line
(`"repetition": i`); a last line (`"repetition": "median"`) holds the median of every figure over
them, ratios included (the median of the per-repetition ratios, each taken within one repetition).
The phase fields are means over a repetition's timed steps: `gather_ms` and `apply_ms` are how long
those phases ran, and `hidden_ms` is the part of them that ran while workers still computed
(broadcast + compute + gather + apply - total, plus `overlapped_ms`: the servers' summing of
gradient buckets pushed while a worker still computed). gradserve runs as a trainer does by
default (`pushes_gradients` says whether that pushed its gradients in buckets during backward: only
where the machine has a core to spare beyond the workers), then on the other path;
`pushed_samples_per_s` and `returned_samples_per_s` (each worker returning its sums when done) are
the two, `pushed_over_returned` their ratio. Each step is given the next as a stream of steps
gives it (StreamSteps, `gradserve train`), so it is begun before the one before it ends where
steps can overlap; `serial_samples_per_s` is the returned path with each step run alone (Step
calls one after another), `ahead_over_serial` the gain.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import time

import numpy as np

from gradserve.builders import mlp

__all__ = ["add_arguments", "run", "reference_spec", "synthetic_batches", "measure_gradserve"]

LAYERS = (784, 1024, 1024, 10)


def add_arguments(parser) -> None:
    parser.add_argument("--steps", type=int, default=30, help="timed steps per system")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--batch", type=int, default=512, help="global batch size")
    parser.add_argument("--workers", type=int, default=2,
                        help="gradserve workers = torch threads = DDP processes")
    parser.add_argument("--ray-address", default=None, help="Ray cluster (default: embedded)")
    parser.add_argument("--skip-torch", action="store_true", help="measure gradserve only")
    parser.add_argument("--repeats", type=int, default=3,
                        help="repetitions, each of every system; a last line holds the medians")


def reference_spec(layers=LAYERS) -> dict:
    """The SDK's ReLU MLP of layer widths `layers` (input, hidden..., classes)."""
    return mlp(layers[0], list(layers[1:-1]), layers[-1])


def synthetic_batches(count: int, rows: int, seed: int = 0, layers=LAYERS):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((rows, layers[0]), dtype=np.float32),
             rng.integers(0, layers[-1], rows).astype(np.int64)) for _ in range(count)]


def measure_gradserve(executor, *, workers: int, batch: int, steps: int, warmup: int,
                      layers=LAYERS, push_gradients: bool | None = None, ahead: bool = True) -> dict:
    """Samples/s of sync SGD steps and the mean phase breakdown (ms) over the timed steps. With
    `ahead`, each step is given the next (`Trainer.step(..., then=...)`), as StreamSteps and
    `gradserve train` give it: the next step's workers start the moment the update is published."""
    from gradserve_services.cluster import TrainerConfig
    from gradserve_services.engine import Model

    spec = reference_spec(layers)
    params = Model(spec).init_parameters(seed=0, dtype="float32")
    trainer = executor.create_trainer(
        TrainerConfig(spec, {"name": "sgd", "lr": 0.01}, num_workers=workers, push_gradients=push_gradients),
        params)
    data = synthetic_batches(4, batch, layers=layers)
    try:
        for step in range(warmup):
            trainer.step(step, *data[step % len(data)])  # step ids are integers
        results = []
        started = time.perf_counter()
        for step in range(steps):
            then = (warmup + step + 1, *data[(step + 1) % len(data)]) if ahead and step + 1 < steps else None
            results.append(trainer.step(warmup + step, *data[step % len(data)], then=then))
        elapsed = time.perf_counter() - started
    finally:
        trainer.close()
    phases = ("broadcast", "compute", "gather", "apply", "total")
    breakdown = {f"{phase}_ms": round(float(np.mean([r.timings[phase] for r in results])), 3)
                 for phase in phases}
    breakdown["hidden_ms"] = round(float(np.mean([hidden_ms(r.timings) for r in results])), 3)
    breakdown["overlapped_ms"] = round(float(np.mean([r.timings.get("overlapped", 0.0) for r in results])), 3)
    return {"samples_per_s": batch * steps / elapsed, "breakdown": breakdown,
            "final_loss": results[-1].loss, "pushed": "reduced" in results[-1].timings}


def hidden_ms(timings: dict) -> float:
    """The part of a step's gather and apply that overlapped the workers' compute: the phases'
    durations add up to more than the step's wall time by exactly that much; and, where the
    workers pushed their gradients during backward, the servers' summing of the buckets that came
    while a worker still computed (`overlapped`)."""
    phases = timings["broadcast"] + timings["compute"] + timings["gather"] + timings["apply"]
    return max(phases - timings["total"], 0.0) + timings.get("overlapped", 0.0)


# ----- PyTorch baselines (each in fresh processes, so thread settings do not leak) ---------------

def _torch_model(layers):
    import torch

    modules = []
    for index, (fan_in, fan_out) in enumerate(zip(layers[:-1], layers[1:])):
        modules.append(torch.nn.Linear(fan_in, fan_out))
        if index < len(layers) - 2:
            modules.append(torch.nn.ReLU())
    return torch.nn.Sequential(*modules)


def _torch_steps(model, optimizer, batches, steps, warmup):
    import torch

    def one(x, y):
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

    for step in range(warmup):
        one(*batches[step % len(batches)])
    started = time.perf_counter()
    for step in range(steps):
        one(*batches[step % len(batches)])
    return time.perf_counter() - started


def _torch_single(queue, threads, batch, steps, warmup, layers):
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = _torch_model(layers)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    batches = [(torch.from_numpy(x), torch.from_numpy(y))
               for x, y in synthetic_batches(4, batch, layers=layers)]
    queue.put(batch * steps / _torch_steps(model, optimizer, batches, steps, warmup))


def _torch_ddp(rank, world, port, queue, batch, steps, warmup, layers):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = torch.nn.parallel.DistributedDataParallel(_torch_model(layers))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        local = batch // world
        batches = [(torch.from_numpy(x[rank * local:(rank + 1) * local]),
                    torch.from_numpy(y[rank * local:(rank + 1) * local]))
                   for x, y in synthetic_batches(4, batch, layers=layers)]
        dist.barrier()
        elapsed = _torch_steps(model, optimizer, batches, steps, warmup)
        dist.barrier()
        if rank == 0:
            queue.put(local * world * steps / elapsed)
    finally:
        dist.destroy_process_group()


def measure_torch(*, threads: int, batch: int, steps: int, warmup: int, layers=LAYERS) -> float:
    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    process = context.Process(target=_torch_single,
                              args=(queue, threads, batch, steps, warmup, layers))
    process.start()
    process.join()
    if process.exitcode != 0:
        raise RuntimeError(f"torch baseline exited with {process.exitcode}")
    return queue.get()


def measure_ddp(*, processes: int, batch: int, steps: int, warmup: int, layers=LAYERS) -> float:
    import torch.multiprocessing as mp

    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_torch_ddp, args=(processes, _free_port(), queue, batch, steps, warmup, layers),
             nprocs=processes, join=True)
    return queue.get()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run(args) -> int:
    from gradserve_services.cluster import RayExecutor

    executor = RayExecutor(address=args.ray_address, num_workers=args.workers)
    records = []
    try:
        for repetition in range(max(args.repeats, 1)):
            records.append(_measure_all(args, executor))
            _print({"repetition": repetition, **records[-1]})
    finally:
        executor.shutdown()
    _print({"repetition": "median", **median_record(records)})
    return 0


def _measure_all(args, executor) -> dict:
    """One repetition: PyTorch, DDP, then gradserve, back to back (their ratios are this run's)."""
    record = {"suite": "training", "model": "-".join(map(str, LAYERS)), "dtype": "float32",
              "global_batch": args.batch, "workers": args.workers, "steps": args.steps}
    if not args.skip_torch:
        record["torch_samples_per_s"] = measure_torch(
            threads=args.workers, batch=args.batch, steps=args.steps, warmup=args.warmup)
        record["ddp_samples_per_s"] = measure_ddp(
            processes=args.workers, batch=args.batch, steps=args.steps, warmup=args.warmup)
    measured = measure_gradserve(executor, workers=args.workers, batch=args.batch,
                                 steps=args.steps, warmup=args.warmup)
    record["gradserve_samples_per_s"] = measured["samples_per_s"]
    record.update(measured["breakdown"])
    # the same steps on the other gradient path (pushed during backward, or returned when done)
    other = measure_gradserve(executor, workers=args.workers, batch=args.batch, steps=args.steps,
                              warmup=args.warmup, push_gradients=not measured["pushed"])
    pushed, returned = (measured, other) if measured["pushed"] else (other, measured)
    # the returned path's steps one at a time, none begun ahead (Step calls, one after another)
    serial = measure_gradserve(executor, workers=args.workers, batch=args.batch, steps=args.steps,
                               warmup=args.warmup, push_gradients=False, ahead=False)
    record["pushes_gradients"] = measured["pushed"]
    record["pushed_samples_per_s"] = pushed["samples_per_s"]
    record["returned_samples_per_s"] = returned["samples_per_s"]
    record["pushed_over_returned"] = pushed["samples_per_s"] / returned["samples_per_s"]
    record["serial_samples_per_s"] = serial["samples_per_s"]
    record["ahead_over_serial"] = returned["samples_per_s"] / serial["samples_per_s"]
    if not args.skip_torch:
        record["ratio_vs_torch"] = record["gradserve_samples_per_s"] / record["torch_samples_per_s"]
        record["ratio_vs_ddp"] = record["gradserve_samples_per_s"] / record["ddp_samples_per_s"]
    return record


def median_record(records: list[dict]) -> dict:
    """The first record's descriptive fields with the median of every measured figure."""
    return {key: statistics.median(r[key] for r in records) if isinstance(value, float) else value
            for key, value in records[0].items()}


def _print(record: dict) -> None:
    print(json.dumps({key: round(value, 3) if isinstance(value, float) else value
                      for key, value in record.items()}), flush=True)
