"""The service a job talks to, and its training session, seen only through the SDK (`gradserve.Client`).

Without a target the job embeds a service: a gRPC server on 127.0.0.1 (port 0) over a local Ray
runtime, with its checkpoint directory in a temporary folder, stopped when the job ends. The job
still reaches it over gRPC like any client: the embedding only decides who starts the process.

A job killed before it could remove that folder (SIGKILL, a lost machine) leaves it behind; the
folder is owned (see owned_folder.py), so the next embedded service on this machine removes every
such folder whose job is gone, and never one a live job is using.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from gradserve_services.cluster.config import ROUND_MODES
from gradserve_services.owned_folder import OwnedFolder, remove_orphans

from .prepare import PreparedJob

__all__ = ["Service", "service_target", "TrainingSession"]

STOP_GRACE_S = 5.0
SESSION_TIMEOUT_S = 600.0  # per call: a first step includes actor start-up on a busy machine
SERVICE_FOLDER_PREFIX = "gradserve-job-service-"
SERVICE_FOLDER_MARKER = "owner"


@dataclass(frozen=True)
class Service:
    target: str  # host:port
    token: str | None
    checkpoint_dir: Path | None  # the service's own checkpoint folder, when this job embeds it
    embedded: bool


@contextmanager
def service_target(prepared: PreparedJob, *, log=None):
    """Yield the `Service` to use: `job.target` as given, or one embedded for the job's duration."""
    job = prepared.job
    if job.target is not None:
        yield Service(job.target, job.token, None, embedded=False)
        return
    # Ray and the gateway log through `logging`; the job's stderr is for its progress and errors.
    logging.getLogger("gradserve_services").setLevel(logging.WARNING)
    from gradserve_services.cluster import RayExecutor
    from gradserve_services.gateway import create_server

    folder = own_service_folder()
    checkpoint_dir = Path(folder.path)
    server = None
    try:
        executor = RayExecutor(num_workers=job.train.workers)
    except BaseException:
        folder.remove()
        raise
    try:
        server, port = create_server(executor, host="127.0.0.1", port=0, checkpoint_dir=str(checkpoint_dir))
        yield Service(f"127.0.0.1:{port}", None, checkpoint_dir, embedded=True)
    finally:
        try:
            if server is not None:
                server.stop(STOP_GRACE_S)
        finally:
            executor.shutdown()
            folder.remove()


def own_service_folder(root: str | None = None) -> OwnedFolder:
    """A new folder for an embedded service's checkpoints in `root` (the temporary directory),
    after removing those that killed jobs left there."""
    root = root or tempfile.gettempdir()
    remove_orphans(root, SERVICE_FOLDER_PREFIX, marker=SERVICE_FOLDER_MARKER)
    return OwnedFolder(os.path.join(root, f"{SERVICE_FOLDER_PREFIX}{uuid.uuid4().hex[:16]}"),
                       marker=SERVICE_FOLDER_MARKER)


class TrainingSession:
    """One training session of the job on the service. Step ids are `global step + 1` (the service
    numbers steps from 1), so they are the same in every run of the job."""

    def __init__(self, service: Service, client, session_id: str):
        self.service, self.client, self.session_id = service, client, session_id

    @classmethod
    def open(cls, service: Service, prepared: PreparedJob, record=None) -> "TrainingSession":
        """A new session; or, resuming against a running service (no job copy of the state), the
        session the checkpoint was taken from, which that service still holds."""
        from gradserve import Client

        job = prepared.job
        client = Client(service.target, token=service.token, timeout=SESSION_TIMEOUT_S)
        try:
            if record is not None and record.state_file is None:
                return cls(service, client, _still_open(client, record, service))
            session_id = client.create_session(
                prepared.spec,
                optimizer=prepared.optimizer,
                seed=job.seed,
                consistency=job.train.consistency,
                staleness=job.train.staleness,
                num_workers=job.train.workers,
                micro_batch_size=job.train.micro_batch_size,
                compression=job.train.compression,
                table_optimizer=job.table_optimizer,
                **_round_settings(job.train),
            )
        except BaseException:
            client.close()
            raise
        return cls(service, client, session_id)

    def __enter__(self) -> "TrainingSession":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def run_steps(self, batches):
        """`batches` yields (step, x, y); yields (step, the SDK's StepResult) per step, in order, from
        one stream. A duplicate answer (a step the session had already applied) is not trained twice."""
        numbered = ((step + 1, x, y) for step, x, y in batches)
        for result in self.client.stream_steps(self.session_id, numbered):
            yield result.step_id - 1, result

    def parameters(self):
        return self.client.pull_parameters(self.session_id)

    def forward(self, x):
        """The model's output for `x` at the session's current parameters (the Forward RPC)."""
        return self.client.forward_session(self.session_id, x)[1]

    def save_checkpoint(self):
        """Ask the service to checkpoint the session (parameters, optimizer state, version, step
        log); returns (name, version) and, when embedded, the file it wrote."""
        saved = self.client.save_checkpoint(self.session_id)
        path = None
        if self.service.checkpoint_dir is not None:
            path = self.service.checkpoint_dir / self.session_id / saved.name
        return saved.name, saved.version, path

    def restore(self, record, store_folder: Path) -> int:
        """Put the session into the state of a job checkpoint, through RestoreCheckpoint; returns
        the parameter version restored."""
        name = record.service["checkpoint"]
        if record.state_file is not None and self.service.checkpoint_dir is not None:
            # A fresh embedded service: hand it the job's copy under the name it gave the file.
            folder = self.service.checkpoint_dir / self.session_id
            folder.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(store_folder / record.state_file, folder / name)
        return self.client.restore_checkpoint(self.session_id, name).version

    def close(self) -> None:
        try:
            self.client.close_session(self.session_id)
        except Exception:  # the service may already be gone (it is stopped right after)
            pass
        finally:
            self.client.close()


def _still_open(client, record, service: Service) -> str:
    from gradserve_services.jobs.state import CheckpointMismatch

    session_id = record.service["session_id"]
    if record.service.get("target") != service.target or \
            session_id not in {info.session_id for info in client.list_sessions()}:
        raise CheckpointMismatch(
            f"the checkpoint's state lives in session {session_id[:8]}... on {record.service.get('target')}, "
            f"which {service.target} does not hold (any more); resume needs that service and session",
            field="checkpoint.dir",
        )
    return session_id


def _round_settings(train) -> dict:
    """The session's local-round and PowerSGD settings, sent only where they apply."""
    settings = {}
    if train.consistency in ROUND_MODES:
        settings.update(local_steps=train.local_steps, inner_optimizer=train.inner_optimizer)
    if train.compression == "powersgd":
        settings["powersgd_rank"] = train.powersgd_rank
    return settings
