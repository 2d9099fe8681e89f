"""The optimizers follow torch.optim step for step (float64, several steps, every rule)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from gradserve_services.errors import InvalidArgument
from gradserve_services.optim import Optimizer, OptimizerConfig, learning_rate

SHAPES = {"w": (7, 5), "b": (5,), "big": (3, 40_000)}  # "big" spans several update blocks
STEPS = 6


def _gradients(rng, shapes):
    return {name: rng.standard_normal(shape) for name, shape in shapes.items()}


def _torch_optimizer(config: dict, tensors):
    name = config["name"]
    lr, wd = config["lr"], config.get("weight_decay", 0.0)
    if name == "sgd":
        return torch.optim.SGD(tensors, lr=lr, weight_decay=wd)
    if name in ("momentum", "nesterov"):
        return torch.optim.SGD(tensors, lr=lr, momentum=config["momentum"], weight_decay=wd,
                               nesterov=name == "nesterov")
    betas = (config["beta1"], config["beta2"])
    cls = torch.optim.Adam if name == "adam" else torch.optim.AdamW
    return cls(tensors, lr=lr, betas=betas, eps=config["eps"], weight_decay=wd, foreach=False)


CONFIGS = [
    {"name": "sgd", "lr": 0.1},
    {"name": "sgd", "lr": 0.05, "weight_decay": 0.01},
    {"name": "momentum", "lr": 0.05, "momentum": 0.9},
    {"name": "momentum", "lr": 0.05, "momentum": 0.8, "weight_decay": 0.02},
    {"name": "nesterov", "lr": 0.05, "momentum": 0.9},
    {"name": "adam", "lr": 0.01, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8},
    {"name": "adam", "lr": 0.01, "beta1": 0.8, "beta2": 0.99, "eps": 1e-6, "weight_decay": 0.05},
    {"name": "adamw", "lr": 0.01, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.1},
]


@pytest.mark.parametrize("clip_norm", [None, 0.5])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_trajectory_matches_torch(config, clip_norm):
    rng = np.random.default_rng(0)
    params = _gradients(rng, SHAPES)
    tensors = [torch.tensor(value, requires_grad=True) for value in params.values()]
    reference = _torch_optimizer(config, tensors)
    ours = Optimizer({**config, "clip_norm": clip_norm}, params)
    for _ in range(STEPS):
        grads = _gradients(rng, SHAPES)
        # Our server passes gradient SUMS over two workers and 1/count; torch gets the mean.
        half = {name: value * 0.25 for name, value in grads.items()}
        for tensor, grad in zip(tensors, grads.values()):
            tensor.grad = torch.tensor(grad * 0.5)
        if clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(tensors, clip_norm)
        reference.step()
        info = ours.step(params, [half, half], grad_scale=1.0)
        expected_norm = math.sqrt(sum(float(np.sum((g * 0.5) ** 2)) for g in grads.values()))
        assert info["grad_norm"] == pytest.approx(expected_norm, rel=1e-12)
    for tensor, value in zip(tensors, params.values()):
        np.testing.assert_allclose(value, tensor.detach().numpy(), rtol=1e-12, atol=1e-14)


def test_grad_scale_divides_sum_by_count():
    rng = np.random.default_rng(1)
    params = _gradients(rng, SHAPES)
    twin = {name: value.copy() for name, value in params.items()}
    grads = _gradients(rng, SHAPES)
    Optimizer({"name": "sgd", "lr": 0.1}, params).step(params, [grads], grad_scale=1 / 8)
    mean = {name: value / 8 for name, value in grads.items()}
    Optimizer({"name": "sgd", "lr": 0.1}, twin).step(twin, [mean])
    for name in params:
        np.testing.assert_allclose(params[name], twin[name], rtol=1e-14)


def test_updates_float32_in_place():
    rng = np.random.default_rng(2)
    params = {name: value.astype(np.float32) for name, value in _gradients(rng, SHAPES).items()}
    before = {name: value for name, value in params.items()}
    grads = {name: value.astype(np.float32) for name, value in _gradients(rng, SHAPES).items()}
    expected = {name: params[name] - np.float32(0.1) * grads[name] for name in params}
    Optimizer({"name": "sgd", "lr": 0.1}, params).step(params, [grads])
    for name in params:
        assert params[name] is before[name] and params[name].dtype == np.float32
        np.testing.assert_allclose(params[name], expected[name], rtol=1e-6)


@pytest.mark.parametrize("schedule,torch_factory", [
    ({"name": "step", "step_size": 3, "gamma": 0.5},
     lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)),
    ({"name": "cosine", "total_steps": 10, "min_lr": 0.01},
     lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10, eta_min=0.01)),
])
def test_schedules_match_torch(schedule, torch_factory):
    tensor = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([tensor], lr=0.2)
    scheduler = torch_factory(opt)
    config = OptimizerConfig.from_dict({"name": "sgd", "lr": 0.2, "schedule": schedule})
    for update_index in range(11):  # torch cosine is periodic past T_max; ours holds min_lr
        assert learning_rate(config, update_index) == pytest.approx(opt.param_groups[0]["lr"],
                                                                    rel=1e-12)
        opt.step()
        scheduler.step()


def test_warmup_then_cosine():
    config = OptimizerConfig.from_dict({"name": "sgd", "lr": 1.0, "schedule": {
        "name": "cosine", "warmup_steps": 4, "total_steps": 8, "min_lr": 0.0}})
    rates = [learning_rate(config, i) for i in range(10)]
    assert rates[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert rates[4] == pytest.approx(1.0)
    assert rates[6] == pytest.approx(0.5)
    assert rates[8] == pytest.approx(0.0) and rates[9] == pytest.approx(0.0)


def test_state_dict_round_trip_continues_identically():
    rng = np.random.default_rng(3)
    config = {"name": "adamw", "lr": 0.01, "weight_decay": 0.1}
    params = _gradients(rng, SHAPES)
    grads = [_gradients(rng, SHAPES) for _ in range(4)]
    first = Optimizer(config, params)
    for g in grads[:2]:
        first.step(params, [g])
    arrays, meta = first.state_dict()

    meta = json.loads(json.dumps(meta))
    twin_params = {name: value.copy() for name, value in params.items()}
    second = Optimizer(config, twin_params)
    second.load_state_dict({k: v.copy() for k, v in arrays.items()}, meta)
    for g in grads[2:]:
        first.step(params, [g])
        second.step(twin_params, [g])
    for name in params:
        np.testing.assert_array_equal(params[name], twin_params[name])


@pytest.mark.parametrize("config,field", [
    ({"name": "rmsprop"}, "optimizer.name"),
    ({"name": "sgd", "lr": -1.0}, "optimizer.lr"),
    ({"name": "sgd", "lr": float("nan")}, "optimizer.lr"),
    ({"name": "adam", "beta2": 1.0}, "optimizer.beta2"),
    ({"name": "sgd", "clip_norm": 0}, "optimizer.clip_norm"),
    ({"name": "sgd", "bogus": 1}, "optimizer.bogus"),
    ({"name": "sgd", "schedule": {"name": "linear"}}, "optimizer.schedule.name"),
    ({"name": "sgd", "schedule": {"name": "step", "step_size": 0}}, "optimizer.schedule.step_size"),
])
def test_invalid_config_names_the_field(config, field):
    with pytest.raises(InvalidArgument) as raised:
        OptimizerConfig.from_dict(config)
    assert raised.value.field == field
