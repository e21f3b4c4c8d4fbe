"""SwarmSGD: asynchronous decentralized SGD with local steps and pairwise model averaging.

Every rank, with no rounds and no barriers: take ``H`` local SGD steps (momentum kept local;
``H`` fixed or geometric with mean ``H``), then pick a neighbour uniformly at random in the
topology and average with it.

Publishing and reading. Each rank publishes its model into its own RMA window after every
step: the encoded copy (``quantize``) and the float32 copy, in a ring of ``publish_slots``
slots (default 2), with counters of publishes started and completed. A reader gets the
counters, the slot of the last completed publish and the counters again; the copy is
consistent unless the publisher has meanwhile started rewriting that slot (a sequence lock over
K buffers: the publisher never waits, and a reader retries only if its read spans K - 1 whole
steps of the publisher; more slots help where a read is slow against a step, as over TCP).

The windows live in one passive-target epoch opened with ``MPI_MODE_NOCHECK`` for the whole
run, so no operation waits for a lock: within a node MPICH reads the partner's memory directly
and a ``Get`` from a rank that computes (no MPI calls) completes at once, which an MPI lock does
not (its grant needs the target's progress; measured at 1.8 s behind a 2 s computation). Across
nodes, on a fabric without hardware RMA, a ``Get`` needs the target to enter MPI: ranks read by
peers on other nodes run a :class:`~mpiopt.comm.windows.ProgressThread` (``progress: auto``),
which enters MPI every millisecond, so such a read waits milliseconds, not the partner's step.
``rma_sync: locks`` keeps the authors' protocol instead (an exclusive lock on one's own window
to publish, a shared lock on the partner's to read, every read a ``Get``), for comparison.

Modes. ``pull`` (the authors' code): the initiator averages its own model with the partner's
copy, ``x_i <- (x_i + x_j)/2``; the partner does nothing. ``pairwise``: both ends move to the
average; the initiator also adds ``(x_i - x_j)/2`` into the partner's inbox window with
``Accumulate(SUM)`` (one-sided, so the partner never waits or is waited for), and every rank
drains its inbox each step with an atomic swap (``Get_accumulate(REPLACE)``). The sum of all
models is preserved exactly in real arithmetic, staleness included, because both ends use the
same decoded copy ``x_j``.

Quantization (``quantize``): ``fp16``, or the lattice scheme ``lattice16``/``lattice8``
(``z = round(x/eps) mod q``, decoded against the reader's own model). A violated distance bound
is detected by the decoder; that exchange then reads the float32 copy instead and is counted as
a fallback.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from mpiopt.algorithms import ALGORITHMS
from mpiopt.algorithms.base import AsynchronousAlgorithm, GraphKeys
from mpiopt.comm.transport import Channel, CommTimeout, async_progress_enabled
from mpiopt.comm.windows import ProgressThread, Window
from mpiopt.compressors import make_compressor
from mpiopt.compressors.lattice import LatticeBoundError
from mpiopt.config import check_ranks, param
from mpiopt.errors import ConfigError

MODES = ("pull", "pairwise")
PROGRESS = ("auto", "thread", "none")
QUANTIZERS = ("none", "fp16", "lattice16", "lattice8")
_HEADER = 24  # int64 publishes started, publishes completed, step


def _align(n: int) -> int:
    return (n + 7) // 8 * 8


class _Published:
    """This rank's window and reads of any rank's.

    Layout: a header of three int64 (publishes started, publishes completed, step), then K
    slots, each holding the encoded copy and the float32 copy. Publish ``p`` writes slot
    ``p % K`` between raising ``started`` and ``completed`` to ``p``. A reader takes the slot of
    the last completed publish ``c`` and re-reads ``started`` afterwards: the copy is
    consistent unless publish ``c + K`` (the next to reuse that slot) had started, so a read
    only has to finish within K - 1 whole steps of the publisher, not within its write.
    """

    def __init__(self, transport, d: int, compressor, xp, direct: bool = True,
                 slots: int = 2, locks: bool = False):
        self.t, self.d, self.comp = transport, d, compressor
        self.direct = direct and not locks
        self.k, self.locks = int(slots), locks
        self.payload = compressor.empty_payload(d, xp) if compressor else None
        self.peer_payload = compressor.empty_payload(d, xp) if compressor else None
        buffers = self.payload.buffers if compressor else ()
        self.offsets, self.fp32_offsets, off = [], [], _HEADER
        for _ in range(self.k):
            slot = []
            for buf in buffers:
                slot.append(off)
                off = _align(off + buf.nbytes)
            self.offsets.append(slot)
            self.fp32_offsets.append(off)
            off = _align(off + 4 * d)
        self.win = Window(transport, off, np.uint8, Channel.GOSSIP)
        local = self.win.local
        self.header = local[:_HEADER].view(np.int64)
        self.slots = [[local[o: o + b.nbytes] for o, b in zip(self.offsets[k], buffers)]
                      for k in range(self.k)]
        self.fp32 = [local[o: o + 4 * d].view(np.float32) for o in self.fp32_offsets]
        self.seen = np.zeros(3, np.int64)
        self.again = np.zeros(3, np.int64)
        self.retries = 0
        if not locks:
            self.win.open_epoch()

    def publish(self, x, step: int) -> None:
        """Write ``x`` (encoded and float32) into the next slot of our window."""
        if self.locks:  # the authors' protocol: an exclusive lock on our own window
            with self.win.locked(self.t.rank, "exclusive"):
                self._write(x, step)
        else:
            self._write(x, step)

    def _write(self, x, step: int) -> None:
        win, h = self.win, self.header
        p = int(h[1]) + 1
        h[0] = p  # started
        win.sync_local()
        k = p % self.k
        if self.comp is not None:
            payload, _ = self.comp.compress(x, (), out=self.payload)
            for slot, buf in zip(self.slots[k], payload.buffers):
                slot[...] = buf.reshape(-1).view(np.uint8)
        self.fp32[k][...] = x
        win.sync_local()
        h[2] = step
        h[1] = p  # completed
        win.sync_local()

    def _snapshot(self, rank: int, regions, channel, deadline: float) -> int:
        """Read a consistent copy of ``rank``'s last publish; return the publisher's step.

        ``regions(slot)`` lists (uint8 view to fill, offset) pairs of that slot. A peer on
        this node is read by plain loads from its window memory; others by ``Get``.
        """
        win = self.win
        view = win.shared_view(rank) if self.direct else None
        while True:
            if view is not None:
                head = view[:_HEADER].view(np.int64)
                c, step = int(head[1]), int(head[2])
                win.sync_local()  # a memory barrier between the loads
                nbytes = _HEADER
                for out, off in regions(c % self.k):
                    out[...] = view[off: off + out.size]
                    nbytes += out.size
                win.sync_local()
                started = int(head[0])
                win.charge(rank, nbytes + _HEADER, channel)
            elif self.locks:  # the authors' protocol: a shared lock on the partner's window
                with win.locked(rank, "shared"):
                    started, c, step = self._get(rank, regions, channel)
            else:
                started, c, step = self._get(rank, regions, channel)
            if started < c + self.k:
                return step
            self.retries += 1
            if time.monotonic() > deadline:
                raise CommTimeout(f"swarm read of rank {rank}'s model found no consistent copy "
                                  f"within the deadline (peer {rank}, tag GOSSIP, step "
                                  f"{self.t.step})")

    def _get(self, rank: int, regions, channel) -> tuple[int, int, int]:
        """Get the counters, the last completed slot and the counters again (flushed)."""
        win = self.win
        win.get(self.seen.view(np.uint8), rank, 0, channel)
        win.flush(rank)
        c, step = int(self.seen[1]), int(self.seen[2])
        for out, off in regions(c % self.k):
            win.get(out, rank, off, channel)
        win.flush(rank)
        win.get(self.again.view(np.uint8), rank, 0, channel)
        win.flush(rank)
        return int(self.again[0]), c, step

    def read_fp32(self, rank: int, out, channel=None, timeout: float = 300.0):
        """Read ``rank``'s float32 copy into ``out``."""
        view = out.view(np.uint8)
        self._snapshot(rank, lambda k: [(view, self.fp32_offsets[k])], channel,
                       time.monotonic() + timeout)
        return out

    def read_encoded(self, rank: int, timeout: float = 300.0):
        """Read ``rank``'s encoded copy; return the payload (valid until the next read)."""
        views = [b.reshape(-1).view(np.uint8) for b in self.peer_payload.buffers]
        self._snapshot(rank, lambda k: list(zip(views, self.offsets[k])), None,
                       time.monotonic() + timeout)
        return self.peer_payload

    def free(self) -> None:
        self.win.free()


