"""The metrics file, the plot and the progress bar."""

from __future__ import annotations

import io
import json

from gradserve_services.jobs.progress import EpochProgress
from gradserve import StepResult
from gradserve_services.jobs.report import EpochSignals, MetricsLog, plot_metrics


def rows(epochs: int, accuracy: bool = True):
    for epoch in range(epochs):
        row = {"epoch": epoch, "train_loss": 1.0 / (epoch + 1), "test_loss": 1.2 / (epoch + 1)}
        if accuracy:
            row["test_accuracy"] = 0.5 + epoch * 0.1
        yield row


def test_metrics_log_appends_lines_and_drops_epochs_a_resume_recomputes(tmp_path):
    path = tmp_path / "out" / "metrics.jsonl"
    log = MetricsLog(path)
    for row in rows(4):
        log.append(row)
    assert [json.loads(line)["epoch"] for line in path.read_text().splitlines()] == [0, 1, 2, 3]
    with open(path, "a") as handle:
        handle.write('{"epoch": 4, "train_lo')  # a line cut short by a killed job
    resumed = MetricsLog(path, keep_epochs_below=2)
    assert [row["epoch"] for row in resumed.read()] == [0, 1]
    assert MetricsLog(path).read() == []  # a fresh run starts an empty file


def test_plot_is_a_png_with_and_without_accuracy(tmp_path):
    for accuracy in (True, False):
        path = plot_metrics(list(rows(3, accuracy)), tmp_path / f"plot_{accuracy}.png", title="t")
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def step(noise_scale, spread, slowest, cosines=(0.5, 0.7), ratios=None):
    return StepResult(step_id=1, loss=1.0, version=1, duplicate=False, applied=True, samples=8,
                      grad_norm=1.0, lr=0.1, noise_scale=noise_scale, shard_cosines=cosines,
                      update_ratios=ratios or {"w": 1e-3, "b": float("nan")},
                      compute_spread=spread, slowest_worker=slowest)


def test_epoch_signals_condense_the_steps_into_a_row_and_a_line():
    signals = EpochSignals()
    for result in (step(10.0, 1.2, 1), step(float("nan"), 3.0, 1), step(12.0, 1.0, 0, ratios={"w": 3e-3})):
        signals.add(result)
    row = signals.row()
    assert row["noise_scale"] == 12.0  # the last estimate: the service smooths over steps already
    assert abs(row["shard_cosine_mean"] - 0.6) < 1e-12
    assert row["update_ratio_median"] == 1e-3  # NaN ratios left out
    assert (row["compute_spread_median"], row["compute_spread_max"]) == (1.2, 3.0)
    assert row["slowest_worker_steps"] == {"0": 1, "1": 2}
    json.dumps(row, allow_nan=False)
    assert signals.summary() == ("noise_scale=12.0 cosine=0.600 update_ratio=1.00e-03 spread=1.20/3.00 "
                                 "slowest=worker 1 (2/3 steps)")
    assert EpochSignals().row() == {} and EpochSignals().summary() == "noise_scale=n/a"


def test_plot_draws_the_noise_scale_beside_the_loss(tmp_path):
    import matplotlib.image

    with_noise = [{**row, "noise_scale": 20.0 * (row["epoch"] + 1)} for row in rows(3)]
    image = matplotlib.image.imread(plot_metrics(with_noise, tmp_path / "noise.png"))
    without = matplotlib.image.imread(plot_metrics(list(rows(3)), tmp_path / "plain.png"))
    purple = (0x94 / 255, 0x67 / 255, 0xBD / 255)  # tab:purple, the noise-scale line

    def purple_pixels(pixels):
        return int((abs(pixels[..., :3] - purple).max(axis=-1) < 0.02).sum())

    assert purple_pixels(image) > 100 and purple_pixels(without) == 0


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_is_silent_off_a_terminal_and_shows_loss_and_rate_on_one():
    quiet = io.StringIO()
    bar = EpochProgress(0, 2, total_steps=3, stream=quiet)
    for _ in range(3):
        bar.advance(64, 0.5)
    bar.close()
    assert quiet.getvalue() == ""
    terminal = FakeTerminal()
    bar = EpochProgress(1, 2, total_steps=3, stream=terminal)
    for _ in range(3):
        bar.advance(64, 0.25)
    bar.close("test_acc=0.9")
    shown = terminal.getvalue()
    assert "epoch 2/2" in shown and "3/3" in shown and "test_acc=0.9" in shown
    assert "loss=0.2500" in shown and "samples/s=" in shown
