"""Multi-rank checks of the transport and the windows; size-agnostic (any number of ranks).

Run as ``mpiexec -n N python -m mpi4py check_comm.py``: an assertion on any rank aborts the job.
"""

import time

import numpy as np

from mpiopt.comm.transport import Channel, CommTimeout, Transport, wait_all
from mpiopt.comm.windows import SharedWindow, Window

t = Transport(timeout=30)
r, n = t.rank, t.size


def check_allreduce():
    for d in (1, 7, 1000):
        x = np.full(d, r + 1, dtype=np.float32)
        t.reset_stats()
        t.allreduce(x, Channel.GRADIENT)
        assert np.all(x == n * (n + 1) / 2), x[:3]
        expect = int(2 * (n - 1) * x.nbytes / n)
        s = t.stats[Channel.GRADIENT]
        assert s.sent == expect and s.recv == expect, (s, expect)
        assert t.bytes_sent() == expect
    m = np.array([float(r)])
    t.allreduce(m, op="max")
    assert m[0] == n - 1


def check_collectives():
    b = np.arange(5, dtype=np.float32) if r == 0 else np.zeros(5, np.float32)
    t.bcast(b, root=0)
    assert np.array_equal(b, np.arange(5, dtype=np.float32))
    mine = np.full(3, r, dtype=np.int32)
    every = np.empty((n, 3), np.int32)
    t.allgather(mine, every)
    assert np.array_equal(every[:, 0], np.arange(n))
    send = np.array([r * 100 + j for j in range(n)], dtype=np.int64)
    recv = np.empty(n, np.int64)
    t.alltoall(send, recv)
    assert np.array_equal(recv, np.arange(n) * 100 + r)
    gathered = np.empty((n, 3), np.int32) if r == 0 else None
    t.gather(mine, gathered, root=0)
    if r == 0:
        assert np.array_equal(gathered[:, 1], np.arange(n))
    assert t.allgather_obj({"rank": r})[n - 1] == {"rank": n - 1}
    assert t.bcast_obj("hello" if r == 0 else None) == "hello"


def check_point_to_point():
    right, left = (r + 1) % n, (r - 1) % n
    out = np.full(4, r, dtype=np.float64)
    got = np.empty(4, np.float64)
    t.reset_stats()
    t.sendrecv(out, right, got, left, Channel.GOSSIP)
    assert np.all(got == left)
    assert t.stats[Channel.GOSSIP].sent == out.nbytes
    assert t.stats[Channel.GOSSIP].recv == got.nbytes
    handles = [t.irecv(got, left, Channel.MODEL), t.isend(out, right, Channel.MODEL)]
    wait_all(handles)
    assert all(h.test() for h in handles)


def check_deadline():
    """A receive nobody answers must fail at its deadline, naming peer, tag and step."""
    t.step = 42
    h = t.irecv(np.empty(1), (r + 1) % n, Channel.CONTROL)
    t0 = time.monotonic()
    try:
        h.wait(timeout=0.3)
    except CommTimeout as exc:
        text = str(exc)
        assert f"peer {(r + 1) % n}" in text and "tag CONTROL" in text and "step 42" in text
    else:
        raise AssertionError("wait() returned without a message")
    assert 0.3 <= time.monotonic() - t0 < 5.0
    h.cancel()
    t.step = -1
    t.barrier()


def check_window():
    w = Window(t, 8, np.float64)
    w.local[:] = r
    w.sync()
    t.barrier()
    peer = (r + 1) % n
    buf = np.empty(8)
    with w.locked(peer, "shared"):
        w.get(buf, peer)
    assert np.all(buf == peer)
    t.barrier()
    with w.locked(0, "shared"):
        w.accumulate(np.ones(8), 0)
    t.barrier()
    if r == 0:
        w.sync()
        assert np.all(w.local == n), w.local
    t.barrier()  # rank n-1 puts into rank 0 next: not before rank 0 has checked the sum
    with w.locked(peer, "exclusive"):
        w.put(np.full(2, -1.0), peer, offset=6)
    t.barrier()
    w.sync()
    assert np.all(w.local[6:] == -1.0)
    counter = Window(t, 1, np.int64)
    with counter.locked(0, "shared"):
        counter.fetch_and_add(1, 0)
    t.barrier()
    if r == 0:
        counter.sync()
        assert counter.local[0] == n
    counter.free()
    w.free()


def check_shared():
    node = t.split_shared()
    sw = SharedWindow(node, 16, np.float32)
    sw.local[:] = node.rank + 1
    sw.fence()
    for q in range(node.size):
        assert np.all(sw.view(q) == q + 1)
    sw.fence()
    sw.free()
    node.free()


def check_split():
    half = t.split(r % 2)
    x = np.ones(2)
    half.allreduce(x)
    assert x[0] == len(range(r % 2, n, 2))
    half.free()


for check in (check_allreduce, check_collectives, check_point_to_point, check_deadline,
              check_window, check_shared, check_split):
    check()
    t.barrier()
if r == 0:
    print(f"comm checks passed on {n} ranks", flush=True)
