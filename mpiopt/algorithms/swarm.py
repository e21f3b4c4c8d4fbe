"""SwarmSGD: asynchronous decentralized SGD with local steps and pairwise model averaging.

Every rank, with no rounds and no barriers: take ``H`` local SGD steps (momentum kept local;
``H`` fixed or geometric with mean ``H``), then pick a neighbour uniformly at random in the
topology and average with it.

Publishing and reading. Each rank publishes its model on a publication board
(:class:`~mpiopt.comm.board.Board`) after every step: the encoded copy (``quantize``) and the
float32 copy, in a ring of ``publish_slots`` slots (default 2), with counters of publishes
started and completed. A reader gets the counters, the slot of the last completed publish and
the counters again; the copy is consistent unless the publisher has meanwhile started rewriting
that slot (a sequence lock over K buffers: the publisher never waits, and a reader retries only
if its read spans K - 1 whole steps of the publisher; more slots help where a read is slow
against a step, as over TCP).

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
drains its inbox each step (:class:`~mpiopt.comm.board.Inbox`: an atomic read with
``Get_accumulate(NO_OP)``, then ``Accumulate(SUM)`` of minus what it read, so only ops that the
window's ``accumulate_ops`` hint keeps atomic together meet). The initiator's ``x_j`` is the
partner's effective model: its published copy plus what is in its inbox, not yet applied (an
atomic read of the partner's inbox); otherwise several averages with a slow partner's stale
copy overshoot. The sum of all models is preserved in real arithmetic, staleness included,
because both ends use the same ``x_j``.

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
from mpiopt.comm.board import Board, Inbox
from mpiopt.comm.transport import Channel, async_progress_enabled
from mpiopt.comm.windows import ProgressThread
from mpiopt.compressors import make_compressor
from mpiopt.compressors.lattice import LatticeBoundError
from mpiopt.config import param
from mpiopt.errors import ConfigError

MODES = ("pull", "pairwise")
PROGRESS = ("auto", "thread", "none")
QUANTIZERS = ("none", "fp16", "lattice16", "lattice8")
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
        self.payload = compressor.empty_payload(d, np) if compressor else None
        self.peer_payload = compressor.empty_payload(d, np) if compressor else None
        self.peer = np.empty(d, np.float32)
        self.board = Board(transport, {**self._encoded(self.payload), "fp32": self.peer},
                           slots, "swarm.model", Channel.GOSSIP, direct_reads, locks)
        readers = (set(self.neighbors) | {0}) - {transport.rank}
        self.remote_readers = sorted(r for r in readers
                                     if self.board.win.shared_view(r) is None)
        # progress: thread below thread level multiple is refused by SwarmConfig.check_world
        # (and by ProgressThread.start); auto then falls back to the per-step entry into MPI.
        needed = progress == "auto" and bool(self.remote_readers) and \
            not async_progress_enabled()
        unserved = needed and not ProgressThread.supported()
        self.progress = ProgressThread(transport, progress_interval)  # collective
        self.serve_reads = progress == "thread" or (needed and not unserved)
        if transport.allreduce_scalar(float(unserved), op="max") and transport.rank == 0:
            print("mpiopt: warning: peers on other nodes read ranks that run no progress thread "
                  "(MPI thread level is not 'multiple'); their reads may wait up to a whole "
                  "step of the partner. Set MPIR_CVAR_ASYNC_PROGRESS=1 or mpi4py.rc.thread_level"
                  " = 'multiple'.", flush=True)
        self.inbox = None
        if mode == "pairwise":
            self.inbox = Inbox(transport, d, np.float32, "swarm.inbox", Channel.GOSSIP)
            self.drained = np.zeros(d, np.float32)
        self.corr = np.empty(d, np.float32)
        # Pairwise: the average is with the partner's effective model, its published copy plus
        # the corrections others have added into its inbox that it has not applied yet.
        self.pending = self.inbox is not None
        self.interactions = self.fallbacks = 0
        self.blocked_s = self.longest_s = 0.0

    def start(self, x) -> None:
        """Publish the initial model and wait until every rank has (collective).

        Decoding our own copy once first loads (or compiles, on a fresh install) the kernels
        here rather than in the first interaction: a rank that stops for seconds mid-run to
        compile drags its partners back to its stale model.
        """
        self._publish(x, -1)
        if self.comp is not None:
            self._decode(self.payload, x)
        if self.serve_reads:
            self.progress.start()
        self.t.barrier()

    @staticmethod
    def _encoded(payload) -> dict:
        """Name the buffers of an encoded copy as board regions (none for float32)."""
        return {f"enc{i}": b for i, b in enumerate(payload.buffers)} if payload else {}

    def _publish(self, x, step: int) -> None:
        """Write ``x`` (encoded and float32) into the next slot of our board."""
        values = {"fp32": x}
        if self.comp is not None:
            payload, _ = self.comp.compress(x, (), out=self.payload)
            values.update(self._encoded(payload))
        self.board.publish(values, step)

    def publish(self, x, step: int) -> None:
        """Publish ``x`` and enter MPI briefly (progress for peers on other nodes)."""
        self._publish(x, step)
        self.board.progress()

    def read_fp32(self, j: int, out, channel=None):
        """Read partner ``j``'s published float32 copy into ``out``."""
        self.board.read(j, {"fp32": out}, channel, self.t.timeout)
        return out

    def _decode(self, payload, x):
        """Decode ``payload`` into ``self.peer`` (the lattice against our own model ``x``)."""
        if self.comp.name == "lattice":
            return self.comp.decompress(payload, self.peer, reference=x)
        return self.comp.decompress(payload, self.peer)

    def read(self, j: int, x):
        """Return partner ``j``'s published model as float32 (decoded against ``x``)."""
        if self.comp is None:
            return self.read_fp32(j, self.peer)
        self.board.read(j, self._encoded(self.peer_payload), None, self.t.timeout)
        try:
            self._decode(self.peer_payload, x)
        except LatticeBoundError:
            self.fallbacks += 1
            self.read_fp32(j, self.peer)
        return self.peer

    def interact(self, x, rng) -> int:
        """Average ``x`` in place with a random neighbour; return the partner (-1: none)."""
        if not self.neighbors:
            return -1
        j = self.topology.random_neighbor(self.t.rank, rng)
        t0, inside = time.perf_counter(), self.t.comm_seconds()
        peer = self.read(j, x)
        if self.pending:  # the corrections others sent j that it has not applied yet
            self.inbox.win.get_accumulate(None, self.corr, j, 0, "no_op")
            peer += self.corr
        if self.inbox is not None:  # pairwise: the partner moves by (x_i - x_j)/2 too
            np.subtract(x, peer, out=self.corr)
            self.corr *= 0.5
            self.inbox.add(self.corr, j)
            x -= self.corr
        else:
            x += peer
            x *= 0.5
        took = time.perf_counter() - t0
        # The whole interaction is the step's communication time; the waits inside MPI
        # (polled RMA requests, locks) have charged their part already.
        self.t.charge_time(Channel.GOSSIP, max(took - (self.t.comm_seconds() - inside), 0.0))
        self.blocked_s += took
        self.longest_s = max(self.longest_s, took)
        self.interactions += 1
        return j

    def drain(self, x) -> bool:
        """Pairwise: add what partners accumulated into our inbox; return True if any came."""
        if self.inbox is None:
            return False
        got = self.inbox.drain(self.drained)
        if not got.any():
            return False
        x += got
        return True

    def serve(self, x, step: int) -> None:
        """While waiting at the stop (pairwise): apply arriving corrections, republish.

        Left to pile up, corrections computed against one stale copy would overshoot the
        average.
        """
        if self.drain(x):  # republish only a model that moved: readers are not disturbed
            self._publish(x, step)

    def settle(self) -> None:
        """Complete our corrections in the partners' inboxes (before waiting at the stop).

        Every read of an interaction completes before it returns; the corrections added to
        partners' inboxes complete at the targets only with a flush.
        """
        if self.inbox is not None:
            self.inbox.settle()

    def stop(self, x) -> dict:
        """Release everything once every rank has stopped (collective); return the counters.

        Every rank settled its operations before the stop; others read nothing any more. The
        last corrections are applied and the windows freed.
        """
        t = self.t
        self.progress.stop()  # everyone is past its last operation
        if self.inbox is not None:
            self.drain(x)
            self.inbox.free()
        self.board.free()
        mine = {"interactions": self.interactions, "fallbacks": self.fallbacks,
                "retries": self.board.retries, "blocked_s": self.blocked_s,
                "longest_s": self.longest_s, "gossip_bytes": t.stats[Channel.GOSSIP].recv,
                "progress_thread": self.progress.started,
                "remote_readers": len(self.remote_readers)}
        return t.allgather_obj(mine)

    def read_all(self, x, channel=Channel.EVAL) -> list:
        """Rank-ordered float32 copies of every rank's published model (ours is ``x``)."""
        out = []
        for r in range(self.t.size):
            if r == self.t.rank:
                out.append(x)
            else:
                out.append(self.read_fp32(r, np.empty_like(x), channel))
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
        return loss

    def settle(self) -> None:
        self.gossip.settle()

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


