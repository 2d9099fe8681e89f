"""What a job leaves behind in its output folder: `metrics.jsonl` (one JSON object per epoch) and
`metrics.png` (loss and accuracy per epoch, drawn with matplotlib's Agg backend: no display)."""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["MetricsLog", "plot_metrics"]


class MetricsLog:
    """The metrics JSON-lines file. On resume, epochs the checkpoint does not cover are dropped so
    each epoch appears once, as the resumed run computes it."""

    def __init__(self, path: Path, *, keep_epochs_below: int = 0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = [row for row in self.read() if row.get("epoch", 0) < keep_epochs_below]
        self._rewrite(kept)

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        rows = []
        for line in self.path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut short by a killed job
        return rows

    def append(self, row: dict) -> None:
        with open(self.path, "a") as handle:
            handle.write(json.dumps(row, sort_keys=True) + "\n")
            handle.flush()

    def _rewrite(self, rows: list[dict]) -> None:
        temporary = self.path.with_name(self.path.name + ".tmp")
        temporary.write_text("".join(json.dumps(row, sort_keys=True) + "\n" for row in rows))
        temporary.replace(self.path)


def plot_metrics(rows: list[dict], path: Path, *, title: str = "") -> Path:
    """Loss (train and test) on the left, accuracy on the right when the task has one."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    has_accuracy = any("test_accuracy" in row for row in rows)
    figure, axes = pyplot.subplots(1, 2 if has_accuracy else 1, figsize=(10 if has_accuracy else 5.5, 4),
                                   squeeze=False)
    epochs = [row["epoch"] + 1 for row in rows]
    loss_axis = axes[0][0]
    loss_axis.plot(epochs, [row["train_loss"] for row in rows], marker="o", label="train")
    loss_axis.plot(epochs, [row["test_loss"] for row in rows], marker="o", label="test")
    loss_axis.set(xlabel="epoch", ylabel="loss", title="loss")
    loss_axis.legend()
    loss_axis.grid(alpha=0.3)
    if has_accuracy:
        accuracy_axis = axes[0][1]
        accuracy_axis.plot(epochs, [row.get("test_accuracy") for row in rows], marker="o", color="tab:green")
        accuracy_axis.set(xlabel="epoch", ylabel="accuracy", title="test accuracy")
        accuracy_axis.grid(alpha=0.3)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    pyplot.close(figure)
    return path