class Gossip:
    """The averaging machinery of one rank: publish, pairwise average, drain, stop.

    Args:
        transport: the world transport.
        d: the model length.
        topology: the graph whose neighbours are partners.
        mode: ``pull`` or ``pairwise``.
        compressor: the encoding of the published copy (None: float32).
        direct_reads: read node-local partners by loads from their window memory (False:
            always ``Get``, as for partners on other nodes).
        progress: ``thread``: run a :class:`ProgressThread` from :meth:`start` to
            :meth:`stop`; ``none``: only enter MPI once per step; ``auto``: a thread if a
            rank that reads this one (a neighbour, or rank 0 for evaluations) is on another
            node, unless MPICH's own progress thread is on.
        progress_interval: seconds between two entries into MPI of the progress thread.
        slots: the number of slots the published copies rotate through.
        locks: publish under an exclusive MPI lock on our window and read under a shared
            lock on the partner's, by ``Get`` (the authors' protocol; ``pull`` mode only).
    """

    def __init__(self, transport, d: int, topology, mode: str, compressor,
                 direct_reads: bool = True, progress: str = "auto",
                 progress_interval: float = 1e-3, slots: int = 2, locks: bool = False):
        self.t, self.topology, self.comp = transport, topology, compressor
        self.neighbors = topology.neighbors(transport.rank)
        self.pub = _Published(transport, d, compressor, np, direct_reads, slots, locks)
        readers = (set(self.neighbors) | {0}) - {transport.rank}
        self.remote_readers = sorted(r for r in readers if self.pub.win.shared_view(r) is None)
        # progress: thread below thread level multiple is refused by SwarmConfig.check_world
        # (and by ProgressThread.start); auto then falls back to the per-step entry into MPI.
        needed = progress == "auto" and bool(self.remote_readers) and \
            not async_progress_enabled()
        unserved = needed and not ProgressThread.supported()
        self.progress_comm = transport.comm.Dup()  # collective: every rank makes one
        self.progress = (ProgressThread(self.progress_comm, progress_interval)
                         if progress == "thread" or (needed and not unserved) else None)
        if transport.allreduce_scalar(float(unserved), op="max") and transport.rank == 0:
            print("mpiopt: warning: peers on other nodes read ranks that run no progress thread "
                  "(MPI thread level is not 'multiple'); their reads may wait up to a whole "
                  "step of the partner. Set MPIR_CVAR_ASYNC_PROGRESS=1 or mpi4py.rc.thread_level"
                  " = 'multiple'.", flush=True)
        self.inbox = None
        if mode == "pairwise":
            self.inbox = Window(transport, d, np.float32, Channel.GOSSIP)
            self.inbox.open_epoch()
            self.zeros = np.zeros(d, np.float32)
            self.drained = np.zeros(d, np.float32)
        self.peer = np.empty(d, np.float32)
        self.corr = np.empty(d, np.float32)
        self.interactions = self.fallbacks = 0
        self.blocked_s = self.longest_s = 0.0

    def start(self, x) -> None:
        """Publish the initial model and wait until every rank has (collective).

        Decoding our own copy once first loads (or compiles, on a fresh install) the kernels
        here rather than in the first interaction: a rank that stops for seconds mid-run to
        compile drags its partners back to its stale model.
        """
        self.pub.publish(x, -1)
        if self.comp is not None:
            self._decode(self.pub.payload, x)
        if self.progress is not None:
            self.progress.start()
        self.t.barrier()

    def publish(self, x, step: int) -> None:
        """Publish ``x`` and enter MPI briefly (progress for peers on other nodes)."""
        self.pub.publish(x, step)
        self.pub.win.progress()

    def _decode(self, payload, x):
        """Decode ``payload`` into ``self.peer`` (the lattice against our own model ``x``)."""
        if self.comp.name == "lattice":
            return self.comp.decompress(payload, self.peer, reference=x)
        return self.comp.decompress(payload, self.peer)

    def read(self, j: int, x):
        """Return partner ``j``'s published model as float32 (decoded against ``x``)."""
        timeout = self.t.timeout
        if self.comp is None:
            return self.pub.read_fp32(j, self.peer, timeout=timeout)
        try:
            self._decode(self.pub.read_encoded(j, timeout), x)
        except LatticeBoundError:
            self.fallbacks += 1
            self.pub.read_fp32(j, self.peer, timeout=timeout)
        return self.peer

    def interact(self, x, rng) -> int:
        """Average ``x`` in place with a random neighbour; return the partner (-1: none)."""
        if not self.neighbors:
            return -1
        j = self.topology.random_neighbor(self.t.rank, rng)
        t0 = time.perf_counter()
        peer = self.read(j, x)
        if self.inbox is not None:  # pairwise: the partner moves by (x_i - x_j)/2 too
            np.subtract(x, peer, out=self.corr)
            self.corr *= 0.5
            self.inbox.accumulate(self.corr, j)
            self.inbox.flush(j)
            x -= self.corr
        else:
            x += peer
            x *= 0.5
        took = time.perf_counter() - t0
        self.t._charge(Channel.GOSSIP, 0, 0, took)  # the step's communication time
        self.blocked_s += took
        self.longest_s = max(self.longest_s, took)
        self.interactions += 1
        return j

    def drain(self, x) -> None:
        """Pairwise: add what partners accumulated into our inbox (atomic swap with 0)."""
        if self.inbox is None:
            return
        me = self.t.rank
        self.inbox.swap(self.zeros, self.drained, me)
        self.inbox.flush(me)
        x += self.drained

    def serve(self, x, step: int) -> None:
        """While waiting at the stop (pairwise): apply arriving corrections, republish.

        Left to pile up, corrections computed against one stale copy would overshoot the
        average.
        """
        if self.inbox is not None:
            self.drain(x)
            self.pub.publish(x, step)

    def stop(self, x) -> dict:
        """Release everything once every rank has stopped (collective); return the counters.

        Every interaction flushes its operations, so nothing is outstanding; the last
        corrections are applied and the windows freed.
        """
        t = self.t
        if self.progress is not None:  # everyone is past its last operation
            self.progress.stop()
        if self.inbox is not None:
            self.drain(x)
            self.inbox.free()
        self.pub.free()
        self.progress_comm.Free()
        mine = {"interactions": self.interactions, "fallbacks": self.fallbacks,
                "retries": self.pub.retries, "blocked_s": self.blocked_s,
                "longest_s": self.longest_s, "gossip_bytes": t.stats[Channel.GOSSIP].recv,
                "progress_thread": self.progress is not None,
                "remote_readers": len(self.remote_readers)}
        return t.allgather_obj(mine)

    def read_all(self, x, channel=Channel.EVAL) -> list:
        """Rank-ordered float32 copies of every rank's published model (ours is ``x``)."""
        out = []
        for r in range(self.t.size):
            if r == self.t.rank:
                out.append(x)
            else:
                out.append(self.pub.read_fp32(r, np.empty_like(x), channel, self.t.timeout))
        return out


