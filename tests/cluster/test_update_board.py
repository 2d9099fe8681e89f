"""The update board and the workers' bells (update_board.py), in process: outcomes found by
ticket, never half a record, a ring that wakes a waiter at once, and every way a wait ends."""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time

import numpy as np
import pytest

from gradserve_services.cluster.shared import SharedArea, SharedMemoryLane
from gradserve_services.cluster.update_board import (APPLIED, BOARD_LAYOUT, FAILED, GIVEN_UP, SLOTS, Doorbell,
                                                     UpdateBoard, kept_board, read_board, ring, wait_for_update)
from gradserve_services.errors import Unavailable

WAIT_S = 30.0  # what a wait that must not run out is given (a busy machine)


@pytest.fixture()
def area():
    root = tempfile.mkdtemp(prefix="gs-", dir="/tmp")  # short: a socket's path has 107 bytes at most
    made = SharedArea(root)
    yield made
    made.remove()
    shutil.rmtree(root, ignore_errors=True)


def _boards(area, count: int = 1):
    """`count` server boards and a given-up board, each written through one lane and read
    through another (as a server, the coordinator and a worker do)."""
    writer, reader = SharedMemoryLane((area.path, area.token)), SharedMemoryLane((area.path, area.token))
    written = [kept_board(writer, f"t-updates-{index}") for index in range(count + 1)]
    read = [read_board(reader, board.ref) for board in written]
    return written[:-1], written[-1], read[:-1], read[-1]


def test_an_outcome_is_found_by_its_ticket_by_another_mapping(area):
    (server,), _, (seen,), _ = _boards(area)
    assert seen.find(7) is None
    server.post(7, APPLIED, 3)
    server.post(8, FAILED, 3)
    assert (seen.find(7).status, seen.find(7).version) == (APPLIED, 3)
    assert seen.find(8).status == FAILED
    assert seen.find(9) is None


def test_the_ring_keeps_the_last_slots_outcomes(area):
    (server,), _, (seen,), _ = _boards(area)
    for ticket in range(1, SLOTS + 11):
        server.post(ticket, APPLIED, ticket)
    assert all(seen.find(ticket) is None for ticket in range(1, 11))
    assert [seen.find(ticket).version for ticket in (11, SLOTS + 10)] == [11, SLOTS + 10]


def test_a_record_being_written_is_not_taken():
    slots = np.zeros(BOARD_LAYOUT["slots"][1], np.int64)
    board = UpdateBoard(slots)
    board.post(5, APPLIED, 1)
    slots[1, 0] = 0  # as the writer leaves it between marking and filling
    assert board.find(5) is None


def test_a_wait_returns_each_shards_version_once_all_applied(area):
    servers, given_up, seen, seen_given_up = _boards(area, 2)
    servers[0].post(11, APPLIED, 4)
    servers[1].post(11, APPLIED, 4)
    assert wait_for_update(seen, seen_given_up, 11, None, WAIT_S) == [4, 4]


@pytest.mark.parametrize("outcome", ["failed", "given_up"])
def test_a_wait_for_an_update_that_will_not_land_raises(area, outcome):
    servers, given_up, seen, seen_given_up = _boards(area, 2)
    servers[0].post(12, APPLIED, 5)
    if outcome == "failed":
        servers[1].post(12, FAILED, 4)
    else:
        given_up.post(12, GIVEN_UP, 0)
    with pytest.raises(Unavailable) as raised:
        wait_for_update(seen, seen_given_up, 12, None, WAIT_S)
    assert raised.value.field == "step_id"


def test_a_wait_runs_out_at_its_bound(area):
    _, _, seen, seen_given_up = _boards(area)
    started = time.monotonic()
    with pytest.raises(Unavailable) as raised:
        wait_for_update(seen, seen_given_up, 13, None, 0.2)
    assert raised.value.field == "parameter_server"
    assert time.monotonic() - started >= 0.2


def test_a_ring_wakes_a_waiter_long_before_its_poll(area, monkeypatch):
    import gradserve_services.cluster.update_board as update_board

    monkeypatch.setattr(update_board, "POLL_S", WAIT_S)  # only a ring can end this wait early
    (server,), _, seen, seen_given_up = _boards(area)
    bell = Doorbell(area.path)
    answers = []
    waiter = threading.Thread(target=lambda: answers.append(
        (wait_for_update(seen, seen_given_up, 14, bell, 2 * WAIT_S), time.monotonic())))
    waiter.start()
    time.sleep(0.2)  # the waiter is in its wait
    posted = time.monotonic()
    server.post(14, APPLIED, 6)  # a post rings the area's bells
    waiter.join(2 * WAIT_S)
    assert answers and answers[0][0] == [6]
    assert answers[0][1] - posted < WAIT_S / 2


def test_ringing_removes_the_bell_of_a_process_gone(area):
    bell = Doorbell(area.path)
    gone = Doorbell(area.path)
    gone._socket.close()  # bound once, nobody reading it now
    ring(area.path)
    assert not os.path.exists(gone.path)
    assert os.path.exists(bell.path)


def test_no_bell_where_its_path_is_too_long_for_a_socket(tmp_path):
    deep = tmp_path / ("d" * 100)
    deep.mkdir()
    assert Doorbell.bound(str(deep)) is None
    assert Doorbell.bound(None) is None
