"""Two-phase steps (forward, the caller's loss, backward): the same update as a step with that loss,
exactly once per step id, no forward recomputed, bounded held memory, eviction and version rules."""

from __future__ import annotations

import numpy as np
import pytest

from gradserve_services.cluster import LocalExecutor, TrainerConfig
from gradserve_services.engine import Model
from gradserve_services.errors import FailedPrecondition, InvalidArgument, ResourceExhausted

from .helpers import MLP_SPEC, batches, classification_data

DROPOUT_SPEC = {
    **MLP_SPEC,
    "nodes": [*MLP_SPEC["nodes"][:2], {"name": "drop", "op": "dropout", "inputs": ["act1"], "rate": 0.3},
              {**MLP_SPEC["nodes"][2], "inputs": ["drop"]}],
}


def mean_softmax_cross_entropy(logits, y):
    """(mean loss, dL/d logits) in numpy: the service's built-in loss, computed by the caller."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probabilities = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    rows = np.arange(len(y))
    gradient = np.exp(log_probabilities)
    gradient[rows, y] -= 1.0
    return float(-log_probabilities[rows, y].mean()), gradient / len(y)


def two_phase(trainer, step_id, x, y):
    phase = trainer.forward_step(step_id, x)
    loss, gradient = mean_softmax_cross_entropy(phase.output, y)
    return trainer.backward_step(step_id, gradient, loss)


@pytest.mark.parametrize("spec", [MLP_SPEC, DROPOUT_SPEC], ids=["mlp", "dropout"])
@pytest.mark.parametrize("ps_shards", [1, 2])
def test_two_phase_steps_make_the_updates_of_steps_with_that_loss(spec, ps_shards):
    params = Model(spec).init_parameters(seed=0, dtype="float64")
    config = TrainerConfig(spec, {"name": "adam", "lr": 0.01, "clip_norm": 1.0}, ps_shards=ps_shards)
    with LocalExecutor(2) as executor:
        reference = executor.create_trainer(config, params)
        client_loss = executor.create_trainer(config, params)
        for step_id, (x, y) in enumerate(batches(5, 24), start=1):
            expected = reference.step(step_id, x, y)
            result = two_phase(client_loss, step_id, x, y)
            assert result.loss == pytest.approx(expected.loss, rel=1e-12)
            assert result.version == expected.version == step_id and result.applied
            assert result.grad_norm == pytest.approx(expected.grad_norm, rel=1e-9)
        (_, want), (_, got) = reference.parameters(), client_loss.parameters()
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-10, atol=1e-13)


def test_a_repeated_backward_applies_nothing_and_a_repeated_forward_says_duplicate():
    params = Model(MLP_SPEC).init_parameters(seed=0, dtype="float64")
    with LocalExecutor() as executor:
        trainer = executor.create_trainer(TrainerConfig(MLP_SPEC), params)
        x, y = classification_data(16)
        phase = trainer.forward_step(3, x)
        loss, gradient = mean_softmax_cross_entropy(phase.output, y)
        first = trainer.backward_step(3, gradient, loss)
        again = trainer.backward_step(3, gradient * 7.0, loss)  # a retry after a lost answer
        assert (first.version, first.duplicate) == (1, False)
        assert (again.version, again.duplicate, again.loss) == (1, True, first.loss)
        assert trainer.forward_step(3, x).duplicate and trainer.version == 1
        assert trainer.forward_step(3, x).output is None


def test_the_backward_uses_the_held_activations_not_a_new_forward():
    """The forward's dropout masks depend on the steps run: a recomputed forward after another
    trainer step would differ; the held one gives the gradient of the outputs the caller saw."""
    params = Model(DROPOUT_SPEC).init_parameters(seed=0, dtype="float64")
    config = TrainerConfig(DROPOUT_SPEC, {"name": "sgd", "lr": 0.1}, consistency="async")
    x, y = classification_data(20)
    with LocalExecutor() as executor:
        trainer = executor.create_trainer(config, params)
        phase = trainer.forward_step(1, x)
        output = phase.output.copy()
        trainer.forward_step(2, x + 1.0)  # another held forward in between
        trainer.step(3, x, y)  # and a step: new parameters, the next step's dropout seed
        moved, between = trainer.parameters()
        loss, gradient = mean_softmax_cross_entropy(phase.output, y)
        result = trainer.backward_step(1, gradient, loss)
        _, after = trainer.parameters()
    model = Model(DROPOUT_SPEC)
    assert np.array_equal(output, model.forward(params, x, train=True, seed=0))
    assert moved == 2 and result.staleness == (2,)  # async: applied as late as a late shard would be
    expected = model.loss_and_grad(params, x, y, train=True, seed=0)[1]
    for name in params:
        np.testing.assert_allclose(after[name], between[name] - 0.1 * expected[name], rtol=1e-10, atol=1e-13)


def test_evicted_or_never_run_forwards_are_refused_and_apply_nothing():
    params = Model(MLP_SPEC).init_parameters(seed=0, dtype="float64")
    with LocalExecutor() as executor:
        trainer = executor.create_trainer(TrainerConfig(MLP_SPEC), params)
        trainer._two_phase.max_forwards = 2
        x, y = classification_data(8)
        outputs = [trainer.forward_step(step_id, x).output for step_id in (1, 2, 3)]
        assert trainer._two_phase.held_steps() == [2, 3]  # the oldest went first
        for step_id in (1, 9):
            with pytest.raises(FailedPrecondition, match="run the step's forward again") as refused:
                trainer.backward_step(step_id, mean_softmax_cross_entropy(outputs[0], y)[1], 0.5)
            assert refused.value.field == "step_id"
        assert trainer.version == 0
        trainer.forward_step(1, x)  # forward again, then the backward applies
        assert trainer.backward_step(1, mean_softmax_cross_entropy(outputs[0], y)[1], 0.5).version == 1


def test_held_bytes_are_bounded():
    params = Model(MLP_SPEC).init_parameters(seed=0, dtype="float64")
    with LocalExecutor() as executor:
        trainer = executor.create_trainer(TrainerConfig(MLP_SPEC), params)
        x, _ = classification_data(64)
        trainer.forward_step(1, x)
        one = trainer._two_phase.held_bytes
        trainer._two_phase.max_bytes = int(one * 2.5)
        for step_id in range(2, 7):
            trainer.forward_step(step_id, x)
            assert trainer._two_phase.held_bytes <= trainer._two_phase.max_bytes
        assert trainer._two_phase.held_steps() == [5, 6]
        trainer._two_phase.max_bytes = one // 2
        with pytest.raises(ResourceExhausted) as refused:
            trainer.forward_step(7, x)
        assert refused.value.field == "batch.x" and 7 not in trainer._two_phase.held_steps()


def test_sync_refuses_a_backward_after_the_parameters_moved():
    params = Model(MLP_SPEC).init_parameters(seed=0, dtype="float64")
    with LocalExecutor() as executor:
        trainer = executor.create_trainer(TrainerConfig(MLP_SPEC), params)
        x, y = classification_data(8)
        phase = trainer.forward_step(1, x)
        trainer.step(2, x, y)
        with pytest.raises(FailedPrecondition, match="moved from version 0 to 1") as refused:
            trainer.backward_step(1, mean_softmax_cross_entropy(phase.output, y)[1], 0.5)
        assert refused.value.field == "step_id" and trainer.version == 1


@pytest.mark.parametrize("gradient, loss, field", [
    (np.zeros((8, 2)), 0.5, "output_gradient"),
    (np.zeros((8, 3), dtype=np.float32), 0.5, "output_gradient"),
    (np.full((8, 3), np.nan), 0.5, "output_gradient"),
    (np.zeros((8, 3)), float("inf"), "loss"),
])
def test_bad_backward_input_is_named_and_keeps_the_forward(gradient, loss, field):
    params = Model(MLP_SPEC).init_parameters(seed=0, dtype="float64")
    with LocalExecutor() as executor:
        trainer = executor.create_trainer(TrainerConfig(MLP_SPEC), params)
        x, y = classification_data(8)
        phase = trainer.forward_step(1, x)
        with pytest.raises(InvalidArgument) as refused:
            trainer.backward_step(1, gradient, loss)
        assert refused.value.field == field and trainer.version == 0
        # the held forward survives a refused backward: the corrected one applies
        assert trainer.backward_step(1, mean_softmax_cross_entropy(phase.output, y)[1], 0.5).version == 1


def test_each_parameter_version_held_counts_once():
    """Forwards at one version share one parameter copy; one at a newer version (async: a step in
    between) holds another, and the bound counts both."""
    params = Model(MLP_SPEC).init_parameters(seed=0, dtype="float64")
    param_bytes = sum(value.nbytes for value in params.values())
    with LocalExecutor() as executor:
        trainer = executor.create_trainer(TrainerConfig(MLP_SPEC, consistency="async", num_workers=1), params)
        x, y = classification_data(8)
        trainer.forward_step(1, x)
        trainer.forward_step(2, x)
        activations = trainer._two_phase.held_bytes - param_bytes
        trainer.step(3, x, y)
        trainer.forward_step(4, x)
        assert trainer._two_phase.held_bytes == 3 * activations // 2 + 2 * param_bytes
        trainer._two_phase.max_bytes = trainer._two_phase.held_bytes  # room for three forwards, two copies
        trainer.forward_step(5, x)  # evicts step 1; step 2 still holds version 0's copy
        assert trainer._two_phase.held_steps() == [2, 4, 5]
        trainer._two_phase.max_bytes -= 1
        trainer.forward_step(6, x)  # evicting step 2 frees version 0's copy too: three fit again
        assert trainer._two_phase.held_steps() == [4, 5, 6]
        assert trainer._two_phase.held_bytes == 3 * activations // 2 + param_bytes


def test_a_model_with_tables_is_refused_naming_the_model():
    from .table_models import TABLE_SPEC, lazy_parameters, table_batch

    with LocalExecutor() as executor:
        trainer = executor.create_trainer(TrainerConfig(TABLE_SPEC, {"name": "sgd", "lr": 0.1}), lazy_parameters(0))
        x, _ = table_batch(6, seed=0)
        with pytest.raises(FailedPrecondition) as refused:
            trainer.forward_step(1, x)
        assert refused.value.field == "model" and trainer.version == 0
        trainer.close()
