"""One-sided windows: RMA windows over ``Win.Allocate`` and node-local shared memory.

Synchronisation. A :class:`Window` lives in one of two modes, chosen at creation:

- ``epoch`` (the default): one passive-target epoch over every rank, opened with
  ``Lock_all(MODE_NOCHECK)`` at creation and closed by :meth:`Window.free`. No operation waits
  for a lock grant; consistency is the caller's business (a sequence lock, atomics).
- ``locks``: no standing epoch; operations on a rank go inside :meth:`Window.locked`.

Every method is valid in its mode and raises :class:`WindowModeError` otherwise.

Completion. Operations are request-based (``Rget``, ``Rput``, ``Raccumulate``,
``Rget_accumulate``) and polled by a :class:`~mpiopt.comm.transport.Handle` under a deadline; a
target that stays outside MPI past it raises :class:`~mpiopt.comm.transport.CommTimeout` naming
the operation, the window, the peer and the step. Reads (``get``, ``get_accumulate``,
``fetch_and_add``) are complete when they return: the result is valid. Writes (``put``,
``accumulate``) return once the origin buffer may be reused; the target sees them at the
latest after :meth:`Window.flush` or :meth:`Window.free`, and before any later
accumulate-family read of the same elements by this rank (MPI's default
``accumulate_ordering``). The calls MPI only offers blocking -- ``Lock``, ``Unlock``,
``Flush``, ``Unlock_all``, ``Win.Free`` -- run under the transport's watchdog, which aborts the
job with the same names if one outlives the deadline; ``free`` first passes a nonblocking
barrier polled under the deadline, so a rank that never arrives raises ``CommTimeout`` instead of
hanging the others in the collective ``Win.Free``.

Atomicity. Windows are created with the ``accumulate_ops=same_op_no_op`` hint: concurrent
accumulate-family operations on one element are atomic only if they use one op and
``no_op``. Mix ``sum`` with ``no_op`` (as :class:`~mpiopt.comm.board.Inbox` does), never
``sum`` with ``replace``.

Progress. MPICH progresses passive-target RMA only while the target rank is inside MPI: a
``Get`` from a rank that computes without calling MPI waits for it. Asynchronous algorithms
therefore either read node-local peers directly (:class:`SharedWindow`, or
:meth:`Window.shared_view` of an RMA window: plain loads from shared memory, no progress
needed), or run a :class:`ProgressThread` (a helper thread that enters MPI every millisecond),
or run with MPICH's asynchronous progress (``MPIR_CVAR_ASYNC_PROGRESS=1``), or call
:meth:`Window.progress` from their loops.
"""

from __future__ import annotations

import contextlib
import threading

import numpy as np
from mpi4py import MPI

from mpiopt.comm.transport import Channel, CommTimeout, Handle, Transport, wait_all

_LOCKS = {"exclusive": MPI.LOCK_EXCLUSIVE, "shared": MPI.LOCK_SHARED}
_OPS = {"sum": MPI.SUM, "replace": MPI.REPLACE, "no_op": MPI.NO_OP, "max": MPI.MAX,
        "min": MPI.MIN}
SYNC_MODES = ("epoch", "locks")


class WindowModeError(RuntimeError):
    """A window method was called where its synchronisation mode does not allow it."""


def _allocate(factory, nbytes: int, unit: int, comm):
    """Create a window with ``factory`` and the ``accumulate_ops`` hint (see module doc)."""
    info = MPI.Info.Create()
    info.Set("accumulate_ops", "same_op_no_op")
    try:
        return factory(nbytes, unit, info, comm=comm)
    finally:
        info.Free()


def _mpi_type(dtype: np.dtype):
    return MPI._typedict[dtype.char]


def _free_collective(owner, timeout: float | None, before) -> None:
    """Free ``owner.win`` once every rank has arrived (an ibarrier polled under the deadline).

    A free that timed out may be called again: it waits for the same barrier.
    """
    t = owner.transport
    if owner._arrival is None:
        owner._arrival = t.ibarrier(Channel.CONTROL)
        owner._arrival.what = f"free of window '{owner.name}': barrier"
    owner._arrival.wait(timeout)
    before()
    t._call(f"free of window '{owner.name}'", "all", Channel.CONTROL, 0, 0, owner.win.Free)


