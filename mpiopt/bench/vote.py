"""``mpiexec -n N mpiopt bench comm --algorithm signum``: one vote step against fp32 Allreduce.

For vectors of ``d`` float32 parameters from 1M to ``--size``, each round times one vote step
of every transport (pack the signs, exchange, vote, unpack the +-1 result) and a raw mpi4py
``Allreduce`` of the same ``d`` floats, in an order rotated every round so that drift in machine
load hits all alike. The figure of merit is the median over rounds of the paired ratio
(vote step / allreduce of the same round), taken on the slowest rank. Bytes are those the
transport accounted for one step: the most any rank sent and received.
"""

from __future__ import annotations

import json
import time

import numpy as np

from mpiopt.algorithms.signum import SEGMENT_BYTES, Vote
from mpiopt.bench.comm import slowest
from mpiopt.comm.transport import Channel, Transport, raw_allreduce

VARIANTS = (("sharded", 0), ("sharded", SEGMENT_BYTES), ("allgather", 0), ("server", 0))


def _label(kind: str, segment: int) -> str:
    return f"{kind}/pipelined" if segment else kind


def _sizes(max_elems: int) -> list[int]:
    sizes, d = [], 1 << 20
    while d <= max_elems:
        sizes.append(d)
        d *= 4
    return sizes or [max_elems]


def _calls(d: int) -> int:
    return int(min(20, max(1, (1 << 24) // d)))


def measure(t: Transport, d: int, rounds: int) -> list[dict]:
    """Time every vote transport and the fp32 allreduce on ``d`` parameters."""
    rng = np.random.default_rng([7, t.rank])
    v = rng.standard_normal(d, dtype=np.float32)
    u = np.empty(d, np.float32)
    flat = np.zeros(d, np.float32)  # zeros: the sums stay finite however often it is reduced
    votes = {_label(k, s): Vote(k, t, d, np, s) for k, s in VARIANTS}
    fns = {"allreduce": lambda: raw_allreduce(t, flat)}
    for name, vote in votes.items():
        fns[name] = (lambda vote=vote: vote(v, u))
    traffic = {}
    for name, fn in fns.items():  # warm up, and account one step of each
        fn()
        t.reset_stats()
        fn()
        if name == "allreduce":  # raw MPI is not accounted: a ring's volume each way
            moved = 2 * (t.size - 1) * flat.nbytes // t.size
            traffic[name] = (moved, moved)
        else:
            st = [t.stats[Channel.VOTE], t.stats[Channel.VOTE_RESULT]]
            traffic[name] = (sum(s.sent for s in st), sum(s.recv for s in st))
    calls = _calls(d)
    names = list(fns)
    times = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            t.barrier()
            t0 = time.perf_counter()
            for _ in range(calls):
                fns[name]()
            times[name].append((time.perf_counter() - t0) / calls)
    ar = np.array(times["allreduce"])
    rows = []
    for name in names:
        mine = np.array(times[name])
        sent = t.allreduce_scalar(float(traffic[name][0]), op="max", channel=Channel.BENCH)
        recv = t.allreduce_scalar(float(traffic[name][1]), op="max", channel=Channel.BENCH)
        rows.append({"d": d, "transport": name, "time_s": slowest(t, np.median(mine)),
                     "ratio": slowest(t, np.median(mine / ar)),
                     "sent_bytes": int(sent), "recv_bytes": int(recv)})
    return rows


def run(max_elems: int = 64 << 20, repeats: int | None = None, json_path: str | None = None,
        out=print) -> list[dict]:
    """Run the vote benchmark on every rank; rank 0 prints each size's rows as they finish."""
    from mpiopt.runner import share_cores

    t = Transport()
    threads = share_cores(t)  # as a run does: ranks on one node split its cores
    if t.rank == 0:
        out(f"one signum vote step against a raw fp32 Allreduce of the same d, {t.size} ranks, "
            f"{threads} kernel thread(s) each (median of paired rounds, slowest rank; bytes: "
            "the most any rank moved)")
        out(f"{'d':>6} {'transport':>18} {'time':>10} {'vs allreduce':>13} {'sent':>10} "
            f"{'received':>10}")
    rows = []
    for d in _sizes(max_elems):
        new = measure(t, d, repeats or 7)
        rows += new
        if t.rank == 0:
            for r in new:
                out(f"{r['d'] >> 20:>5}M {r['transport']:>18} {r['time_s'] * 1e3:8.2f}ms "
                    f"{r['ratio']:13.3f} {r['sent_bytes'] / 2**20:8.2f}MB "
                    f"{r['recv_bytes'] / 2**20:8.2f}MB")
            by = {r["transport"]: r["time_s"] for r in new}
            out(f"{'':>6} sharded / allgather time: {by['sharded'] / by['allgather']:.3f}",
                flush=True)
    if t.rank == 0 and json_path:
        with open(json_path, "w") as fh:
            json.dump({"ranks": t.size, "vote": rows}, fh, indent=2)
    t.free()
    return rows
