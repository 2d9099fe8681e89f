"""`gradserve bench engine` prints one JSON line per (model, threads) plus the modes line."""

import json

import pytest

from gradserve_services.cli import main

FIELDS = {
    "model", "batch", "threads", "dtype", "gradserve_ms", "torch_ms", "ratio_vs_torch",
    "achieved_gflops", "gemm_ceiling_gflops", "fraction_of_ceiling",
}


def test_quick_bench_run_prints_the_documented_lines(capsys):
    code = main(["bench", "engine", "--json", "--models", "20-16-4:8,12-6-3:4", "--threads", "1,2",
                 "--repeats", "1", "--modes-model", "5-4-3", "--modes-batch", "6"])
    assert code == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    steps, modes = lines[:-1], lines[-1]
    assert [(s["model"], s["batch"], s["threads"]) for s in steps] == [
        ("20-16-4", 8, 1), ("20-16-4", 8, 2), ("12-6-3", 4, 1), ("12-6-3", 4, 2)
    ]
    for step in steps:
        assert set(step) == FIELDS
        assert step["gradserve_ms"] > 0 and step["torch_ms"] > 0
        # Every figure is printed to 5 significant digits (relative error <= 5e-5 each), so a
        # quotient of two printed figures is within about 1.5e-4 of the printed quotient.
        assert step["ratio_vs_torch"] == pytest.approx(step["gradserve_ms"] / step["torch_ms"], rel=2e-4)
        assert step["fraction_of_ceiling"] == pytest.approx(
            step["achieved_gflops"] / step["gemm_ceiling_gflops"], rel=2e-4)
    assert modes["suite"] == "modes"
    assert modes["n_params"] == 5 * 4 + 4 + 4 * 3 + 3
    assert modes["max_abs_diff"] < 1e-5  # forward mode rebuilds the same gradient
    assert modes["forward_ms"] > 0 and modes["reverse_ms"] > 0
