"""Multi-rank checks of the transport and the windows; size-agnostic (any number of ranks).

Run as ``mpiexec -n N python -m mpi4py check_comm.py``: an assertion on any rank aborts the job.
"""

import os
import time
from functools import partial

import numpy as np

from mpiopt.comm.board import Board, Inbox
from mpiopt.comm.transport import Channel, CommTimeout, Transport, test_some, wait_all, wait_any
from mpiopt.comm.windows import SharedWindow, Window, WindowModeError

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
    assert handles[0].source == left and handles[0].channel is Channel.MODEL


def check_received_bytes_are_what_arrived():
    """A receive counts the message's real size when it completes, not its buffer at post."""
    right, left = (r + 1) % n, (r - 1) % n
    t.reset_stats()
    buf = np.full(10, -1.0)
    h = t.irecv(buf, left, Channel.MODEL)
    assert t.stats[Channel.MODEL].recv == 0  # posted, nothing has arrived yet
    wait_all([h, t.isend(np.full(3, float(r)), right, Channel.MODEL)])
    assert h.nbytes == 24 and t.stats[Channel.MODEL].recv == 24 and t.bytes_recv() == 24
    assert np.all(buf[:3] == left) and np.all(buf[3:] == -1.0), buf


def check_cancel():
    """Cancelling a receive nobody answers, and a send nobody takes, ends by its deadline."""
    t.step = 9
    right, left = (r + 1) % n, (r - 1) % n
    t.reset_stats()
    h = t.irecv(np.zeros(4), left, Channel.VOTE)  # nobody sends on VOTE here
    t0 = time.monotonic()
    assert h.cancel(timeout=1.0) is True
    assert time.monotonic() - t0 < 6.0
    assert h.done and h.cancelled and h.nbytes is None and t.stats[Channel.VOTE].recv == 0
    h.wait()  # a cancelled handle is done: waiting returns at once
    # 1 MiB goes by rendezvous: MPICH can cancel it only on this rank (n == 1), and it cannot
    # complete while the receiver has not posted a receive (it posts one after the allgather).
    big = np.ones(1 << 17)
    h = t.isend(big, right, Channel.BENCH)
    t0 = time.monotonic()
    try:
        outcome = h.cancel(timeout=0.5)
    except CommTimeout as exc:
        outcome = None
        where = f"(peer {right}, tag BENCH, step 9)"
        assert f"send could not be cancelled within 0.5 s {where}" in str(exc), exc
        assert not h.done and not h.cancelled
    assert 0 <= time.monotonic() - t0 < 6.0
    if outcome is True:
        assert h.cancelled and t.stats[Channel.BENCH].sent == 0
    outcomes = t.allgather_obj(outcome)
    if outcomes[left] is not True:  # the message exists: take it, as a stop protocol would
        got = np.zeros_like(big)
        t.irecv(got, left, Channel.BENCH).wait()
        assert np.all(got == 1.0)
    h.wait()
    assert h.done and h.cancel() is (outcome is True)
    t.step = -1


def check_any_source():
    """Rank 0 receives one message from every other rank, sent in random order, from anyone."""
    rng = np.random.default_rng([r, 12])
    kinds = (Channel.MODEL, Channel.GRADIENT, Channel.GOSSIP)
    if r == 0:
        bufs = [np.zeros(5) for _ in range(n - 1)]
        handles = [t.irecv(b, None, None) for b in bufs]
        seen = {}
        while (i := wait_any(handles, timeout=20)) is not None:
            assert i not in seen.values(), (i, seen)
            h = handles[i]
            assert h.source not in seen and h.channel is kinds[h.source % 3], (h.source, seen)
            assert np.all(bufs[i] == h.source) and h.nbytes == 40
            seen[h.source] = i
        assert sorted(seen) == list(range(1, n)) and all(h.done for h in handles)
        assert wait_any([]) is None and test_some(handles) == []
    else:
        time.sleep(rng.uniform(0, 0.02))
        t.isend(np.full(5, float(r)), 0, kinds[r % 3]).wait()
    t.barrier()
    # Again on one channel, polling with test_some: every index once, every source once.
    if r == 0:
        handles = [t.irecv(np.zeros(2), None, Channel.GOSSIP) for _ in range(n - 1)]
        order = []
        deadline = time.monotonic() + 20
        while len(order) < n - 1 and time.monotonic() < deadline:
            order += test_some(handles)
            time.sleep(1e-3)
        assert sorted(order) == list(range(n - 1)), order
        assert sorted(h.source for h in handles) == list(range(1, n))
    else:
        time.sleep(rng.uniform(0, 0.02))
        t.isend(np.full(2, float(r)), 0, Channel.GOSSIP).wait()


