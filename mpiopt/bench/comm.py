"""``mpiexec -n N mpiopt bench comm``: the transport's allreduce against raw mpi4py.

For float32 buffers from 1 KB to ``max_mb`` MB, both are timed in the same run, in blocks of
calls interleaved round by round (the order swapped each round) so that drift in machine load
hits both alike; the figure of merit is the median over rounds of the paired ratio
(transport / raw), printed next to the same statistic for raw against raw (the noise floor).
The transport's overhead is its deadline watchdog, byte accounting and GPU-safety checks.
"""

from __future__ import annotations

import json
import time

import numpy as np

from mpiopt.comm.transport import Channel, Transport, raw_allreduce, self_transport


def _sizes(max_mb: float) -> list[int]:
    sizes, nbytes = [], 1024
    while nbytes <= max_mb * 2**20:
        sizes.append(nbytes)
        nbytes *= 4
    return sizes


def _block(nbytes: int) -> int:
    """Return calls per timed block: enough that a block lasts well above timer noise."""
    return int(min(500, max(3, 2**24 // max(nbytes, 1))))


def _time_block(fn, calls: int, transport: Transport) -> float:
    transport.barrier()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls


def _paired(transport: Transport, first, second, rounds: int, calls: int):
    """Time blocks of two calls ``rounds`` times, swapping their order every round (ABBA)."""
    a, b = [], []
    for i in range(rounds):
        order = ((first, a), (second, b)) if i % 2 == 0 else ((second, b), (first, a))
        for fn, times in order:
            times.append(_time_block(fn, calls, transport))
    return np.array(a), np.array(b)


def slowest(transport: Transport, value: float) -> float:
    """Return the largest ``value`` over the ranks (the slowest rank's figure)."""
    return transport.allreduce_scalar(float(value), op="max")


def measure(transport: Transport, nbytes: int, rounds: int = 12) -> dict:
    """Time raw ``Allreduce`` and ``Transport.allreduce`` of one buffer size, interleaved.

    Each round times a block of calls of each, in alternating order; the ratio is the median
    over rounds of the paired ratio. A second pairing of raw against raw measures the noise
    floor of the method itself: a transport ratio inside that spread is indistinguishable
    from zero overhead.
    """
    buf = np.zeros(nbytes // 4, dtype=np.float32)  # zeros: sums stay finite forever
    calls = _block(nbytes)

    def raw():
        raw_allreduce(transport, buf)

    def ours():
        transport.allreduce(buf, Channel.BENCH)

    for _ in range(3):  # warm-up both paths
        raw()
        ours()
    t_raw, t_ours = _paired(transport, raw, ours, rounds, calls)
    n_a, n_b = _paired(transport, raw, raw, rounds, calls)
    return {"bytes": nbytes, "raw_s": slowest(transport, np.median(t_raw)),
            "transport_s": slowest(transport, np.median(t_ours)),
            "ratio": slowest(transport, np.median(t_ours / t_raw)),
            "raw_raw_ratio": slowest(transport, np.median(n_b / n_a)),
            "raw_GBps": nbytes / slowest(transport, np.median(t_raw)) / 1e9}


def call_overhead(calls: int = 20000) -> float:
    """Return the transport's own cost per allreduce call in seconds.

    Measured on a one-process communicator with a one-element buffer, where MPI itself does
    almost nothing, as the difference of the median block times.
    """
    solo = self_transport()
    buf = np.zeros(1, np.float32)
    raw, ours = _paired(solo, lambda: raw_allreduce(solo, buf),
                        lambda: solo.allreduce(buf, Channel.BENCH), 7, calls)
    solo.free()
    return float(np.median(ours) - np.median(raw))


def _fmt(nbytes: int) -> str:
    for unit, scale in (("MB", 2**20), ("KB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:g} {unit}"
    return f"{nbytes} B"


def run(max_mb: float = 64.0, repeats: int | None = None, json_path: str | None = None,
        out=print) -> list[dict]:
    """Run the allreduce comparison on every rank; rank 0 prints."""
    transport = Transport()
    rows = [measure(transport, n, repeats or 12) for n in _sizes(max_mb)]
    overhead = slowest(transport, call_overhead())
    if transport.rank == 0:
        out(f"allreduce of float32 buffers on {transport.size} ranks (median block times; ratios: "
            "median over rounds of paired blocks, order alternated; slowest rank)")
        out(f"{'size':>8} {'raw mpi4py':>12} {'transport':>12} {'ratio':>7} {'raw/raw':>8} "
            f"{'raw GB/s':>9}")
        for r in rows:
            flag = "" if r["bytes"] < 2**20 or r["ratio"] <= 1.05 else "  > 5% overhead"
            out(f"{_fmt(r['bytes']):>8} {r['raw_s'] * 1e6:10.1f}us {r['transport_s'] * 1e6:10.1f}"
                f"us {r['ratio']:7.3f} {r['raw_raw_ratio']:8.3f} {r['raw_GBps']:9.2f}{flag}")
        out(f"transport cost per call (one-process communicator, 4-byte buffer): "
            f"{overhead * 1e6:.2f} us")
        if json_path:
            with open(json_path, "w") as fh:
                json.dump({"ranks": transport.size, "allreduce": rows,
                           "call_overhead_s": overhead}, fh, indent=2)
    return rows
