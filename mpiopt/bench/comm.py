"""``mpiexec -n N mpiopt bench comm``: the transport's allreduce against raw mpi4py.

For float32 buffers from 1 KB to ``max_mb`` MB, both are timed in the same run, interleaved
repetition by repetition so that drift in machine load hits both alike; the figure of merit is
the median over repetitions of the paired ratio (transport / raw). The transport's overhead is
its deadline watchdog, byte accounting and GPU-safety checks.
"""

from __future__ import annotations

import json
import time

import numpy as np

from mpiopt.comm.transport import Channel, Transport, raw_allreduce


def _sizes(max_mb: float) -> list[int]:
    sizes, nbytes = [], 1024
    while nbytes <= max_mb * 2**20:
        sizes.append(nbytes)
        nbytes *= 4
    return sizes


def _repeats(nbytes: int, requested: int | None) -> int:
    if requested:
        return requested
    return int(min(400, max(20, 2**28 // max(nbytes, 1) // 8)))


def _time(fn, transport: Transport) -> float:
    transport.barrier()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure(transport: Transport, nbytes: int, repeats: int) -> dict:
    """Time raw ``Allreduce`` and ``Transport.allreduce`` of one buffer size, interleaved."""
    buf = np.ones(nbytes // 4, dtype=np.float32)
    raw, ours = [], []
    for _ in range(3):  # warm-up both paths
        raw_allreduce(transport, buf)
        transport.allreduce(buf, Channel.BENCH)
    for _ in range(repeats):
        raw.append(_time(lambda: raw_allreduce(transport, buf), transport))
        ours.append(_time(lambda: transport.allreduce(buf, Channel.BENCH), transport))
    # Each transport call is paired with the raw call just before it, so load drifts cancel;
    # every rank reports the slowest rank's figures.
    ratio = transport.allreduce_scalar(float(np.median(np.array(ours) / np.array(raw))),
                                       op="max")
    t_raw = transport.allreduce_scalar(float(np.median(raw)), op="max")
    t_ours = transport.allreduce_scalar(float(np.median(ours)), op="max")
    return {"bytes": nbytes, "raw_s": t_raw, "transport_s": t_ours, "ratio": ratio,
            "raw_GBps": nbytes / t_raw / 1e9}


def _fmt(nbytes: int) -> str:
    for unit, scale in (("MB", 2**20), ("KB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:g} {unit}"
    return f"{nbytes} B"


def run(max_mb: float = 64.0, repeats: int | None = None, json_path: str | None = None,
        algorithm: str | None = None, out=print) -> list[dict]:
    """Run the allreduce comparison on every rank; print the table on rank 0."""
    if algorithm is not None:
        from mpiopt.errors import ConfigError

        raise ConfigError(f"no communication benchmark for algorithm {algorithm!r} yet",
                          key="--algorithm")
    transport = Transport()
    rows = [measure(transport, n, _repeats(n, repeats)) for n in _sizes(max_mb)]
    if transport.rank == 0:
        out(f"allreduce of float32 buffers on {transport.size} ranks (median times; ratio: "
            "median of paired transport/raw; slowest rank)")
        out(f"{'size':>8} {'raw mpi4py':>12} {'transport':>12} {'ratio':>7} {'raw GB/s':>9}")
        for r in rows:
            flag = "" if r["bytes"] < 2**20 or r["ratio"] <= 1.05 else "  > 5% overhead"
            out(f"{_fmt(r['bytes']):>8} {r['raw_s'] * 1e6:10.1f}us {r['transport_s'] * 1e6:10.1f}"
                f"us {r['ratio']:7.3f} {r['raw_GBps']:9.2f}{flag}")
        if json_path:
            with open(json_path, "w") as fh:
                json.dump({"ranks": transport.size, "allreduce": rows}, fh, indent=2)
    return rows
