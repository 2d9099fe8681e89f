"""Local-SGD rounds (cluster/local_round.py) against PyTorch: each worker's H inner AdamW steps on
its shards of successive inner batches, then the parameter server's outer Nesterov step on the
sample-weighted mean delta, for two rounds, equal torch.optim's AdamW and SGD(nesterov=True).
Also the round's row layout and the int8 encoding of deltas."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gradserve_services.cluster.compression import decode, encode
from gradserve_services.cluster.local_round import inner_seed, round_ranges, run_round
from gradserve_services.cluster.parameter_server import ParameterTable
from gradserve_services.engine import Model

from .helpers import MLP_SPEC, classification_data

INNER = {"name": "adamw", "lr": 0.01, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8,
         "weight_decay": 0.01}
OUTER = {"name": "nesterov", "lr": 0.7, "momentum": 0.9}


def test_round_ranges_cover_every_row_once_in_inner_batch_order():
    ranges = round_ranges(rows=23, inner_steps=4, workers=3)
    assert len(ranges) == 3 and all(len(worker) == 4 for worker in ranges)
    rows = sorted(r for worker in ranges for start, stop in worker for r in range(start, stop))
    assert rows == list(range(23))
    inner_batches = [(0, 6), (6, 12), (12, 18), (18, 23)]  # split_rows(23, 4)
    for step, (start, stop) in enumerate(inner_batches):
        shards = [worker[step] for worker in ranges]
        assert shards[0][0] == start and shards[-1][1] == stop
    # an inner batch smaller than the pool leaves the last workers without a range of it
    assert [len(worker) for worker in round_ranges(rows=4, inner_steps=2, workers=3)] == [2, 2, 0]


def _torch_round(params: dict, x, y, ranges, tensors_out):
    """One worker's inner steps in torch; returns its final parameters."""
    tensors = {name: torch.tensor(value, requires_grad=True) for name, value in params.items()}
    optimizer = torch.optim.AdamW(list(tensors.values()), lr=INNER["lr"], betas=(0.9, 0.999),
                                  eps=1e-8, weight_decay=INNER["weight_decay"], foreach=False)
    for start, stop in ranges:
        optimizer.zero_grad()
        hidden = torch.tanh(torch.tensor(x[start:stop]) @ tensors["fc1.weight"] + tensors["fc1.bias"])
        logits = hidden @ tensors["logits.weight"] + tensors["logits.bias"]
        torch.nn.functional.cross_entropy(logits, torch.tensor(y[start:stop])).backward()
        optimizer.step()
    tensors_out.append({name: t.detach().numpy() for name, t in tensors.items()})


@pytest.mark.parametrize("workers", [1, 2])
def test_two_rounds_equal_torch_inner_adamw_and_outer_nesterov(workers):
    model = Model(MLP_SPEC)
    params = model.init_parameters(seed=0, dtype="float64")
    table = ParameterTable(params, OUTER)
    reference = {name: torch.tensor(value, requires_grad=True) for name, value in params.items()}
    outer = torch.optim.SGD(list(reference.values()), lr=0.7, momentum=0.9, nesterov=True)
    inner_steps = 3
    for round_index in range(2):
        x, y = classification_data(31, seed=round_index)
        ranges = round_ranges(x.shape[0], inner_steps, workers)
        seeds = [inner_seed(0, round_index, inner_steps, h) for h in range(inner_steps)]
        start_params = {name: value.copy() for name, value in table.params.items()}
        results = [run_round(model, table.params, x, y, worker_ranges, INNER, seeds)
                   for worker_ranges in ranges]
        for name, value in table.params.items():  # the round leaves the global parameters alone
            np.testing.assert_array_equal(value, start_params[name])
        parts = [{"kind": "dense", "grads": result.grad_sum} for result in results]
        table.apply(str(round_index), parts, sum(r.count for r in results), table.version)

        finals = []
        for worker_ranges in ranges:
            _torch_round({n: t.detach().numpy().copy() for n, t in reference.items()}, x, y,
                         worker_ranges, finals)
        counts = [sum(stop - start for start, stop in worker_ranges) for worker_ranges in ranges]
        outer.zero_grad()
        for name, tensor in reference.items():
            delta = sum((tensor.detach().numpy() - final[name]) * count
                        for final, count in zip(finals, counts)) / sum(counts)
            tensor.grad = torch.tensor(delta)
        outer.step()
        for name, tensor in reference.items():
            np.testing.assert_allclose(table.params[name], tensor.detach().numpy(),
                                       rtol=1e-9, atol=1e-12)
    assert table.version == 2


def test_the_round_loss_is_the_inner_steps_losses_at_their_own_parameters():
    model = Model(MLP_SPEC)
    params = model.init_parameters(seed=1, dtype="float64")
    x, y = classification_data(20, seed=5)
    result = run_round(model, params, x, y, [(0, 10), (10, 20)], INNER, [0, 1])
    first = model.loss_and_grad_sum(params, x[:10], y[:10]).loss_sum
    assert result.count == 20 and first < result.loss_sum  # the second inner batch counted too
    assert np.isclose(result.loss_sum - first,
                      model.loss_and_grad_sum(_after_one_step(model, params, x, y), x[10:], y[10:]).loss_sum)


def _after_one_step(model, params, x, y):
    from gradserve_services.optim import Optimizer

    local = {name: value.copy() for name, value in params.items()}
    grads = model.loss_and_grad_sum(local, x[:10], y[:10])
    Optimizer(INNER, local).step(local, [grads.grad_sum], grad_scale=1 / 10)
    return local


def test_int8_keeps_each_element_within_half_a_step_of_the_mean_and_sends_a_quarter():
    rng = np.random.default_rng(0)
    grad_sum = {"w": rng.standard_normal((50, 40)).astype(np.float32) * 12,
                "zero": np.zeros(7, np.float32)}
    part, raw, sent = encode(grad_sum, ["w", "zero"], 4, "int8")
    assert raw == grad_sum["w"].nbytes + 28 and sent == 2000 + 7 + 16
    decoded = decode(part)
    scale = np.max(np.abs(grad_sum["w"] / 4)) / 127
    assert np.max(np.abs(decoded["w"] / 4 - grad_sum["w"] / 4)) <= scale / 2 * (1 + 1e-5)
    np.testing.assert_array_equal(decoded["zero"], 0.0)
    assert decoded["w"].dtype == np.float32
