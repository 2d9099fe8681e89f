"""sparse: DLRM training with embedding tables on the parameter servers vs PyTorch in one process.

The model (the same on both sides): a bottom MLP 13-64-16 on the dense features, one table of
`--vocab` rows x `--dim` per categorical field (26), DLRM's dot interaction of the 27 vectors, a top
MLP to one click logit, binary cross-entropy with logits; Adam on the MLPs and a per-row optimizer
on the tables (`--table-optimizer`: sparse_adam or adagrad). Data: the synthetic click-through set
(jobs/synthetic_ctr.py, Zipf ids), `--batch` rows a step, the same batches for every system.

PyTorch runs in its own process with `--workers` threads: `nn.EmbeddingBag(sparse=True)` per field
with `torch.optim.SparseAdam` / `Adagrad` on the tables and `Adam` on the MLPs. gradserve runs sync
steps on `--workers` Ray workers with the tables row-sharded over 1 and 2 parameter-server shards
(config `sparse_tables`), and with the tables as dense parameters (config `dense_tables`,
`TrainerConfig.dense_tables`: the tables whole on the servers, updated by the dense Adam).

One JSON line per configuration: suite, config, ps_shards, samples_per_s, torch_samples_per_s,
ratio_vs_torch, and the table traffic per step: wire_bytes_per_step (rows the workers pulled plus
row gradients they pushed, as the service counts them), min_bytes_per_step (the step's distinct
rows per table pulled once plus each worker's distinct rows pushed, x dim x itemsize: what a
parameter-server exchange of rows must move), bytes_over_min, dense_bytes_per_step (every worker
pulling the tables whole and pushing whole table gradients; a dense_tables line's wire bytes are
that figure), dense_over_sparse, and server_rss_bytes (resident memory of the parameter-server
processes after the timed steps). A configuration the cluster cannot run prints its line with
`error` and null figures; the suite goes on.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np

__all__ = ["add_arguments", "run", "dlrm_spec", "ctr_batches", "min_bytes_per_step", "dense_bytes_per_step"]

DENSE_FEATURES = 13
BOTTOM = (64,)
TOP = (64,)
LR = 1e-3


def add_arguments(parser) -> None:
    parser.add_argument("--steps", type=int, default=10, help="timed steps per system")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--batch", type=int, default=4096, help="global batch size")
    parser.add_argument("--workers", type=int, default=2, help="gradserve workers = torch threads")
    parser.add_argument("--fields", type=int, default=26, help="categorical fields, a table each")
    parser.add_argument("--vocab", type=int, default=100_000, help="rows of each table")
    parser.add_argument("--dim", type=int, default=16, help="embedding width")
    parser.add_argument("--zipf", type=float, default=1.5, help="Zipf exponent of the ids")
    parser.add_argument("--ps-shards", default="1,2", help="parameter-server shard counts, comma-separated")
    parser.add_argument("--table-optimizer", default="sparse_adam", choices=("sparse_adam", "adagrad"),
                        help="the tables' per-row rule (torch: SparseAdam or Adagrad)")
    parser.add_argument("--ray-address", default=None, help="Ray cluster (default: embedded)")
    parser.add_argument("--skip-torch", action="store_true", help="measure gradserve only")


def dlrm_spec(fields: int, vocab: int, dim: int) -> dict:
    nodes, previous = [], "dense"
    for index, units in enumerate((*BOTTOM, dim), start=1):
        nodes += [{"name": f"bottom{index}", "op": "dense", "inputs": [previous], "units": units},
                  {"name": f"bottom{index}_act", "op": "relu", "inputs": [f"bottom{index}"]}]
        previous = f"bottom{index}_act"
    tables = [f"table{field}" for field in range(fields)]
    nodes += [{"name": name, "op": "embedding", "inputs": ["categorical"], "field": field, "rows": vocab, "dim": dim}
              for field, name in enumerate(tables)]
    nodes.append({"name": "interaction", "op": "dot_interaction", "inputs": [previous, *tables], "dim": dim})
    previous = "interaction"
    for index, units in enumerate(TOP, start=1):
        nodes += [{"name": f"top{index}", "op": "dense", "inputs": [previous], "units": units},
                  {"name": f"top{index}_act", "op": "relu", "inputs": [f"top{index}"]}]
        previous = f"top{index}_act"
    nodes.append({"name": "click", "op": "dense", "inputs": [previous], "units": 1})
    inputs = [{"name": "dense", "kind": "float", "features": DENSE_FEATURES},
              {"name": "categorical", "kind": "ids", "fields": fields}]
    return {"inputs": inputs, "nodes": nodes, "output": "click", "loss": "binary_cross_entropy"}


def ctr_batches(count: int, rows: int, *, fields: int, vocab: int, zipf: float, seed: int = 0):
    """`count` batches of (named inputs, clicks (rows, 1)) from the synthetic click-through set."""
    from gradserve_services.jobs.synthetic_ctr import make_synthetic_ctr

    data = make_synthetic_ctr(count * rows, seed=seed, fields=fields, vocab=vocab, zipf=zipf)
    batches = []
    for index in range(count):
        part = slice(index * rows, (index + 1) * rows)
        batches.append(({"dense": data.dense[part].astype(np.float32), "categorical": data.ids[part]},
                        data.clicks[part].astype(np.float32).reshape(-1, 1)))
    return batches


def min_bytes_per_step(ids: np.ndarray, workers: int, dim: int, itemsize: int) -> int:
    """The least a parameter-server exchange of rows moves: the step's distinct rows of every
    table pulled once (workers on one node read the same answers), and each worker's shard
    (contiguous rows, as the trainer splits) pushing one gradient row per distinct id it read
    (workers do not add their gradients among themselves): rows x dim x itemsize, summed."""
    from gradserve_services.cluster.sharding import split_rows

    pulled = sum(len(np.unique(ids[:, field])) for field in range(ids.shape[1]))
    pushed = sum(len(np.unique(ids[start:stop, field]))
                 for start, stop in split_rows(len(ids), workers) for field in range(ids.shape[1]))
    return (pulled + pushed) * dim * itemsize


def dense_bytes_per_step(fields: int, vocab: int, dim: int, itemsize: int, workers: int) -> int:
    """Tables as dense parameters: every worker reads them whole and pushes a whole gradient."""
    return 2 * workers * fields * vocab * dim * itemsize


# ----- gradserve ----------------------------------------------------------------------------------

def measure_gradserve(executor, spec: dict, params: dict, batches, *, config: str, ps_shards: int,
                      workers: int, steps: int, warmup: int, table_optimizer: str) -> dict:
    """Samples/s of sync steps and the mean table traffic the steps report."""
    from gradserve_services.cluster import TrainerConfig

    options = dict(num_workers=workers, ps_shards=ps_shards)
    if config == "sparse_tables":
        options["table_optimizer"] = {"name": table_optimizer, "lr": LR}
    else:
        options.update(_dense_tables_option())
    trainer = executor.create_trainer(TrainerConfig(spec, {"name": "adam", "lr": LR}, **options), params)
    try:
        for step in range(warmup):
            trainer.step(step, *batches[step % len(batches)])
        results = []
        started = time.perf_counter()
        for step in range(steps):
            results.append(trainer.step(warmup + step, *batches[step % len(batches)]))
        elapsed = time.perf_counter() - started
        rss = server_rss_bytes()
    finally:
        trainer.close()
    wire = [getattr(r, "bytes_pulled", 0) + getattr(r, "bytes_pushed", 0) for r in results]
    return {"samples_per_s": len(batches[0][1]) * steps / elapsed, "wire_bytes_per_step": float(np.mean(wire)),
            "server_rss_bytes": rss, "final_loss": results[-1].loss}


def _dense_tables_option() -> dict:
    """The TrainerConfig setting that keeps tables whole on the servers, if the cluster has one."""
    from gradserve_services.cluster import TrainerConfig

    fields = getattr(TrainerConfig, "__dataclass_fields__", {})
    if "dense_tables" in fields:
        return {"dense_tables": True}
    raise NotImplementedError("this cluster keeps every table row-sharded (no TrainerConfig.dense_tables)")


def server_rss_bytes() -> int:
    """Resident bytes of this process tree's parameter-server actor processes."""
    from gradserve_services import procfs

    return sum(procfs.rss_bytes(pid) for pid in procfs.descendants(os.getpid())
               if "ParameterServer" in procfs.cmdline(pid))