class Swarm(AsynchronousAlgorithm):
    """SwarmSGD on one rank: local steps and one-sided reads; no barrier until the stop."""

    def setup(self) -> None:
        super().setup()
        ctx, cfg = self.ctx, self.cfg
        self.gossip = Gossip(ctx.transport, int(self.x.size), cfg.topology_for(ctx.size),
                             cfg.mode, cfg.compressor(ctx.size), cfg.direct_reads,
                             cfg.progress, cfg.progress_interval_s, cfg.publish_slots,
                             cfg.rma_sync == "locks")
        self.slow = cfg.slow_s if ctx.rank in cfg.slow_ranks else 0.0
        self.left = self._draw_h()
        self.last = -1
        self.gossip.start(self.x)

    def _draw_h(self) -> int:
        h = self.cfg.local_steps
        if self.cfg.local_steps_dist == "geometric":
            return int(self.ctx.rng.geometric(1.0 / h))
        return h

    def step(self, step: int, lr: float) -> float:
        gossip = self.gossip
        loss = self.local_gradient(step)
        self.opt.apply(self.x, self.g, self.state, lr)
        gossip.drain(self.x)
        self.left -= 1
        if self.left == 0:
            gossip.interact(self.x, self.ctx.rng)
            self.left = self._draw_h()
        gossip.publish(self.x, step)
        self.last = step
        if self.slow:
            time.sleep(self.slow)
        return loss

    def serve(self) -> None:
        self.gossip.serve(self.x, self.last)

    def finish(self) -> None:
        self.totals = self.gossip.stop(self.x)

    def evaluate_running(self, step: int) -> dict:
        return self._evaluate_published()

    def summary_info(self) -> dict:
        tot = self.totals
        inter = sum(r["interactions"] for r in tot)
        return {
            "interactions_per_rank": [r["interactions"] for r in tot],
            "bytes_per_interaction": (sum(r["gossip_bytes"] for r in tot) / inter
                                      if inter else 0.0),
            "fp32_bytes_per_interaction": 4.0 * self.x.size,
            "quantizer_fallbacks": sum(r["fallbacks"] for r in tot),
            "torn_read_retries": sum(r["retries"] for r in tot),
            "rma_blocked_s_per_rank": [r["blocked_s"] for r in tot],
            "longest_interaction_s_per_rank": [r["longest_s"] for r in tot],
            "progress_thread_per_rank": [r["progress_thread"] for r in tot],
            "remote_readers_per_rank": [r["remote_readers"] for r in tot],
            "mode": self.cfg.mode, "quantize": self.cfg.quantize,
        }

    def evaluate(self, step: int) -> dict:
        """Average model (loss, accuracy), consensus distance, and rank 0's own model."""
        own = self.ctx.problem.evaluate(self.x) if self.ctx.rank == 0 else {}
        avg = self.evaluate_average()
        if self.ctx.rank != 0:
            return {}
        return {**avg, **{f"rank0_{k}": v for k, v in own.items()}}

    def _evaluate_published(self) -> dict:
        """Rank 0 alone, mid-run: read every published float32 copy one-sidedly (EVAL)."""
        ctx = self.ctx
        copies = self.gossip.read_all(self.x)
        avg = self.state.scratch
        avg[...] = 0.0
        for c in copies:
            avg += c
        avg *= 1.0 / ctx.size
        dist = float(np.mean([float(((c - avg) ** 2).sum()) for c in copies]))
        own = ctx.problem.evaluate(self.x)
        return {**ctx.problem.evaluate(avg), "consensus_distance": dist,
                **{f"rank0_{k}": v for k, v in own.items()}}