def check_any_channel_wait():
    """A receive from one peer on any channel, waited for: the channel is learnt on arrival."""
    if n == 1:
        return
    kinds = (Channel.MODEL, Channel.GRADIENT, Channel.GOSSIP)
    left = (r - 1) % n
    got = t.irecv(np.zeros(3), left, None)
    t.isend(np.full(3, float(r)), (r + 1) % n, kinds[r % 3]).wait()
    got.wait(timeout=20)
    assert got.channel is kinds[left % 3] and got.source == left, (got.channel, got.source)
    assert got.nbytes == 24


def check_wait_any_deadline():
    """wait_any on receives nobody answers raises at its deadline naming each of them."""
    t.step = 11
    left = (r - 1) % n
    handles = [t.irecv(np.zeros(1), left, Channel.EVAL), t.irecv(np.zeros(1), None, Channel.BENCH)]
    t0 = time.monotonic()
    try:
        wait_any(handles, timeout=0.3)
    except CommTimeout as exc:
        text = str(exc)
        assert "wait_any timed out after 0.3 s at step 11" in text, text
        assert f"receive (peer {left}, tag EVAL, step 11)" in text, text
        assert "receive (peer any, tag BENCH, step 11)" in text, text
    else:
        raise AssertionError("wait_any returned although nobody sent")
    assert 0.3 <= time.monotonic() - t0 < 6.0
    assert test_some(handles) == []
    assert all(h.cancel() for h in handles)
    assert wait_any(handles) is None
    t.step = -1


def check_request_set():
    """Persistent operations restarted for every message: data, sources, channels and bytes."""
    right, left = (r + 1) % n, (r - 1) % n
    got, out = np.zeros(4), np.zeros(4)
    ring = t.requests()
    assert ring.recv(got, left, None) == 0 and ring.send(out, right, Channel.GOSSIP) == 1
    t.reset_stats()
    for i in range(5):
        out[:] = 10 * r + i
        ring.start_all()
        assert t.stats[Channel.GOSSIP].sent == 32 * (i + 1)  # a send counts when started
        ring.wait_all(timeout=20)
        assert np.all(got == 10 * left + i) and not any(ring.active)
        assert ring.source[0] == left and ring.channel[0] is Channel.GOSSIP
        assert ring.nbytes[0] == 32 and t.stats[Channel.GOSSIP].recv == 32 * (i + 1)
    ring.wait_all()  # nothing active: returns at once
    assert ring.wait_any() is None
    ring.free()
    t.barrier()
    # Every other rank sends rank 0 three messages (small: they go out without being taken),
    # all there before rank 0 looks. It takes them with wait_any, restarting each receive
    # once reported: each is reported once, with its size, and in turn: a receive restarted
    # onto a message already there does not jump the queue of those completed before it.
    if r == 0:
        bufs = [np.zeros(n) for _ in range(n - 1)]
        inbox = t.requests()
        for q, buf in enumerate(bufs):
            inbox.recv(buf, q + 1, None)
        inbox.start_all()
        t.barrier()
        seen = []
        while len(seen) < 3 * (n - 1):
            k = inbox.wait_any(timeout=20)
            assert k is not None and inbox.source[k] == k + 1 and inbox.nbytes[k] == 8 * (k + 1)
            assert bufs[k][0] == k + 1 and inbox.channel[k] is Channel.MODEL
            seen.append(k)
            if seen.count(k) < 3:
                inbox.start(k)
        assert seen == list(range(n - 1)) * 3 and inbox.wait_any() is None, seen
        inbox.free()
    else:
        mine = t.requests()
        mine.send(np.full(r, float(r)), 0, Channel.MODEL)
        for _ in range(3):
            mine.start_all()
            mine.wait_all(timeout=20)
        mine.free()
        t.barrier()
    t.barrier()


def check_request_set_deadlines():
    """Waits on persistent receives nobody answers raise at their deadlines, naming each."""
    t.step = 13
    left = (r - 1) % n
    idle = t.requests()
    idle.recv(np.zeros(1), left, Channel.EVAL)
    idle.recv(np.zeros(1), None, None)
    idle.start_all()
    t.step = 14
    for wait, what in ((idle.wait_any, "wait_any timed out after 0.1 s at step 14 waiting for"),
                       (idle.wait_all, "wait_all timed out after 0.1 s at step 14 waiting for"),
                       (partial(idle.wait, 1), "receive timed out after 0.1 s")):
        t0 = time.monotonic()
        _expect_timeout(partial(wait, timeout=0.1), [what, "(peer any, tag any, step 13)"])
        assert 0.1 <= time.monotonic() - t0 < 5.0
    _expect_timeout(lambda: idle.wait_any(timeout=0.1), [f"receive (peer {left}, tag EVAL, "
                                                         "step 13)"])
    assert all(idle.active)
    idle.free()  # cancels both
    assert not any(idle.active) and idle.nbytes == [None, None]
    t.step = -1
    t.barrier()


