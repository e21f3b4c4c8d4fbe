"""``mpiexec -n N mpiopt bench comm --algorithm swarm``: reading a partner's published model.

Rank 0 reads the published copies of ranks 1..N-1 in turn through SwarmSGD's own read path
(:class:`~mpiopt.algorithms.swarm.Gossip`), while those ranks either wait inside MPI (idle) or
compute without entering MPI (busy: a numpy matrix loop, as a training step does). The
reference, measured in the same run, is a raw mpi4py ``Get`` + ``Flush`` of the same float32
bytes from an idle partner. The figure of merit is the ratio of medians: a read of a busy
partner against the raw read of an idle one. ``max`` shows what a busy partner can cost at
worst; without hardware RMA or shared memory and without a progress thread it is the length of
the partner's computation.

Rows: ``raw Get, idle`` (the reference), ``read, idle`` and ``read, busy`` (the float32 copy),
``lattice16, busy`` (the encoded copy, decoded against the reader's model), and, when the
partners are on other nodes (``progress: auto`` starts a thread), ``busy, no thread``.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np

from mpiopt.comm.topology import build_topology
from mpiopt.comm.transport import CommTimeout, Transport
from mpiopt.comm.windows import RawReader

BUSY_S = 0.5  # how long a busy partner computes without entering MPI


def _sizes(max_elems: int) -> list[int]:
    sizes = [d for d in (1 << 16, 1 << 20, 1 << 22, 1 << 24) if d <= max_elems]
    return sizes or [max_elems]


def _compute(seconds: float) -> None:
    """Keep the CPU busy for ``seconds`` without any MPI call."""
    a = np.random.default_rng(0).random((192, 192))
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        a = a @ a
        a /= a.max()


def _idle(t: Transport) -> None:
    """Stay inside MPI (polling a barrier, yielding the core between polls) until all arrive.

    Unlike ``Handle.wait`` it never sleeps: an idle partner must keep entering MPI so that
    one-sided reads of it progress at once.
    """
    done = t.ibarrier()
    deadline = time.monotonic() + t.timeout
    while not done.test():
        os.sched_yield()  # oversubscribed: let the reader run
        if time.monotonic() > deadline:
            raise CommTimeout(done.describe(f"did not complete within {t.timeout:g} s (the "
                                            "benchmark's idle partners)"))


def _reads(t: Transport, fn, busy: bool, reads: int) -> list[float]:
    """Rank 0 times up to ``reads`` calls of ``fn(peer)``; the others idle or compute."""
    times: list[float] = []
    if t.rank == 0:
        stop = time.perf_counter() + 0.8 * BUSY_S
        for i in range(reads):
            peer = 1 + i % (t.size - 1)
            t0 = time.perf_counter()
            fn(peer)
            times.append(time.perf_counter() - t0)
            if busy and time.perf_counter() > stop:
                break
        if not busy:
            _idle(t)
    elif busy:
        _compute(BUSY_S)
    else:
        _idle(t)
    t.barrier()
    return times


def _raw_get(t: Transport, d: int, reads: int) -> list[float]:
    reader = RawReader(t, d)
    times = _reads(t, reader.read, False, reads)
    reader.free()
    return times


def _gossip_reads(t: Transport, d: int, quantize: str, progress: str, reads: int):
    from mpiopt.algorithms.swarm import Gossip, SwarmConfig

    cfg = SwarmConfig(quantize=quantize)
    base = np.random.default_rng(5).standard_normal(d).astype(np.float32)
    x = base + np.float32(1e-3) * np.random.default_rng([5, t.rank]).standard_normal(
        d).astype(np.float32)
    g = Gossip(t, d, build_topology("complete", t.size, 0), "pull", cfg.compressor(t.size),
               progress=progress)
    g.start(x)
    out = {"idle": _reads(t, lambda p: g.read(p, x), False, reads),
           "busy": _reads(t, lambda p: g.read(p, x), True, reads)}
    totals = g.stop(x)
    threads = any(r["progress_thread"] for r in totals)
    remote = any(r["remote_readers"] for r in totals)
    return out, threads, remote, sum(r["fallbacks"] for r in totals)


def measure(t: Transport, d: int, reads: int) -> list[dict]:
    """Time every read path for a model of ``d`` float32 parameters."""
    paths = {"raw Get, idle": _raw_get(t, d, reads)}
    fp32, threads, remote, _ = _gossip_reads(t, d, "none", "auto", reads)
    paths["read, idle"], paths["read, busy"] = fp32["idle"], fp32["busy"]
    lat, _, _, fallbacks = _gossip_reads(t, d, "lattice16", "auto", reads)
    paths["lattice16, busy"] = lat["busy"]
    if remote:
        bare, _, _, _ = _gossip_reads(t, d, "none", "none", reads)
        paths["busy, no thread"] = bare["busy"]
    rows = []
    if t.rank == 0:
        ref = float(np.median(paths["raw Get, idle"]))
        for name, times in paths.items():
            med = float(np.median(times))
            rows.append({"d": d, "path": name, "median_s": med, "max_s": float(max(times)),
                         "reads": len(times), "ratio": med / ref,
                         "progress_thread": threads, "remote": remote,
                         "fallbacks": fallbacks})
    return rows


def run(max_elems: int = 1 << 22, repeats: int | None = None, json_path: str | None = None,
        out=print) -> list[dict]:
    """Run the read benchmark (at least 2 ranks); rank 0 prints each size's rows.

    Models above 4M parameters (16 MB) are not timed: ``max_elems`` is capped there.
    """
    from mpiopt.errors import ConfigError
    from mpiopt.runner import share_cores

    t = Transport()
    if t.size < 2:
        t.free()
        raise ConfigError("needs at least 2 ranks (rank 0 reads the others)", key="--algorithm")
    share_cores(t)
    reads = repeats or 50
    if t.rank == 0:
        out(f"swarm: rank 0 reads the published model of {t.size - 1} partner(s), idle (inside "
            f"MPI) or busy (computing {BUSY_S:g} s without MPI); ratio: median read / median "
            "raw Get of an idle partner, same d")
        out(f"{'d':>6} {'path':>16} {'median':>10} {'max':>10} {'vs raw Get':>11} {'reads':>6}")
    rows = []
    for d in _sizes(min(max_elems, 1 << 22)):
        new = measure(t, d, reads)
        rows += new
        if t.rank == 0:
            for r in new:
                out(f"{r['d'] >> 10:>5}K {r['path']:>16} {r['median_s'] * 1e3:8.3f}ms "
                    f"{r['max_s'] * 1e3:8.2f}ms {r['ratio']:11.2f} {r['reads']:6d}")
            where = "other nodes" if new[0]["remote"] else "this node (direct loads)"
            out(f"{'':>6} partners on {where}; progress thread: "
                f"{'yes' if new[0]['progress_thread'] else 'no'}; lattice fallbacks: "
                f"{new[0]['fallbacks']}", flush=True)
    if t.rank == 0 and json_path:
        with open(json_path, "w") as fh:
            json.dump({"ranks": t.size, "reads": rows}, fh, indent=2)
    t.free()
    return rows
