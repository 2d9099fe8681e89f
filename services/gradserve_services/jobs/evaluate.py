"""Test-set evaluation in the job process, from parameters pulled from the service.

This is evaluation, not training: no update is applied, so it need not go through the service. It
uses the engine's own loss (via `loss_and_grad_sum` in eval mode) so the test loss means exactly
what the training loss means.
"""

from __future__ import annotations

import numpy as np

__all__ = ["Evaluator"]

EVAL_ROWS = 4096  # rows per forward pass: bounds memory on large test sets


class Evaluator:
    def __init__(self, spec: dict, task: str):
        from gradserve_services.engine import Model

        self.model = Model(spec)
        self.task = task

    def evaluate(self, params: dict, x: np.ndarray, y: np.ndarray) -> dict:
        """{"loss": mean loss, "accuracy": fraction correct (classification and binary only)}."""
        loss_sum, correct, count = 0.0, 0.0, 0
        for start in range(0, len(x), EVAL_ROWS):
            x_part, y_part = x[start : start + EVAL_ROWS], y[start : start + EVAL_ROWS]
            grad_sum = self.model.loss_and_grad_sum(params, x_part, y_part, train=False)
            loss_sum += grad_sum.loss_sum
            count += grad_sum.count
            if self.task != "regression":
                correct += self._correct(self.model.forward(params, x_part, train=False), y_part)
        result = {"loss": loss_sum / max(count, 1)}
        if self.task != "regression":
            result["accuracy"] = correct / max(count, 1)
        return result

    def _correct(self, outputs: np.ndarray, y: np.ndarray) -> float:
        if self.task == "classification":
            return float(np.sum(outputs.argmax(axis=1) == y))
        # Binary: a logit > 0 predicts 1; a row counts by the fraction of its outputs that are right.
        return float(np.mean((outputs > 0) == (y > 0.5), axis=1).sum())
