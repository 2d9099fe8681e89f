"""What a job leaves behind in its output folder: `metrics.jsonl` (one JSON object per epoch) and
`metrics.png` (loss, the gradient noise scale and accuracy per epoch, drawn with matplotlib's Agg
backend: no display). `EpochSignals` condenses the steps' gradient signals and stragglers into an
epoch's row and its one-line summary."""

from __future__ import annotations

import collections
import json
import math
from pathlib import Path

import numpy as np

__all__ = ["MetricsLog", "plot_metrics", "EpochSignals", "SIGNAL_FIELDS"]

# The fields of a row that observe the run rather than the training: timings differ between any two
# runs, and after `--resume` an interrupted epoch's signals cover only the steps run since (the
# service's noise-scale smoothing restarts too). The other fields are the same for a resumed run.
SIGNAL_FIELDS = ("noise_scale", "shard_cosine_mean", "update_ratio_median", "compute_spread_median",
                 "compute_spread_max", "slowest_worker_steps")


class EpochSignals:
    """The gradient signals and straggler attribution of one epoch's steps (SDK StepResults)."""

    def __init__(self):
        self.noise_scale = math.nan  # already smoothed over steps by the service: the last one
        self.cosines: list[float] = []
        self.ratios: list[float] = []
        self.spreads: list[float] = []
        self.slowest = collections.Counter()  # pool position -> steps it was slowest in

    def add(self, result) -> None:
        if math.isfinite(result.noise_scale):
            self.noise_scale = result.noise_scale
        self.cosines.extend(c for c in result.shard_cosines if math.isfinite(c))
        self.ratios.extend(r for r in result.update_ratios.values() if math.isfinite(r))
        if math.isfinite(result.compute_spread) and result.compute_spread > 0:
            self.spreads.append(result.compute_spread)
        if result.slowest_worker >= 0:
            self.slowest[result.slowest_worker] += 1

    def row(self) -> dict:
        """metrics.jsonl fields; a signal not measured this epoch is left out (JSON has no NaN)."""
        row = {}
        if math.isfinite(self.noise_scale):
            row["noise_scale"] = self.noise_scale
        if self.cosines:
            row["shard_cosine_mean"] = float(np.mean(self.cosines))
        if self.ratios:
            row["update_ratio_median"] = float(np.median(self.ratios))
        if self.spreads:
            row["compute_spread_median"] = float(np.median(self.spreads))
            row["compute_spread_max"] = float(max(self.spreads))
        if self.slowest:
            row["slowest_worker_steps"] = {str(position): steps for position, steps in sorted(self.slowest.items())}
        return row

    def summary(self) -> str:
        """`noise_scale=.. cosine=.. update_ratio=.. spread=median/max slowest=worker P (k/n steps)`."""
        row = self.row()
        shown = [f"noise_scale={row['noise_scale']:.1f}" if "noise_scale" in row else "noise_scale=n/a"]
        if "shard_cosine_mean" in row:
            shown.append(f"cosine={row['shard_cosine_mean']:.3f}")
        if "update_ratio_median" in row:
            shown.append(f"update_ratio={row['update_ratio_median']:.2e}")
        if "compute_spread_median" in row:
            shown.append(f"spread={row['compute_spread_median']:.2f}/{row['compute_spread_max']:.2f}")
        if self.slowest:
            position, steps = self.slowest.most_common(1)[0]
            shown.append(f"slowest=worker {position} ({steps}/{sum(self.slowest.values())} steps)")
        return " ".join(shown)


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
    loss_axis.legend(loc="upper left")
    loss_axis.grid(alpha=0.3)
    noise = [(row["epoch"] + 1, row["noise_scale"]) for row in rows if "noise_scale" in row]
    if noise:  # beside the loss, on its own scale: it grows as the loss falls
        noise_axis = loss_axis.twinx()
        noise_axis.plot(*zip(*noise), marker="s", linestyle="--", color="tab:purple", label="noise scale")
        noise_axis.set_ylabel("gradient noise scale B_simple (samples)")
        noise_axis.legend(loc="upper right")
        loss_axis.set_title("loss and gradient noise scale")
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
