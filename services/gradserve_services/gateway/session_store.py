"""Where sessions persist: manifests, checkpoints, recovery after a restart, replay after a lost
parameter server.

With a checkpoint directory, every session folder holds a manifest (`session.json`: owner,
creation time, checkpoint policy, the checkpoint the session's state is based on, closed or not),
rewritten atomically whenever that changes. A gateway started on the same directory brings back
every open session from its manifest's checkpoint, owner and step log included, so a retried step
id gets its recorded answer. A session that checkpoints every N steps also keeps the batches of the
steps since its last checkpoint (at most N) in memory: when a parameter-server actor dies, the
session is restored from that checkpoint and those steps are replayed with their own step ids
before the failed call runs again, so no update is lost and none is applied twice.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from gradserve_services.checkpoint import atomic_file, load_checkpoint, save_checkpoint
from gradserve_services.cluster import StepResult, TrainerConfig
from gradserve_services.errors import FailedPrecondition, InvalidArgument, NotFound, ParameterServerLost

if TYPE_CHECKING:
    from .sessions import Session

__all__ = ["SessionStore", "SavedSession", "CHECKPOINT_NAME", "SESSION_ID", "MANIFEST"]

log = logging.getLogger(__name__)

# Used with fullmatch: `$` would accept a trailing newline, and `\d` any Unicode digit.
CHECKPOINT_NAME = re.compile(r"v[0-9]{12}\.npz")
SESSION_ID = re.compile(r"[A-Za-z0-9_-]{32}")  # secrets.token_urlsafe(24)
MANIFEST = "session.json"


@dataclasses.dataclass(frozen=True)
class SavedSession:
    """An open session as its folder holds it: what a restarted gateway rebuilds it from."""

    session_id: str
    manifest: dict
    checkpoint: str  # the manifest's checkpoint name
    config: TrainerConfig  # validated
    arrays: dict
    meta: dict


class SessionStore:
    """A session's folder under the checkpoint directory (none: nothing persists)."""

    def __init__(self, checkpoint_dir: str | None):
        self.checkpoint_dir = checkpoint_dir

    def require_directory(self, field: str = "checkpoint") -> str:
        """The checkpoint directory; FailedPrecondition naming `field` if the service has none."""
        if self.checkpoint_dir is None:
            raise FailedPrecondition("the service runs without a checkpoint directory (--checkpoint-dir)", field)
        return self.checkpoint_dir

    def session_dir(self, session_id: str) -> str:
        return os.path.join(self.require_directory(), session_id)

    # ----- checkpoints and manifests ------------------------------------------------------------

    def save(self, session: Session) -> tuple[str, int]:
        """A checkpoint of the session's trainer; it becomes the session's base (replay emptied)."""
        arrays, meta = session.trainer.state()
        meta = dict(meta, session={
            "session_id": session.session_id,
            "spec": session.config.spec,
            "optimizer": session.config.optimizer.to_dict(),
            "config": {key: value for key, value in dataclasses.asdict(session.config).items()
                       if key not in ("spec", "optimizer")},
        })
        directory = self.session_dir(session.session_id)
        os.makedirs(directory, exist_ok=True)
        name = f"v{int(meta['version']):012d}.npz"
        save_checkpoint(os.path.join(directory, name), arrays, meta)
        session.base_checkpoint = name
        session.replay.clear()
        self.write_manifest(session)
        return name, int(meta["version"])

    def load(self, session: Session, name: str, allocate=None) -> tuple[str, dict, dict]:
        """`(name, arrays, meta)` of a checkpoint of this session; an empty name is its latest
        (`allocate`: where arrays are read, `load_checkpoint`'s)."""
        directory = self.session_dir(session.session_id)
        if not name:
            saved = sorted(n for n in os.listdir(directory) if CHECKPOINT_NAME.fullmatch(n)) \
                if os.path.isdir(directory) else []
            if not saved:
                raise NotFound("this session has no checkpoint yet", "checkpoint")
            name = saved[-1]
        elif not CHECKPOINT_NAME.fullmatch(name):
            raise InvalidArgument("not a checkpoint name SaveCheckpoint returned", "checkpoint")
        arrays, meta = load_checkpoint(os.path.join(directory, name), allocate)
        return name, arrays, meta

    def write_manifest(self, session: Session) -> None:
        """The session's manifest, replaced atomically (only where the session has a folder)."""
        if self.checkpoint_dir is None:
            return
        directory = self.session_dir(session.session_id)
        if not os.path.isdir(directory):
            return
        manifest = {"session_id": session.session_id, "owner": session.owner,
                    "created_unix_s": session.created_unix_s,
                    "checkpoint_every_steps": session.checkpoint_every_steps,
                    "checkpoint": session.base_checkpoint, "closed": session.closed}
        with atomic_file(os.path.join(directory, MANIFEST)) as handle:
            handle.write(json.dumps(manifest, sort_keys=True).encode())

    # ----- recovery after a restart -------------------------------------------------------------

    def session_ids(self) -> Iterator[str]:
        """The ids of the session folders in the checkpoint directory, sorted."""
        if self.checkpoint_dir is None or not os.path.isdir(self.checkpoint_dir):
            return
        for session_id in sorted(os.listdir(self.checkpoint_dir)):
            if SESSION_ID.fullmatch(session_id):
                yield session_id

    def open_session(self, session_id: str) -> SavedSession | None:
        """The saved state of an open session, or None for a closed one or one never checkpointed."""
        directory = self.session_dir(session_id)
        manifest = _read_manifest(directory)
        if manifest is None or manifest.get("closed") or not manifest.get("checkpoint"):
            return None
        name = manifest["checkpoint"]
        if not CHECKPOINT_NAME.fullmatch(name) or manifest.get("session_id") != session_id:
            raise InvalidArgument("manifest names no checkpoint of this session", MANIFEST)
        arrays, meta = load_checkpoint(os.path.join(directory, name))
        saved = meta["session"]
        config = TrainerConfig(spec=saved["spec"], optimizer=saved["optimizer"], **saved["config"]).validated()
        return SavedSession(session_id, manifest, name, config, arrays, meta)

    # ----- replay after a lost parameter server -------------------------------------------------

    def after_step(self, session: Session, step_id: int, x, y, result: StepResult) -> None:
        """Keep a new step's batch for replay, and checkpoint on the session's policy."""
        every = session.checkpoint_every_steps
        if every:
            session.replay.append((step_id, x, y))
            if result.applied and session.steps % every == 0:
                self.save(session)

    def recovering(self, session: Session, operation: Callable):
        """Run `operation` (with the session's lock held); if a parameter server was lost, rebuild
        the session from its base checkpoint plus the steps since, then run it once more."""
        try:
            return operation()
        except ParameterServerLost as error:
            if session.base_checkpoint is None or not session.checkpoint_every_steps:
                # Without a checkpoint policy the steps since the last checkpoint were not kept:
                # restoring alone would silently drop them. The caller decides (RestoreCheckpoint).
                raise ParameterServerLost(f"{error.message}; this session keeps no automatic checkpoints "
                                          "(checkpoint_every_steps): restore one of its checkpoints and "
                                          "resend the steps after it") from None
        log.warning("session %s lost a parameter server; restoring %s and replaying %d steps",
                    session.session_id, session.base_checkpoint, len(session.replay))
        arrays, meta = load_checkpoint(os.path.join(self.session_dir(session.session_id),
                                                    session.base_checkpoint))
        session.trainer.restore(arrays, meta)  # starts replacement servers for the lost ones
        for step_id, x, y in session.replay:
            session.trainer.step(step_id, x, y)  # the same ids and inputs: the same updates, once
        return operation()


def _read_manifest(directory: str) -> dict | None:
    try:
        with open(os.path.join(directory, MANIFEST), encoding="utf-8") as handle:
            manifest = json.load(handle)
    except FileNotFoundError:
        return None
    return manifest if isinstance(manifest, dict) else None
