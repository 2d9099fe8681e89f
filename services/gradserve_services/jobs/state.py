"""A job's checkpoints: the service's session state plus where the job was in its data.

The service writes the session state itself (SaveCheckpoint: parameters, optimizer state, parameter
version, step log, spec). Beside it the job keeps, per checkpoint:

- `step-00000120.json`: the job record — step, data-order position, model spec, the running sums
  of the unfinished epoch, a fingerprint of the job, and which service checkpoint holds the state;
- `step-00000120.npz` (embedded service only): a copy of that service checkpoint, because the
  embedded service and its folder end with the job.

Both are written atomically (temp file + rename), the record last: it is the commit point, so a job
killed in between leaves an `.npz` without a record, which `latest` ignores.

Resuming reads the newest record, restores the state into the session through RestoreCheckpoint
and continues at the recorded step; since batches are a function of (seed, step) (see
`split.BatchOrder`) that is enough to draw exactly the batches the uninterrupted run would have.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from gradserve_services.checkpoint import atomic_file
from gradserve_services.errors import InvalidArgument

__all__ = ["CheckpointMismatch", "JobRecord", "CheckpointStore", "RECORD_FORMAT"]

RECORD_FORMAT = "gradserve.job-checkpoint.v1"
RECORD_NAME = re.compile(r"^step-(\d{8,})\.json$")
KEEP_CHECKPOINTS = 3  # older ones are deleted: a resume needs only the newest complete one


class CheckpointMismatch(InvalidArgument):
    """The checkpoint folder holds a different job's state (other spec, data, batch size, seed)."""


@dataclass(frozen=True)
class JobRecord:
    step: int  # global steps applied; the next step id to run
    position: dict  # BatchOrder.position(step)
    fingerprint: str
    spec: dict
    epoch_loss_sum: float  # sample-weighted loss of the unfinished epoch's steps so far
    epoch_samples: int
    service: dict  # {"target", "session_id", "checkpoint": name SaveCheckpoint returned, "version"}
    state_file: str | None  # the job's copy of the service checkpoint (embedded service), or None

    def to_json(self) -> dict:
        return {
            "format": RECORD_FORMAT,
            "step": self.step,
            "position": self.position,
            "fingerprint": self.fingerprint,
            "spec": self.spec,
            "epoch_loss_sum": self.epoch_loss_sum,
            "epoch_samples": self.epoch_samples,
            "service": self.service,
            "state_file": self.state_file,
        }

    @classmethod
    def from_json(cls, data: dict) -> "JobRecord":
        if data.get("format") != RECORD_FORMAT:
            raise InvalidArgument(f"unknown checkpoint record format {data.get('format')!r}", field="checkpoint.dir")
        return cls(**{key: data[key] for key in (
            "step", "position", "fingerprint", "spec", "epoch_loss_sum", "epoch_samples", "service", "state_file")})


class CheckpointStore:
    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def keep_copy(self, step: int, service_file: Path) -> str:
        """Copy the service's checkpoint file of step `step` in (atomically); returns its name."""
        path = self.folder / f"step-{step:08d}.npz"
        _write_atomically(path, Path(service_file).read_bytes())
        return path.name

    def commit(self, record: JobRecord) -> Path:
        """Write the record (the commit point) and prune checkpoints older than the newest few."""
        path = self.folder / f"step-{record.step:08d}.json"
        _write_atomically(path, json.dumps(record.to_json(), sort_keys=True).encode())
        self._prune()
        return path

    def latest(self, fingerprint: str) -> JobRecord | None:
        """The newest complete checkpoint, or None; a different job's checkpoint is an error."""
        for step, path in reversed(self._records()):
            try:
                record = JobRecord.from_json(json.loads(path.read_text()))
            except (OSError, ValueError, KeyError, TypeError):
                continue  # unreadable: fall back to an older one
            if record.state_file is not None and not (self.folder / record.state_file).exists():
                continue
            if record.fingerprint != fingerprint:
                raise CheckpointMismatch(
                    f"{path} was written by a different job (model, data, batch size, seed or optimizer differ); "
                    "use another checkpoint.dir or drop --resume",
                    field="checkpoint.dir",
                )
            return record
        return None

    def clear(self) -> None:
        """Delete this store's checkpoints (a fresh run supersedes them: a later --resume must not
        pick up an older run's higher-numbered step). Other files in the folder are left alone."""
        if not self.folder.is_dir():
            return
        for path in self.folder.iterdir():
            if re.match(r"^step-\d{8,}\.(json|npz)$", path.name):
                path.unlink(missing_ok=True)

    def _records(self) -> list[tuple[int, Path]]:
        if not self.folder.is_dir():
            return []
        found = []
        for path in self.folder.iterdir():
            match = RECORD_NAME.match(path.name)
            if match:
                found.append((int(match.group(1)), path))
        return sorted(found)

    def _prune(self) -> None:
        records = self._records()
        for step, path in records[:-KEEP_CHECKPOINTS]:
            for stale in (path, self.folder / f"step-{step:08d}.npz"):
                try:
                    stale.unlink()
                except FileNotFoundError:
                    pass


def _write_atomically(path: Path, data: bytes) -> None:
    with atomic_file(path) as handle:
        handle.write(data)
