"""Micro-batches, uneven shards and forward mode all agree with the full-batch reverse pass."""

import numpy as np
import pytest

from engine_testing import make_batch, mlp, random_params, relative_error, residual_concat_dag
from gradserve_services.engine import GradSum, Model

EXACT = 1e-10  # float64: only summation order differs


@pytest.fixture(params=[False, True], ids=["eval", "train-dropout"])
def setup(request):
    spec = residual_concat_dag(dropout_rate=0.4)
    model = Model(spec)
    params = random_params(model)
    x, y = make_batch(spec, 23)
    return model, params, x, y, dict(train=request.param, seed=11)


def test_micro_batch_sums_divided_by_the_count_equal_the_full_batch(setup):
    model, params, x, y, options = setup
    full_loss, full_grads = model.loss_and_grad(params, x, y, **options)
    for micro_batch_size in (1, 4, 7, 23, 100):
        summed = model.loss_and_grad_sum(params, x, y, micro_batch_size=micro_batch_size, **options)
        assert isinstance(summed, GradSum) and summed.count == 23
        assert summed.loss_sum / summed.count == pytest.approx(full_loss, rel=EXACT)
        for name, grad in full_grads.items():
            assert relative_error(summed.grad_sum[name] / summed.count, grad) <= EXACT


def test_mean_gradients_with_micro_batches_equal_the_full_batch(setup):
    model, params, x, y, options = setup
    full_loss, full_grads = model.loss_and_grad(params, x, y, **options)
    loss, grads = model.loss_and_grad(params, x, y, micro_batch_size=5, **options)
    assert loss == pytest.approx(full_loss, rel=EXACT)
    for name in full_grads:
        assert relative_error(grads[name], full_grads[name]) <= EXACT


def test_uneven_shards_summed_equal_the_full_batch(setup):
    """What the parameter server does: shard sums added, divided by the total count once."""
    model, params, x, y, options = setup
    full_loss, full_grads = model.loss_and_grad(params, x, y, **options)
    bounds = [0, 2, 3, 11, 23]
    shards = [
        model.loss_and_grad_sum(params, x[a:b], y[a:b], sample_offset=a, micro_batch_size=3, **options)
        for a, b in zip(bounds[:-1], bounds[1:])
    ]
    count = sum(shard.count for shard in shards)
    assert count == 23
    assert sum(shard.loss_sum for shard in shards) / count == pytest.approx(full_loss, rel=EXACT)
    for name in full_grads:
        total = sum(shard.grad_sum[name] for shard in shards)
        assert relative_error(total / count, full_grads[name]) <= EXACT


def test_dropout_masks_depend_on_the_global_sample_index():
    spec = residual_concat_dag(dropout_rate=0.5)
    model = Model(spec)
    params = random_params(model)
    x, y = make_batch(spec, 10)
    # Same rows at another global position draw another mask, hence another loss.
    at_zero = model.loss_and_grad_sum(params, x, y, train=True, seed=1, sample_offset=0).loss_sum
    at_ten = model.loss_and_grad_sum(params, x, y, train=True, seed=1, sample_offset=10).loss_sum
    assert at_zero != at_ten


def test_jvp_equals_the_gradient_dotted_with_the_tangent(setup):
    model, params, x, y, options = setup
    loss, grads = model.loss_and_grad(params, x, y, **options)
    tangent = random_params(model, seed=99)
    jvp_loss, derivative = model.jvp(params, tangent, x, y, micro_batch_size=6, **options)
    expected = sum(float(np.vdot(grads[name], tangent[name])) for name in grads)
    assert jvp_loss == pytest.approx(loss, rel=EXACT)
    assert derivative == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_jvp_in_float32():
    spec = mlp([6, 16, 16, 4])
    model = Model(spec)
    params = random_params(model, dtype="float32")
    x, y = make_batch(spec, 12, dtype="float32")
    _, grads = model.loss_and_grad(params, x, y)
    tangent = random_params(model, dtype="float32", seed=5)
    _, derivative = model.jvp(params, tangent, x, y)
    expected = sum(float(np.vdot(grads[n].astype(np.float64), tangent[n])) for n in grads)
    assert derivative == pytest.approx(expected, rel=1e-4)