class Window:
    """An RMA window of ``count`` elements of ``dtype`` on every rank of a transport.

    Collective: every rank creates it and frees it together.

    Args:
        transport: the transport whose communicator the window spans.
        count: elements exposed by each rank.
        dtype: element type (numpy dtype).
        channel: the channel that RMA bytes and seconds are counted on.
        name: what errors call the window (also its MPI name).
        sync: ``epoch`` (one ``Lock_all(MODE_NOCHECK)`` epoch for the window's life) or
            ``locks`` (operations inside :meth:`locked`).
    """

    def __init__(self, transport: Transport, count: int, dtype=np.float32,
                 channel: Channel = Channel.MODEL, name: str = "window", sync: str = "epoch"):
        if sync not in SYNC_MODES:
            raise ValueError(f"sync: {sync!r}; valid: {', '.join(SYNC_MODES)}")
        self.transport, self.channel, self.name, self.sync_mode = transport, channel, name, sync
        self.dtype = np.dtype(dtype)
        self.count = int(count)
        self.win = _allocate(MPI.Win.Allocate, max(self.count, 1) * self.dtype.itemsize,
                             self.dtype.itemsize, transport.comm)
        self.win.Set_name(name)
        self.local = np.frombuffer(self.win.tomemory(), dtype=self.dtype)[: self.count]
        self.local[:] = 0
        self._type = _mpi_type(self.dtype)
        self._views: dict = {}
        self._held: dict[int, str] = {}  # ranks locked now (locks mode)
        self._orphans: list[Handle] = []  # operations that timed out, completed at free
        self._arrival: Handle | None = None  # the barrier before Win.Free
        transport.barrier()  # everyone's memory is zeroed before anyone reads it
        if sync == "epoch":
            self.win.Lock_all(MPI.MODE_NOCHECK)

    # ----------------------------------------------------------------- direct access

    def shared_view(self, rank: int) -> np.ndarray | None:
        """Return ``rank``'s window memory as an array if this rank can load it directly.

        Ranks of one node share the memory of a ``Win.Allocate`` window in MPICH (MPI 4's
        ``Win.Shared_query``); reading it is then a plain copy that needs nothing from the
        target. Returns None for a peer on another node (use :meth:`get`).
        """
        if rank in self._views:
            return self._views[rank]
        view = None
        try:
            mem, _ = self.win.Shared_query(rank)
            arr = np.frombuffer(mem, dtype=self.dtype) if mem is not None else None
            if arr is not None and arr.size >= self.count:
                view = arr[: self.count]
        except (MPI.Exception, ValueError, TypeError):
            view = None
        self._views[rank] = view
        return view

    def sync(self) -> None:
        """Order this rank's loads and stores on window memory (``Win.Sync``, a barrier).

        Valid in either mode: in ``locks`` mode outside a lock of our own window it takes a
        shared one around the ``Sync``, which needs a passive-target epoch.
        """
        me = self.transport.rank
        if self.sync_mode == "epoch" or self._held:
            self.win.Sync()
        else:
            with self.locked(me, "shared"):
                self.win.Sync()

    def progress(self) -> None:
        """Enter MPI briefly so that pending passive-target operations on us progress."""
        MPI.Request.Testall([])
        self.transport.comm.Iprobe(source=MPI.ANY_SOURCE, tag=MPI.ANY_TAG)

    # ----------------------------------------------------------------- synchronisation

    @contextlib.contextmanager
    def locked(self, rank: int, mode: str = "shared"):
        """Hold a passive-target lock on ``rank``'s window (``shared`` or ``exclusive``).

        ``locks`` mode only. ``Lock`` and ``Unlock`` block in MPI (the grant, and the
        completion of the epoch's operations, need the target's progress): they run under the
        transport's watchdog, which aborts the job naming the window, the peer and the step
        if they outlive the deadline. Operations inside are polled under their own deadline.
        """
        self._need("locked", "locks")
        if rank in self._held:
            raise WindowModeError(f"window '{self.name}': rank {rank} is already locked "
                                  f"({self._held[rank]})")
        t = self.transport
        t._call(f"lock of window '{self.name}'", rank, self.channel, 0, 0,
                self.win.Lock, rank, _LOCKS[mode])
        self._held[rank] = mode
        try:
            yield self
        finally:
            del self._held[rank]
            t._call(f"unlock of window '{self.name}'", rank, self.channel, 0, 0,
                    self.win.Unlock, rank)

    def flush(self, rank: int) -> None:
        """Complete at ``rank`` every write this rank issued to it (``Win.Flush``).

        Blocking in MPI (it may need the target's progress): bounded by the watchdog.
        """
        self._check(rank, "flush")
        self.transport._call(f"flush of window '{self.name}'", rank, self.channel, 0, 0,
                             self.win.Flush, rank)

    def flush_all(self) -> None:
        """Complete every write this rank issued, at every target (``epoch`` mode)."""
        self._need("flush_all", "epoch")
        self.transport._call(f"flush of window '{self.name}'", "all", self.channel, 0, 0,
                             self.win.Flush_all)

    def _need(self, what: str, mode: str) -> None:
        if self.sync_mode != mode:
            raise WindowModeError(f"window '{self.name}': {what} needs sync mode {mode!r}; "
                                  f"this window was created with {self.sync_mode!r}")

    def _check(self, rank: int, what: str) -> None:
        if self.sync_mode == "locks" and rank not in self._held:
            raise WindowModeError(f"window '{self.name}' is in locks mode: {what} on rank "
                                  f"{rank} must run inside locked({rank})")

    # ----------------------------------------------------------------- operations

    # One-sided traffic is charged to the origin, the only rank that knows of it, in both
    # columns: what crosses the network at its request counts as sent and as received, so that
    # totals over ranks agree with two-sided traffic. Traffic to oneself is free.

    def charge(self, rank: int, nbytes: int, channel: Channel | None = None) -> None:
        """Count ``nbytes`` moved from or to ``rank`` (also by direct loads or stores)."""
        if rank != self.transport.rank:
            self.transport._charge(self.channel if channel is None else channel, nbytes,
                                   nbytes, 0.0)

    def _start(self, what: str, rank: int, post, nbytes: int, channel=None) -> Handle:
        self._check(rank, what)
        req = post()
        self.charge(rank, nbytes, channel)
        return Handle(self.transport, req, f"{what} of window '{self.name}'", rank,
                      self.channel if channel is None else channel)

    def _finish(self, handle: Handle, timeout: float | None) -> None:
        self.wait_all([handle], timeout)

    def wait_all(self, handles: list[Handle], timeout: float | None = None) -> None:
        """Wait for operations started on this window, all under one deadline.

        On CommTimeout the unfinished ones stay in MPI's hands; :meth:`free` completes them.
        """
        try:
            wait_all(handles, timeout)
        except CommTimeout:
            self._orphans.extend(h for h in handles if not h.done)
            raise

    def _target(self, offset: int, count: int):
        return (int(offset), int(count), self._type)

    def iget(self, out: np.ndarray, rank: int, offset: int = 0,
             channel: Channel | None = None) -> Handle:
        """Start reading ``out.size`` elements of ``rank``'s window from ``offset``."""
        return self._start("get", rank, lambda: self.win.Rget(
            out, rank, self._target(offset, out.size)), out.nbytes, channel)

    def get(self, out: np.ndarray, rank: int, offset: int = 0, channel: Channel | None = None,
            timeout: float | None = None) -> np.ndarray:
        """Read ``out.size`` elements of ``rank``'s window from ``offset``; valid on return.

        ``channel`` overrides the window's channel for this read's accounting (EVAL reads).
        """
        self._finish(self.iget(out, rank, offset, channel), timeout)
        return out

    def iput(self, buf: np.ndarray, rank: int, offset: int = 0) -> Handle:
        """Start writing ``buf`` into ``rank``'s window at ``offset``."""
        return self._start("put", rank, lambda: self.win.Rput(
            buf, rank, self._target(offset, buf.size)), buf.nbytes)

    def put(self, buf: np.ndarray, rank: int, offset: int = 0,
            timeout: float | None = None) -> None:
        """Write ``buf`` into ``rank``'s window at ``offset``; ``buf`` is free on return."""
        self._finish(self.iput(buf, rank, offset), timeout)

    def iaccumulate(self, buf: np.ndarray, rank: int, offset: int = 0,
                    op: str = "sum") -> Handle:
        """Start combining ``buf`` into ``rank``'s window element-wise with ``op``."""
        return self._start("accumulate", rank, lambda: self.win.Raccumulate(
            buf, rank, self._target(offset, buf.size), op=_OPS[op]), buf.nbytes)

    def accumulate(self, buf: np.ndarray, rank: int, offset: int = 0, op: str = "sum",
                   timeout: float | None = None) -> None:
        """Combine ``buf`` into ``rank``'s window (atomic per element); ``buf`` free on return."""
        self._finish(self.iaccumulate(buf, rank, offset, op), timeout)

    def iget_accumulate(self, buf: np.ndarray | None, out: np.ndarray, rank: int,
                        offset: int = 0, op: str = "sum") -> Handle:
        """Start :meth:`get_accumulate`; ``out`` is valid once the handle completes."""
        origin = out if buf is None else buf
        moved = out.nbytes if op == "no_op" else out.nbytes + origin.nbytes
        return self._start("get_accumulate", rank, lambda: self.win.Rget_accumulate(
            origin, out, rank, self._target(offset, out.size), op=_OPS[op]), moved)

    def get_accumulate(self, buf: np.ndarray | None, out: np.ndarray, rank: int,
                       offset: int = 0, op: str = "sum",
                       timeout: float | None = None) -> np.ndarray:
        """Combine ``buf`` into ``rank``'s elements; their old values land in ``out``.

        Atomic per element against other accumulate-family operations with the same op or
        ``no_op`` (``op="no_op"`` is an atomic read; ``buf`` is then ignored).
        """
        self._finish(self.iget_accumulate(buf, out, rank, offset, op), timeout)
        return out

    def fetch_and_add(self, value, rank: int, offset: int = 0, timeout: float | None = None):
        """Atomically add ``value`` to one element of ``rank``'s window; return the old value.

        Complete on return: the old value has arrived (and the add was applied before it
        was read).
        """
        origin = np.array([value], dtype=self.dtype)
        result = np.empty(1, dtype=self.dtype)
        self.get_accumulate(origin, result, rank, offset, "sum", timeout)
        return result[0]

    # ----------------------------------------------------------------- the end

    def free(self, timeout: float | None = None) -> None:
        """Release the window (collective), raising CommTimeout if a rank never arrives."""
        if self.win == MPI.WIN_NULL:
            return
        if self._held:
            raise WindowModeError(f"window '{self.name}': free inside locked({self._held})")

        def close():
            # Everyone is inside MPI now: what timed out earlier can complete.
            for h in self._orphans:
                h.wait(timeout)
            self._orphans = []
            if self.sync_mode == "epoch":
                self.transport._call(f"unlock_all of window '{self.name}'", "all",
                                     self.channel, 0, 0, self.win.Unlock_all)

        _free_collective(self, timeout, close)
        self.local = None
        self._views = {}


