"""Progress lines on rank 0: step, loss, accuracy (or the problem's own metric), steps/s, MB
sent, ETA."""

from __future__ import annotations

import math
import sys
import time

LABELS = {"accuracy": "acc", "perplexity": "ppl"}  # short names on the line


class Progress:
    """Prints a progress line at most every ``every_s`` seconds (rank 0, not quiet).

    The first line appears only after ``every_s`` seconds, so short runs stay silent. The
    latest evaluation's ``metric`` (the problem's headline: ``accuracy``, ``return``...) is
    shown once there is one. :attr:`due` is the ``perf_counter`` time from which the next line
    may be printed (infinite when disabled): the step loop compares its own clock reading with
    it and calls :meth:`update` only then, so the steps in between pay for one comparison.
    """

    def __init__(self, total_steps: int, every_s: float = 2.0, enabled: bool = True,
                 stream=None, metric: str = "accuracy"):
        self.total = total_steps
        self.every = every_s
        self.enabled = enabled
        self.stream = stream or sys.stdout
        self.start = time.perf_counter()
        self.last = self.start
        self.metric = metric
        self.label = LABELS.get(metric, metric)
        self.value: float | None = None
        self.due = self.start + every_s if enabled else math.inf

    def note_eval(self, metrics: dict) -> None:
        """Remember the latest evaluation for the next line."""
        self.value = metrics.get(self.metric, self.value)

    def update(self, step: int, loss: float, bytes_sent: int, now: float | None = None) -> None:
        """Print a line if the interval has passed since the last one.

        ``now`` is the caller's ``perf_counter`` reading, if it has one (read here otherwise).
        """
        if not self.enabled:
            return
        if now is None:
            now = time.perf_counter()
        if now - self.last < self.every:
            return
        self.last = now
        self.due = now + self.every
        done = step + 1
        rate = done / max(now - self.start, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else float("inf")
        acc = "" if self.value is None else (
            f" | {self.label} {self.value:.1f}" if self.metric == "perplexity"
            else f" | {self.label} {self.value:.4f}")
        self.stream.write(
            f"step {done}/{self.total} ({100 * done / self.total:.0f}%) | loss {loss:.4f}{acc}"
            f" | {rate:.1f} steps/s | {bytes_sent / 1e6:.1f} MB sent | ETA {eta:.0f}s\n")
        self.stream.flush()
