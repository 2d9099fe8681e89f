"""`gradserve bench sparse` runs end to end (PyTorch peer in its own process, gradserve on an embedded
Ray runtime) and prints one line per configuration with every field; a short run: the figures
themselves are the benchmark's business, their consistency is ours."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gradserve_services.bench.sparse import dense_bytes_per_step, min_bytes_per_step

FIELDS = ("suite", "config", "ps_shards", "samples_per_s", "torch_samples_per_s", "ratio_vs_torch",
          "wire_bytes_per_step", "min_bytes_per_step", "bytes_over_min", "dense_bytes_per_step",
          "dense_over_sparse", "server_rss_bytes")


def test_minimum_bytes_count_the_steps_distinct_rows_pulled_and_each_workers_pushed():
    ids = np.array([[0, 1], [0, 2], [0, 1], [3, 1]])
    # pulled once: field 0 {0, 3}, field 1 {1, 2}; pushed: worker 0 (rows 0-1) field 0 {0},
    # field 1 {1, 2}; worker 1 (rows 2-3) field 0 {0, 3}, field 1 {1}
    assert min_bytes_per_step(ids, 2, dim=8, itemsize=4) == (4 + 6) * 8 * 4
    assert min_bytes_per_step(ids, 1, dim=8, itemsize=4) == 2 * (2 + 2) * 8 * 4
    assert dense_bytes_per_step(fields=2, vocab=10, dim=8, itemsize=4, workers=2) == 2 * 2 * 2 * 10 * 8 * 4


@pytest.mark.integration
def test_sparse_suite_prints_every_field_for_each_configuration():
    done = subprocess.run([str(Path(sys.executable).parent / "gradserve"), "bench", "sparse", "--json",
                           "--steps", "2", "--warmup", "1", "--batch", "512", "--fields", "4", "--vocab", "5000",
                           "--dim", "8"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert [(line["config"], line["ps_shards"]) for line in lines] == [
        ("sparse_tables", 1), ("sparse_tables", 2), ("dense_tables", 1), ("dense_tables", 2)]
    for line in lines:
        assert set(FIELDS) <= set(line) and line["suite"] == "sparse" and line["batch"] == 512
        assert line["dense_bytes_per_step"] == 2 * 2 * 4 * 5000 * 8 * 4
    for line in lines[2:]:  # the tables whole on the servers: every worker moves them whole
        assert "error" not in line, line["error"]
        assert line["samples_per_s"] > 0 and line["server_rss_bytes"] > 0
        assert line["wire_bytes_per_step"] == line["dense_bytes_per_step"] and line["dense_over_sparse"] == 1.0
    for line in lines[:2]:
        assert "error" not in line, line["error"]
        assert line["samples_per_s"] > 0 and line["torch_samples_per_s"] > 0 and line["server_rss_bytes"] > 0
        assert line["ratio_vs_torch"] == pytest.approx(line["samples_per_s"] / line["torch_samples_per_s"], rel=1e-3)
        # no exchange of rows moves fewer bytes than the step's distinct rows pulled and each worker's pushed
        assert line["wire_bytes_per_step"] >= line["min_bytes_per_step"] > 0
        assert line["bytes_over_min"] == pytest.approx(line["wire_bytes_per_step"] / line["min_bytes_per_step"],
                                                       rel=1e-3)
        assert line["dense_over_sparse"] == pytest.approx(line["dense_bytes_per_step"] / line["wire_bytes_per_step"],
                                                          rel=1e-3)
