"""One-sided patterns over windows: a publication board and a pairwise inbox.

:class:`Board`: every rank publishes named regions (a model, its encoded copy, a step count)
into its own window, and any rank reads any rank's last publish without waiting for it: a
sequence lock over K slots. The window header holds two int64: publishes started and publishes
completed. Publish ``p`` writes slot ``p % K`` (its step, then its regions) between raising
``started`` and ``completed`` to ``p``. A reader takes the slot of the last completed
publish ``c`` and re-reads ``started`` afterwards: the copy is consistent unless publish
``c + K`` (the next to reuse that slot) had started, so a read only has to finish within K - 1
whole publishes of the publisher, not within its write; otherwise it is retried. A peer on this
node is read by loads from its window memory (nothing needed from it), others by ``Get``.
With ``locks=True`` the board keeps the classic protocol instead: the publisher holds an
exclusive MPI lock on its own window while writing, readers a shared lock, every read a ``Get``
(a lock grant needs the target's MPI progress).

:class:`Inbox`: a vector per rank that others add into one-sidedly (``Accumulate(SUM)``) and its
owner drains: an atomic read (``Get_accumulate(NO_OP)``) of what arrived, then the subtraction
of exactly that (``Accumulate(SUM)`` of its negation). Only ``sum`` and ``no_op`` ever meet on
an element, which the window's ``accumulate_ops=same_op_no_op`` hint guarantees atomic, so no
addition is lost or counted twice.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import numpy as np

from mpiopt.comm.transport import Channel, CommTimeout, Transport
from mpiopt.comm.windows import Window

_HEADER = 16  # int64 publishes started, publishes completed
_STEP = 8  # each slot starts with the int64 step of its publish


def _align(n: int) -> int:
    return (n + 7) // 8 * 8


def _bytes(a: np.ndarray) -> np.ndarray:
    """Return a contiguous array's memory as a flat uint8 view."""
    return a.reshape(-1).view(np.uint8)


