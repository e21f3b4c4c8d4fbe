"""Channels, the deadline error, and handles of pending nonblocking operations.

A :class:`Handle` stands for one pending operation of the transport (or of a window): ``wait``
polls it with backoff (:func:`_backoff`) until it completes or its deadline passes, then
raises :class:`CommTimeout` naming the operation, the peer, the channel and the step.
:func:`wait_any` and :func:`test_some` do the same over many handles. A :class:`RequestSet`
holds persistent operations that are started again and again (a parameter server's messages)
and polls them together, with the same backoff, deadlines and accounting. Split from
:mod:`mpiopt.comm.transport`, which re-exports every name here.
"""

from __future__ import annotations

import collections
import enum
import itertools
import os
import time

from mpi4py import MPI

SPIN_S = 0.05  # poll without sleeping this long: most messages complete within it
# Polls between two yields of the core while spinning. A poll costs about half a microsecond; a
# yield that hands the core to a peer costs a context switch and the caches of both. Yielding
# after every poll cost a small parameter server about 5% of its rate on 4 ranks on 2 cores
# (bench ps at 10K floats: paired ratios 0.71-0.79 against 0.78-0.87 for every second poll);
# the latency it adds is one poll.
POLLS_PER_YIELD = 2


class Channel(enum.IntEnum):
    """Kinds of traffic; the value is the MPI tag used for point-to-point messages."""

    CONTROL = 1
    GRADIENT = 2
    MODEL = 3
    VOTE = 4  # signs on their way to the voters
    GOSSIP = 5
    EVAL = 6  # evaluation of the model(s): instrumentation, not counted as algorithm bytes
    BENCH = 7
    VOTE_RESULT = 8  # voted signs on their way back to every worker


_BYTE = MPI.BYTE
_startall = MPI.Prequest.Startall
_CHANNELS = [None] * (max(Channel) + 1)  # tag -> Channel: calling the enum costs ~0.4 us
for _c in Channel:
    _CHANNELS[_c] = _c


class CommTimeout(RuntimeError):
    """A communication did not complete before its deadline."""


def _copy_back(buf, host, nbytes: int | None = None) -> None:
    """Copy a staged host result into the device buffer it stands for.

    ``nbytes`` (a receive's real size) shorter than the buffer copies only that prefix, so the
    rest of ``buf`` keeps its contents as it would if MPI had received into it directly.
    """
    if host is buf or host is None:
        return
    # Synchronous from page-locked memory (no stream given): the host array may be leased
    # again as soon as this returns.
    if nbytes is None or nbytes >= host.nbytes:
        buf.set(host)
    else:
        k = nbytes // host.itemsize
        buf.reshape(-1)[:k].set(host.reshape(-1)[:k])


def _backoff(limit: float, spin: float = SPIN_S):
    """Yield between two polls until ``limit`` seconds have passed, then stop.

    The first ``spin`` seconds (``SPIN_S`` by default) give the core away after every
    ``POLLS_PER_YIELD`` polls (with more ranks than cores the peers being waited for need it;
    MPICH's own blocking waits do the same, every thousand polls), which also drives MPI
    progress on large messages; then the pauses grow to 2 ms so that an idle rank does not burn
    a core. The deadline is checked once spinning is over. A rank that expects a long wait (a
    server whose clients compute many steps between messages) spins less: yielding still
    takes a share of a core that ranks beside it need.
    """
    now = time.monotonic()
    deadline, spin_until, pause, polls = now + limit, now + spin, 1e-5, 0
    while True:
        now = time.monotonic()
        if now <= spin_until:
            polls += 1
            if polls == POLLS_PER_YIELD:
                os.sched_yield()
                polls = 0
        elif now > deadline:
            return
        else:
            time.sleep(pause)
            pause = min(pause * 2, 2e-3)
        yield


