"""links: training across slow links: sync dense, fp16, top-k, PowerSGD and local-SGD rounds.

One task for every configuration: a 784-512-512-10 MLP (float32) learning a planted teacher (x
standard normal, y the argmax of a fixed random 784-32-10 tanh network's logits, drawn fresh for
every batch from its seed), the same batches in the same order, the same sample budget. Each worker
is a Ray node in a network namespace of its own behind a tc-shaped link (links_site.py); the
coordinator and the parameter servers are on this machine. Sync configurations use AdamW (lr
1e-3); local rounds use it as their inner optimizer and DiLoCo's outer Nesterov (lr 0.7, momentum
0.9) on the servers.

One JSON line per configuration, sync dense (the peer) first, all from the same run:
suite "links", config, rate_mbit, samples, bytes_per_sample (what the workers sent the servers:
gradients, deltas or their compressed forms, as StepResult.bytes_compressed counts them),
bytes_ratio_vs_sync (sync dense's bytes_per_sample / this one's), link_bytes_per_sample and
link_bytes_ratio_vs_sync (every byte the links carried both ways, parameters and batches included,
from the host ends' interface counters), train_seconds (training only: evaluations excluded),
seconds_to_target (training seconds until the held-out loss first reached the target: the loss
sync dense reached after `--target-fraction` of the budget; null if never), speedup_vs_sync (sync
dense's seconds_to_target / this one's; null if the target was not reached), eval_loss (held-out,
after the whole budget), eval_loss_ratio_vs_sync (this / sync dense's, at equal samples),
test_accuracy, updates (parameter versions applied).

Stopped by SIGTERM or SIGINT, the run removes its namespaces and Ray nodes as a finished one does
(stop_signals.py), and exits with 128 + the signal's number. SIGUSR1 writes every thread's stack
to stderr and the run goes on; stderr also has a line per evaluation (step, training seconds,
held-out loss).
"""

from __future__ import annotations

import faulthandler
import json
import math
import signal
import sys
import time

import numpy as np

__all__ = ["add_arguments", "run", "CONFIGS", "teacher_batch", "measure"]

LAYERS = (784, 512, 512, 10)
TEACHER_HIDDEN = 32
ADAMW = {"name": "adamw", "lr": 1e-3}
# name -> TrainerConfig settings; the optimizer is filled in by the mode.
CONFIGS = {
    "sync": {"consistency": "sync", "compression": "none"},
    "sync_fp16": {"consistency": "sync", "compression": "fp16"},
    "sync_topk": {"consistency": "sync", "compression": "topk", "topk_fraction": 0.01},
    "sync_powersgd_r4": {"consistency": "sync", "compression": "powersgd", "powersgd_rank": 4},
    "local_h10": {"consistency": "local", "local_steps": 10},
    "local_h50": {"consistency": "local", "local_steps": 50},
}


def add_arguments(parser) -> None:
    parser.add_argument("--rate-mbit", type=float, default=100.0, help="each worker's link rate")
    parser.add_argument("--steps", type=int, default=300,
                        help="sample budget in sync steps (local rounds get steps / H rounds)")
    parser.add_argument("--batch", type=int, default=256, help="rows per sync step (inner batch)")
    parser.add_argument("--workers", type=int, default=2, help="worker nodes, one namespace each")
    parser.add_argument("--configs", default=",".join(CONFIGS),
                        help="comma-separated subset of " + ", ".join(CONFIGS) + " (sync always runs)")
    parser.add_argument("--eval-every", type=int, default=10, help="sync steps between evaluations")
    parser.add_argument("--call-timeout-s", type=int, default=None,
                        help="seconds a step's call may take before its actor counts as stuck and the "
                             "shard is re-run (default: the trainer's)")
    parser.add_argument("--eval-rows", type=int, default=4096, help="held-out rows")
    parser.add_argument("--target-fraction", type=float, default=0.75,
                        help="the target is sync dense's held-out loss after this share of the budget")


def run(args) -> int:
    from .links_site import SiteUnavailable, far_site
    from .stop_signals import stop_signals_raise

    names = ["sync"] + [n for n in args.configs.split(",") if n and n != "sync"]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        print(f"unknown config {unknown[0]!r}; one of {', '.join(CONFIGS)}", file=sys.stderr)
        return 2
    # SIGUSR1 writes every thread's stack to stderr: a supervisor that finds the run stuck asks it
    # where it waits before stopping it.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    try:  # stopped by SIGTERM or SIGINT, the site is removed as after a finished run
        with stop_signals_raise("links") as stop, far_site(args.workers, args.rate_mbit) as site:
            from gradserve_services.cluster import RayExecutor

            stop.last_resort(site.remove)
            executor = RayExecutor(address=site.address, num_workers=args.workers)
            stop.install()  # ray.init replaced the SIGTERM handler
            try:
                _warm_up(executor, args.workers)
                runs = {}
                for name in names:  # each line as soon as its run is measured (sync's comes first)
                    print(f"links: {name}", file=sys.stderr, flush=True)
                    runs[name] = measure(executor, site, name, args)
                    print(json.dumps(report(runs, args)[-1]), flush=True)
            finally:
                executor.shutdown()
    except SiteUnavailable as reason:
        print(f"links: {reason}", file=sys.stderr)
        return 2
    return 0


# ----- the task --------------------------------------------------------------------------------

def spec(layers=LAYERS) -> dict:
    from .training import reference_spec

    return reference_spec(layers)


def _teacher(seed: int):
    rng = np.random.default_rng([seed, 7])
    first = rng.standard_normal((LAYERS[0], TEACHER_HIDDEN)) / math.sqrt(LAYERS[0])
    second = rng.standard_normal((TEACHER_HIDDEN, LAYERS[-1])) * 3.0
    return first, second