class SharedWindow:
    """Node-local shared memory: every rank of a node sees every segment as a numpy array.

    Built with ``Win.Allocate_shared`` on the transport's node communicator (ranks that share
    memory) and kept in one ``Lock_all(MODE_NOCHECK)`` epoch for its life, so that
    :meth:`sync` and the atomics are valid at any time. Reads and writes are plain loads and
    stores: no MPI progress is involved, which is what lock-free (Hogwild) updates and reads
    of a busy peer need; counters and tickets use :meth:`fetch_and_add`.

    Args:
        transport: a transport over the ranks of one node (see ``Transport.split_shared``).
        count: elements of the segment this rank contributes (0 for none).
        dtype: element type.
        name: what errors call the window.
    """

    def __init__(self, transport: Transport, count: int, dtype=np.float32,
                 name: str = "shared"):
        self.transport, self.name = transport, name
        self.dtype = np.dtype(dtype)
        self.win = _allocate(MPI.Win.Allocate_shared, int(count) * self.dtype.itemsize,
                             self.dtype.itemsize, transport.comm)
        self.win.Set_name(name)
        self.counts = transport.comm.allgather(int(count))
        self._views = [self._segment(r) for r in range(transport.size)]
        self.local = self._views[transport.rank]
        self.local[:] = 0
        self._arrival: Handle | None = None  # the barrier before Win.Free
        self.win.Lock_all(MPI.MODE_NOCHECK)
        self.win.Sync()
        transport.barrier()  # every segment is zeroed before anyone reads it

    def _segment(self, rank: int) -> np.ndarray:
        mem, itemsize = self.win.Shared_query(rank)
        arr = np.frombuffer(mem, dtype=self.dtype)
        return arr[: self.counts[rank]]

    def view(self, rank: int) -> np.ndarray:
        """Return the numpy array over ``rank``'s segment (shared memory, no copy)."""
        return self._views[rank]

    def sync(self) -> None:
        """Order this rank's loads and stores on the shared memory (``Win.Sync``)."""
        self.win.Sync()

    def fence(self) -> None:
        """Make stores visible to the other ranks of the node and wait for them.

        ``Sync``, barrier, ``Sync``: MPI's recipe for the unified shared-memory model.
        """
        self.win.Sync()
        self.transport.barrier()
        self.win.Sync()

    def fetch_and_add(self, value, rank: int, offset: int = 0):
        """Atomically add ``value`` to element ``offset`` of ``rank``'s segment; return the old.

        ``Fetch_and_op`` then ``Flush``, so the old value is valid on return. Over shared
        memory neither needs the target's progress; the flush still runs under the
        watchdog's deadline.
        """
        origin = np.array([value], dtype=self.dtype)
        result = np.empty(1, dtype=self.dtype)
        self.win.Fetch_and_op(origin, result, rank, int(offset), op=MPI.SUM)
        self.transport._call(f"fetch_and_add on window '{self.name}'", rank, Channel.CONTROL,
                             0, 0, self.win.Flush, rank)
        return result[0]

    def free(self, timeout: float | None = None) -> None:
        """Release the shared memory (collective over the node's ranks)."""
        if self.win == MPI.WIN_NULL:
            return
        _free_collective(self, timeout, self.win.Unlock_all)
        self._views = []
        self.local = None