class Handle:
    """A pending nonblocking operation with a deadline.

    ``wait`` polls the request with backoff (see :func:`_backoff`) and raises
    :class:`CommTimeout` naming the peer, the channel and the step when the deadline passes.
    ``cancel`` is bounded the same way. A receive's handle also tells, once done, where its
    message came from (``source``, ``channel``) and its size (``nbytes``).

    Args:
        transport: the :class:`~mpiopt.comm.transport.Transport` of the operation (its
            deadline, step and counters).
        request: the MPI request.
        what: the operation's name in errors (``send``, ``get of window 'board'``...).
        peer: the peer (a rank, ``all``, ``any``) in errors.
        channel: the channel its time is charged to.
        finish: called once when the operation completes (staged data copied back).
        release: called once when MPI is done with the buffers (staging leases returned).
    """

    source: int | None = None  # set when a receive completes
    nbytes: int | None = None  # bytes a receive got, set when it completes
    cancelled = False  # set by a successful cancel
    _status = None  # an MPI.Status where completion must be read (receives, cancels)
    _sent = 0  # bytes charged when a send was posted (refunded if it is cancelled)

    def __init__(self, transport, request, what: str, peer, channel: Channel,
                 finish=None, release=None):
        self.transport = transport
        self.request = request
        self.what = what
        self.peer = peer
        self.channel = channel
        self.step = transport.step
        self._finish = finish  # on completion only (copies a staged receive back)
        self._release = release  # once, on completion or cancel (returns staging leases)
        self._cancel_posted = False
        self.done = False

    def test(self) -> bool:
        """Return True if the operation has completed (finishing it if so)."""
        if not self.done and self.request.Test(self._status):
            self._complete()
        return self.done

    def wait(self, timeout: float | None = None) -> None:
        """Block until completion or raise CommTimeout after ``timeout`` seconds."""
        if self.done:
            return
        t0 = time.perf_counter()
        self._poll(timeout, "timed out after {limit:g} s")
        self._complete()  # first: a receive on any channel learns its channel here
        self.transport._charge(self.channel, 0, 0, time.perf_counter() - t0)

    def _poll(self, timeout: float | None, problem: str) -> None:
        """Test the request with backoff until it completes; raise past ``timeout`` seconds.

        ``problem`` is the error's wording, formatted with ``limit``.
        """
        limit = self.transport.timeout if timeout is None else timeout
        if not self.request.Test(self._status):
            for _ in _backoff(limit):
                if self.request.Test(self._status):
                    return
            raise CommTimeout(self.describe(problem.format(limit=limit)))

    def _complete(self) -> None:
        self.done = True
        if self._finish is not None:
            self._finish()
        self._let_go()

    def _let_go(self) -> None:
        if self._release is not None:
            self._release()
            self._release = None

    def cancel(self, timeout: float | None = None) -> bool:
        """Cancel the operation if it has not completed; return True if MPI cancelled it.

        False means it completed anyway and was finished as ``wait`` would (a receive's data
        copied and counted; a send delivered: MPICH cannot cancel a send to another rank, an
        eager one completes at once and its message still reaches the receiver). If it neither
        completes nor is cancelled within ``timeout`` seconds (default: the transport's) this
        raises :class:`CommTimeout` and the handle stays pending, its buffers still in MPI's
        hands: a rendezvous-sized send to a rank that never receives does so in MPICH.
        """
        if self.done:
            return self.cancelled
        if not self._cancel_posted:
            self.request.Cancel()
            self._cancel_posted = True
        if self._status is None:
            self._status = MPI.Status()
        self._poll(timeout, "could not be cancelled within {limit:g} s")
        if not self._status.Is_cancelled():
            self._complete()
            return False
        self.done = self.cancelled = True
        if self._sent:
            self.transport._charge(self.channel, -self._sent, 0, 0.0)
        self._let_go()
        return True

    def where(self) -> str:
        """Return ``(peer P, tag T, step S)`` for messages about this operation."""
        return _where(self.peer, self.channel, self.step)

    def describe(self, problem: str) -> str:
        return f"{self.what} {problem} {self.where()}"