def teacher_batch(seed: int, index: int, rows: int):
    """Batch `index` of the planted task: a pure function of (seed, index, rows)."""
    first, second = _teacher(seed)
    x = np.random.default_rng([seed, index]).standard_normal((rows, LAYERS[0]))
    y = np.argmax(np.tanh(x @ first) @ second, axis=1).astype(np.int64)
    return x.astype(np.float32), y


def _eval(model, params, x, y) -> tuple[float, float]:
    logits = np.asarray(model.forward(params, x), dtype=np.float64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    loss = float(-log_probs[np.arange(y.size), y].mean())
    return loss, float((logits.argmax(axis=1) == y).mean())


def measure(executor, site, name: str, args) -> dict:
    """Train one configuration over the site's links; its curve and totals."""
    from gradserve_services.cluster import TrainerConfig
    from gradserve_services.cluster.config import OUTER_OPTIMIZER
    from gradserve_services.engine import Model

    settings = dict(CONFIGS[name])
    local = settings["consistency"] == "local"
    optimizer = OUTER_OPTIMIZER if local else ADAMW
    if local:
        settings["inner_optimizer"] = ADAMW
    model = Model(spec())
    params = model.init_parameters(seed=0, dtype="float32")
    eval_x, eval_y = teacher_batch(1, 10**9, args.eval_rows)  # held out: no batch has this index
    h = settings.get("local_steps", 1)
    steps = args.steps // h  # steps of this trainer (rounds for local)
    eval_every = max(1, args.eval_every // h)
    if args.call_timeout_s is not None:
        settings["call_timeout_s"] = args.call_timeout_s
    trainer = executor.create_trainer(
        TrainerConfig(spec(), optimizer, num_workers=args.workers, **settings), params)
    print(f"links: {name}: trainer ready, {steps} steps", file=sys.stderr, flush=True)
    curve, sent, train_s, version = [], 0, 0.0, 0
    try:
        link_start = site.link_bytes()
        for step in range(steps):
            batches = [teacher_batch(1, step * h + i, args.batch) for i in range(h)]
            x = np.concatenate([b[0] for b in batches])
            y = np.concatenate([b[1] for b in batches])
            started = time.perf_counter()
            result = trainer.step(step, x, y)
            train_s += time.perf_counter() - started
            sent += result.bytes_compressed
            if (step + 1) % eval_every == 0 or step + 1 == steps:
                version, current = trainer.parameters()
                loss, accuracy = _eval(model, current, eval_x, eval_y)
                curve.append({"samples": (step + 1) * h * args.batch, "seconds": train_s,
                              "loss": loss, "accuracy": accuracy})
                print(f"links: {name}: step {step + 1}/{steps}, {train_s:.1f} s training, held-out loss "
                      f"{loss:.4f}", file=sys.stderr, flush=True)
        link = site.link_bytes() - link_start
    finally:
        trainer.close()
    samples = steps * h * args.batch
    return {"curve": curve, "samples": samples, "bytes": sent, "link_bytes": link,
            "train_s": train_s, "updates": version}


def _warm_up(executor, workers: int) -> None:
    """Start the worker actors and load the engine on them before any configuration is timed."""
    from gradserve_services.cluster import TrainerConfig
    from gradserve_services.engine import Model

    model = Model(spec())
    trainer = executor.create_trainer(TrainerConfig(spec(), ADAMW, num_workers=workers),
                                      model.init_parameters(seed=0, dtype="float32"))
    try:
        trainer.step(0, *teacher_batch(2, 0, 8 * workers))
    finally:
        trainer.close()


def report(runs: dict, args) -> list[dict]:
    """The JSON lines, every ratio against the sync dense run."""
    peer = runs["sync"]
    target_samples = args.target_fraction * peer["samples"]
    reached = [point for point in peer["curve"] if point["samples"] >= target_samples]
    target = (reached[0] if reached else peer["curve"][-1])["loss"]
    peer_seconds = _seconds_to(peer["curve"], target)
    lines = []
    for name, measured in runs.items():
        final = measured["curve"][-1]
        seconds = _seconds_to(measured["curve"], target)
        per_sample = measured["bytes"] / measured["samples"]
        link_per_sample = measured["link_bytes"] / measured["samples"]
        lines.append({
            "suite": "links", "config": name, "rate_mbit": args.rate_mbit, "workers": args.workers,
            "samples": measured["samples"], "updates": measured["updates"],
            "bytes_per_sample": round(per_sample, 1),
            "bytes_ratio_vs_sync": _ratio(peer["bytes"] / peer["samples"], per_sample),
            "link_bytes_per_sample": round(link_per_sample, 1),
            "link_bytes_ratio_vs_sync": _ratio(peer["link_bytes"] / peer["samples"], link_per_sample),
            "train_seconds": round(measured["train_s"], 2),
            "target_loss": round(target, 5),
            "seconds_to_target": None if seconds is None else round(seconds, 2),
            "speedup_vs_sync": None if seconds is None or peer_seconds is None
            else round(peer_seconds / seconds, 2),
            "eval_loss": round(final["loss"], 5),
            "eval_loss_ratio_vs_sync": round(final["loss"] / peer["curve"][-1]["loss"], 4),
            "test_accuracy": round(final["accuracy"], 4),
            "test_accuracy_vs_sync_points": round(100 * (final["accuracy"] - peer["curve"][-1]["accuracy"]), 2),
        })
    return lines


def _seconds_to(curve: list[dict], target: float):
    for point in curve:
        if point["loss"] <= target:
            return point["seconds"]
    return None


def _ratio(peer: float, this: float):
    return None if this == 0 else round(peer / this, 2)
