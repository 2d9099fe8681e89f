"""Training sessions: who owns which trainer, the limits on what they may hold, one step at a time
per session. What persists (manifests, checkpoints, recovery, replay) is session_store.py's.

A session id is `secrets.token_urlsafe` (unguessable); a session is visible to its owner only: any
other identity gets NotFound, exactly as for an id that never existed, so ids cannot be probed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import secrets
import threading
import time
from collections.abc import Callable, Mapping

import numpy as np

from gradserve.results import TABLE_STEP_FIELDS
from gradserve_services import metrics
from gradserve_services.cluster import DEFAULT_CALL_TIMEOUT_S, DEFAULT_STEP_WINDOW, StepResult, TrainerConfig
from gradserve_services.cluster.table_lane import InitialRows
from gradserve_services.cluster.handover import Landing, hand_over
from gradserve_services.engine import Model
from gradserve_services.engine.spec import parse_spec
from gradserve_services.errors import (
    DeadlineExceeded,
    GradserveError,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)

from .session_store import SavedSession, SessionStore

__all__ = ["Session", "SessionRegistry", "SessionLimits", "activation_features", "check_activations"]

log = logging.getLogger(__name__)

INIT_DTYPES = ("", "float32", "float64")  # "" is float32
STEP_TIME_SMOOTHING = 0.3  # weight of the newest step in the running step-time estimate


@dataclasses.dataclass(frozen=True)
class SessionLimits:
    sessions_per_owner: int = 16
    workers_per_session: int = 16
    ps_shards_per_session: int = 16
    # Parameters (plus as much optimizer state) a session may hold, in bytes; a CreateSession that
    # initialises from a seed would otherwise allocate whatever size a spec declares.
    parameter_bytes_per_session: int = 2 << 30
    # Activations one call may hold at once: rows (or micro-batch rows) x the features of every
    # node. A batch small on the wire can otherwise ask for any amount of memory through wide layers.
    activation_elements_per_call: int = 1 << 28
    # Steps whose results a session keeps to answer retries (and writes into each checkpoint); an
    # older step id is refused, never applied twice (see cluster/steplog.py).
    step_window: int = DEFAULT_STEP_WINDOW
    # Seconds one call of a step (a worker's shard, the servers' update) may take before its actor
    # counts as stuck and is replaced (cluster TrainerConfig.call_timeout_s).
    call_timeout_s: int = DEFAULT_CALL_TIMEOUT_S


@dataclasses.dataclass(eq=False)
class Session:
    session_id: str
    owner: str
    trainer: object  # gradserve_services.cluster.Trainer
    config: TrainerConfig
    checkpoint_every_steps: int
    created_unix_s: float
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    step_seconds: float = 0.0  # running estimate of one step's wall time
    closed: bool = False
    # The checkpoint the session's state builds on (last saved or restored) and the steps applied
    # since, (step_id, x, y) in order: what a lost parameter server is rebuilt from.
    base_checkpoint: str | None = None
    replay: list = dataclasses.field(default_factory=list)
    features_per_row: int = 0  # activation elements per batch row (see check_activations)
    # (step_id, x, y) of the next step of a stream, begun by the trainer before its call
    # (Trainer.step's `then`); and (step_id, result) of one run before its call came
    ahead: tuple | None = None
    answered: tuple | None = None

    def __post_init__(self):
        self.features_per_row = activation_features(self.config.spec)

    @property
    def version(self) -> int:
        return self.trainer.version

    @property
    def steps(self) -> int:
        """Steps handled, duplicates excluded: the trainer's count (a checkpoint carries it)."""
        return self.trainer.steps_run