class _Receive(Handle):
    """A receive; on completion its source, tag and size are read from the MPI status.

    Its bytes are counted then, as many as arrived, on the channel they arrived on: a
    cancelled or never-completed receive counts nothing.
    """

    def __init__(self, transport, request, buf, host, source, channel):
        super().__init__(transport, request, "receive", "any" if source is None else source,
                         channel, release=transport._releaser((buf, host)))
        self._status = MPI.Status()
        self._buf, self._host = buf, host

    def _complete(self) -> None:
        status = self._status
        self.source = status.Get_source()
        self.channel = _CHANNELS[status.Get_tag()]
        self.nbytes = status.Get_count(MPI.BYTE)
        self.transport._charge(self.channel, 0, self.nbytes, 0.0)
        _copy_back(self._buf, self._host, self.nbytes)
        super()._complete()


def wait_all(handles, timeout: float | None = None) -> None:
    """Wait for every handle, each under the same overall deadline."""
    if not handles:
        return
    limit = handles[0].transport.timeout if timeout is None else timeout
    deadline = time.monotonic() + limit
    for h in handles:
        h.wait(max(deadline - time.monotonic(), 0.0))


_turn = itertools.count()  # where wait_any starts looking, so no pending handle starves


def wait_any(handles, timeout: float | None = None) -> int | None:
    """Wait until one of ``handles`` completes; return its index (finishing it).

    Handles already done are skipped, as MPI skips inactive requests: calling this until it
    returns None reports every handle exactly once. Polls like :meth:`Handle.wait`; at the
    deadline (default: the transport's) raises :class:`CommTimeout` listing what is pending.
    """
    pending = [i for i, h in enumerate(handles) if not h.done]
    if not pending:
        return None
    k = next(_turn) % len(pending)
    order = pending[k:] + pending[:k]
    first = handles[pending[0]].transport
    limit = first.timeout if timeout is None else timeout
    t0 = time.perf_counter()
    found = next((i for i in order if handles[i].test()), None)
    if found is None:
        for _ in _backoff(limit):
            found = next((i for i in order if handles[i].test()), None)
            if found is not None:
                break
        else:
            waiting = ", ".join(f"{handles[i].what} {handles[i].where()}" for i in pending)
            raise CommTimeout(f"wait_any timed out after {limit:g} s at step {first.step} "
                              f"waiting for any of: {waiting}")
    first._charge(handles[found].channel, 0, 0, time.perf_counter() - t0)
    return found


def test_some(handles) -> list[int]:
    """Return the indices of the handles that complete now (finishing them), without waiting.

    Handles already done are skipped, so each index is reported once over repeated calls.
    """
    return [i for i, h in enumerate(handles) if not h.done and h.test()]


test_some.__test__ = False  # not a test, for pytest's collection of modules importing it


