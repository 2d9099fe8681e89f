"""The metrics file, the plot and the progress bar."""

from __future__ import annotations

import io
import json

from gradserve_services.jobs.progress import EpochProgress
from gradserve_services.jobs.report import MetricsLog, plot_metrics


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
