"""ReadAhead: a request stream read ahead in a thread, its items and errors in their order."""

from __future__ import annotations

import threading
import time

import pytest

from gradserve_services.gateway.read_ahead import ReadAhead


def _wait_for(condition, within_s=30.0):
    deadline = time.monotonic() + within_s
    while not condition():
        assert time.monotonic() < deadline, "not within the bound"
        time.sleep(0.005)


def test_items_come_in_order_and_the_next_is_seen_once_it_arrived():
    release = threading.Event()

    def items():
        yield 1
        yield 2
        release.wait(30)
        yield 3

    stream = ReadAhead(items())
    seen = iter(stream)
    assert next(seen) == 1
    _wait_for(lambda: stream.arrived() == 2)
    assert next(seen) == 2
    assert stream.arrived() is None  # 3 is not there yet
    release.set()
    _wait_for(lambda: stream.arrived() == 3)
    assert list(seen) == [3]
    assert stream.arrived() is None


def test_an_error_of_the_stream_is_raised_after_the_items_before_it():
    def items():
        yield "a"
        raise ValueError("bad chunk")

    stream = ReadAhead(items())
    seen = iter(stream)
    assert next(seen) == "a"
    _wait_for(lambda: stream._held is not None or not stream._queue.empty())
    assert stream.arrived() is None  # an error is no item
    with pytest.raises(ValueError, match="bad chunk"):
        next(seen)


def test_close_ends_a_reader_whose_handler_stopped_taking_items():
    def items():
        for index in range(1000):
            yield index

    stream = ReadAhead(items())
    assert next(iter(stream)) == 0
    stream.close()
    stream._reader.join(timeout=30)
    assert not stream._reader.is_alive()
