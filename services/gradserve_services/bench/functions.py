"""Client-side losses: what a two-phase step and a vector-Jacobian product cost against their peers.

Cases, each one JSON line, the peer measured in the same run on the same session configuration:
- `train_step`: `Client.train_step` (StepForward, the loss in numpy on the client, StepBackward;
  the service holds the activations in between) against `Client.step` with the same loss built in,
  milliseconds per step and their ratio.
- `held_backward`: the same two-phase step against the session forms `forward_session` +
  `vjp_session` (the loss in between; the vector-Jacobian product runs the forward again, nothing
  is held), milliseconds per gradient and their ratio: what holding the activations saves. The
  two-phase side also applies its update (plain SGD), which the peer does not, so the ratio is an
  upper bound of its cost.
Each number is the best of `--repeats` runs of `--steps` calls, the case and its peer alternating,
so load that comes and goes falls on both alike. The service is in this process over the
in-process executor (one worker), so both sides pay the same gRPC and thread costs.
"""

from __future__ import annotations

import json
import time

import numpy as np

__all__ = ["add_arguments", "run"]


def add_arguments(parser) -> None:
    parser.add_argument("--repeats", type=int, default=3, help="runs per case; the best is reported")
    parser.add_argument("--steps", type=int, default=10, help="calls per run")
    parser.add_argument("--batch", type=int, default=256, help="rows per batch")
    parser.add_argument("--hidden", type=int, nargs="+", default=[1024, 1024], help="hidden layer widths")


def _cross_entropy(labels):
    def loss(logits):
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        rows = np.arange(len(labels))
        grad = np.exp(log_p)
        grad[rows, labels] -= 1
        return float(-log_p[rows, labels].mean()), grad / len(labels)
    return loss


def _best_ms(calls: int, repeats: int, first, second) -> tuple[float, float]:
    """Best per-call milliseconds of `first()` and `second()`, runs alternating."""
    best = [float("inf"), float("inf")]
    for _ in range(repeats):
        for index, call in enumerate((first, second)):
            started = time.perf_counter()
            for _ in range(calls):
                call()
            best[index] = min(best[index], (time.perf_counter() - started) * 1e3 / calls)
    return best[0], best[1]


def run(args) -> int:
    from gradserve import Client, mlp
    from gradserve_services.cluster import LocalExecutor
    from gradserve_services.engine import Model
    from gradserve_services.gateway import create_server

    spec = mlp(784, list(args.hidden), 10)
    params = Model(spec).init_parameters(seed=0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.batch, 784)).astype(np.float32)
    y = rng.integers(0, 10, args.batch)
    loss = _cross_entropy(y)
    model = f"784-{'-'.join(map(str, args.hidden))}-10"
    executor = LocalExecutor(num_workers=1)
    gateway, port = create_server(executor)
    try:
        with Client(f"127.0.0.1:{port}", timeout=600, retries=0) as client:
            # plain SGD at a tiny rate: both sessions stay near the same parameters all run long
            sessions = [client.create_session(spec, params, optimizer={"name": "sgd", "lr": 1e-6}, num_workers=1)
                        for _ in range(2)]
            step_ms, two_phase_ms = _best_ms(args.steps, args.repeats, lambda: client.step(sessions[0], x, y),
                                             lambda: client.train_step(sessions[1], x, loss))
            print(json.dumps({"case": "train_step", "model": model, "batch": args.batch,
                              "train_step_ms": round(two_phase_ms, 3), "step_ms": round(step_ms, 3),
                              "ratio_to_step": round(two_phase_ms / step_ms, 3)}), flush=True)
            def recomputed():
                _, output = client.forward_session(sessions[0], x)
                client.vjp_session(sessions[0], x, loss(output)[1])

            recomputed_ms, held_ms = _best_ms(args.steps, args.repeats, recomputed,
                                              lambda: client.train_step(sessions[1], x, loss))
            print(json.dumps({"case": "held_backward", "model": model, "batch": args.batch,
                              "held_ms": round(held_ms, 3), "recomputed_forward_ms": round(recomputed_ms, 3),
                              "ratio_to_recomputed": round(held_ms / recomputed_ms, 3)}), flush=True)
            for session in sessions:
                client.close_session(session)
    finally:
        gateway.stop(grace=1)
        executor.shutdown()
    return 0
