"""The metrics recorder: per-rank step series and evaluations into ``metrics.h5``.

Each rank buffers one row per local step in a preallocated chunk and appends full chunks to its
own HDF5 file (``.ranks/rank<r>.h5`` in the run directory), so memory stays flat over any run
length and no rank ever waits for another to record. At the end rank 0 merges the per-rank
files and its evaluations into ``metrics.h5``:

- root attributes ``algorithm``, ``problem``, ``dataset``, ``world_size``, ``config`` (YAML);
- ``ranks/<r>/{step, time, loss, lr, bytes_sent, bytes_recv, compute_s, comm_s}``, one row
  per local step of rank r (bytes and seconds of that step);
- ``eval/{step, time, bytes_sent, loss, accuracy, ...}``, one row per evaluation, where
  ``bytes_sent`` is the cumulative bytes sent per rank so far and further columns are the
  algorithm's own (``consensus_distance``, ``avg_accuracy``, ...);
- ``series/<r>/<name>``: the algorithm's own 1-D series of rank r (``Algorithm.series()``),
  each with its own length and a ``doc`` attribute, for the ranks that have any; the group
  ``series`` is always there. A parameter server's rank 0 writes ``staleness`` and ``worker``,
  one row per applied gradient in the order applied: its staleness (updates applied between
  the model it was computed at and its own) and the index of the worker it came from (its
  place among the workers, as in ``updates_per_worker``; rank ``index + 1`` with one server).
"""

from __future__ import annotations

import os
import shutil

import h5py
import numpy as np

STEP_FIELDS = [("step", np.int64), ("time", np.float64), ("loss", np.float32),
               ("lr", np.float32), ("bytes_sent", np.int64), ("bytes_recv", np.int64),
               ("compute_s", np.float64), ("comm_s", np.float64)]


class StepLog:
    """A per-rank, chunked, append-only table of step rows backed by an HDF5 file.

    Rows are buffered column by column in preallocated Python lists: a row is eight list
    stores (about 0.2 us), where assigning it to a numpy structured row converts each field
    (about 0.4 us); a full chunk becomes numpy arrays once, when it is written.

    Args:
        path: the rank's own HDF5 file.
        chunk: rows buffered in memory before they are appended to the file.
    """

    def __init__(self, path: str, chunk: int = 4096):
        self.path = path
        self.chunk = chunk
        self.columns = [[0] * chunk for _ in STEP_FIELDS]
        (self._step, self._time, self._loss, self._lr, self._sent, self._recv, self._compute,
         self._comm) = self.columns
        self.fill = 0
        self.rows = 0
        self._compute_s = 0.0  # totals of the rows already written
        self._comm_s = 0.0
        self.file = h5py.File(path, "w")
        self.datasets = [self.file.create_dataset(name, shape=(0,), maxshape=(None,),
                                                  dtype=dtype, chunks=(min(chunk, 65536),))
                         for name, dtype in STEP_FIELDS]

    def append(self, step, time, loss, lr, bytes_sent, bytes_recv, compute_s, comm_s) -> None:
        """Record one step; flushes to the file when the buffer is full."""
        i = self.fill
        self._step[i] = step
        self._time[i] = time
        self._loss[i] = loss
        self._lr[i] = lr
        self._sent[i] = bytes_sent
        self._recv[i] = bytes_recv
        self._compute[i] = compute_s
        self._comm[i] = comm_s
        self.fill = i = i + 1
        if i == self.chunk:
            self.flush()

    @property
    def compute_s(self) -> float:
        """Seconds of computation over every row so far (the summary's, without a re-read)."""
        return self._compute_s + sum(self._compute[: self.fill])

    @property
    def comm_s(self) -> float:
        """Seconds of communication over every row so far."""
        return self._comm_s + sum(self._comm[: self.fill])

    def flush(self) -> None:
        """Append the buffered rows to the file."""
        if not self.fill:
            return
        n, new = self.fill, self.rows + self.fill
        for ds, column, (_, dtype) in zip(self.datasets, self.columns, STEP_FIELDS):
            ds.resize((new,))
            ds[self.rows:new] = np.fromiter(column, dtype, n)
        self._compute_s += sum(self._compute[:n])
        self._comm_s += sum(self._comm[:n])
        self.rows, self.fill = new, 0
        self.file.flush()

    def write_series(self, series: dict) -> None:
        """Store this rank's named 1-D series (``name -> (array, doc)``) under ``series/``."""
        if not series:
            return
        group = self.file.require_group("series")
        for name, (values, doc) in series.items():
            group.create_dataset(name, data=np.asarray(values)).attrs["doc"] = doc

    def close(self) -> None:
        """Flush and close the file."""
        if self.file is not None:
            self.flush()
            self.file.close()
            self.file = None


class EvalLog:
    """Evaluation rows (few: one per evaluation), with the columns the algorithm reports."""

    def __init__(self):
        self.rows: list[dict] = []

    def append(self, row: dict) -> None:
        """Record one evaluation (``step``, ``time``, ``bytes_sent`` and metrics)."""
        self.rows.append(dict(row))

    def columns(self) -> dict[str, np.ndarray]:
        """Return each column as an array (missing values as NaN)."""
        names: list[str] = []
        for row in self.rows:
            names += [k for k in row if k not in names]
        out = {}
        for name in names:
            dtype = np.int64 if name == "step" else np.float64
            fill = -1 if name == "step" else np.nan
            out[name] = np.array([r.get(name, fill) for r in self.rows], dtype=dtype)
        return out


def rank_log_path(run_dir: str, rank: int) -> str:
    """Return where rank ``rank`` keeps its step log during the run."""
    return os.path.join(run_dir, ".ranks", f"rank{rank}.h5")


def merge(run_dir: str, world_size: int, evals: EvalLog, attrs: dict) -> str:
    """Write ``metrics.h5`` from the per-rank logs and the evaluations (rank 0, at the end).

    The file is written under a temporary name and renamed, so a reader never sees half of
    it; the per-rank logs are removed afterwards.
    """
    final = os.path.join(run_dir, "metrics.h5")
    tmp = final + ".tmp"
    with h5py.File(tmp, "w") as out:
        for key, value in attrs.items():
            out.attrs[key] = value
        ranks = out.create_group("ranks")
        series = out.create_group("series")
        for r in range(world_size):
            with h5py.File(rank_log_path(run_dir, r), "r") as src:
                group = ranks.create_group(str(r))
                for name, _ in STEP_FIELDS:
                    src.copy(src[name], group, name=name)
                if "series" in src:
                    src.copy(src["series"], series, name=str(r))
        ev = out.create_group("eval")
        for name, column in evals.columns().items():
            ev.create_dataset(name, data=column)
    os.replace(tmp, final)
    shutil.rmtree(os.path.join(run_dir, ".ranks"), ignore_errors=True)
    return final


def read_metrics(path: str) -> dict:
    """Read ``metrics.h5`` into ``{"attrs", "ranks": [...], "eval": {...}, "series": {r: ...}}``."""
    with h5py.File(path, "r") as f:
        ranks = [{k: f["ranks"][str(r)][k][()] for k in f["ranks"][str(r)]}
                 for r in range(len(f["ranks"]))]
        series = {int(r): {k: g[k][()] for k in g} for r, g in f.get("series", {}).items()}
        return {"attrs": dict(f.attrs), "ranks": ranks,
                "eval": {k: f["eval"][k][()] for k in f["eval"]}, "series": series}
