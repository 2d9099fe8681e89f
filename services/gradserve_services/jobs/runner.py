"""The training loop of a job: every step goes through the SDK to the service (gRPC -> Ray).

Step ids are global step indices, so a step the SDK retries after UNAVAILABLE, or one a resumed job
sends again, hits the service's exactly-once record instead of being applied twice. The job process
itself only draws batches, evaluates pulled parameters, checkpoints and reports.
"""

from __future__ import annotations

import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass

from gradserve_services.checkpoint import save_checkpoint
from gradserve_services.errors import FailedPrecondition

from .evaluate import Evaluator, planted_figures
from .prepare import PreparedJob
from .progress import EpochProgress
from .report import EpochSignals, MetricsLog, plot_metrics
from .service import TrainingSession, service_target
from .state import CheckpointStore, JobRecord

__all__ = ["run_job"]


@dataclass
class EpochTotals:
    """Sample-weighted loss of the current epoch's steps; saved in checkpoints mid-epoch."""

    loss_sum: float = 0.0
    samples: int = 0

    def add(self, loss: float, samples: int) -> None:
        self.loss_sum += loss * samples
        self.samples += samples

    @property
    def mean(self) -> float:
        return self.loss_sum / max(self.samples, 1)


def run_job(prepared: PreparedJob, *, resume: bool = False, progress: bool | None = None, log=None) -> dict:
    """Train the prepared job to its last epoch; returns the summary printed as the final JSON line."""
    log = sys.stderr if log is None else log
    job, order = prepared.job, prepared.order
    started = time.perf_counter()
    store = CheckpointStore(job.checkpoint.dir) if job.checkpoint.dir is not None else None
    record = store.latest(prepared.fingerprint()) if (resume and store is not None) else None
    if store is not None and not resume:
        store.clear()
    if resume and record is None:
        print(f"gradserve train: no checkpoint in {job.checkpoint.dir}; starting at step 0", file=log)
    first_step = record.step if record is not None else 0
    totals = EpochTotals(record.epoch_loss_sum, record.epoch_samples) if record is not None else EpochTotals()
    job.out_dir.mkdir(parents=True, exist_ok=True)
    metrics = MetricsLog(job.out_dir / "metrics.jsonl", keep_epochs_below=order.epoch_of(first_step) if record else 0)
    evaluator = Evaluator(prepared.spec, prepared.dataset.task)

    with ExitStack() as stack:
        service = stack.enter_context(service_target(prepared, log=log))
        session = stack.enter_context(TrainingSession.open(service, prepared, record))
        if record is not None:
            version = session.restore(record, store.folder)
            if version != record.service["version"]:
                raise FailedPrecondition(f"restored version {version}, expected {record.service['version']}",
                                         field="checkpoint")
            print(f"gradserve train: resumed at step {record.step} (epoch {record.position['epoch'] + 1}, "
                  f"batch {record.position['batch_in_epoch']})", file=log)
        loop = _Loop(prepared, session, store, metrics, evaluator, totals, progress, log)
        loop.run(first_step)
        final_version, params = session.parameters()
        final = evaluator.evaluate(session.forward, prepared.split.test_inputs(), prepared.split.y_test)

    rows = metrics.read()
    plot_metrics(rows, job.out_dir / "metrics.png", title=f"{job.name}: {prepared.dataset.source}")
    save_checkpoint(job.out_dir / "parameters.npz", params, {"spec": prepared.spec, "step": prepared.total_steps, "version": final_version})
    summary = {
        "steps": prepared.total_steps,
        "epochs": job.train.epochs,
        "train_loss": rows[-1]["train_loss"] if rows else None,
        "test_loss": final["loss"],
    }
    if "accuracy" in final and prepared.dataset.task == "classification":
        summary["test_accuracy"] = final["accuracy"]
    if "auc" in final:
        summary["test_auc"] = final["auc"]
    summary.update(planted_figures(prepared.split))
    if "planted_test_loss" in summary:
        print(f"gradserve train: held-out log-loss {final['loss']:.4f} (planted model {summary['planted_test_loss']:.4f}, "
              f"ratio {final['loss'] / summary['planted_test_loss']:.4f}), AUC {final.get('auc', float('nan')):.4f} "
              f"(planted {summary['planted_test_auc']:.4f})", file=log)
    summary["samples_per_s"] = round(loop.samples / loop.step_seconds, 1) if loop.step_seconds > 0 else 0.0
    summary["wall_s"] = round(time.perf_counter() - started, 3)
    return summary