# ----- PyTorch, in a fresh process (its thread setting must not leak into ours) -------------------

def _torch_run(queue, threads, batches, fields, vocab, dim, steps, warmup, table_optimizer):
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = _TorchDlrm(torch, fields, vocab, dim)
    tables = list(model.tables.parameters())
    table_step = (torch.optim.SparseAdam(tables, lr=LR) if table_optimizer == "sparse_adam"
                  else torch.optim.Adagrad(tables, lr=LR))
    dense_step = torch.optim.Adam([p for name, p in model.named_parameters() if not name.startswith("tables.")], lr=LR)
    prepared = [(torch.from_numpy(x["dense"]), torch.from_numpy(x["categorical"]), torch.from_numpy(y))
                for x, y in batches]
    offsets = torch.arange(len(prepared[0][0]))

    def one(dense, ids, clicks):
        table_step.zero_grad(set_to_none=True)
        dense_step.zero_grad(set_to_none=True)
        torch.nn.functional.binary_cross_entropy_with_logits(model(dense, ids, offsets), clicks).backward()
        table_step.step()
        dense_step.step()

    for step in range(warmup):
        one(*prepared[step % len(prepared)])
    started = time.perf_counter()
    for step in range(steps):
        one(*prepared[step % len(prepared)])
    queue.put(len(prepared[0][0]) * steps / (time.perf_counter() - started))