def check_iallreduce():
    """The nonblocking allreduce equals numpy's sum of every rank's vector."""
    every = [np.random.default_rng([q, 7]).integers(-1000, 1000, 333).astype(np.float32)
             for q in range(n)]
    x = every[r].copy()
    t.reset_stats()
    h = t.iallreduce(x)
    expect = int(2 * (n - 1) * x.nbytes / n)
    assert t.stats[Channel.GRADIENT].sent == expect == t.stats[Channel.GRADIENT].recv
    h.wait()
    assert np.array_equal(x, np.sum(every, axis=0)), np.abs(x - np.sum(every, axis=0)).max()
    m = np.array([float(r), -float(r)])
    t.iallreduce(m, Channel.CONTROL, op="max").wait()
    assert m[0] == n - 1 and m[1] == 0


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


def check_window_epoch():
    """Epoch mode: operations complete on return, no locks; lock calls are refused."""
    w = Window(t, 8, np.float64, name="epoch")
    w.local[:] = r
    w.sync()
    t.barrier()
    peer = (r + 1) % n
    buf = np.empty(8)
    assert w.get(buf, peer) is buf and np.all(buf == peer), buf  # valid on return
    t.barrier()  # everyone has read before anyone adds
    w.accumulate(np.ones(8), 0)
    w.flush(0)
    t.barrier()
    if r == 0:
        w.sync()
        assert np.all(w.local == n), w.local
    t.barrier()  # rank n-1 puts into rank 0 next: not before rank 0 has checked the sum
    w.put(np.full(2, -1.0), peer, offset=6)
    w.flush(peer)
    t.barrier()
    w.sync()
    assert np.all(w.local[6:] == -1.0) and np.all(w.local[:6] == (n if r == 0 else r))
    try:
        with w.locked(peer):
            pass
    except WindowModeError as exc:
        assert "window 'epoch'" in str(exc) and "'locks'" in str(exc), exc
    else:
        raise AssertionError("locked() accepted in epoch mode")
    t.barrier()
    w.free()


def check_window_locks():
    """Locks mode: operations inside locked(rank) only; anything else is refused."""
    w = Window(t, 4, np.int64, name="locked", sync="locks")
    w.local[:] = r
    w.sync()
    t.barrier()
    peer = (r + 1) % n
    got = np.empty(4, np.int64)
    with w.locked(peer, "shared"):
        w.get(got, peer)
    assert np.all(got == peer), got
    t.barrier()  # everyone has read before anyone adds
    with w.locked(0, "exclusive"):
        w.accumulate(np.ones(4, np.int64), 0)
    t.barrier()
    if r == 0:
        w.sync()
        assert np.all(w.local == n), w.local
    for refused in (lambda: w.get(got, peer), w.flush_all):
        try:
            refused()
        except WindowModeError as exc:
            assert "window 'locked'" in str(exc), exc
        else:
            raise AssertionError("an operation outside any lock was accepted")
    t.barrier()
    w.free()


def check_fetch_and_add(make, value=3, reps=3):
    """All ranks add concurrently to counters on every rank: old values 0, v, 2v, ... each.

    ``make(count)`` builds the window; every rank of its transport adds to element ``k`` of
    every target ``k`` times over ``reps`` rounds in a rank-dependent order.
    """
    win, comm = make(4)
    m = comm.size
    comm.step = 3
    olds = {q: [] for q in range(m)}
    for _ in range(reps):
        for q in np.random.default_rng([7, comm.rank]).permutation(m):
            olds[int(q)].append(int(win.fetch_and_add(value, int(q), offset=int(q) % 4)))
    every = comm.allgather_obj(olds)
    mine = sorted(v for rank_olds in every for v in rank_olds[comm.rank])
    assert mine == [value * i for i in range(m * reps)], mine
    comm.barrier()
    win.sync()
    assert win.local[comm.rank % 4] == value * m * reps, win.local
    comm.barrier()
    win.free()
    if comm is not t:
        comm.free()


def _rma_counters(count):
    return Window(t, count, np.int64, name="counters"), t


def _shared_counters(count):
    node = t.split_shared()
    return SharedWindow(node, count, np.int64, name="shared-counters"), node


def check_shared():
    """Every rank of a node loads every segment; Sync orders stores within the epoch."""
    node = t.split_shared()
    sw = SharedWindow(node, 16, np.float32)
    assert np.all(sw.local == 0)
    sw.local[:] = node.rank + 1
    sw.fence()
    for q in range(node.size):
        assert np.all(sw.view(q) == q + 1)
    sw.fence()
    sw.local[0] = -1
    sw.sync()
    assert sw.view(node.rank)[0] == -1
    node.barrier()
    sw.free()
    node.free()