@ALGORITHMS.register("swarm")
@dataclass(frozen=True)
class SwarmConfig(GraphKeys):
    """SwarmSGD: asynchronous local steps and random pairwise averaging over RMA."""

    HOST_ONLY = True  # windows and shared-memory reads are host memory
    ASYNCHRONOUS = True

    topology: Any = param("complete", "Graph over ranks: complete, ring, torus, hypercube, "
                          "random_regular:k, or a list of [i, j] edges.")
    local_steps: int = param(1, "Local steps H between two averagings (the mean if "
                             "geometric).", low=1)
    local_steps_dist: str = param("fixed", "H fixed, or geometric with mean H.",
                                  choices=("fixed", "geometric"))
    mode: str = param("pull", "pull: average only the initiator (the authors' code); "
                      "pairwise: both ends, the partner through Accumulate.", choices=MODES)
    quantize: str = param("none", "Encoding of the published copy: none (float32), fp16, "
                          "lattice16 or lattice8 (decoded against the reader's model).",
                          choices=QUANTIZERS)
    lattice_eps: float | None = param(None, "Lattice step eps (default 0.0035/n for "
                                      "lattice16, 0.0035 for lattice8).", low=0,
                                      low_open=True)
    direct_reads: bool = param(True, "Read partners on this node by direct loads from their "
                               "window memory; false: always MPI Get.")
    rma_sync: str = param("epoch", "epoch: one MPI_MODE_NOCHECK epoch for the run and a "
                          "sequence lock, so no read waits for a partner; locks: the authors' "
                          "exclusive lock to publish and shared lock to read (a lock grant "
                          "waits for the partner's MPI progress; pull mode only).",
                          choices=("epoch", "locks"))
    publish_slots: int = param(2, "Slots the published copies rotate through; a read is "
                               "retried only if it spans publish_slots - 1 whole steps of the "
                               "partner (raise it where reads are slow against a step).", low=2)
    progress: str = param("auto", "Progress of reads that target a computing rank from "
                          "another node: thread (a helper thread enters MPI every "
                          "progress_interval_s), none (once per step), auto (a thread on ranks "
                          "read from other nodes, unless MPIR_CVAR_ASYNC_PROGRESS=1).",
                          choices=PROGRESS)
    progress_interval_s: float = param(0.001, "Seconds between two entries into MPI of the "
                                       "progress thread.", low=0, low_open=True)
    slow_ranks: tuple[int, ...] = param((), "Ranks made slow on purpose (heterogeneous-speed "
                                        "experiments).", low=0)
    slow_s: float = param(0.0, "Seconds each slow rank sleeps after every local step.",
                          low=0)

    def compressor(self, world_size: int):
        """Return the compressor of the published copy (None for float32)."""
        if self.quantize == "none":
            return None
        if self.quantize == "fp16":
            return make_compressor("fp16")
        q = 1 << 16 if self.quantize == "lattice16" else 1 << 8
        eps = self.lattice_eps
        if eps is None:
            eps = 0.0035 / world_size if q == 1 << 16 else 0.0035
        return make_compressor("lattice", eps=eps, q=q)

    def check_world(self, world_size: int) -> None:
        super().check_world(world_size)
        check_ranks(self.slow_ranks, world_size, "algorithm.slow_ranks")
        if self.progress == "thread" and not ProgressThread.supported():
            raise ConfigError("thread needs MPI thread level 'multiple' (set "
                              "mpi4py.rc.thread_level or MPI4PY_RC_THREAD_LEVEL); valid "
                              "here: auto, none", key="algorithm.progress")

    def validate(self) -> None:
        super().validate()
        if self.rma_sync == "locks" and self.mode != "pull":
            raise ConfigError("locks is the authors' pull protocol; use mode: pull, or "
                              "rma_sync: epoch with mode: pairwise", key="algorithm.rma_sync")

    def build(self, ctx) -> Swarm:
        return Swarm(self, ctx)