class SessionRegistry:
    """Sessions by id, with their owners; every method takes the caller's identity."""

    def __init__(self, executor, *, checkpoint_dir: str | None = None, limits: SessionLimits = SessionLimits()):
        self._executor = executor
        self._store = SessionStore(checkpoint_dir)
        self.limits = limits
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()  # guards _sessions only; never held during work

    @property
    def checkpoint_dir(self) -> str | None:
        return self._store.checkpoint_dir

    @property
    def default_workers(self) -> int:
        return self._executor.num_workers

    # ----- lifecycle ----------------------------------------------------------------------------

    def create(self, owner: str, config: TrainerConfig, params: Mapping[str, np.ndarray] | None,
               *, init_seed: int, init_dtype: str, checkpoint_every_steps: int) -> Session:
        """Validate everything, then start the trainer. Nothing is created if anything is wrong
        (the trainer checks given parameters against the spec before it starts anything)."""
        if init_dtype not in INIT_DTYPES:  # exactly the names service.proto documents
            raise InvalidArgument(f"must be float32 or float64, got {init_dtype!r}", "config.init.dtype")
        # optimizer parsed; errors name `config.X` / `optimizer.X`
        config = dataclasses.replace(config, step_window=self.limits.step_window,
                                     call_timeout_s=self.limits.call_timeout_s).validated()
        self._check_limits(owner, config, checkpoint_every_steps)
        model = Model(config.spec)  # SpecError names the node
        if not params:
            self._check_parameter_bytes(model, init_dtype or "float32")
            params = _initial_parameters(model, init_seed, init_dtype or "float32")
        trainer = self._executor.create_trainer(config, params)
        session = Session(secrets.token_urlsafe(24), owner, trainer, config, checkpoint_every_steps, time.time())
        try:
            if checkpoint_every_steps:
                self._store.save(session)  # version 0: a lost parameter server can be rebuilt from step 1 on
            with self._lock:
                self._check_room(owner)
                self._add(session)
        except BaseException:
            trainer.close()
            raise
        return session

    def landing(self) -> Landing:
        """Where a request's parameters are decoded (handover.py): a block of the executor's
        shared-memory area, which its parameter servers map, or none (in process, another
        machine); closed (its block removed) when the request is done."""
        return Landing(getattr(self._executor, "shared_area", None))

    def recover(self) -> int:
        """Bring back every open session found in the checkpoint directory (a gateway restart);
        returns how many. A session that cannot be restored is logged and left on disk."""
        recovered = 0
        for session_id in self._store.session_ids():
            try:
                recovered += self._recover_one(session_id)
            except (GradserveError, OSError, ValueError, KeyError, TypeError) as error:
                log.warning("session %s not recovered: %s", session_id, error)
        return recovered

    def _recover_one(self, session_id: str) -> int:
        with self._lock:
            if session_id in self._sessions:
                return 0
        saved = self._store.open_session(session_id)
        if saved is None:
            return 0
        session = self._restored(saved)
        log.info("recovered session %s of %s at version %d", session_id, session.owner, session.version)
        return 1

    def _restored(self, saved: SavedSession) -> Session:
        model = Model(saved.config.spec)
        dtype = next(value.dtype for key, value in saved.arrays.items()  # a parameter's, or a table row's
                     if key.startswith("param/") or (key.startswith("rows/") and key.endswith("/rows")))
        params = {name: InitialRows(0, dtype) if name in model.graph.tables else saved.arrays[f"param/{name}"]
                  for name in model.parameter_shapes()}  # restore() loads the tables' stored rows
        trainer = self._executor.create_trainer(saved.config, params)
        try:
            trainer.restore(saved.arrays, saved.meta)
            manifest = saved.manifest
            session = Session(saved.session_id, manifest["owner"], trainer, saved.config,
                              int(manifest.get("checkpoint_every_steps", 0)),
                              float(manifest.get("created_unix_s", time.time())),
                              base_checkpoint=saved.checkpoint)
            with self._lock:  # owners' limits were checked when the sessions were created
                self._add(session)
        except BaseException:
            trainer.close()
            raise
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
            session.replay.clear()
            self._store.write_manifest(session)  # a closed session does not come back after a restart
        return version

    def close_all(self) -> None:
        with self._lock:
            sessions, self._sessions = list(self._sessions.values()), {}
            metrics.set_active_sessions(0)
        for session in sessions:  # a shutdown, not a close: their manifests stay open for `recover`
            with session.lock:
                session.closed = True
                session.trainer.close()

    # ----- work ---------------------------------------------------------------------------------

    def step(self, session: Session, step_id: int, x, y, seconds_left: Callable[[], float | None], *,
             then: tuple | None = None) -> StepResult:
        """One step under the session's lock. Refuses (DeadlineExceeded) a step the caller's
        deadline cannot cover, judged by the session's recent step times, so a step is never
        applied after its caller gave up on it. `then=(step_id, x, y)`: the stream's next step,
        arrived already: the trainer begins it before this one's end is waited for, where the
        deadline covers both and no checkpoint falls between them. It is applied even if its
        call never comes (it was sent): any other call of the session first waits for it and
        runs its bookkeeping (replay, checkpoints, metrics), and its call gets that result."""
        if step_id < 1:
            raise InvalidArgument("step ids start at 1", "step_id")
        self._check_activations(session, x)
        with session.lock:
            self._check_open(session)
            answered, session.answered = session.answered, None
            if answered is not None and answered[0] == step_id:
                return answered[1]
            if session.ahead is not None and session.ahead[0] != step_id:
                self._settle_ahead(session)
            remaining = seconds_left()
            if remaining is not None and remaining < session.step_seconds:
                raise DeadlineExceeded(
                    f"{remaining:.3f} s left, a step of this session takes about {session.step_seconds:.3f} s",
                    "deadline",
                )
            return self._run_step(session, step_id, x, y, self._ahead_of(session, then, remaining))

    def _ahead_of(self, session: Session, then: tuple | None, remaining: float | None) -> tuple | None:
        """`then`, where it may be begun ahead: a valid id, a batch within the limits, a deadline
        that covers two steps, and no checkpoint due after this step (it saves a quiet state)."""
        if then is None or then[0] < 1:
            return None
        every = session.checkpoint_every_steps
        if (every and (session.steps + 1) % every == 0) or \
                (remaining is not None and remaining < 2 * session.step_seconds):
            return None
        try:
            self._check_activations(session, then[1])
        except InvalidArgument:
            return None
        return then

    def _check_activations(self, session: Session, x) -> None:
        check_activations(session.features_per_row, x, session.config.micro_batch_size,
                          self.limits.activation_elements_per_call)

    def _run_step(self, session: Session, step_id: int, x, y, then: tuple | None = None) -> StepResult:
        """The step with the session's lock held: recovery, metrics, replay and checkpoints."""
        session.ahead = None
        started = time.perf_counter()
        result = self._store.recovering(session, lambda: session.trainer.step(step_id, x, y, then=then))
        elapsed = time.perf_counter() - started
        record_step_metrics(result, elapsed)
        if not result.duplicate:
            session.step_seconds = elapsed if session.steps == 1 else (
                STEP_TIME_SMOOTHING * elapsed + (1 - STEP_TIME_SMOOTHING) * session.step_seconds)
            self._store.after_step(session, step_id, x, y, result)
        if then is not None and session.trainer.ahead_step == then[0]:
            session.ahead = then
            metrics.record_step_begun_ahead()
        return result

    def _settle_ahead(self, session: Session) -> None:
        """Run out the step begun ahead, if any, as its call would (with the lock held); its call,
        when it comes, is answered with the result. One that fails is left to its call."""
        ahead, session.ahead = session.ahead, None
        if ahead is not None:
            try:
                session.answered = (ahead[0], self._run_step(session, *ahead))
            except Exception:  # noqa: BLE001 - its own call meets the error again
                pass

    @contextlib.contextmanager
    def _held(self, session: Session):
        """The session's lock, the session open, no step begun ahead still in flight."""
        with session.lock:
            self._check_open(session)
            self._settle_ahead(session)
            yield

    def forward_step(self, session: Session, step_id: int, x):
        """Phase one of a two-phase step (cluster/two_phase.py): a `ForwardPhase`."""
        if step_id < 1:
            raise InvalidArgument("step ids start at 1", "step_id")
        check_activations(session.features_per_row, x, 0, self.limits.activation_elements_per_call)
        with self._held(session):
            return self._store.recovering(session, lambda: session.trainer.forward_step(step_id, x))

    def backward_step(self, session: Session, step_id: int, output_gradient, loss: float, *,
                      input_gradient: bool = False) -> tuple[StepResult, dict | None]:
        """Phase two: `(result, input gradients or None)`. A session with a checkpoint policy
        checkpoints after it: replay after a lost parameter server re-runs steps from their
        batches, and this update has none to re-run."""
        if step_id < 1:
            raise InvalidArgument("step ids start at 1", "step_id")
        with self._held(session):
            started = time.perf_counter()

            def backward():
                answer = session.trainer.backward_step(step_id, output_gradient, loss, input_gradient=input_gradient)
                return answer if input_gradient else (answer, None)

            result, inputs = self._store.recovering(session, backward)
            record_step_metrics(result, time.perf_counter() - started)
            if result.applied and not result.duplicate and session.checkpoint_every_steps:
                self._store.save(session)
        return result, inputs

    def table_rows(self, session: Session, table: str, ids) -> tuple[int, np.ndarray]:
        """`(version, rows)` of a session's table by id (PullRows)."""
        with self._held(session):
            return session.trainer.table_rows(table, ids)

    def parameters(self, session: Session) -> tuple[int, dict[str, np.ndarray]]:
        with self._held(session):
            return self._store.recovering(session, session.trainer.parameters)

    @contextlib.contextmanager
    def parameters_in_place(self, session: Session):
        """`(version, params)` as the servers hold them (Trainer.parameters_in_place), with the
        session's lock held until the `with` block ends: no step of the session runs meanwhile."""
        with self._held(session), contextlib.ExitStack() as held:
            yield self._store.recovering(
                session, lambda: held.enter_context(session.trainer.parameters_in_place()))

    def save_checkpoint(self, session: Session) -> tuple[str, int]:
        with self._held(session):
            return self._store.recovering(session, lambda: self._store.save(session))

    def restore_checkpoint(self, session: Session, name: str) -> tuple[str, int]:
        with self.landing() as landing:  # the parameters read where the servers' processes map them
            name, arrays, meta = self._store.load(session, name, allocate=lambda found: landing.allocate(
                {key: spec for key, spec in found.items() if key.startswith("param/")}))
            with self._held(session):
                # validates before changing anything; the loaded arrays become the servers' (handover.py)
                session.trainer.restore(hand_over(arrays), meta)
                session.base_checkpoint = name
                session.replay.clear()
                self._store.write_manifest(session)
                return name, session.version

    # ----- helpers ------------------------------------------------------------------------------

    def _add(self, session: Session) -> None:
        """Register `session` (with `_lock` held)."""
        self._sessions[session.session_id] = session
        metrics.set_active_sessions(len(self._sessions))

    def _check_parameter_bytes(self, model: Model, dtype: str) -> None:
        itemsize = 8 if dtype == "float64" else 4
        tables = model.graph.tables  # held row by row as steps touch them: a 4-byte slot per row to start
        total = sum(math.prod(shape) * itemsize if name not in tables else shape[0] * 4
                    for name, shape in model.parameter_shapes().items())
        if total > self.limits.parameter_bytes_per_session:
            raise ResourceExhausted(f"the model has {total} bytes of parameters; at most "
                                    f"{self.limits.parameter_bytes_per_session} per session", "config.model")

    def _check_limits(self, owner: str, config: TrainerConfig, checkpoint_every_steps: int) -> None:
        if config.num_workers > self.limits.workers_per_session:
            raise ResourceExhausted(f"at most {self.limits.workers_per_session} workers per session",
                                    "config.num_workers")
        if config.ps_shards > self.limits.ps_shards_per_session:
            raise ResourceExhausted(f"at most {self.limits.ps_shards_per_session} parameter-server shards",
                                    "config.ps_shards")
        if checkpoint_every_steps:
            self._store.require_directory("config.checkpoint_every_steps")
        with self._lock:
            self._check_room(owner)

    def _check_room(self, owner: str) -> None:
        """ResourceExhausted if `owner` holds as many sessions as it may (with `_lock` held)."""
        owned = sum(1 for s in self._sessions.values() if s.owner == owner)
        if owned >= self.limits.sessions_per_owner:
            raise ResourceExhausted(f"at most {self.limits.sessions_per_owner} sessions per caller", "sessions")

    @staticmethod
    def _check_open(session: Session) -> None:
        if session.closed:
            raise NotFound(f"session {session.session_id!r} was closed", "session_id")


