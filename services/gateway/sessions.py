"""Training sessions: who owns which trainer, one step at a time per session, checkpoints.

A session id is `secrets.token_urlsafe` (unguessable); a session is visible to its owner only: any
other identity gets NotFound, exactly as for an id that never existed, so ids cannot be probed.
"""

from __future__ import annotations

import dataclasses
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Mapping

import numpy as np

from gradserve_services import metrics
from gradserve_services.checkpoint import load_checkpoint, save_checkpoint
from gradserve_services.cluster import StepResult, TrainerConfig
from gradserve_services.engine import Model
from gradserve_services.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)

__all__ = ["Session", "SessionRegistry", "SessionLimits"]

CHECKPOINT_NAME = re.compile(r"^v\d{12}\.npz$")
STEP_TIME_SMOOTHING = 0.3  # weight of the newest step in the running step-time estimate


@dataclasses.dataclass(frozen=True)
class SessionLimits:
    sessions_per_owner: int = 16
    workers_per_session: int = 16
    ps_shards_per_session: int = 16


@dataclasses.dataclass(eq=False)
class Session:
    session_id: str
    owner: str
    trainer: object  # gradserve_services.cluster.Trainer
    config: TrainerConfig
    checkpoint_every_steps: int
    created_unix_s: float
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    steps: int = 0  # steps handled, duplicates excluded
    step_seconds: float = 0.0  # running estimate of one step's wall time
    closed: bool = False

    @property
    def version(self) -> int:
        return self.trainer.version


