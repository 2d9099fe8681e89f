"""Update outcomes on one machine: how a step begun ahead learns that the update before it landed
without a round trip through the coordinator.

Through Ray, a step's workers are started once the update they follow is published: the server's
answer goes to the coordinator, which then hands their calls over, two hops of about a
millisecond each on a busy machine, on the critical path of every step. Where the workers map the
same shared-memory area as the server, the coordinator instead hands the next step's calls over at
once, and each worker, free after its pass, waits on the *board*: a small block the server writes
an outcome to for every update it is given a ticket for (`post`), then rings every worker's
*bell* (a datagram socket in the area) so that none has to poll.

A ticket's outcome on the server's board is APPLIED (the call returned: applied, a duplicate, or
dropped as stale; its version says which version the workers now read) or FAILED (refused, or
broken). The coordinator posts GIVEN_UP on a board of its own when it drops the step begun ahead
(the update before it failed, or was submitted again under another ticket after a shard re-ran):
a worker never waits for an update that will not come. Each outcome is what the workers' call
would have met through Ray: the published parameters given (APPLIED) or the update's error
(anything else).

A board is a ring of `SLOTS` records `(sequence, ticket, status, version)` with one writer each;
a record is marked invalid while written (sequence 0) and is valid when read twice alike, so a
reader never takes half of one.
"""

from __future__ import annotations

import os
import secrets
import select
import socket
import time
import uuid
from dataclasses import dataclass

import numpy as np

from gradserve_services.errors import Unavailable

__all__ = ["UpdateBoard", "PostedBoard", "kept_board", "read_board", "Doorbell", "ring", "new_ticket",
           "wait_for_update", "APPLIED", "FAILED", "GIVEN_UP", "BOARD_LAYOUT"]

SLOTS = 256  # outcomes kept: a re-run shard still finds the one it follows
APPLIED, FAILED, GIVEN_UP = 1, 2, 3
BOARD_LAYOUT = {"slots": ("<i8", (SLOTS, 4))}
BELL_PREFIX = "bell-"
# How often a waiting worker looks at the boards although no bell rang: only a ring lost to a
# full socket queue is ever waited for this long; a worker with no bell (its socket could not be
# bound) looks this often.
POLL_S = 0.005
POLL_WITHOUT_BELL_S = 0.0005


def new_ticket() -> int:
    return secrets.randbits(62) + 1


@dataclass(frozen=True)
class Outcome:
    status: int
    version: int


class UpdateBoard:
    """A view of one board's slots: `post` from its one writer, `find` from any reader."""

    def __init__(self, slots: np.ndarray):
        self._slots = slots
        self._sequence = int(slots[:, 0].max()) if slots.size else 0

    def post(self, ticket: int, status: int, version: int) -> None:
        self._sequence += 1
        slot = self._slots[self._sequence % SLOTS]
        slot[0] = 0  # invalid while written
        slot[1], slot[2], slot[3] = ticket, status, version
        slot[0] = self._sequence

    def find(self, ticket: int) -> Outcome | None:
        for index in np.flatnonzero(self._slots[:, 1] == ticket):
            slot = self._slots[index]
            sequence = int(slot[0])
            record = slot[1:].tolist()
            if sequence > 0 and int(slot[0]) == sequence and record[0] == ticket:
                return Outcome(record[1], record[2])
        return None


@dataclass(frozen=True)
class PostedBoard:
    """A board its writer posts on (`ref`: what readers map), each post ringing the area's bells."""

    ref: object  # shared.BlockRef
    board: UpdateBoard
    folder: str

    def post(self, ticket: int, status: int, version: int) -> None:
        self.board.post(ticket, status, version)
        ring(self.folder)


def kept_board(lane, name: str) -> PostedBoard | None:
    """The board `name` this process writes, a block of its lane (None where there is no room)."""
    block = lane.kept(name, BOARD_LAYOUT)
    return None if block is None else PostedBoard(block[0], UpdateBoard(block[1]["slots"]), lane.area[0])


def read_board(lane, ref) -> UpdateBoard:
    """Another process's board, mapped read-only through `lane`."""
    return UpdateBoard(lane.read(ref)["slots"])


class Doorbell:
    """A worker's bell: a datagram socket in the area; anyone may ring it, and a ring queued
    while the worker computes is drained before it next looks at a board."""

    def __init__(self, folder: str):
        self.path = os.path.join(folder, f"{BELL_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}")
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            self._socket.bind(self.path)
        except OSError:
            self._socket.close()
            raise
        self._socket.setblocking(False)

    @classmethod
    def bound(cls, folder: str | None) -> "Doorbell | None":
        """The bell in `folder`, or None where none can be bound there (no area, a path too long
        for a socket): that worker then looks at the boards every `POLL_WITHOUT_BELL_S`."""
        if folder is None:
            return None
        try:
            return cls(folder)
        except OSError:
            return None

    def drain(self) -> None:
        while True:
            try:
                self._socket.recv(16)
            except (BlockingIOError, InterruptedError):
                return

    def wait(self, timeout_s: float) -> None:
        select.select([self._socket], [], [], timeout_s)


_ringer = None


def ring(folder: str) -> None:
    """Ring every bell in `folder` (a bell whose worker is gone is removed)."""
    global _ringer
    if _ringer is None:
        _ringer = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        _ringer.setblocking(False)
    try:
        entries = [entry.path for entry in os.scandir(folder) if entry.name.startswith(BELL_PREFIX)]
    except OSError:
        return
    for path in entries:
        try:
            _ringer.sendto(b"!", path)
        except ConnectionRefusedError:
            try:
                os.unlink(path)
            except OSError:
                pass
        except OSError:  # a full queue: that worker drains before it looks anyway
            pass


def wait_for_update(boards: list[UpdateBoard], given_up: UpdateBoard, ticket: int, bell: Doorbell | None,
                    timeout_s: float) -> list[int]:
    """The version each server's board gives for `ticket` once all say APPLIED; Unavailable where
    one says otherwise, the coordinator gave it up, or `timeout_s` passed first."""
    deadline = time.monotonic() + timeout_s
    while True:
        if bell is not None:
            bell.drain()  # before looking: a ring after the look is then still queued
        if given_up.find(ticket) is not None:
            raise Unavailable("the step before this one was dropped", "step_id")
        outcomes = [board.find(ticket) for board in boards]
        if any(outcome is not None and outcome.status != APPLIED for outcome in outcomes):
            raise Unavailable("the update before this step was not applied", "step_id")
        if all(outcome is not None for outcome in outcomes):
            return [outcome.version for outcome in outcomes]
        left = deadline - time.monotonic()
        if left <= 0:
            raise Unavailable(f"the update before this step did not land within {timeout_s:g} s",
                              "parameter_server")
        if bell is None:
            time.sleep(min(left, POLL_WITHOUT_BELL_S))
        else:
            bell.wait(min(left, POLL_S))
