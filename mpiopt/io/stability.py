"""The two stability measures of a run's test accuracy (ALGORITHMS.md, section 3).

The publication behind GSGM reports "training stability" without its formula; mpiopt reports
two measures **[decision]**, both computed from the evaluation rows (``eval/accuracy`` of
``metrics.h5``, in step order, the final evaluation included):

- ``mean_abs_change``: the mean of ``|a[i+1] - a[i]|`` over consecutive evaluations after the
  warm-up. The warm-up is the first ``floor(WARMUP_FRACTION * n)`` of the ``n`` evaluations, or
  every evaluation at a step within ``algorithm.warmup_steps`` (the learning-rate warm-up) if
  that is more: how fast a method first learns is not how steady it is.
- ``tail_std``: the standard deviation (population, ``ddof=0``) of the last
  ``max(2, ceil(TAIL_FRACTION * n))`` evaluations.

Lower is steadier for both; "improvement" over a baseline is ``1 - ours / baseline``.
With fewer than ``MIN_EVALUATIONS`` (3) evaluations neither measure means anything (two points
are a warm-up and a final model, not a tail) and both are None; so is ``mean_abs_change`` when
the warm-up leaves fewer than two evaluations. Evaluations without an accuracy (NaN) are left
out before counting.
"""

from __future__ import annotations

import math

import numpy as np

WARMUP_FRACTION = 0.2
TAIL_FRACTION = 0.2
MIN_EVALUATIONS = 3


def warmup_count(steps: np.ndarray, warmup_steps: int = 0) -> int:
    """Return how many of the evaluations at ``steps`` (ascending) belong to the warm-up."""
    by_fraction = int(math.floor(WARMUP_FRACTION * len(steps)))
    by_schedule = int(np.count_nonzero(np.asarray(steps) <= warmup_steps)) if warmup_steps else 0
    return max(by_fraction, by_schedule)


def tail_count(n: int) -> int:
    """Return how many of ``n`` evaluations make the tail: 20% of them, at least two."""
    return min(n, max(2, int(math.ceil(TAIL_FRACTION * n))))


def stability(accuracy, steps=None, warmup_steps: int = 0) -> dict:
    """Return the stability measures of a series of test accuracies.

    Args:
        accuracy: Test accuracy of each evaluation, in evaluation order.
        steps: The step of each evaluation (default: 1, 2, ...); only the warm-up uses it.
        warmup_steps: Steps of learning-rate warm-up; evaluations within them are warm-up.

    Returns:
        ``{"mean_abs_change", "tail_std", "evaluations", "warmup", "tail"}``: the two measures
        (None where undefined, see the module) and the counts of evaluations they used.
    """
    acc = np.asarray(accuracy, dtype=np.float64)
    steps = np.arange(1, acc.size + 1) if steps is None else np.asarray(steps)
    keep = np.isfinite(acc)
    acc, steps = acc[keep], steps[keep]
    n = int(acc.size)
    out = {"mean_abs_change": None, "tail_std": None, "evaluations": n, "warmup": 0, "tail": 0}
    if n < MIN_EVALUATIONS:
        return out
    warm, tail = warmup_count(steps, warmup_steps), tail_count(n)
    after = acc[warm:]
    if after.size >= 2:
        out["mean_abs_change"] = float(np.mean(np.abs(np.diff(after))))
    out.update(tail_std=float(np.std(acc[-tail:])), warmup=warm, tail=tail)
    return out
