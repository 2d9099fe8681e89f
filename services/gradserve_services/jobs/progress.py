"""The per-epoch progress bar: steps done, running loss and samples/s, on stderr.

Silent when stderr is not a terminal (CI logs, pipes, tests): stdout carries only the final JSON
line, and a log file full of carriage returns helps nobody.
"""

from __future__ import annotations

import os
import sys
import time

__all__ = ["EpochProgress"]


class EpochProgress:
    """One bar per epoch; `advance` after each step, `close` at the end of the epoch."""

    def __init__(self, epoch: int, epochs: int, total_steps: int, *, done_steps: int = 0, stream=None,
                 enabled: bool | None = None):
        stream = sys.stderr if stream is None else stream
        if enabled is None:
            enabled = bool(getattr(stream, "isatty", lambda: False)())
        self.started = time.perf_counter()
        self.samples = 0
        self.bar = None
        self.postfix = ""
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=done_steps, desc=f"epoch {epoch + 1}/{epochs}",
                            unit="step", file=stream, leave=True, **_screen(stream))

    def advance(self, samples: int, loss: float) -> None:
        self.samples += samples
        if self.bar is not None:
            rate = self.samples / max(time.perf_counter() - self.started, 1e-9)
            self.postfix = f"loss={loss:.4f} samples/s={rate:,.0f}"
            self.bar.set_postfix_str(self.postfix, refresh=False)
            self.bar.update(1)

    def close(self, summary: str | None = None) -> None:
        if self.bar is not None:
            if summary:
                self.bar.set_postfix_str(f"{self.postfix} {summary}".strip(), refresh=False)
            self.bar.close()


def _screen(stream) -> dict:
    """The terminal's size for tqdm. Pseudo-terminals that report 0x0 (some CI runners, `script`)
    get 100x24: with 0 rows tqdm hides the bar as if it were scrolled off the screen."""
    try:
        size = os.get_terminal_size(stream.fileno())
    except (AttributeError, OSError, ValueError):
        size = os.terminal_size((0, 0))
    return {"ncols": size.columns if size.columns > 0 else 100, "nrows": size.lines if size.lines > 0 else 24}