class SessionRegistry:
    """Sessions by id, with their owners; every method takes the caller's identity."""

    def __init__(self, executor, *, checkpoint_dir: str | None = None, limits: SessionLimits = SessionLimits()):
        self._executor = executor
        self._checkpoint_dir = checkpoint_dir
        self.limits = limits
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()  # guards _sessions only; never held during work

    @property
    def default_workers(self) -> int:
        return self._executor.num_workers

    # ----- lifecycle ----------------------------------------------------------------------------

    def create(self, owner: str, config: TrainerConfig, params: Mapping[str, np.ndarray] | None,
               *, init_seed: int, init_dtype: str, checkpoint_every_steps: int) -> Session:
        """Validate everything, then start the trainer. Nothing is created if anything is wrong."""
        config = config.validated()  # optimizer parsed; errors name `config.X` / `optimizer.X`
        self._check_limits(owner, config, checkpoint_every_steps)
        model = Model(config.spec)  # SpecError names the node
        if params:
            model.validate_parameters(params)
        else:
            params = model.init_parameters(seed=init_seed, dtype=init_dtype or "float32")
        trainer = self._executor.create_trainer(config, params)
        session = Session(secrets.token_urlsafe(24), owner, trainer, config, checkpoint_every_steps, time.time())
        with self._lock:
            if self._owned_count(owner) >= self.limits.sessions_per_owner:
                trainer.close()
                raise ResourceExhausted(f"at most {self.limits.sessions_per_owner} sessions per caller", "sessions")
            self._sessions[session.session_id] = session
            metrics.set_active_sessions(len(self._sessions))
        return session

    def get(self, owner: str, session_id: str) -> Session:
        with self._lock:
            session = self._sessions.get(session_id)
        if session is None or session.owner != owner:
            raise NotFound(f"no session {session_id!r}", "session_id")
        return session

    def list(self, owner: str) -> list[Session]:
        with self._lock:
            owned = [s for s in self._sessions.values() if s.owner == owner]
        return sorted(owned, key=lambda s: s.created_unix_s)

    def close(self, owner: str, session_id: str) -> int:
        session = self.get(owner, session_id)
        with session.lock:
            with self._lock:
                if self._sessions.pop(session_id, None) is None:
                    raise NotFound(f"no session {session_id!r}", "session_id")
                metrics.set_active_sessions(len(self._sessions))
            session.closed = True
            version = session.version
            session.trainer.close()
        return version

    def close_all(self) -> None:
        with self._lock:
            sessions, self._sessions = list(self._sessions.values()), {}
            metrics.set_active_sessions(0)
        for session in sessions:
            with session.lock:
                session.closed = True
                session.trainer.close()

    # ----- work ---------------------------------------------------------------------------------

    def step(self, session: Session, step_id: int, x, y, seconds_left: Callable[[], float | None]) -> StepResult:
        """One step under the session's lock. Refuses (DeadlineExceeded) a step the caller's
        deadline cannot cover, judged by the session's recent step times, so a step is never
        applied after its caller gave up on it."""
        if step_id < 1:
            raise InvalidArgument("step ids start at 1", "step_id")
        with session.lock:
            self._check_open(session)
            remaining = seconds_left()
            if remaining is not None and remaining < session.step_seconds:
                raise DeadlineExceeded(
                    f"{remaining:.3f} s left, a step of this session takes about {session.step_seconds:.3f} s",
                    "deadline",
                )
            started = time.perf_counter()
            result = session.trainer.step(step_id, x, y)
            elapsed = time.perf_counter() - started
            record_step_metrics(result, elapsed)
            if not result.duplicate:
                session.steps += 1
                session.step_seconds = elapsed if session.steps == 1 else (
                    STEP_TIME_SMOOTHING * elapsed + (1 - STEP_TIME_SMOOTHING) * session.step_seconds)
                every = session.checkpoint_every_steps
                if every and result.applied and session.steps % every == 0:
                    self._save(session)
        return result

    def parameters(self, session: Session) -> tuple[int, dict[str, np.ndarray]]:
        with session.lock:
            self._check_open(session)
            return session.trainer.parameters()

    def save_checkpoint(self, session: Session) -> tuple[str, int]:
        with session.lock:
            self._check_open(session)
            return self._save(session)

    def restore_checkpoint(self, session: Session, name: str) -> tuple[str, int]:
        directory = self._session_dir(session)
        if not name:
            saved = sorted(n for n in os.listdir(directory) if CHECKPOINT_NAME.match(n)) \
                if os.path.isdir(directory) else []
            if not saved:
                raise NotFound("this session has no checkpoint yet", "checkpoint")
            name = saved[-1]
        elif not CHECKPOINT_NAME.match(name):
            raise InvalidArgument("not a checkpoint name SaveCheckpoint returned", "checkpoint")
        arrays, meta = load_checkpoint(os.path.join(directory, name))
        with session.lock:
            self._check_open(session)
            session.trainer.restore(arrays, meta)  # validates before changing anything
            session.steps = int(meta.get("steps_run", session.steps))
            return name, session.version

    # ----- helpers ------------------------------------------------------------------------------

    def _save(self, session: Session) -> tuple[str, int]:
        arrays, meta = session.trainer.state()
        meta = dict(meta, session={
            "session_id": session.session_id,
            "spec": session.config.spec,
            "optimizer": session.config.optimizer.to_dict(),
            "config": {key: value for key, value in dataclasses.asdict(session.config).items()
                       if key not in ("spec", "optimizer")},
        })
        directory = self._session_dir(session)
        os.makedirs(directory, exist_ok=True)
        name = f"v{int(meta['version']):012d}.npz"
        save_checkpoint(os.path.join(directory, name), arrays, meta)
        return name, int(meta["version"])

    def _session_dir(self, session: Session) -> str:
        if self._checkpoint_dir is None:
            raise FailedPrecondition("the service runs without a checkpoint directory (--checkpoint-dir)",
                                     "checkpoint")
        return os.path.join(self._checkpoint_dir, session.session_id)

    def _check_limits(self, owner: str, config: TrainerConfig, checkpoint_every_steps: int) -> None:
        if config.num_workers > self.limits.workers_per_session:
            raise ResourceExhausted(f"at most {self.limits.workers_per_session} workers per session",
                                    "config.num_workers")
        if config.ps_shards > self.limits.ps_shards_per_session:
            raise ResourceExhausted(f"at most {self.limits.ps_shards_per_session} parameter-server shards",
                                    "config.ps_shards")
        if checkpoint_every_steps and self._checkpoint_dir is None:
            raise FailedPrecondition("the service runs without a checkpoint directory (--checkpoint-dir)",
                                     "config.checkpoint_every_steps")
        with self._lock:
            if self._owned_count(owner) >= self.limits.sessions_per_owner:
                raise ResourceExhausted(f"at most {self.limits.sessions_per_owner} sessions per caller", "sessions")

    def _owned_count(self, owner: str) -> int:
        return sum(1 for s in self._sessions.values() if s.owner == owner)

    @staticmethod
    def _check_open(session: Session) -> None:
        if session.closed:
            raise NotFound(f"session {session.session_id!r} was closed", "session_id")


def record_step_metrics(result: StepResult, elapsed_s: float) -> None:
    """The gateway owns the one exporter; the cluster's numbers reach it here (see metrics.py)."""
    if result.duplicate:  # answered from the step log: nothing was computed or applied
        metrics.record_step(duration_s=elapsed_s, phases_s={}, samples=0, loss=result.loss,
                            grad_norm=result.grad_norm, version=result.version, applied=0, duplicate=1,
                            mode=result.mode)
        return
    metrics.record_step(
        duration_s=elapsed_s,
        phases_s={phase: ms / 1e3 for phase, ms in result.timings.items()},
        samples=result.samples,
        loss=result.loss,
        grad_norm=result.grad_norm,
        version=result.version,
        staleness=result.staleness,
        applied=result.updates_applied,
        dropped_stale=result.updates_dropped,
        worker_failures=result.worker_failures,
        retries=result.retries,
        bytes_raw=result.bytes_raw,
        bytes_compressed=result.bytes_compressed,
        mode=result.mode,
    )
