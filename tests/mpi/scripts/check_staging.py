"""Host staging of device buffers in the transport, with stand-in device arrays; any size.

A ``StandIn`` looks like a CuPy array to the transport (its type's module starts with "cupy")
but exposes no buffer to MPI, so every operation here only works if the transport staged it
through a host array. The pool's allocator is plain numpy (no pinned memory without CuPy).

Run as ``mpiexec -n N python -m mpi4py check_staging.py``.
"""

import numpy as np

from mpiopt import backend
from mpiopt.comm.transport import Channel, Transport, wait_all


class StandIn:
    """A device array's surface: shape, dtype, nbytes, device, get(out=), set()."""

    __module__ = "cupy_stand_in"

    def __init__(self, values, view=False):
        self._a = values if view else np.array(values)

    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    nbytes = property(lambda self: self._a.nbytes)
    size = property(lambda self: self._a.size)

    def get(self, out):
        assert out.shape == self._a.shape and out.dtype == self._a.dtype, (out.shape, out.dtype)
        out[...] = self._a

    def set(self, host):
        assert host.shape == self._a.shape and host.dtype == self._a.dtype
        self._a[...] = host

    def reshape(self, *shape):
        return StandIn(self._a.reshape(*shape), view=True)

    def __getitem__(self, index):
        return StandIn(self._a[index], view=True)

    def host(self):
        return self._a.copy()


synced = []
backend.synchronize = lambda x, stream=None: synced.append(x)

t = Transport(timeout=30)
t.staging = backend.StagingPool(lambda shape, dtype: np.zeros(shape, dtype), keep=4)
r, n = t.rank, t.size


def settled():
    assert t.staging.leased == 0, t.staging.leased
    assert len(t.staging) <= t.staging.keep


def check_blocking():
    x = StandIn(np.full(1000, r + 1, np.float32))
    t.allreduce(x)
    assert np.all(x.host() == n * (n + 1) / 2) and synced[-1] is x
    b = StandIn(np.arange(5.0) if r == 0 else np.zeros(5))
    t.bcast(b, root=0)
    assert np.array_equal(b.host(), np.arange(5.0))
    every = StandIn(np.empty((n, 3), np.int32))
    t.allgather(StandIn(np.full(3, r, np.int32)), every)
    assert np.array_equal(every.host()[:, 0], np.arange(n))
    got = StandIn(np.empty(n, np.int64))
    t.alltoall(StandIn(np.array([r * 100 + j for j in range(n)], np.int64)), got)
    assert np.array_equal(got.host(), np.arange(n) * 100 + r)
    root = StandIn(np.zeros((n, 2), np.float32))
    t.gather(StandIn(np.full(2, r, np.float32)), root, root=n - 1)
    if r == n - 1:
        assert np.array_equal(root.host()[:, 1], np.arange(n))
    settled()


def check_sends_in_flight_do_not_share_a_host_array():
    # Equal shapes, different contents, all in flight at once: one shared host array per
    # shape would deliver the last one written to every receiver.
    right, left = (r + 1) % n, (r - 1) % n
    a, b = StandIn(np.full(64, 10 * r + 1.0)), StandIn(np.full(64, 10 * r + 2.0))
    ga, gb = StandIn(np.zeros(64)), StandIn(np.zeros(64))
    wait_all([t.irecv(ga, left, Channel.MODEL), t.irecv(gb, right, Channel.GOSSIP),
              t.isend(a, right, Channel.MODEL), t.isend(b, left, Channel.GOSSIP)])
    assert np.all(ga.host() == 10 * left + 1.0) and np.all(gb.host() == 10 * right + 2.0)
    settled()


def check_nonblocking_collectives():
    every = StandIn(np.empty((n, 4), np.float64))
    h = t.iallgather(StandIn(np.full(4, float(r))), every)
    b = StandIn(np.arange(3.0) if r == 0 else np.zeros(3))
    g = t.ibcast(b, root=0)
    x = StandIn(np.full((2, 3), r + 1.0))
    s = t.iallreduce(x)
    wait_all([h, g, s])
    assert np.array_equal(every.host()[:, 0], np.arange(n, dtype=np.float64))
    assert np.array_equal(b.host(), np.arange(3.0))
    assert np.all(x.host() == n * (n + 1) / 2) and synced[-1] is x
    settled()


def check_short_message_keeps_the_rest_of_the_buffer():
    # A staged receive copies back only what arrived, as MPI receiving directly would.
    right, left = (r + 1) % n, (r - 1) % n
    got = StandIn(np.full((2, 4), -1.0))
    h = t.irecv(got, None, Channel.MODEL)
    wait_all([h, t.isend(StandIn(np.full(3, float(r))), right, Channel.MODEL)])
    assert h.source == left and h.nbytes == 24
    assert np.all(got.host().ravel()[:3] == left) and np.all(got.host().ravel()[3:] == -1.0)
    settled()


def check_cancelled_receive_returns_its_lease():
    h = t.irecv(StandIn(np.zeros(16)), r, Channel.BENCH)  # nobody sends on BENCH
    assert t.staging.leased == 1
    assert h.cancel() is True and t.stats[Channel.BENCH].recv == 0
    settled()


def check_shapes_change_at_one_size():
    for shape in ((4, 2), (8,), (2, 4)):
        x = StandIn(np.ones(shape, np.float32))
        t.allreduce(x)
        assert x.shape == shape and np.all(x.host() == n)
    settled()


check_blocking()
check_sends_in_flight_do_not_share_a_host_array()
check_nonblocking_collectives()
check_short_message_keeps_the_rest_of_the_buffer()
check_cancelled_receive_returns_its_lease()
check_shapes_change_at_one_size()
t.barrier()
t.free()
assert len(t.staging) == 0
if r == 0:
    print(f"staging checks passed on {n} ranks", flush=True)