def _initial_parameters(model: Model, seed: int, dtype: str) -> dict:
    """`init_parameters` without making the tables: their servers make each row from the seed
    (table_lane.py), so a table of millions of rows is never built here nor sent whole."""
    made = model.init_parameters(seed=seed, dtype=dtype, tables=False)
    return {name: made.get(name, InitialRows(seed, dtype)) for name in model.parameter_shapes()}


def activation_features(spec) -> int:
    """Activation elements one batch row makes: the input's and every node's features."""
    graph = parse_spec(spec)  # SpecError names the node
    return graph.input_features + sum(graph.widths[node.name] for node in graph.nodes)


def check_activations(per_row: int, x, micro_batch_size, limit: int) -> None:
    """ResourceExhausted if one pass over `x` would hold more than `limit` activation elements
    (`per_row` from `activation_features`). An x that is not 2-D is left to the engine to reject."""
    rows = x.shape[0] if getattr(x, "ndim", 0) == 2 else 0
    if micro_batch_size:
        rows = min(rows, int(micro_batch_size))
    if rows * per_row > limit:
        raise ResourceExhausted(f"{rows} rows x {per_row} features per row of activations exceed the "
                                f"{limit} elements one call may hold; send smaller batches or set "
                                "micro_batch_size", "batch.x")


def record_step_metrics(result: StepResult, elapsed_s: float) -> None:
    """The gateway owns the one exporter; the cluster's numbers reach it here (see gradserve_services.metrics)."""
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
        noise_scale=result.noise_scale,
        shard_cosines=result.shard_cosines,
        update_ratios=result.update_ratios.values(),
        compute_spread=result.compute_spread,
        slowest_worker=result.slowest_worker,
    )
    if result.row_lookups:  # a model with tables
        metrics.record_table_step(**{name: getattr(result, name) for name in TABLE_STEP_FIELDS})
