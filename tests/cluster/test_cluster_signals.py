"""Gradient signals of a sync step: the noise scale B_simple against per-sample gradients on digits,
shard cosines, update-to-weight ratios, straggler spread; the estimator formulas on known inputs."""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
import pytest
from sklearn.datasets import load_digits

from gradserve_services.cluster import LocalExecutor, TrainerConfig
from gradserve_services.cluster.config import SIGNALS_EVERY
from gradserve_services.cluster.signals import (
    NoiseScale, ShardProducts, add_products, compute_spread, noise_terms, shard_cosines,
    slowest_position)
from gradserve_services.engine import Model

from gradserve_services.optim import BLOCK_ELEMENTS

from .helpers import MLP_SPEC, classification_data

def shard_products(parts: Sequence[Mapping[str, np.ndarray]]) -> ShardProducts:
    """Squared norms, dots with the aggregate and the aggregate's squared norm of gradient sums,
    read apart from any update: the reference for what the optimizer measures inside its loop."""
    count = len(parts)
    shard_sq, shard_dot, total_sq = [0.0] * count, [0.0] * count, 0.0
    names = list(parts[0]) if parts else []
    scratch = None
    for name in names:
        flats = [np.ravel(part[name]) for part in parts]
        for start in range(0, flats[0].size, BLOCK_ELEMENTS):
            blocks = [flat[start:start + BLOCK_ELEMENTS] for flat in flats]
            if scratch is None or scratch.size < blocks[0].size or scratch.dtype != blocks[0].dtype:
                scratch = np.empty(max(blocks[0].size, BLOCK_ELEMENTS), blocks[0].dtype)
            total = scratch[:blocks[0].size]
            np.copyto(total, blocks[0])
            for block in blocks[1:]:
                total += block
            with np.errstate(over="ignore", invalid="ignore"):
                total_sq += float(np.dot(total, total))
                for index, block in enumerate(blocks):
                    shard_sq[index] += float(np.dot(block, block))
                    shard_dot[index] += float(np.dot(block, total))
    return ShardProducts(shard_sq=shard_sq, shard_dot=shard_dot, total_sq=total_sq)


DIGITS_SPEC = {
    "input_features": 64,
    "nodes": [
        {"name": "fc1", "op": "dense", "inputs": ["input"], "units": 32},
        {"name": "act1", "op": "tanh", "inputs": ["fc1"]},
        {"name": "logits", "op": "dense", "inputs": ["act1"], "units": 10},
    ],
    "output": "logits",
    "loss": "softmax_cross_entropy",
}


def _digits():
    bunch = load_digits()
    return (bunch.data / 16.0).astype(np.float64), bunch.target.astype(np.int64)


def _per_sample_terms(model, params, x, y) -> tuple[float, float]:
    """(tr(Sigma), |G|^2) from per-sample gradients, one row at a time: the unbiased sample
    covariance trace and |mean|^2 minus its expected excess tr(Sigma) / B."""
    rows = []
    for index in range(x.shape[0]):
        _, grads = model.loss_and_grad(params, x[index:index + 1], y[index:index + 1])
        rows.append(np.concatenate([grads[name].ravel() for name in model.parameter_shapes()]))
    samples = np.stack(rows)
    mean = samples.mean(axis=0)
    trace = float(((samples - mean) ** 2).sum() / (len(rows) - 1))
    return trace, float(mean @ mean) - trace / len(rows)


@pytest.mark.parametrize("every", [1, SIGNALS_EVERY])
def test_noise_scale_matches_per_sample_gradients_on_digits(every):
    """The reference folds in the same steps the trainer measures (every `every`-th)."""
    x_all, y_all = _digits()
    model = Model(DIGITS_SPEC)
    params = model.init_parameters(seed=3, dtype="float64")
    rng = np.random.default_rng(7)
    reference = NoiseScale()
    config = TrainerConfig(DIGITS_SPEC, {"name": "sgd", "lr": 0.05}, num_workers=8, signals_every=every)
    with LocalExecutor(8) as executor:
        trainer = executor.create_trainer(config, params)
        try:
            for step in range(60):
                rows = rng.choice(x_all.shape[0], 256, replace=False)
                x, y = x_all[rows], y_all[rows]
                _, current = trainer.parameters()  # the parameters this step's gradient is taken at
                if step % every == 0:
                    reference.update(_per_sample_terms(model, current, x, y))
                result = trainer.step(step, x, y)
        finally:
            trainer.close()
    assert math.isfinite(reference.value) and reference.value > 0
    assert result.noise_scale == pytest.approx(reference.value, rel=0.25)


