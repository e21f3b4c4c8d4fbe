"""The problem interface: an objective on a flat float32 parameter vector."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from mpiopt.config import Section


@dataclass(frozen=True)
class ProblemConfig(Section):
    """Keys common to every problem."""

    NEEDS_DATA: ClassVar[bool] = True  # False: makes its own samples (data section: none)
    HOST_ONLY: ClassVar[bool] = False  # True: numpy only (run.device auto means cpu)
    HEADLINE: ClassVar[str] = "accuracy"  # the evaluation metric progress lines show

    def build(self, shard, batch_size: int, xp):
        """Return the :class:`Problem` on this rank's ``shard`` with array module ``xp``."""
        raise NotImplementedError


class Problem:
    """An objective on a flat float32 vector of length ``dim``.

    ``gradient`` draws a minibatch from the rank's own shard and writes the stochastic
    direction into ``out``; ``evaluate`` scores a vector on the held-out test set. A problem
    that records events of its own (the episodes of a reinforcement-learning problem) reports
    them at the end of the run through :meth:`series`, :meth:`info` and :meth:`summary_info`.
    """

    dim: int

    def init(self, rng):
        """Return initial parameters (float32, length ``dim``) drawn from ``rng``."""
        raise NotImplementedError

    def gradient(self, x, rng, out) -> dict:
        """Write a stochastic gradient at ``x`` into ``out``; return metrics (``loss``)."""
        raise NotImplementedError

    def evaluate(self, x) -> dict:
        """Return test metrics of ``x`` (``loss``, ``accuracy``)."""
        raise NotImplementedError

    def replica(self) -> Problem:
        """Return an independent copy for another thread of this rank (its own buffers).

        A deep copy by default (modules, such as the array module, are shared); a problem
        whose data is read-only may share it instead.
        """
        import copy
        import types

        shared = {id(v): v for v in vars(self).values() if isinstance(v, types.ModuleType)}
        return copy.deepcopy(self, shared)

    def warm_up(self, x, out, calls: int = 16) -> None:
        """Compute ``calls`` gradients into the scratch ``out``, leaving the run unchanged.

        The first gradients after setup run several times slower than later ones (caches,
        memory touched for the first time, the interpreter specialising the hot code); the
        runner calls this before its clock starts. The minibatch stream must not move: the
        run draws exactly the batches it would have drawn without it. Does nothing here.
        """

    def series(self, origin: float) -> dict:
        """Return this rank's own series for ``metrics.h5``: ``name -> (1-D array, doc)``.

        Written to ``series/<rank>/`` beside the algorithm's. Times are on the run's clock:
        ``origin`` is the ``time.perf_counter()`` at which it started. None here.
        """
        return {}

    def info(self, origin: float) -> dict:
        """Return small, picklable facts of this rank, gathered for :meth:`summary_info`."""
        return {}

    def summary_info(self, infos: list[dict], wall_time_s: float) -> dict:
        """Return the problem's facts for ``summary.json`` (``problem_info``), on rank 0.

        ``infos`` are every rank's :meth:`info`, in rank order; ``wall_time_s`` the run's.
        """
        return {}


class EpochBatches:
    """Minibatches of a problem's ``n_train`` samples, epoch by epoch in a shuffled order.

    A problem sets ``n_train`` and ``batch_size`` and calls :meth:`_reset_batches` once. The
    warm-up computes :attr:`WARM_CALLS` gradients on a throwaway stream and restores the order,
    so that the run draws exactly the batches it would have drawn without it.
    """

    WARM_CALLS = 16
    n_train: int
    batch_size: int

    def _reset_batches(self) -> None:
        self._order, self._pos = None, 0

    def _next_indices(self, rng):
        """Return the sorted indices of the next minibatch (a new permutation per epoch)."""
        if self._order is None or self._pos + self.batch_size > self.n_train:
            self._order = rng.permutation(self.n_train)
            self._pos = 0
        idx = self._order[self._pos: self._pos + self.batch_size]
        self._pos += self.batch_size
        return np.sort(idx)

    def warm_up(self, x, out, calls: int | None = None) -> None:
        """Compute gradients on a throwaway stream; the minibatch order is restored."""
        saved = self._order, self._pos
        rng = np.random.default_rng(0)
        for _ in range(self.WARM_CALLS if calls is None else calls):
            self.gradient(x, rng, out)
        self._order, self._pos = saved
