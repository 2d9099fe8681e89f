"""Where an executor's shared-memory area is made: GRADSERVE_SHARED_ROOT (a tmpfs an operator
mounted with huge pages) before /dev/shm, and what `huge_pages` reads of a folder's mount."""

import os

from gradserve_services.cluster import shared
from gradserve_services.cluster.shared import ROOT_ENV, SharedArea, huge_pages


def test_the_configured_root_is_used_first(tmp_path, monkeypatch):
    monkeypatch.setenv(ROOT_ENV, str(tmp_path))
    area = SharedArea.create()
    try:
        assert os.path.dirname(area.path) == str(tmp_path)
        assert os.listdir(tmp_path) == [os.path.basename(area.path)]
    finally:
        area.remove()
    assert os.listdir(tmp_path) == []


def test_a_missing_configured_root_falls_back_to_dev_shm(tmp_path, monkeypatch):
    monkeypatch.setenv(ROOT_ENV, str(tmp_path / "not-mounted"))
    area = SharedArea.create()
    try:
        assert os.path.dirname(area.path) == "/dev/shm"
    finally:
        area.remove()


def test_huge_pages_reads_the_option_of_the_longest_mount_holding_the_path(tmp_path, monkeypatch):
    mounts = tmp_path / "mounts"
    mounts.write_text("/dev/vda / ext4 rw,relatime 0 0\n"
                      "tmpfs /dev/shm tmpfs rw,relatime,size=1024k 0 0\n"
                      "tmpfs /mnt/huge tmpfs rw,size=4194304k,huge=within_size 0 0\n"
                      "tmpfs /mnt/hugeish tmpfs rw,size=4k 0 0\n")
    real_open = open
    monkeypatch.setattr(shared, "open", lambda path, *a, **k: real_open(mounts if path == "/proc/mounts" else path,
                                                                         *a, **k), raising=False)
    assert huge_pages("/mnt/huge/gradserve-1-ab") == "within_size"
    assert huge_pages("/mnt/hugeish/x") == "never"  # a mount whose name extends another's is its own
    assert huge_pages("/dev/shm/gradserve-1-ab") == "never"
    assert huge_pages("/work/somewhere") == "never"  # not a tmpfs