def test_workspace_is_bounded_by_the_micro_batch():
    spec = mlp([32, 256, 256, 10])
    x, y = make_batch(spec, 512, dtype="float32")
    full, micro = Model(spec), Model(spec)
    params = full.init_parameters()
    full.loss_and_grad(params, x, y)
    micro.loss_and_grad(params, x, y, micro_batch_size=32)
    activations_per_row = (256 * 2 + 10) * 4
    assert full.workspace_nbytes() > micro.workspace_nbytes() + 400 * activations_per_row


def test_returned_gradients_stay_valid_across_later_calls():
    spec = mlp([5, 7, 3])
    model = Model(spec)
    params = random_params(model, dtype="float32")
    x, y = make_batch(spec, 8, dtype="float32")
    _, first = model.loss_and_grad(params, x, y)
    snapshot = {name: grad.copy() for name, grad in first.items()}
    view = first["fc1.weight"][:, :2]
    for step in range(4):
        model.loss_and_grad(params, x * (step + 2), y)
        model.loss_and_grad_sum(params, x * 3, y, micro_batch_size=3)
    for name, grad in first.items():
        np.testing.assert_array_equal(grad, snapshot[name])
    np.testing.assert_array_equal(view, snapshot["fc1.weight"][:, :2])


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_gradients_keep_names_shapes_and_dtype(dtype):
    spec = residual_concat_dag()
    model = Model(spec)
    params = model.init_parameters(seed=3, dtype=dtype)
    x, y = make_batch(spec, 4, dtype=dtype)
    loss, grads = model.loss_and_grad(params, x, y)
    assert isinstance(loss, float)
    assert list(grads) == list(model.parameter_shapes()) == list(params)
    for name, grad in grads.items():
        assert grad.shape == params[name].shape and grad.dtype == np.dtype(dtype)
    out = model.forward(params, x)
    assert out.dtype == np.dtype(dtype) and out.shape == (4, 3)


def test_dropped_gradient_arrays_are_recycled_instead_of_reallocated():
    """Steady-state training allocates no new gradient memory once results are let go."""
    spec = mlp([5, 7, 3])
    model = Model(spec)
    params = random_params(model, dtype="float32")
    x, y = make_batch(spec, 8, dtype="float32")
    _, grads = model.loss_and_grad(params, x, y)
    first_address = grads["fc1.weight"].ctypes.data
    del grads
    _, grads = model.loss_and_grad(params, x, y)
    assert grads["fc1.weight"].ctypes.data == first_address
    held = grads  # still referenced: the next call must use other memory
    _, grads = model.loss_and_grad(params, x * 2, y)
    assert not np.shares_memory(grads["fc1.weight"], held["fc1.weight"])


@pytest.mark.parametrize("micro_batch_size", [None, 4])
def test_sums_accumulated_in_the_callers_arrays_are_bitwise_the_engines_own(setup, micro_batch_size):
    """`out`: what a worker sums its gradients into when a server reads them from its block."""
    model, params, x, y, options = setup
    own = model.loss_and_grad_sum(params, x, y, micro_batch_size=micro_batch_size, **options)
    given = {name: np.full(value.shape, np.nan, value.dtype) for name, value in params.items()}
    summed = model.loss_and_grad_sum(params, x, y, micro_batch_size=micro_batch_size, out=given, **options)
    assert summed.loss_sum == own.loss_sum
    for name, grad in own.grad_sum.items():
        assert summed.grad_sum[name] is given[name]
        np.testing.assert_array_equal(given[name], grad, err_msg=name)


def test_arrays_that_cannot_hold_a_sum_in_place_are_refused_by_name(setup):
    from gradserve_services.errors import InvalidArgument

    model, params, x, y, options = setup
    name, value = next(iter(params.items()))
    for bad in (np.zeros(value.shape, np.float32), np.zeros(value.shape + (1,), value.dtype),
                np.zeros(value.shape[::-1], value.dtype).T if value.ndim == 2 else np.zeros(3, value.dtype)):
        with pytest.raises(InvalidArgument) as refused:
            model.loss_and_grad_sum(params, x, y, out={name: bad}, **options)
        assert refused.value.field == f"out.{name}"