def check_inbox():
    """Everyone adds into everyone's inbox while owners drain: nothing lost, nothing twice."""
    d, reps = 5, 20
    box = Inbox(t, d, np.float32, name="inbox")
    got = np.zeros(d, np.float64)
    out = np.empty(d, np.float32)
    rng = np.random.default_rng([11, r])
    for _ in range(reps):
        for q in rng.permutation(n):
            box.add(np.full(d, r + 1, np.float32), int(q))
        got += box.drain(out)
    box.settle()
    t.barrier()
    got += box.drain(out)
    assert np.all(got == reps * n * (n + 1) / 2), got
    box.free()


def check_board():
    """Readers see one whole publish (every region from the same one) at any interleaving."""
    d = 300
    for direct in (True, False):
        a, b = np.full(d, -1, np.int64), np.full(7, -1, np.float32)
        board = Board(t, {"a": a, "b": b}, slots=2, name="board", direct=direct)
        board.publish({"a": a, "b": b}, -1)
        t.barrier()
        peer = (r + 1) % n
        ra, rb = np.empty_like(a), np.empty_like(b)
        for p in range(50):
            a[:] = p
            b[:] = p
            board.publish({"a": a, "b": b}, p)
            step = board.read(peer, {"a": ra, "b": rb})
            assert np.all(ra == step) and np.all(rb == step), (step, ra[:3], rb[:3])
        t.barrier()
        assert board.read(peer, {"b": rb}) == 49 and np.all(rb == 49)
        board.free()


def check_rma_deadlines():
    """A Get from a partner outside MPI, and a free it has not reached, time out cleanly.

    Odd ranks sleep in Python, even ranks read them. The Get is meaningful only where
    one-sided operations need the target's progress (the emulated cross-node setting): it must
    raise CommTimeout naming peer, window and step. The free's barrier cannot complete while a
    rank sleeps in any setting: a free that timed out is called again and then succeeds.
    """
    w = Window(t, 16, np.float32, name="stalled")
    t.step = 42
    flag = np.zeros(1)
    if r % 2 == 1:
        # Tell the reader we are leaving MPI (a small message goes out at once), then sleep.
        sent = t.isend(flag, r - 1, Channel.CONTROL)
        time.sleep(2.0)
        sent.wait()
    elif r + 1 < n:
        t.irecv(flag, r + 1, Channel.CONTROL).wait()
        t0 = time.monotonic()
        _expect_timeout(lambda: w.get(np.empty(16, np.float32), r + 1, timeout=0.4),
                        [f"peer {r + 1}", "get of window 'stalled'", "step 42"])
        assert 0.4 <= time.monotonic() - t0 < 1.2, time.monotonic() - t0
        _expect_timeout(lambda: w.free(timeout=0.3),
                        ["free of window 'stalled'", "peer all", "step 42"])
        assert time.monotonic() - t0 < 1.8, time.monotonic() - t0
    t.step = -1
    w.free()  # completes the timed-out Get once its target is inside MPI again


def _expect_timeout(fn, names):
    try:
        fn()
    except CommTimeout as exc:
        assert all(name in str(exc) for name in names), (str(exc), names)
    else:
        raise AssertionError(f"no CommTimeout naming {names}")


def check_split():
    half = t.split(r % 2)
    x = np.ones(2)
    half.allreduce(x)
    assert x[0] == len(range(r % 2, n, 2))
    half.free()
    workers = t.split(None if r == 0 else 1)  # rank 0, a server, stays out of the workers'
    if r == 0:
        assert workers is None
    else:
        assert (workers.rank, workers.size) == (r - 1, n - 1)
        assert workers.allreduce_scalar(float(r)) == n * (n - 1) / 2
        workers.free()


REMOTE = os.environ.get("MPIR_CVAR_NOLOCAL") == "1"  # one-sided needs the target's progress
checks = [check_allreduce, check_collectives, check_point_to_point,
          check_received_bytes_are_what_arrived, check_cancel, check_any_source,
          check_any_channel_wait, check_wait_any_deadline, check_request_set,
          check_request_set_deadlines, check_iallreduce, check_deadline,
          check_window_epoch, check_window_locks, lambda: check_fetch_and_add(_rma_counters),
          check_shared, lambda: check_fetch_and_add(_shared_counters), check_inbox, check_board,
          check_split]
if REMOTE:
    checks.append(check_rma_deadlines)
for check in checks:
    check()
    t.barrier()
if r == 0:
    print(f"comm checks passed on {n} ranks" + ("; RMA deadline checked" if REMOTE else ""),
          flush=True)
