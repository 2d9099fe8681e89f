"""PowerSGD's math (cluster/powersgd.py): exact for low-rank matrices, the best rank-r
approximation under warm starts (checked against an SVD), linear in the workers' shares so the
worker count changes nothing, error feedback that loses nothing over time, and the rank rules."""

from __future__ import annotations

import numpy as np
import pytest

from gradserve_services.cluster.powersgd import (
    WorkerFactors,
    check_rank,
    compressed_shapes,
    initial_q,
    orthonormal,
)
from gradserve_services.errors import InvalidArgument

RANK = 3


def _step(workers: list[WorkerFactors], shares: list[dict], qs: dict) -> tuple[dict, dict]:
    """One PowerSGD step as the servers run it: sum P, orthonormalize, sum Q. Returns
    (update, next Q) per parameter."""
    p_parts = [worker.p_factors(share, qs) for worker, share in zip(workers, shares)]
    p_hats = {name: orthonormal(sum(part[name] for part in p_parts)) for name in qs}
    q_parts = [worker.q_factors(p_hats) for worker in workers]
    q_sums = {name: sum(part[name] for part in q_parts) for name in qs}
    return {name: p_hats[name] @ q_sums[name].T for name in qs}, q_sums


def test_a_matrix_of_rank_r_is_sent_exactly():
    rng = np.random.default_rng(0)
    m = rng.standard_normal((60, RANK)) @ rng.standard_normal((RANK, 40))
    q = {"w": initial_q(0, "w", m.shape, RANK, m.dtype)}
    update, _ = _step([WorkerFactors()], [{"w": m}], q)
    np.testing.assert_allclose(update["w"], m, rtol=0, atol=1e-10)


def test_warm_started_q_converges_to_the_truncated_svd_without_feedback():
    rng = np.random.default_rng(1)
    u, _ = np.linalg.qr(rng.standard_normal((50, 50)))
    v, _ = np.linalg.qr(rng.standard_normal((30, 30)))
    singular = np.array([10.0, 7.0, 5.0] + [0.5 ** k for k in range(27)])
    m = (u[:, :30] * singular) @ v.T
    qs = {"w": initial_q(3, "w", m.shape, RANK, m.dtype)}
    for _ in range(40):  # a fresh worker each step: no error feedback, pure power iteration
        update, qs = _step([WorkerFactors()], [{"w": m}], qs)
    left, values, right = np.linalg.svd(m)
    best = (left[:, :RANK] * values[:RANK]) @ right[:RANK]
    np.testing.assert_allclose(update["w"], best, rtol=0, atol=1e-8)


@pytest.mark.parametrize("workers", [2, 3, 5])
def test_the_result_does_not_depend_on_how_many_workers_share_the_gradient(workers):
    rng = np.random.default_rng(2)
    shape = (64, 48)
    one, many = [WorkerFactors()], [WorkerFactors() for _ in range(workers)]
    q_one = q_many = {"w": initial_q(0, "w", shape, RANK, np.float64)}
    for _ in range(6):
        shares = [{"w": rng.standard_normal(shape)} for _ in range(workers)]
        whole = {"w": sum(share["w"] for share in shares)}
        update_one, q_one = _step(one, [whole], q_one)
        update_many, q_many = _step(many, shares, q_many)
        np.testing.assert_allclose(update_many["w"], update_one["w"], rtol=0, atol=1e-9)
    residual_sum = sum(worker.residuals["w"] for worker in many)
    np.testing.assert_allclose(residual_sum, one[0].residuals["w"], rtol=0, atol=1e-9)


def test_error_feedback_loses_nothing_sent_plus_residual_is_every_gradient():
    rng = np.random.default_rng(3)
    shape = (40, 40)
    workers = [WorkerFactors(), WorkerFactors()]
    qs = {"w": initial_q(0, "w", shape, 2, np.float64)}
    sent, given = np.zeros(shape), np.zeros(shape)
    for _ in range(8):
        shares = [{"w": rng.standard_normal(shape)} for _ in workers]
        given += sum(share["w"] for share in shares)
        update, qs = _step(workers, shares, qs)
        sent += update["w"]
    residual = sum(worker.residuals["w"] for worker in workers)
    np.testing.assert_allclose(sent + residual, given, rtol=0, atol=1e-9)
    assert np.linalg.norm(residual) > 1.0  # rank 2 of a 40x40 noise matrix leaves a lot


def test_vectors_and_small_matrices_stay_uncompressed():
    shapes = {"fc1.weight": (784, 512), "fc1.bias": (512,), "tiny.weight": (8, 8),
              "column.weight": (5000, 1), "fc3.weight": (512, 10)}
    assert compressed_shapes(shapes) == {"fc1.weight": (784, 512), "fc3.weight": (512, 10)}


@pytest.mark.parametrize("rank", [0, -1, 11, 2.0, True])
def test_a_rank_of_zero_or_above_a_matrix_side_is_refused_naming_the_field(rank):
    shapes = {"fc1.weight": (784, 512), "fc3.weight": (512, 10)}
    with pytest.raises(InvalidArgument) as refused:
        check_rank(rank, shapes, "config.powersgd_rank")
    assert refused.value.field == "config.powersgd_rank"
    check_rank(10, shapes, "config.powersgd_rank")  # the smaller side itself is allowed


def test_orthonormal_columns_and_initial_q_is_a_function_of_seed_and_name():
    p = np.random.default_rng(4).standard_normal((30, 4))
    p_hat = orthonormal(p)
    np.testing.assert_allclose(p_hat.T @ p_hat, np.eye(4), atol=1e-12)
    np.testing.assert_allclose(p_hat @ (p_hat.T @ p), p, atol=1e-12)  # same column space
    a = initial_q(7, "fc1.weight", (10, 20), 4, np.float32)
    assert a.shape == (20, 4) and a.dtype == np.float32
    np.testing.assert_array_equal(a, initial_q(7, "fc1.weight", (10, 20), 4, np.float32))
    assert not np.array_equal(a, initial_q(7, "fc2.weight", (10, 20), 4, np.float32))
