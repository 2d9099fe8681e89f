"""One trainer's table on its parameter-server shards, as the coordinator addresses it: what the
workers read (`published`), the update (`apply`), the cross-shard agreement before an update (the
two phases of clipping, the finiteness check), the table's lifecycle and state.

Each shard holds a disjoint slice of the dense parameters (`partition`) and, for a model with
tables, its rows of every table (`lane`, table_lane.py: row r on shard r mod S). With one shard it decides alone
while applying; with several, the global gradient norm (clipping) and the verdict "this update
stays finite" need every shard's answer before any shard changes, so they are asked first.
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np

from .backend import Backend
from .handover import received
from .recovery import PROBE_S, ServersSlow, get_from_servers, load_replacing_lost, server_lost, servers_alive

__all__ = ["ParameterShards", "PUSH_WAIT_S"]

# How long a server waits for the pushed gradients of one update (re-runs of lost shards included)
# before it gives the update up.
PUSH_WAIT_S = 600.0


class Update(list):
    """`update`'s `(published, report)` futures per shard, with the checks (and squared norms)
    they wait for: read with them where the update fails (each update in flight keeps its own)."""

    def __init__(self, outputs: list, agreement: list = ()):
        super().__init__(outputs)
        self.agreement = list(agreement)


def _agreement(applying: list) -> list:
    return applying.agreement if isinstance(applying, Update) else []


class ParameterShards:
    def __init__(self, backend: Backend, table: str, partition: list[list[str]], in_shared_memory: bool,
                 step_window: int,
                 lane=None, timeout_s: float | None = None):
        self._backend = backend
        self.timeout_s = timeout_s  # how long one wait for the servers may take (recovery.py)
        self._stale = False  # a call outlived its bound: what the servers publish is read afresh
        self.lane = lane  # the model's tables, or None
        self.table = table
        self.partition = partition
        # the servers keep the parameters in shared memory and publish blocks (sync mode)
        self._in_shared_memory = in_shared_memory
        self._step_window = step_window
        # Futures of each shard's `(version, params)` (or `(version, BlockRef)`): the workers'
        # input, and the version they hold (updates applied so far).
        self.published: list = []
        self.version = 0
        # Each shard's `(update board, parameter block)` as the last update reported them
        # (update_board.py), or None: a step begun ahead then waits through Ray.
        self.boards: list | None = None

    @property
    def servers(self) -> list:
        return self._backend.servers(len(self.partition))

    def get(self, futures):
        try:
            return get_from_servers(self._backend, self.servers, futures, self.timeout_s)
        except ServersSlow:
            # the call may still finish (an update applied late): the next step starts from what
            # the servers then hold
            self._stale = True
            raise

    def refresh(self) -> None:
        """Before a step: where a call to the servers outlived its bound, read what they publish
        now (its version included), as `republish`."""
        if self._stale:
            self.republish()
            self._stale = False

    def check_inputs(self, error) -> None:
        """ParameterServerLost if a server is gone (a shard that read from it cannot be re-run)."""
        if not servers_alive(self._backend, self.servers, PROBE_S):
            raise server_lost(error)

    # ----- lifecycle -----------------------------------------------------------------------------

    def create(self, params: Mapping[str, np.ndarray], optimizer: dict, rule: dict) -> None:
        lane = self.lane
        self.boards = None  # a new parameter block: known again from the next update's reports
        self.published = [
            self._backend.submit(server, "create_table", self.table,
                                 self._sent(server, {n: params[n] for n in names}),
                                 optimizer, rule, self._in_shared_memory, self._step_window,
                                 *((lane.layout(k), lane.initial_rows(k)) if lane else ()))[0]
            for k, (server, names) in enumerate(zip(self.servers, self.partition))]
        self.get(self.published)

    def load(self, arrays: Mapping[str, np.ndarray], table_meta: dict) -> None:
        """Every shard's slice of a `state()`, on new servers where they were lost."""
        published = []
        for position, names in enumerate(self.partition):
            # table rows go to every shard, each keeps those placement gives it
            shard_arrays = {key: value for key, value in arrays.items()
                            if key.split("/")[1] in names or key.startswith("rows/")}
            layout = (self.lane.layout(position),) if self.lane else ()
            published.append(load_replacing_lost(self._backend, position, lambda server: self._backend.submit(
                server, "load_table", self.table, self._sent(server, shard_arrays, [f"param/{n}" for n in names], "param/"),
                table_meta, names, self._in_shared_memory, self._step_window, *layout)[0]))
        self.published, self.boards = published, None

    def _sent(self, server, arrays: Mapping, names=None, prefix: str = ""):
        """What `server` is sent of `arrays`: where the ones named `names` (default all) landed in a
        received block this server maps (handover.py), the block's `Received` (a few bytes; given
        once: a retry on a replacement server is sent the arrays); else the arrays."""
        landed = received(arrays, names, prefix) if self._backend.shares_memory(server) else None
        return arrays if landed is None else landed

    def drop(self) -> None:
        for server in self.servers:
            self._backend.submit(server, "drop_table", self.table)

    def copies(self) -> list[tuple[int, dict]]:
        """Each shard's `(version, params)`, never the live shared blocks (they change in place)."""
        if not self._in_shared_memory:
            return self.get(self.published)
        return self.get([self._backend.submit(server, "snapshot", self.table)[0] for server in self.servers])

    def states(self) -> list[tuple[dict, dict]]:
        return self.get([self._backend.submit(server, "state", self.table)[0] for server in self.servers])

    def republish(self) -> int:
        """The servers' current parameters become the workers' input, at the newest version (after
        a failed on-arrival step, some shards' applies may have failed, others not)."""
        published = [self._backend.submit(server, "published", self.table)[0] for server in self.servers]
        versions = [version for version, _ in self.get(published)]
        self.published, self.boards = published, None
        self.version = max(versions)
        return self.version

    # ----- updates -------------------------------------------------------------------------------

    def apply(self, key: str, counts, computed_on: int, norm: float | None, grads_per_shard: list) -> list:
        """Submit `sum(grads) / counts` to every shard; returns each shard's `(published, report)`
        futures. `grads_per_shard[k]` holds the gradient parts (futures) for shard k."""
        return [self._backend.submit(server, "apply", self.table, key, counts, computed_on, norm, *grads,
                                     num_returns=2)
                for server, grads in zip(self.servers, grads_per_shard)]

    def update(self, key: str, counts, rows: int, computed_on: int, clip_norm: float | None,
               grads_per_shard: list, after: list | None = None, ticket: int = 0) -> list:
        """Submit a whole update without waiting for any of it; returns each shard's
        `(published, report)` futures. One shard applies and decides alone. Several first each
        check their part (with clipping, after every shard's squared norm), and every apply takes
        all the checks as arguments: Ray runs no apply unless every check passed, so a refusal
        anywhere changes no shard, with no round trip through this process. `after[k]`: futures
        shard k's first call waits for (the pushes it must hold). A sync update is applied when
        the workers are done and wait, so it may use their cores (`apply_after`). A `ticket` has
        each server post the outcome on its update board (update_board.py)."""
        after = after or [[] for _ in self.partition]
        servers, submit = self.servers, self._backend.submit
        if len(self.partition) == 1 and not after[0]:  # it decides alone
            return Update([submit(servers[0], "apply_after", self.table, key, counts, computed_on, ticket, 0, 0,
                           *grads_per_shard[0], num_returns=2)])
        squares = [] if clip_norm is None else [
            submit(server, "squared_norm_after", self.table, 1.0 / rows, len(waits), *waits, *grads)[0]
            for server, waits, grads in zip(servers, after, grads_per_shard)]
        checks = [submit(server, "check_after", self.table, rows, computed_on, len(squares), len(waits),
                         *waits, *squares, *grads)[0]
                  for server, waits, grads in zip(servers, after, grads_per_shard)]
        return Update([submit(server, "apply_after", self.table, key, counts, computed_on, ticket, len(squares),
                              len(checks), *checks, *squares, *grads, num_returns=2)
                       for server, grads in zip(servers, grads_per_shard)], squares + checks)

    def discard_update(self, applying: list) -> None:
        """Read an update's failed futures (a lost gradient, a refusal) so they count as handled."""
        self.discard([future for output in applying for future in output] + _agreement(applying))

    def expect_pushes(self, pushes: str, key: str, batch_shards: int, counts, alone: bool) -> list:
        """Tell every shard the attempt `pushes` at update `key` is pushed by `batch_shards`
        shards; returns each shard's `(published, report)` futures of the wait for it (`alone`:
        the one server applies it as soon as it is complete)."""
        waiting = []
        for server in self.servers:
            self._backend.submit(server, "expect", self.table, pushes, key, batch_shards, counts, self.version,
                                 None, alone)
            waiting.append(self._backend.submit_waiting(server, "outcome", self.table, pushes, PUSH_WAIT_S,
                                                        num_returns=2))
        return waiting

    def abandon_pushes(self, pushes: str, waiting: list) -> None:
        for server in self.servers:  # on the waiting threads: the server's own sequence may
            # hold a check that waits for these very pushes
            self._backend.submit_waiting(server, "abandon", self.table, pushes)
        self.discard([future for output in waiting for future in output])

    def settle(self, applying: list) -> list[dict]:
        """The reports of `apply`'s futures; the parameters they published become the workers'
        input, or, where an apply was refused, the last published ones stay."""
        try:
            reports = self.get([output[1] for output in applying])
        except BaseException:
            self.discard([output[0] for output in applying] + _agreement(applying))
            raise
        self.published = [output[0] for output in applying]  # (the applies ran: every check passed)
        # where every shard posts on a board: what a step begun after the next update is given
        self.boards = [(report["board"], report["block"]) for report in reports] \
            if all("board" in report for report in reports) else None
        return reports

    def agree(self, grads_per_shard: list, count: int, computed_on: int, clip_norm: float | None) -> float | None:
        """What every shard must agree on before any applies: the global norm for clipping (phase
        one) and the verdict that the update stays finite everywhere. Returns the norm for
        `apply`, None where each shard measures it while updating."""
        norm = self.clipping_norm(grads_per_shard, count, clip_norm)
        self.check(grads_per_shard, count, computed_on, norm)
        return norm

    def clipping_norm(self, grads_per_shard: list, count: int, clip_norm: float | None) -> float | None:
        """Phase one of clipping over several shards: each gives its squared norm, the global norm
        is their root sum. None (each shard measures while updating) without clipping or with one
        shard."""
        if clip_norm is None or len(self.partition) == 1:
            return None
        squares = self.get([self._backend.submit(server, "squared_norm", self.table, 1.0 / count, *grads)[0]
                            for server, grads in zip(self.servers, grads_per_shard)])
        return math.sqrt(sum(squares))

    def check(self, grads_per_shard: list, count: int, computed_on: int, norm: float | None) -> None:
        """With several shards, each is asked whether its part of the update stays finite
        (FailedPrecondition if not) before any applies, so a refused update changes no shard. One
        shard decides while applying."""
        if len(self.partition) > 1:
            self.get([self._backend.submit(server, "check", self.table, count, computed_on, norm, *grads)[0]
                      for server, grads in zip(self.servers, grads_per_shard)])

    def discard(self, futures) -> None:
        """Read failed futures so their errors count as handled (each waited for at most the
        bound: one still running is left to finish)."""
        for future in futures:
            try:
                self._backend.get(future, timeout_s=self.timeout_s)
            except Exception:  # noqa: BLE001 - expected: the call lost an argument
                pass