class ADPSGD(Swarm):
    """AD-PSGD: the gradient at a stale read, an atomic pairwise average, then the step.

    Lian et al. (ICML 2018): a worker reads its model, computes a gradient there, averages its
    model with a random neighbour's -- both ends move to the average, atomically for each --
    and then applies the gradient computed at the earlier read. On SwarmSGD's machinery
    (``mode: pairwise``, one local step): the read is the model before this step's drain and
    average, so the gradient is stale by the corrections that arrived and by the average. The
    average is with the partner's effective model, as in SwarmSGD's pairwise mode.
    """

    def step(self, step: int, lr: float) -> float:
        gossip, x = self.gossip, self.x
        loss = self.local_gradient(step)  # at the read
        gossip.drain(x)
        gossip.interact(x, self.ctx.rng)
        x -= self.opt.step(x, self.g, self.state, lr)
        gossip.publish(x, step)
        self.last = step
        return loss


@ALGORITHMS.register("ad_psgd")
@dataclass(frozen=True)
class ADPSGDConfig(SwarmConfig):
    """AD-PSGD: asynchronous pairwise averaging, the gradient at a stale read (a baseline)."""

    mode: str = param("pairwise", "pairwise: both ends of an average move to it (AD-PSGD's "
                      "atomic averaging; the only mode).", choices=("pairwise",))
    local_steps: int = param(1, "One step between two averagings (the only value).", low=1,
                             high=1)

    def build(self, ctx) -> ADPSGD:
        return ADPSGD(self, ctx)
