"""all_finite: the one-pass sum check and its exact fallback, against numpy's isfinite."""

import numpy as np
import pytest

from gradserve_services.engine import Model
from gradserve_services.engine.finite import BLOCK_ELEMENTS, all_finite
from gradserve_services.errors import InvalidArgument


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, None])
def test_agrees_with_isfinite_wherever_the_bad_element_lies(dtype, bad):
    values = np.random.default_rng(0).standard_normal(5 * (BLOCK_ELEMENTS // 2 + 3)).astype(dtype)
    for position in (0, BLOCK_ELEMENTS - 1, BLOCK_ELEMENTS, values.size - 1):
        probe = values.copy()
        if bad is not None:
            probe[position] = bad
        assert all_finite(np, probe.reshape(-1, 5)) == bool(np.isfinite(probe).all())


def test_finite_values_whose_sum_overflows_are_finite():
    big = np.full((4, BLOCK_ELEMENTS // 2), np.finfo(np.float32).max / 2, dtype=np.float32)
    with np.errstate(over="ignore"):
        assert np.isinf(big.sum())  # the sum alone would call them non-finite
    assert all_finite(np, big)
    big[3, -1] = np.nan
    assert not all_finite(np, big)


def test_infinities_of_both_signs_are_caught():
    values = np.zeros(10)
    values[[2, 7]] = np.inf, -np.inf  # their sum is NaN, not inf: still not finite
    assert not all_finite(np, values)


def test_validate_parameters_names_the_non_finite_parameter():
    model = Model({"input_features": 3, "nodes": [{"name": "fc", "op": "dense", "inputs": ["input"], "units": 2}],
                   "output": "fc", "loss": "mse"})
    params = model.init_parameters()
    params["fc.bias"][1] = np.inf
    with pytest.raises(InvalidArgument) as caught:
        model.validate_parameters(params)
    assert caught.value.field == "parameters.fc.bias"