def test_signals_of_a_sync_step():
    x, y = classification_data(96)
    model = Model(MLP_SPEC)
    params = model.init_parameters(seed=0, dtype="float64")
    with LocalExecutor(3) as executor:
        trainer = executor.create_trainer(
            TrainerConfig(MLP_SPEC, {"name": "adam", "lr": 0.01}, num_workers=3, ps_shards=2), params)
        try:
            result = trainer.step(0, x, y)
            _, after = trainer.parameters()
        finally:
            trainer.close()
    assert list(result.update_ratios) == list(model.parameter_shapes())
    for name, ratio in result.update_ratios.items():
        weight = np.linalg.norm(params[name])
        if weight == 0.0:  # biases start at zero: no ratio to speak of
            assert math.isnan(ratio), name
            continue
        expected = np.linalg.norm(after[name] - params[name]) / weight
        assert ratio == pytest.approx(expected, rel=1e-6), name
    # every shard's cosine from the shard gradients themselves (one engine call per shard)
    shard_grads = [model.loss_and_grad_sum(params, x[a:b], y[a:b]).grad_sum
                   for a, b in ((0, 32), (32, 64), (64, 96))]
    flat = [np.concatenate([g[n].ravel() for n in model.parameter_shapes()]) for g in shard_grads]
    total = sum(flat)
    expected = [f @ total / (np.linalg.norm(f) * np.linalg.norm(total)) for f in flat]
    assert result.shard_cosines == pytest.approx(expected, rel=1e-6)
    assert result.compute_spread >= 1.0 and 0 <= result.slowest_worker < 3


def test_noise_terms_recover_known_trace_and_norm():
    # Exact expectations: |G_b|^2 = |G|^2 + S / b for the shard sizes and the total.
    true_squared, true_trace, sizes = 2.0, 30.0, [10, 30]
    total = sum(sizes)
    products = {"shard_sq": [(true_squared + true_trace / b) * b * b for b in sizes],
                "shard_dot": [0.0, 0.0],
                "total_sq": (true_squared + true_trace / total) * total * total}
    trace, squared = noise_terms(products, sizes)
    assert trace == pytest.approx(true_trace) and squared == pytest.approx(true_squared)
    assert noise_terms(products, [total, 0]) is None  # one batch size: nothing to compare


def test_products_add_over_parameter_slices_and_cosines():
    rng = np.random.default_rng(0)
    parts = [{"a": rng.standard_normal(70_000), "b": rng.standard_normal((3, 4))} for _ in range(3)]
    whole = shard_products(parts)
    split = add_products([shard_products([{"a": p["a"]} for p in parts]),
                          shard_products([{"b": p["b"]} for p in parts])])
    flat = [np.concatenate([p["a"], p["b"].ravel()]) for p in parts]
    total = sum(flat)
    assert whole["total_sq"] == pytest.approx(total @ total)
    assert split["shard_dot"] == pytest.approx([f @ total for f in flat])
    assert split["shard_sq"] == pytest.approx(whole["shard_sq"])
    assert shard_cosines(whole) == pytest.approx(
        [f @ total / (np.linalg.norm(f) * np.linalg.norm(total)) for f in flat])


def test_noise_scale_smoothing_and_stragglers():
    smoothed = NoiseScale(decay=0.5)
    assert math.isnan(smoothed.update(None))
    assert smoothed.update((10.0, 2.0)) == pytest.approx(5.0)
    assert smoothed.update((30.0, 2.0)) == pytest.approx(17.5 / 1.5)  # (0.25*10 + 0.5*30) / (0.75*2)
    assert compute_spread([10.0, 10.0, 40.0]) == pytest.approx(4.0)
    assert slowest_position([2, 0, 1], [5.0, 9.0, 1.0]) == 0
    assert math.isnan(compute_spread([])) and slowest_position([], []) == -1


def test_products_measured_inside_the_update_equal_the_separate_reading():
    from gradserve_services.optim import Optimizer

    rng = np.random.default_rng(5)
    params = {"w": rng.standard_normal((300, 257)).astype(np.float32), "b": rng.standard_normal(7).astype(np.float32)}
    parts = [{name: rng.standard_normal(value.shape).astype(np.float32) for name, value in params.items()}
             for _ in range(3)]
    products = {}
    Optimizer({"name": "adam", "lr": 1e-3}, params).step(params, parts, grad_scale=0.1, products=products)
    expected = shard_products(parts)
    assert products["total_sq"] == pytest.approx(expected["total_sq"], rel=1e-6)
    assert products["shard_sq"] == pytest.approx(expected["shard_sq"], rel=1e-6)
    assert products["shard_dot"] == pytest.approx(expected["shard_dot"], rel=1e-6)