class RequestSet:
    """Persistent point-to-point operations between fixed buffers, started again and again.

    A parameter server's receive from each worker and answer to it, a worker's push and the
    answer to it: the same message between the same buffers every update. Each operation is
    set up once (``Recv_init``, ``Send_init``) and started for every message (:meth:`start`,
    :meth:`start_all`); completion is polled with one ``Testany`` or ``Testall`` over the raw
    requests, with the backoff of :meth:`Handle.wait`, so no handle object is built per
    message and no Python loop tests each operation. Every wait has a deadline (default: the
    transport's) and raises :class:`CommTimeout` naming each pending operation's peer, tag and
    the step at which it was started. Bytes and seconds are counted as for handles: a send's
    bytes when it is started, a receive's when it completes (as many as arrived, on the
    channel they arrived on), the seconds of a wait on the channel of what completed.

    Host buffers only (the parameter servers run on host memory): a device buffer would need
    staging at every start, which the operations of :class:`Transport` do per message.

    Args:
        transport: the :class:`~mpiopt.comm.transport.Transport` whose communicator, deadline,
            step and counters the operations use.
    """

    def __init__(self, transport):
        self.transport = transport
        self.requests: list = []  # the persistent MPI requests, in the order added
        self.active: list[bool] = []  # started and not yet reported complete
        # Per operation: the channel (a receive's: that of its last message, once complete),
        # and for receives the source and size of the last message.
        self.channel: list[Channel | None] = []
        self.source: list[int | None] = []
        self.nbytes: list[int | None] = []
        self._ops: list[tuple] = []  # (what, peer, posted channel, bytes a start sends)
        self._steps: list[int] = []  # the step at which each was last started
        self._sent: dict[Channel, int] = {}  # bytes start_all sends, per channel
        self._receives: list[int] = []  # indices of the receives
        self._statuses: list = []
        self._status = MPI.Status()
        self._ready: collections.deque = collections.deque()  # completed, not yet reported
        self._cancelled = False  # whether free() has cancelled receives (statuses to check)

    def __len__(self) -> int:
        return len(self.requests)

    def recv(self, buf, source: int | None, channel: Channel | None) -> int:
        """Add a receive into ``buf`` (``source``, ``channel`` None: any); return its index."""
        _host_only(buf)
        req = self.transport.comm.Recv_init(
            buf, MPI.ANY_SOURCE if source is None else source,
            MPI.ANY_TAG if channel is None else int(channel))
        i = self._add(req, ("receive", "any" if source is None else source, channel, 0))
        self.source[i] = source  # known: never read from the status again
        self._receives.append(i)
        return i

    def send(self, buf, dest: int, channel: Channel) -> int:
        """Add a send of ``buf`` to ``dest`` on ``channel``; return its index."""
        _host_only(buf)
        req = self.transport.comm.Send_init(buf, dest, int(channel))
        self._sent[channel] = self._sent.get(channel, 0) + int(buf.nbytes)
        return self._add(req, ("send", dest, channel, int(buf.nbytes)))

    def _add(self, request, op: tuple) -> int:
        for column, value in ((self.requests, request), (self.active, False),
                              (self.channel, op[2]), (self.source, None), (self.nbytes, None),
                              (self._ops, op), (self._steps, -1),
                              (self._statuses, MPI.Status())):
            column.append(value)
        return len(self.requests) - 1

    def start(self, i: int) -> None:
        """Start operation ``i`` (it must not be active); a send's bytes are counted now."""
        self.requests[i].Start()
        t = self.transport
        self.active[i] = True
        self._steps[i] = t.step
        _, _, channel, sent = self._ops[i]
        if sent:
            t._charge_sent(channel, sent)

    def start_all(self) -> None:
        """Start every operation, in the order added (none may be active)."""
        _startall(self.requests)
        t, n = self.transport, len(self.requests)
        self.active = [True] * n
        self._steps = [t.step] * n
        for channel, sent in self._sent.items():  # one channel, in practice
            t._charge_sent(channel, sent)

    def wait_any(self, timeout: float | None = None, spin: float = SPIN_S) -> int | None:
        """Wait until one active operation completes; return its index (None if none is active).

        ``spin``: seconds of polling without sleeping first (see :func:`_backoff`).

        Each completion is reported once, as by :func:`wait_any`, and in turn: one poll
        (``Testsome``) completes every operation that has, and they are reported in that
        order before anything that completes later, so no operation waits behind another
        that completes again and again (a fast worker's pushes). What :meth:`wait` or
        :meth:`wait_all` completed is not reported here.
        """
        if self._ready:
            return self._ready.popleft()
        requests, statuses = self.requests, self._statuses
        t0 = time.perf_counter()
        done = MPI.Request.Testsome(requests, statuses)
        if done == []:  # some are active, none has completed
            limit = self.transport.timeout if timeout is None else timeout
            for _ in _backoff(limit, spin):
                done = MPI.Request.Testsome(requests, statuses)
                if done:
                    break
            else:
                raise CommTimeout(self._pending(f"wait_any timed out after {limit:g} s",
                                                "any of: "))
        if done is None:
            return None
        seconds = time.perf_counter() - t0  # charged to the first of them
        for i, status in zip(done, statuses):  # statuses in the order of the indices
            self._complete(i, status, seconds)
            seconds = 0.0
        if len(done) > 1:
            self._ready.extend(done[1:])
        return done[0]

    def wait(self, i: int, timeout: float | None = None) -> None:
        """Wait until operation ``i`` completes (at once if it is not active)."""
        if not self.active[i]:
            return
        request, status = self.requests[i], self._status
        t0 = time.perf_counter()
        if not request.Test(status):
            limit = self.transport.timeout if timeout is None else timeout
            for _ in _backoff(limit):
                if request.Test(status):
                    break
            else:
                what, peer, channel, _ = self._ops[i]
                raise CommTimeout(f"{what} timed out after {limit:g} s "
                                  f"{_where(peer, channel, self._steps[i])}")
        self._complete(i, status, time.perf_counter() - t0)

    def wait_all(self, timeout: float | None = None) -> None:
        """Wait until every active operation completes."""
        requests, statuses = self.requests, self._statuses
        t0 = time.perf_counter()
        if not MPI.Request.Testall(requests, statuses):
            limit = self.transport.timeout if timeout is None else timeout
            for _ in _backoff(limit):
                if MPI.Request.Testall(requests, statuses):
                    break
            else:
                raise CommTimeout(self._pending(f"wait_all timed out after {limit:g} s", ""))
        seconds = time.perf_counter() - t0  # charged to the first receive, or the first send
        active = self.active
        for i in self._receives:
            if active[i]:
                self._received(i, statuses[i], seconds)
                seconds = 0.0
        if seconds and True in active:
            i = active.index(True)
            self.transport._charge(self._ops[i][2], 0, 0, seconds)
        self.active = [False] * len(active)

    def _complete(self, i: int, status, seconds: float) -> None:
        what, _, channel, _ = self._ops[i]
        if what == "receive":
            self._received(i, status, seconds)
        else:
            self.active[i] = False
            if seconds:
                self.transport._charge(channel, 0, 0, seconds)

    def _received(self, i: int, status, seconds: float) -> None:
        """Finish receive ``i``: what arrived, from where, on which channel; count it."""
        self.active[i] = False
        if self._cancelled and status.Is_cancelled():  # a cancelled receive counts nothing
            return
        if self._ops[i][1] == "any":  # from any rank: which one
            self.source[i] = status.Get_source()
        channel = self.channel[i] = _CHANNELS[status.Get_tag()]
        self.nbytes[i] = nbytes = status.Get_count(_BYTE)
        self.transport._charge_received(channel, nbytes, seconds)

    def _pending(self, problem: str, which: str) -> str:
        waiting = ", ".join(f"{what} {_where(peer, channel, step)}"
                            for (what, peer, channel, _), step, active
                            in zip(self._ops, self._steps, self.active) if active)
        return f"{problem} at step {self.transport.step} waiting for {which}{waiting}"

    def free(self, timeout: float | None = None) -> None:
        """Cancel the receives still active, wait for the sends, release every request."""
        for (what, *_), request, active in zip(self._ops, self.requests, self.active):
            if active and what == "receive":
                request.Cancel()
                self._cancelled = True
        self.wait_all(timeout)
        for request in self.requests:
            request.Free()
        self.requests = []
        self._ready.clear()


def _where(peer, channel, step: int) -> str:
    tag = "any" if channel is None else channel.name
    return f"(peer {peer}, tag {tag}, step {step})"


def _host_only(buf) -> None:
    if type(buf).__module__.startswith("cupy"):
        raise TypeError("RequestSet takes host buffers; device buffers go through the "
                        "transport's isend and irecv, which stage them")