class ProgressThread:
    """A helper thread that enters MPI every ``interval`` seconds.

    Passive-target operations that other ranks direct at this rank's windows (a ``Get`` of
    its published model, an ``Accumulate`` into its inbox) need this rank's MPI progress
    unless the hardware or shared memory does the transfer. While the main thread computes,
    the helper's ``Iprobe`` on a private communicator drives MPICH's progress engine, so a
    remote reader waits about ``interval`` (plus up to one interpreter switch interval, 5 ms,
    while the main thread runs Python code) instead of a whole computation. Needs the
    ``multiple`` thread level (mpi4py's default).

    Creating one is collective over the transport (it duplicates the communicator, so that
    probing never matches a message of the run); :meth:`start` is not, and :meth:`stop`, which
    frees the communicator, is again.

    Args:
        transport: the transport of the ranks that create it together.
        interval: seconds between two entries into MPI.
    """

    def __init__(self, transport: Transport, interval: float = 1e-3):
        self.comm = transport.comm.Dup()
        self.interval = float(interval)
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mpiopt-progress", daemon=True)

    @property
    def started(self) -> bool:
        """True if :meth:`start` ran the thread."""
        return self._thread.ident is not None

    @staticmethod
    def supported() -> bool:
        """True if MPI was initialised with the ``multiple`` thread level."""
        return MPI.Query_thread() == MPI.THREAD_MULTIPLE

    def start(self) -> ProgressThread:
        if not self.supported():
            raise RuntimeError("a progress thread needs MPI thread level 'multiple' (mpi4py's "
                               "default; check mpi4py.rc.thread_level)")
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            while not self._stop.wait(self.interval):
                self.comm.Iprobe(source=MPI.ANY_SOURCE, tag=MPI.ANY_TAG)
        except BaseException as exc:  # reported by stop() on the main thread
            self.error = exc

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the thread and free its communicator (collective); raise if it failed.

        Raises :class:`CommTimeout` if the thread does not end within ``timeout``.
        """
        self._stop.set()
        if self.started:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise CommTimeout(f"the MPI progress thread did not stop within {timeout:g} s")
        self.comm.Free()
        if self.error is not None:
            raise RuntimeError(f"the MPI progress thread failed: {self.error}") from self.error


class RawReader:
    """Bare mpi4py ``Get`` + ``Flush`` of ``count`` float32 from a peer (a benchmark reference).

    Every rank exposes a window of ``count`` floats in one long ``Lock_all`` epoch; ``read``
    is the shortest one-sided read MPI offers, with none of :class:`Window`'s accounting.
    Collective: every rank of ``transport`` creates and frees it together.
    """

    def __init__(self, transport: Transport, count: int):
        self.win = MPI.Win.Allocate(4 * count, 4, comm=transport.comm)
        self.win.Lock_all(MPI.MODE_NOCHECK)
        self.buf = np.empty(count, np.float32)

    def read(self, peer: int) -> None:
        """Read the peer's window into ``self.buf`` and wait until the data has arrived."""
        self.win.Get(self.buf, peer)
        self.win.Flush(peer)

    def free(self) -> None:
        """Close the epoch and free the window (collective)."""
        self.win.Unlock_all()
        self.win.Free()
