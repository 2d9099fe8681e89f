"""The embedded service's temporary folder: owned while its job lives, removed by the next job once
its owner is gone (SIGKILL included), never while it lives. Real processes hold the folders."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from gradserve_services.jobs.service import SERVICE_FOLDER_MARKER, SERVICE_FOLDER_PREFIX, own_service_folder

WAIT_S = 60
# A job's stand-in: makes its service folder in ROOT, prints its path, then waits to be killed.
HOLDER = """
import sys, time
from gradserve_services.jobs.service import own_service_folder
folder = own_service_folder(sys.argv[1])
print(folder.path, flush=True)
time.sleep(600)
"""


def start_holder(root: Path) -> tuple[subprocess.Popen, Path]:
    process = subprocess.Popen([sys.executable, "-c", HOLDER, str(root)], stdout=subprocess.PIPE, text=True)
    watchdog = threading.Timer(WAIT_S, process.kill)  # bounds the read below
    watchdog.start()
    try:
        line = process.stdout.readline()
    finally:
        watchdog.cancel()
    assert line, "the holder made no folder"
    return process, Path(line.strip())


def kill(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=WAIT_S)


def test_a_killed_owners_folder_goes_a_live_owners_stays(tmp_path):
    killed, killed_folder = start_holder(tmp_path)
    live, live_folder = start_holder(tmp_path)
    try:
        (killed_folder / "session").mkdir()  # checkpoints it left behind
        (killed_folder / "session" / "ckpt.npz").write_bytes(b"x" * 1024)
        kill(killed)
        assert killed_folder.exists()  # nothing removes it by itself

        mine = own_service_folder(str(tmp_path))
        try:
            assert not killed_folder.exists()
            assert live_folder.exists() and (live_folder / SERVICE_FOLDER_MARKER).exists()
            assert Path(mine.path).parent == tmp_path and Path(mine.path).name.startswith(SERVICE_FOLDER_PREFIX)
            assert oct(os.stat(mine.path).st_mode & 0o777) == oct(0o700)
        finally:
            mine.remove()
        assert not Path(mine.path).exists()

        kill(live)
        own_service_folder(str(tmp_path)).remove()  # the next job, once that owner is gone too
        assert not live_folder.exists()
    finally:
        kill(killed)
        kill(live)


def test_folders_it_did_not_make_are_left_alone(tmp_path):
    unmarked = tmp_path / f"{SERVICE_FOLDER_PREFIX}unmarked"  # no marker: being made, or someone else's
    unmarked.mkdir()
    other = tmp_path / "gradserve-other"  # another prefix, marker and all
    other.mkdir()
    (other / SERVICE_FOLDER_MARKER).write_text("")
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / SERVICE_FOLDER_MARKER).write_text("")
    (tmp_path / f"{SERVICE_FOLDER_PREFIX}link").symlink_to(target)  # a link is never followed
    own_service_folder(str(tmp_path)).remove()
    assert unmarked.exists() and other.exists() and (target / SERVICE_FOLDER_MARKER).exists()
    assert (tmp_path / f"{SERVICE_FOLDER_PREFIX}link").is_symlink()
