"""A plain-text table of how the configured partition spreads samples and classes over ranks."""

from __future__ import annotations

import numpy as np

from mpiopt.data.base import DataConfig


def describe(cfg_data: DataConfig, world_size: int, seed: int, ranks=None) -> str:
    """Render per-rank sample counts and class histograms of the configured partition.

    Only the training labels are read, never the features.

    Args:
        cfg_data: the ``data`` section of a configuration.
        world_size: number of ranks to partition for (the workers).
        seed: run seed (partitions and splits depend on it).
        ranks: the rank of each part, for the rows (default ``0..world_size-1``; a parameter
            server's workers are ranks ``1..``).

    Returns:
        A heading line and a table with one row per rank (samples, classes present, count of
        each class) and a total row; ends with a newline.

    Raises:
        ConfigError: when the data cannot be opened or the partition does not fit.
    """
    with cfg_data.open(seed) as source:
        labels, n_classes = source.labels, source.n_classes
    parts = cfg_data.split(labels, world_size, seed)
    counts = np.stack([np.bincount(labels[p], minlength=n_classes) for p in parts])
    ranks = range(world_size) if ranks is None else ranks
    rows = [[str(r), *_summary(c)] for r, c in zip(ranks, counts)]
    rows.append(["total", *_summary(counts.sum(axis=0))])
    header = ["rank", "samples", "classes", *map(str, range(n_classes))]
    return _heading(cfg_data, world_size, seed, len(labels), n_classes) + _table(header, rows)


def _summary(counts: np.ndarray) -> list[str]:
    """Return the cells of one row: total, number of classes present, per-class counts."""
    return [str(counts.sum()), str(np.count_nonzero(counts)), *map(str, counts)]


def _heading(cfg_data: DataConfig, world_size: int, seed: int, n: int, n_classes: int) -> str:
    """Return the line naming the dataset, the partition and its parameters."""
    kind = cfg_data.partition
    detail = {"dirichlet": f" (alpha={cfg_data.alpha:g})",
              "shards": f" (classes_per_rank={cfg_data.classes_per_rank})"}.get(kind, "")
    return (f"data {cfg_data.NAME}: {n} training samples, {n_classes} classes; partition "
            f"{kind}{detail} over {world_size} ranks, seed {seed}\n")


def _table(header: list[str], rows: list[list[str]]) -> str:
    """Right-align the cells in columns separated by two spaces."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in [header, *rows]]
    return "\n".join(lines) + "\n"
