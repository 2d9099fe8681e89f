"""Test-set evaluation through the service's Forward, at the session's current parameters: the
model runs where its parameters live (no parameters are pulled to evaluate), in inference mode.
The loss of the outputs is the engine's own loss definition, so the test loss means exactly what
the training loss means. A binary task with one output also gets the ROC AUC of its logits. The
inputs are the features, or a mapping of named inputs (categorical data; bags by their offsets),
cut into row ranges alike.
"""

from __future__ import annotations

import numpy as np

from .bags import slice_inputs

__all__ = ["Evaluator"]

EVAL_ROWS = 4096  # rows per forward pass: bounds memory on large test sets


class Evaluator:
    def __init__(self, spec: dict, task: str):
        from gradserve_services.engine import LOSSES

        self.loss = LOSSES[spec["loss"]]
        self.task = task

    def evaluate(self, forward, x, y: np.ndarray) -> dict:
        """{"loss": mean loss, "accuracy": fraction correct (classification and binary only),
        "auc": binary with one output only}. `forward(x_part)` answers the model's output for a
        row range (the SDK's Forward at the session's parameters)."""
        loss_sum, correct, count = 0.0, 0.0, 0
        scores = []
        for start in range(0, len(y), EVAL_ROWS):
            x_part, y_part = _rows(x, start, start + EVAL_ROWS), y[start : start + EVAL_ROWS]
            outputs = forward(x_part)
            targets = self.loss.check_targets(np, y_part, outputs.shape[0], outputs.shape[1], outputs.dtype)
            loss_sum += self.loss.value_and_grad(np, outputs, targets, 1.0, np.empty_like(outputs))
            count += outputs.shape[0]
            if self.task != "regression":
                correct += self._correct(outputs, y_part)
                scores.append(outputs)
        result = {"loss": loss_sum / max(count, 1)}
        if self.task != "regression":
            result["accuracy"] = correct / max(count, 1)
        if self.task == "binary" and scores and scores[0].shape[1] == 1:
            from .click_metrics import roc_auc

            result["auc"] = roc_auc(y, np.concatenate(scores))
        return result

    def _correct(self, outputs: np.ndarray, y: np.ndarray) -> float:
        if self.task == "classification":
            return float(np.sum(outputs.argmax(axis=1) == y))
        # Binary: a logit > 0 predicts 1; a row counts by the fraction of its outputs that are right.
        return float(np.mean((outputs > 0) == (y > 0.5), axis=1).sum())


def _rows(x, start: int, stop: int):
    if isinstance(x, dict):
        return slice_inputs(x, start, stop)
    return x[start:stop]


def planted_figures(split) -> dict:
    """synthetic_ctr: the planted model's log-loss and AUC on the held-out rows, the floor a trained
    model is measured against; {} for other data."""
    if split.click_probability_test is None:
        return {}
    from .click_metrics import log_loss, roc_auc

    probability = np.clip(split.click_probability_test, 1e-15, 1 - 1e-15)
    logits = np.log(probability) - np.log1p(-probability)
    return {"planted_test_loss": log_loss(split.y_test, logits), "planted_test_auc": roc_auc(split.y_test, logits)}