class Board:
    """A sequence-locked, K-slot publication board (see the module docstring).

    Collective: every rank creates and frees it together, with the same regions.

    Args:
        transport: the ranks that publish and read.
        regions: name -> template array; each slot holds one region of the template's size.
        slots: K, the number of slots publishes rotate through (at least 2).
        name: what errors call the board's window.
        channel: the channel that reads are counted on.
        direct: read node-local peers by loads from their window memory (False: ``Get``).
        locks: the MPI-lock protocol (exclusive to publish, shared to read).
    """

    def __init__(self, transport: Transport, regions: Mapping[str, np.ndarray], slots: int = 2,
                 name: str = "board", channel: Channel = Channel.GOSSIP, direct: bool = True,
                 locks: bool = False):
        if slots < 2:
            raise ValueError(f"board '{name}': slots must be at least 2, got {slots}")
        if "" in regions:
            raise ValueError(f"board '{name}': region names must not be empty")
        self.t, self.name, self.k, self.locks = transport, name, int(slots), locks
        self.direct = direct and not locks
        self.sizes = {key: int(a.nbytes) for key, a in regions.items()}
        self.offsets: list[dict[str, int]] = []
        off = _HEADER
        for _ in range(self.k):
            slot = {"": off}
            off += _STEP
            for key, nbytes in self.sizes.items():
                slot[key] = off
                off = _align(off + nbytes)
            self.offsets.append(slot)
        self.win = Window(transport, off, np.uint8, channel, name,
                          "locks" if locks else "epoch")
        local = self.win.local
        self.header = local[:_HEADER].view(np.int64)
        self.sizes[""] = _STEP
        self._slots = [{key: local[o: o + self.sizes[key]] for key, o in slot.items()}
                       for slot in self.offsets]
        self._seen = np.zeros(2, np.int64)
        self._again = np.zeros(2, np.int64)
        self._step = np.zeros(1, np.int64)
        self.retries = 0

    def publish(self, values: Mapping[str, np.ndarray], step: int) -> None:
        """Write ``values`` (name -> array of the region's size) into the next slot.

        Regions not named keep whatever the slot held: publish every region that readers use.
        """
        if self.locks:
            with self.win.locked(self.t.rank, "exclusive"):
                self._write(values, step)
        else:
            self._write(values, step)

    def _write(self, values, step: int) -> None:
        win, h = self.win, self.header
        p = int(h[1]) + 1
        h[0] = p  # started
        win.sync()
        slot = self._slots[p % self.k]
        slot[""].view(np.int64)[0] = step
        for key, a in values.items():
            slot[key][...] = _bytes(a)
        win.sync()
        h[1] = p  # completed
        win.sync()

    def published(self) -> int:
        """Return how many publishes this rank has completed."""
        return int(self.header[1])

    def read(self, rank: int, out: Mapping[str, np.ndarray], channel: Channel | None = None,
             timeout: float | None = None) -> int:
        """Fill ``out`` (name -> array) from ``rank``'s last publish; return its step.

        Before ``rank``'s first publish the regions read as zeros, with step 0. Retries a
        torn read; raises CommTimeout (naming the peer, the board and the step) if
        no consistent copy is read within ``timeout`` (default: the transport's).
        """
        limit = self.t.timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        targets = [(_bytes(self._step), ""), *((_bytes(a), key) for key, a in out.items())]
        view = self.win.shared_view(rank) if self.direct else None
        while True:
            if view is not None:
                started, c = self._load(rank, view, targets, channel)
            elif self.locks:
                with self.win.locked(rank, "shared"):
                    started, c = self._get(rank, targets, channel, deadline)
            else:
                started, c = self._get(rank, targets, channel, deadline)
            if started < c + self.k:
                return int(self._step[0])
            self.retries += 1
            if time.monotonic() > deadline:
                raise CommTimeout(f"read of board '{self.name}' found no consistent copy "
                                  f"within {limit:g} s (peer {rank}, tag "
                                  f"{self.win.channel.name}, step {self.t.step})")

    def _load(self, rank: int, view, targets, channel) -> tuple[int, int]:
        """Read by plain loads from a node-local peer's window memory."""
        win = self.win
        head = view[:_HEADER].view(np.int64)
        c = int(head[1])
        win.sync()  # a memory barrier between the loads
        offsets = self.offsets[c % self.k]
        nbytes = 2 * _HEADER
        for buf, key in targets:
            off = offsets[key]
            buf[...] = view[off: off + buf.size]
            nbytes += buf.size
        win.sync()
        started = int(head[0])
        win.charge(rank, nbytes, channel)
        return started, c

    def _get(self, rank: int, targets, channel, deadline: float) -> tuple[int, int]:
        """Get the counters, the last completed slot and the counters again."""
        win = self.win

        def left():
            return max(deadline - time.monotonic(), 0.0)

        win.get(self._seen.view(np.uint8), rank, 0, channel, left())
        c = int(self._seen[1])
        offsets = self.offsets[c % self.k]
        win.wait_all([win.iget(buf, rank, offsets[key], channel) for buf, key in targets],
                     left())
        # Only after the slot has arrived: a Get has no order against another.
        win.get(self._again.view(np.uint8), rank, 0, channel, left())
        return int(self._again[0]), c

    def progress(self) -> None:
        """Enter MPI briefly (progress for peers that read us by ``Get``)."""
        self.win.progress()

    def free(self, timeout: float | None = None) -> None:
        """Release the board's window (collective)."""
        self._slots, self.header = [], None
        self.win.free(timeout)


class Inbox:
    """A vector per rank that any rank adds into and its owner drains (see module docstring).

    Collective: every rank creates and frees it together.

    Args:
        transport: the ranks.
        count: elements of every rank's inbox.
        dtype: element type.
        name: what errors call the inbox's window.
        channel: the channel that additions are counted on.
    """

    def __init__(self, transport: Transport, count: int, dtype=np.float32,
                 name: str = "inbox", channel: Channel = Channel.GOSSIP):
        self.t = transport
        self.win = Window(transport, count, dtype, channel, name)
        self._neg = np.zeros(count, dtype)
        self._targets: set[int] = set()

    def add(self, buf: np.ndarray, rank: int, timeout: float | None = None) -> None:
        """Add ``buf`` into ``rank``'s inbox (atomic per element); ``buf`` is free on return."""
        self.win.accumulate(buf, rank, 0, "sum", timeout)
        self._targets.add(rank)

    def drain(self, out: np.ndarray, timeout: float | None = None) -> np.ndarray:
        """Take what arrived since the last drain into ``out`` (overwritten) and return it.

        An atomic read, then the subtraction of what was read, so additions that land in
        between stay for the next drain. The next read sees the subtraction (MPI orders
        accumulate-family operations of one origin on one element).
        """
        me = self.t.rank
        self.win.get_accumulate(None, out, me, 0, "no_op", timeout)
        if out.any():
            np.negative(out, out=self._neg)
            self.win.accumulate(self._neg, me, 0, "sum", timeout)
        return out

    def settle(self) -> None:
        """Complete every addition this rank made at its targets (before a stop barrier)."""
        for rank in sorted(self._targets):
            self.win.flush(rank)
        self._targets.clear()

    def free(self, timeout: float | None = None) -> None:
        """Release the inbox's window (collective)."""
        self.win.free(timeout)