def _TorchDlrm(torch, fields, vocab, dim):
    nn = torch.nn

    class Dlrm(nn.Module):
        def __init__(self):
            super().__init__()
            widths = (DENSE_FEATURES, *BOTTOM, dim)
            self.bottom = nn.Sequential(*[layer for a, b in zip(widths[:-1], widths[1:])
                                          for layer in (nn.Linear(a, b), nn.ReLU())])
            self.tables = nn.ModuleList([nn.EmbeddingBag(vocab, dim, mode="sum", sparse=True) for _ in range(fields)])
            pairs = (fields + 1) * fields // 2
            widths = (dim + pairs, *TOP)
            self.top = nn.Sequential(*[layer for a, b in zip(widths[:-1], widths[1:])
                                       for layer in (nn.Linear(a, b), nn.ReLU())], nn.Linear(widths[-1], 1))
            self.lower = torch.tril_indices(fields + 1, fields + 1, -1)

        def forward(self, dense, ids, offsets):
            bottom = self.bottom(dense)
            vectors = torch.stack([bottom] + [table(ids[:, f], offsets) for f, table in enumerate(self.tables)], 1)
            products = torch.bmm(vectors, vectors.transpose(1, 2))[:, self.lower[0], self.lower[1]]
            return self.top(torch.cat([bottom, products], 1))

    return Dlrm()


def measure_torch(*, threads: int, batches, fields: int, vocab: int, dim: int, steps: int, warmup: int,
                  table_optimizer: str) -> float:
    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    process = context.Process(target=_torch_run, args=(queue, threads, batches, fields, vocab, dim, steps, warmup,
                                                       table_optimizer))
    process.start()
    process.join()
    if process.exitcode != 0:
        raise RuntimeError(f"torch baseline exited with {process.exitcode}")
    return queue.get()


# ----- the suite -----------------------------------------------------------------------------------

def run(args) -> int:
    from gradserve_services.cluster import RayExecutor
    from gradserve_services.engine import Model

    batches = ctr_batches(4, args.batch, fields=args.fields, vocab=args.vocab, zipf=args.zipf)
    spec = dlrm_spec(args.fields, args.vocab, args.dim)
    params = Model(spec).init_parameters(seed=0, dtype="float32")
    itemsize = 4
    minimum = float(np.mean([min_bytes_per_step(x["categorical"], args.workers, args.dim, itemsize)
                             for x, _ in batches]))
    dense = dense_bytes_per_step(args.fields, args.vocab, args.dim, itemsize, args.workers)
    torch_rate = None if args.skip_torch else measure_torch(
        threads=args.workers, batches=batches, fields=args.fields, vocab=args.vocab, dim=args.dim,
        steps=args.steps, warmup=args.warmup, table_optimizer=args.table_optimizer)
    executor = RayExecutor(address=args.ray_address, num_workers=args.workers)
    try:
        for config in ("sparse_tables", "dense_tables"):
            for ps_shards in [int(part) for part in args.ps_shards.split(",")]:
                record = {"suite": "sparse", "config": config, "ps_shards": ps_shards, "batch": args.batch,
                          "workers": args.workers, "fields": args.fields, "vocab": args.vocab, "dim": args.dim,
                          "table_optimizer": args.table_optimizer, "steps": args.steps,
                          "torch_samples_per_s": torch_rate, "min_bytes_per_step": minimum,
                          "dense_bytes_per_step": float(dense)}
                try:
                    measured = measure_gradserve(executor, spec, params, batches, config=config, ps_shards=ps_shards,
                                                 workers=args.workers, steps=args.steps, warmup=args.warmup,
                                                 table_optimizer=args.table_optimizer)
                except Exception as failure:  # noqa: BLE001 - a configuration the cluster cannot run
                    record.update(samples_per_s=None, ratio_vs_torch=None, wire_bytes_per_step=None,
                                  bytes_over_min=None, dense_over_sparse=None, server_rss_bytes=None,
                                  error=f"{type(failure).__name__}: {failure}"[:500])
                    _print(record)
                    continue
                wire = measured["wire_bytes_per_step"] if config == "sparse_tables" else float(dense)
                record.update(
                    samples_per_s=measured["samples_per_s"],
                    ratio_vs_torch=None if torch_rate is None else measured["samples_per_s"] / torch_rate,
                    wire_bytes_per_step=wire,
                    bytes_over_min=wire / minimum if minimum else None,
                    dense_over_sparse=dense / wire if wire else None,
                    server_rss_bytes=measured["server_rss_bytes"],
                    final_loss=measured["final_loss"],
                )
                _print(record)
    finally:
        executor.shutdown()
    return 0


def _print(record: dict) -> None:
    print(json.dumps({key: round(value, 4) if isinstance(value, float) else value
                      for key, value in record.items()}), flush=True)
