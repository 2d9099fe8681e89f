"""PyTorch interop: spec + parameters from a Sequential (and back) compute what torch computes."""

from __future__ import annotations

import sys
import subprocess
from collections import OrderedDict

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

from gradserve_services.engine import Model  # noqa: E402
from gradserve_services.errors import InvalidArgument  # noqa: E402
from gradserve_services.jobs.torch_interop import (  # noqa: E402
    params_from_state_dict,
    spec_from_sequential,
    to_sequential,
    to_state_dict,
)


def every_supported_layer() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(7, 16),
        nn.LayerNorm(16, eps=1e-4),
        nn.ReLU(),
        nn.Linear(16, 12, bias=False),
        nn.LeakyReLU(0.2),
        nn.Dropout(0.3),
        nn.Linear(12, 9),
        nn.GELU(approximate="tanh"),
        nn.Linear(9, 8),
        nn.Tanh(),
        nn.Linear(8, 5),
        nn.Sigmoid(),
        nn.Linear(5, 3),
    ).double()


def test_forward_matches_torch_for_every_supported_layer():
    sequential = every_supported_layer().eval()
    # LayerNorm starts as identity scale/shift: randomise it so a dropped parameter would show.
    with torch.no_grad():
        sequential[1].weight.uniform_(0.5, 1.5)
        sequential[1].bias.uniform_(-0.5, 0.5)
    spec, params = spec_from_sequential(sequential, dtype="float64")
    x = np.random.default_rng(1).normal(size=(11, 7))
    ours = Model(spec).forward(params, x)
    theirs = sequential(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-10, atol=1e-12)
    assert spec["nodes"][0] == {"name": "0", "op": "dense", "units": 16, "bias": True, "inputs": ["input"]}
    assert params["0.weight"].shape == (7, 16)  # engine (in, units), torch (out, in)


def test_gradients_match_torch():
    sequential = every_supported_layer().eval()  # eval: dropout is the identity on both sides
    spec, params = spec_from_sequential(sequential, loss="softmax_cross_entropy", dtype="float64")
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(6, 7)), rng.integers(0, 3, size=6)
    loss, grads = Model(spec).loss_and_grad(params, x, y, train=False)
    torch_loss = nn.functional.cross_entropy(sequential(torch.from_numpy(x)), torch.from_numpy(y))
    torch_loss.backward()
    assert loss == pytest.approx(torch_loss.item(), rel=1e-10)
    exported = to_state_dict(spec, grads)
    for name, parameter in sequential.named_parameters():
        np.testing.assert_allclose(exported[name].numpy(), parameter.grad.numpy(), rtol=1e-8, atol=1e-12)


def test_round_trip_to_sequential_and_state_dict():
    sequential = every_supported_layer().float().eval()
    spec, params = spec_from_sequential(sequential)
    rebuilt = to_sequential(spec, params).eval()
    x = torch.randn(4, 7)
    torch.testing.assert_close(rebuilt(x), sequential(x))
    original = sequential.state_dict()
    assert list(rebuilt.state_dict()) == list(original)
    for name, tensor in to_state_dict(spec, params).items():
        torch.testing.assert_close(tensor, original[name])
    again = params_from_state_dict(rebuilt.state_dict(), spec)
    assert all(np.array_equal(again[name], params[name]) for name in params)


def test_named_sequential_keeps_its_names():
    sequential = nn.Sequential(OrderedDict(hidden=nn.Linear(3, 4), act=nn.ReLU(), out=nn.Linear(4, 2)))
    spec, params = spec_from_sequential(sequential)
    assert [node["name"] for node in spec["nodes"]] == ["hidden", "act", "out"]
    assert set(params) == {"hidden.weight", "hidden.bias", "out.weight", "out.bias"}


@pytest.mark.parametrize(
    "module, field, words",
    [
        (nn.Sequential(nn.Linear(3, 4), nn.GELU()), "1", "approximate='tanh'"),
        (nn.Sequential(nn.Linear(3, 4), nn.Softplus()), "1", "unsupported module Softplus"),
    ],
)
def test_unsupported_modules_are_named(module, field, words):
    with pytest.raises(InvalidArgument) as raised:
        spec_from_sequential(module)
    assert raised.value.field == field and words in raised.value.message


def test_state_dict_with_wrong_shape_is_refused():
    spec, _ = spec_from_sequential(nn.Sequential(nn.Linear(3, 4)))
    with pytest.raises(InvalidArgument) as raised:
        params_from_state_dict(nn.Sequential(nn.Linear(3, 5)).state_dict(), spec)
    assert raised.value.field == "0.weight"


def test_fan_out_graph_cannot_become_a_sequential():
    spec = {
        "input_features": 3,
        "nodes": [
            {"name": "a", "op": "dense", "inputs": ["input"], "units": 3},
            {"name": "sum", "op": "add", "inputs": ["a", "input"]},
        ],
        "output": "sum",
        "loss": "mse",
    }
    params = Model(spec).init_parameters(seed=0)
    with pytest.raises(InvalidArgument) as raised:
        to_sequential(spec, params)
    assert raised.value.field == "sum"


def test_sdk_import_does_not_pull_in_torch_or_the_jobs_package():
    code = "import sys, gradserve; print('torch' in sys.modules, 'gradserve_services.jobs' in sys.modules)"
    shown = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert shown.split() == ["False", "False"]