class _Loop:
    def __init__(self, prepared, session, store, metrics, evaluator, totals, progress, log):
        self.prepared, self.session, self.store = prepared, session, store
        self.metrics, self.evaluator, self.totals, self.progress = metrics, evaluator, totals, progress
        self.log = log
        self.signals = EpochSignals()  # of this process's steps of the current epoch
        self.samples = 0  # trained by this process (a resumed job counts only its own)
        self.step_seconds = 0.0

    def run(self, first_step: int) -> None:
        order, epochs = self.prepared.order, self.prepared.job.train.epochs
        step = first_step
        while step < self.prepared.total_steps:
            epoch = order.epoch_of(step)
            epoch_end = (epoch + 1) * order.steps_per_epoch
            bar = EpochProgress(epoch, epochs, order.steps_per_epoch, done_steps=step - epoch * order.steps_per_epoch,
                                enabled=self.progress)
            while step < epoch_end:
                stop = min(epoch_end, self._next_checkpoint(step))
                step = self._run_steps(step, stop, order.permutation(epoch), bar)
                if step == epoch_end:
                    bar.close(self._finish_epoch(epoch))
                if self.store is not None and (step % self.prepared.job.checkpoint.every_steps == 0
                                               or step == self.prepared.total_steps):
                    self._checkpoint(step)

    def _next_checkpoint(self, step: int) -> int:
        every = self.prepared.job.checkpoint.every_steps
        return (step // every + 1) * every if self.store is not None else self.prepared.total_steps

    def _run_steps(self, first: int, stop: int, permutation, bar) -> int:
        """Send steps [first, stop) as one stream; returns `stop`."""
        split, order = self.prepared.split, self.prepared.order
        batches = (
            (step, split.train_inputs(rows), split.y_train[rows])
            for step in range(first, stop)
            for rows in (order.indices(step, permutation),)
        )
        started = time.perf_counter()
        for step, result in self.session.run_steps(batches):
            self.totals.add(result.loss, result.samples)
            self.signals.add(result)
            self.samples += result.samples
            bar.advance(result.samples, result.loss)
        self.step_seconds += time.perf_counter() - started
        return stop

    def _finish_epoch(self, epoch: int) -> str:
        result = self.evaluator.evaluate(self.session.forward, self.prepared.split.test_inputs(),
                                         self.prepared.split.y_test)
        row = {"epoch": epoch, "step": (epoch + 1) * self.prepared.order.steps_per_epoch,
               "train_loss": self.totals.mean, "test_loss": result["loss"]}
        if "accuracy" in result:
            row["test_accuracy"] = result["accuracy"]
        if "auc" in result:
            row["test_auc"] = result["auc"]
        row.update(self.signals.row())
        self.metrics.append(row)
        print(f"gradserve train: epoch {epoch + 1}/{self.prepared.job.train.epochs} "
              f"train_loss={row['train_loss']:.4f} test_loss={row['test_loss']:.4f} {self.signals.summary()}", file=self.log)
        self.totals, self.signals = EpochTotals(), EpochSignals()
        shown = f"test_loss={result['loss']:.4f}"
        return shown + (f" test_acc={result['accuracy']:.4f}" if "accuracy" in result else "")

    def _checkpoint(self, step: int) -> None:
        name, version, service_file = self.session.save_checkpoint()
        state_file = self.store.keep_copy(step, service_file) if service_file is not None else None
        self.store.commit(JobRecord(
            step=step,
            position=self.prepared.order.position(step),
            fingerprint=self.prepared.fingerprint(),
            spec=self.prepared.spec,
            epoch_loss_sum=self.totals.loss_sum,
            epoch_samples=self.totals.samples,
            service={"target": self.session.service.target, "session_id": self.session.session_id,
                     "checkpoint": name, "version": version},
            state_file=state_file,
        ))
