"""Two-phase steps: a training step whose loss the caller computes. Phase one (`forward`) runs the
model on the batch at the session's current parameters and keeps the activations under the step
id; the caller computes its loss and dL/d output; phase two (`backward`) pulls that gradient back
through the kept activations (no forward is recomputed) and applies the result as one update
under the same exactly-once rule as every step (the trainer's step log, the servers' update keys).
The gradient applied is exactly the vector-Jacobian product of the output gradient sent, never
divided by the rows (as in ComputeGradients' vector-Jacobian mode): a caller whose loss is a mean
over the rows puts the 1/rows into its output gradient, and then gets the update a Step with that
loss would have made.

Both phases run in the coordinator's process, as the gateway's Forward does: the batch is one
caller's, and the activations must stay where phase two will find them.

Memory is bounded per trainer: at most `MAX_HELD_FORWARDS` forwards and `MAX_HELD_BYTES` are kept,
counting their activations and, once per parameter version they ran at, the copy of the
parameters their backward needs; a new forward evicts the oldest ones until it fits (one whose
activations alone are over the byte limit is refused, nothing kept; the newest is always kept).
The copy of the newest version read stays cached for the next forward (one per trainer). A
forward is dropped when its backward applied (a refused backward keeps it, so a corrected one may
follow), and all are dropped by a restore. A backward whose forward was evicted (or never ran, or
ran in a service that restarted since) is refused with FailedPrecondition naming `step_id` and
applies nothing: run the forward again with the same step id, then the backward.

Versions: the update is a gradient computed at the version the forward ran at. In sync mode it
is refused (FailedPrecondition naming `step_id`, nothing applied) when another step applied since;
async applies it as it would a late shard, and bounded applies, drops or down-weights it by its
staleness rule.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from gradserve_services.engine import Model
from gradserve_services.engine.held import HeldForward, backward_held, hold_forward
from gradserve_services.errors import FailedPrecondition, InvalidArgument, ResourceExhausted

from .config import StepResult, TrainerConfig
from .parameter_shards import ParameterShards
from .step_tasks import dropout_seed
from .steplog import update_key

__all__ = ["TwoPhaseSteps", "ForwardPhase", "MAX_HELD_FORWARDS", "MAX_HELD_BYTES", "HeldStep"]

MAX_HELD_FORWARDS = 16
MAX_HELD_BYTES = 256 * 2**20


@dataclass
class HeldStep:
    version: int  # the parameter version the forward ran at
    forward: HeldForward


@dataclass(frozen=True)
class ForwardPhase:
    """What phase one answers: the output at `version`, or, for a step id already applied,
    `duplicate` and no output (its backward returns the recorded result)."""

    version: int
    output: object | None
    duplicate: bool = False


class TwoPhaseSteps:
    def __init__(self, config: TrainerConfig, model: Model, shards: ParameterShards, *,
                 max_forwards: int = MAX_HELD_FORWARDS, max_bytes: int = MAX_HELD_BYTES):
        self._config = config
        self._model = model
        self._shards = shards
        self.max_forwards, self.max_bytes = max_forwards, max_bytes
        self._held: OrderedDict[int, HeldStep] = OrderedDict()  # oldest first
        self._parameters: tuple[int, dict] | None = None  # (version, copies) the last forward read

    @property
    def held_bytes(self) -> int:
        return _bytes_of([step.forward for step in self._held.values()])

    def held_steps(self) -> list[int]:
        return list(self._held)

    def forward(self, step: int, x, *, steps_run: int) -> HeldStep:
        """Phase one at the current parameters; a repeated step id replaces its held forward."""
        if self._model.graph.tables:
            raise FailedPrecondition("two-phase steps take models without embedding tables", "model")
        version, params = self._current_parameters()
        forward = hold_forward(self._model, params, x, train=True,
                               seed=dropout_seed(self._config, steps_run))
        if forward.nbytes > self.max_bytes:
            raise ResourceExhausted(f"the forward of this batch keeps {forward.nbytes} bytes of activations, "
                                    f"over the {self.max_bytes}-byte limit of a session; send fewer rows",
                                    "batch.x")
        self._held.pop(step, None)
        while self._held and (len(self._held) >= self.max_forwards or _bytes_of(
                [*(kept.forward for kept in self._held.values()), forward]) > self.max_bytes):
            self._held.popitem(last=False)
        held = self._held[step] = HeldStep(version, forward)
        return held

    def backward(self, step: int, output_gradient, loss: float, *, input_gradients: list | None = None) -> StepResult:
        """Phase two: one update from `output_gradient` through the held forward of `step`. A
        list given as `input_gradients` receives dL/dx of the float inputs (by tensor name)."""
        started = time.perf_counter()
        if output_gradient is None:
            raise InvalidArgument("missing tensor: the step's dL/d output", "output_gradient")
        if isinstance(loss, bool) or not isinstance(loss, (int, float)) or not math.isfinite(loss):
            raise InvalidArgument(f"the caller's loss must be a finite number, got {loss!r}", "loss")
        held = self._held.get(step)
        if held is None:
            raise FailedPrecondition(
                f"no forward of step {step} is held (never run, evicted by later forwards, or the service "
                f"restarted); run the step's forward again, then its backward", "step_id")
        shards = self._shards
        if self._config.consistency == "sync" and held.version != shards.version:
            del self._held[step]
            raise FailedPrecondition(
                f"the parameters moved from version {held.version} to {shards.version} since step {step}'s "
                f"forward (sync mode applies gradients of the current parameters only); run the forward "
                f"again", "step_id")
        answer = backward_held(self._model, held.forward, output_gradient,
                               input_gradient=input_gradients is not None)
        grads = answer.gradients
        computed = time.perf_counter()
        rows = held.forward.rows
        parts = [[{"kind": "dense", "grads": {name: grads[name] for name in names}}]
                 for names in shards.partition]
        # the parts are the gradient itself (the caller's loss is already reduced): a count of 1
        norm = shards.agree(parts, 1, held.version, self._config.optimizer.clip_norm)
        applying = shards.apply(update_key(step), 1, held.version, norm, parts)
        try:
            reports = shards.get([output[1] for output in applying])
        except BaseException:  # refused (a non-finite update): the published parameters stay
            shards.discard([output[0] for output in applying])
            raise
        shards.published = [output[0] for output in applying]
        del self._held[step]
        if input_gradients is not None:
            input_gradients.append(answer.input_gradients)
        applied = [report for report in reports if report["applied"]]
        shards.version = max(report["version"] for report in reports)
        finished = time.perf_counter()
        return StepResult(
            loss=float(loss), version=shards.version, applied=bool(applied),
            timings={"compute": (computed - started) * 1e3, "apply": (finished - computed) * 1e3,
                     "total": (finished - started) * 1e3,
                     "server_apply": sum(report.get("apply_ms", 0.0) for report in reports)},
            samples=rows,
            grad_norm=norm if norm is not None else math.sqrt(sum(r["grad_norm"] ** 2 for r in applied)),
            lr=applied[-1]["lr"] if applied else 0.0,
            staleness=(reports[0]["staleness"],),
            updates_applied=1 if applied else 0, updates_dropped=0 if applied else 1,
            mode=self._config.consistency,
        )

    def clear(self) -> None:
        """Drop every held forward (the parameters were replaced)."""
        self._held.clear()
        self._parameters = None

    def _current_parameters(self) -> tuple[int, dict]:
        """The current (version, parameters), copied once per version however many forwards run."""
        if self._parameters is None or self._parameters[0] != self._shards.version:
            merged = {}
            for _, shard_params in self._shards.copies():
                merged.update(shard_params)
            # copies: a backend may hand out its live arrays, which the next update changes in
            # place, and a held forward's backward needs the parameters its forward ran at
            self._parameters = (self._shards.version, {name: np.array(merged[name], copy=True)
                                                       for name in self._model.parameter_shapes()})
        return self._parameters


def _bytes_of(forwards: list[HeldForward]) -> int:
    """What holding `forwards` costs: their activations, and each parameter copy they share once."""
    snapshots = {id(forward.params): forward.params for forward in forwards}
    return sum(forward.nbytes for forward in forwards) + sum(
        value.nbytes for params in snapshots.values() for value in params.values())
