"""A stop signal raises into the run's block and its clean-up runs; a way out that blocks is cut
short by the last resort after the grace period; the exit code is 128 + the signal's number."""

import signal
import subprocess
import sys
import time

import pytest

READY_BOUND_S = 60.0
EXIT_BOUND_S = 30.0

# argv: grace_s, a file the removal and the clean-up append to, "swallow" (the block ignores the
# exception and keeps waiting, as a step reading its calls' outcomes would) or "plain".
RUN = r"""
import sys, time
from gradserve_services.bench.stop_signals import stop_signals_raise

grace_s, record, mode = float(sys.argv[1]), sys.argv[2], sys.argv[3]

def note(line):
    with open(record, "a") as handle:
        handle.write(line + "\n")

with stop_signals_raise("test", grace_s) as stop:
    stop.last_resort(lambda: note("last resort"))
    try:
        # "ready" is printed inside the try: the signal is sent the moment it is read, and under
        # load it landed before the try was entered, escaping the swallowing (seen: clean-up ran).
        announced = False
        while True:
            try:
                if not announced:
                    announced = True
                    print("ready", flush=True)
                while True:
                    time.sleep(0.05)
            except BaseException:
                if mode != "swallow":
                    raise
    finally:
        note("clean-up")
"""


def stop(mode: str, signum: int, tmp_path, grace_s: float) -> tuple[int, list[str], float]:
    record = tmp_path / "record"
    run = subprocess.Popen([sys.executable, "-c", RUN, str(grace_s), str(record), mode],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert run.stdout.readline().strip() == "ready", run.stderr.read()
        started = time.monotonic()
        run.send_signal(signum)
        code = run.wait(timeout=EXIT_BOUND_S)
        took = time.monotonic() - started
    finally:
        if run.poll() is None:
            run.kill()
            run.wait(timeout=EXIT_BOUND_S)
        run.stdout.close()
        run.stderr.close()
    lines = record.read_text().splitlines() if record.exists() else []
    return code, lines, took


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_signal_runs_the_clean_up_and_exits_with_its_code(signum, tmp_path):
    code, lines, took = stop("plain", signum, tmp_path, grace_s=20.0)
    assert code == 128 + signum
    assert lines == ["clean-up"] and took < 10.0  # the way out, not the last resort


def test_a_blocked_way_out_ends_by_the_last_resort(tmp_path):
    code, lines, took = stop("swallow", signal.SIGTERM, tmp_path, grace_s=1.0)
    assert code == 128 + signal.SIGTERM
    assert lines == ["last resort"] and took >= 1.0
