"""PowerSGD (Vogels et al., 2019, arXiv 1905.13727): each matrix gradient sent as rank-r factors.

One step for a matrix parameter of shape (n, m), with workers i = 1..K holding shares `G_i` of the
mean gradient (their gradient sum / the step's total samples, so the shares add up to the mean):

    M_i = G_i + e_i                 error feedback: what earlier steps did not send, per worker
    P_i = M_i @ Q                   worker -> servers, (n, r); Q is the same for every worker
    P̂  = orthonormal(sum_i P_i)     servers (reduced QR)
    Q_i = M_i.T @ P̂                 servers -> worker P̂, worker -> servers Q_i, (m, r)
    e_i = M_i - P̂ @ Q_i.T           kept by the worker for the next step
    update = P̂ @ (sum_i Q_i).T      = P̂ P̂ᵀ sum_i M_i, what the optimizer applies

Every step is linear in the M_i, so the servers' sums are exact: the update equals one worker's
PowerSGD on the whole batch, and the workers' residuals add up to that worker's residual. How many
workers share a batch therefore changes nothing but float summation order, as long as the same
workers keep their residuals; a worker replaced (lost, or the pool resized) takes its residual with
it, which changes the next updates as dropping that much error feedback does. Q is warm-started:
the next step's Q is this step's `sum_i Q_i` (one power iteration per step on a slowly changing
matrix tracks its top-r subspace). The first Q is a seeded normal draw per parameter.

Vectors and small matrices (fewer than SMALL_MATRIX_ELEMENTS elements) travel uncompressed: their
factors would save little.
"""

from __future__ import annotations

import zlib
from typing import Mapping

import numpy as np

from gradserve_services.errors import InvalidArgument

__all__ = ["SMALL_MATRIX_ELEMENTS", "compressed_shapes", "check_rank", "initial_q", "orthonormal",
           "WorkerFactors", "factor_bytes", "encode_p"]

SMALL_MATRIX_ELEMENTS = 4096


def compressed_shapes(shapes: Mapping[str, tuple]) -> dict[str, tuple]:
    """The parameters PowerSGD compresses: 2-D, both sides > 1, at least SMALL_MATRIX_ELEMENTS."""
    return {name: tuple(shape) for name, shape in shapes.items()
            if len(shape) == 2 and min(shape) > 1 and shape[0] * shape[1] >= SMALL_MATRIX_ELEMENTS}


def check_rank(rank, shapes: Mapping[str, tuple], field: str) -> None:
    """InvalidArgument naming `field` unless 1 <= rank <= the smaller side of every compressed
    matrix (a rank that high sends more than the matrix itself)."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise InvalidArgument(f"must be an integer >= 1, got {rank!r}", field)
    for name, shape in compressed_shapes(shapes).items():
        if rank > min(shape):
            raise InvalidArgument(f"rank {rank} is above the smaller side of {name!r} {shape}",
                                  field)


def initial_q(seed: int, name: str, shape: tuple, rank: int, dtype) -> np.ndarray:
    """The first Q of parameter `name`: standard normal (m, r), a function of (seed, name) only."""
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    return rng.standard_normal((shape[1], rank)).astype(dtype)


def orthonormal(p: np.ndarray) -> np.ndarray:
    """Orthonormal columns spanning `p`'s (reduced QR; signs fixed so the result is unique)."""
    q, r = np.linalg.qr(p)
    signs = np.where(np.diagonal(r) < 0, -1.0, 1.0).astype(p.dtype)
    return q * signs


def factor_bytes(shape: tuple, rank: int, itemsize: int) -> int:
    """Bytes one worker sends for one compressed matrix per step: P_i and Q_i."""
    return (shape[0] + shape[1]) * rank * itemsize


class WorkerFactors:
    """One worker's side for one trainer: the residuals `e_i` and the step's `M_i` between the two
    phases."""

    def __init__(self):
        self.residuals: dict[str, np.ndarray] = {}
        self._pending: dict[str, np.ndarray] = {}

    def p_factors(self, shares: Mapping[str, np.ndarray], qs: Mapping[str, np.ndarray]) -> dict:
        """Phase one: `{name: P_i}` for the shares `G_i` of the compressed matrices."""
        factors = {}
        for name, share in shares.items():
            m = np.array(share, copy=True)
            residual = self.residuals.get(name)
            if residual is not None and residual.shape == m.shape:
                m += residual
            self._pending[name] = m
            factors[name] = m @ qs[name]
        return factors

    def q_factors(self, p_hats: Mapping[str, np.ndarray]) -> dict:
        """Phase two: `{name: Q_i}` against the servers' orthonormal P̂; the residual becomes what
        this worker's share of the update leaves out."""
        factors = {}
        for name, p_hat in p_hats.items():
            m = self._pending.pop(name)
            q = m.T @ p_hat
            m -= p_hat @ q.T
            self.residuals[name] = m
            factors[name] = q
        return factors


def encode_p(factors: WorkerFactors, grad_sum: Mapping[str, np.ndarray], names, task: dict):
    """`(part, bytes_raw, bytes_sent)` of phase one for the parameters `names` of one server shard:
    `p` the factors of the compressed matrices among them (their share is the gradient sum over
    the step's total rows, `task["total"]`), `dense` the other parameters' gradient sums as they
    are (the coordinator adds them up with the matrices' update into the servers' one part)."""
    qs = task["qs"]
    compressed = [name for name in names if name in qs]
    total = task["total"]
    shares = {name: grad_sum[name] / grad_sum[name].dtype.type(total) for name in compressed}
    p = factors.p_factors(shares, qs)
    dense = {name: grad_sum[name] for name in names if name not in qs}
    raw = sum(grad_sum[name].nbytes for name in names)
    sent = sum(value.nbytes for value in p.values()) + sum(value.nbytes for value in dense.values())
    return {"kind": "powersgd", "p": p, "dense": dense}, raw, sent
