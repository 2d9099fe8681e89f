"""`gradserve bench links` runs end to end over shaped namespace links (a short run: the figures
are the benchmark's; the fields, the byte accounting and the clean-up are checked here). Skipped,
with the reason, where namespaces cannot be made."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gradserve_services.bench.links_site import SiteUnavailable, harness

pytestmark = [pytest.mark.integration, pytest.mark.slow]

FIELDS = {"suite", "config", "rate_mbit", "workers", "samples", "updates", "bytes_per_sample",
          "bytes_ratio_vs_sync", "link_bytes_per_sample", "link_bytes_ratio_vs_sync", "train_seconds",
          "target_loss", "seconds_to_target", "speedup_vs_sync", "eval_loss",
          "eval_loss_ratio_vs_sync", "test_accuracy", "test_accuracy_vs_sync_points"}


def test_links_suite_runs_every_kind_of_configuration():
    try:
        netns, _ = harness()
        netns.create().remove()  # can this machine make one?
    except (SiteUnavailable, netns.NamespacesUnavailable) as reason:
        pytest.skip(f"cannot make network namespaces here: {reason}")
    before = set(netns.namespace_names())
    done = subprocess.run(
        [str(Path(sys.executable).parent / "gradserve"), "bench", "links", "--json", "--steps", "10",
         "--configs", "sync,sync_powersgd_r4,local_h10", "--eval-every", "5", "--eval-rows", "256",
         "--rate-mbit", "400"], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert [line["config"] for line in lines] == ["sync", "sync_powersgd_r4", "local_h10"]
    sync, powersgd, local = lines
    for line in lines:
        assert set(line) == FIELDS and line["suite"] == "links" and line["samples"] == 2560
        assert line["link_bytes_per_sample"] > 0 and line["train_seconds"] > 0
    assert sync["bytes_ratio_vs_sync"] == 1.0 and sync["updates"] == 10
    # a round sends one delta where sync sends H gradients
    assert local["bytes_ratio_vs_sync"] == 10.0 and local["updates"] == 1
    # 784x512, 512x512 and 512x10 as rank-4 factors, 1,034 bias values as they are (float32)
    assert powersgd["bytes_ratio_vs_sync"] == round(669_706 / (4 * (1296 + 1024 + 522) + 1034), 2)
    assert set(netns.namespace_names()) <= before  # the run removed its namespaces
