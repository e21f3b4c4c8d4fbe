"""Multi-Level Local SGD: sub-networks with hubs, heterogeneous rates, hubs gossiping.

ALGORITHMS.md section 5 (Castiglia, Das, Patterson; ICLR 2021). The workers form ``D``
sub-networks (``algorithm.groups``); the lowest rank of each is its hub and also trains (every
rank has the worker role; being a hub is a duty). Time
runs in slots, aligned across ranks (``run.steps`` counts slots):

    every slot k:         worker i steps (x_i <- x_i - lr g_i) with probability p_i
    every tau slots:      y_d = sum_i v_i x_i over sub-network d   (v_i = w_i / w(d))
    every q*tau slots:    hub d: y_d <- sum_j H[j, d] y_j over its hub neighbours and itself
    then:                 every worker of d: x_i <- y_d

A worker that does not step in a slot idles (nobody waits for anybody between rounds); with
``run.slowdown`` set to ``1 / p_i`` a slow worker is also really slower, so that every worker
spends about the same time per slot. ``algorithm.wait: true`` is the waiting comparator: every
worker steps in every slot (local SGD, or hierarchical local SGD with ``q > 1``), so a round
waits for the slowest worker's ``tau`` steps.

Sub-network averaging is one weighted allreduce on the sub-network's communicator (measured
faster than a reduce to the hub and a broadcast: docs/benchmarks.md); the hub
round is a neighbour exchange between hubs on the hubs' communicator (each hub sends its
``y_d`` to and receives ``y_j`` from each hub-graph neighbour) and a broadcast from the hub.

The mixing matrix (:func:`hub_mixing_matrix`), Metropolis-Hastings with the hub masses ``b``
(each sub-network's share of the total weight) as target: a hub proposes a neighbour ``j`` (or
itself) with probability proportional to ``b_j`` and accepts with ``min(1, B_d / B_j)``, where
``B_d`` is the mass of ``d``'s closed neighbourhood. That gives ``H[j, d] = b_j / max(B_d,
B_j)`` on edges and the rest of column ``d`` on its diagonal: column-stochastic, positive
exactly on the edges and self-loops, and in detailed balance with the masses,
``b_d H[j, d] = b_j H[d, j]``. [decision] ALGORITHMS.md writes the balance as ``b_i H[i,j] =
b_j H[j,i]`` with the update ``y_d = sum_j H[j, d] y_j``; the form here is the one under which
that update keeps the weighted average ``sum_d b_d y_d`` (``H b = b``), and on a complete hub
graph every ``H[j, d] = b_j``, so one hub round gives every hub the weighted global average.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from mpiopt.algorithms import ALGORITHMS
from mpiopt.algorithms.base import SGDConfig, SynchronousAlgorithm
from mpiopt.comm.topology import build_topology
from mpiopt.comm.transport import Channel, wait_all
from mpiopt.config import param
from mpiopt.errors import ConfigError

WEIGHTS = ("uniform", "samples")


def hub_mixing_matrix(topology, masses) -> np.ndarray:
    """Return ``H`` for the hub graph ``topology`` and hub masses ``masses`` (see module doc).

    ``H[j, d]`` is what hub ``d`` takes of hub ``j``'s model; every column sums to 1.
    """
    b = np.asarray(masses, dtype=np.float64)
    b = b / b.sum()
    n = topology.n
    closed = np.array([b[d] + sum(b[j] for j in topology.neighbors(d)) for d in range(n)])
    h = np.zeros((n, n))
    for d in range(n):
        for j in topology.neighbors(d):
            h[j, d] = b[j] / max(closed[d], closed[j])
        h[d, d] = 1.0 - h[:, d].sum()
    return h


def parse_rates(spec: Any, world_size: int, seed: int) -> np.ndarray:
    """Return every rank's step probability from ``algorithm.rates`` (see the key's doc)."""
    key = "algorithm.rates"
    if isinstance(spec, bool):
        raise ConfigError(f"{spec!r}; valid: a number in (0, 1], a list per rank, "
                          "uniform:a,b or bimodal:lo,hi", key=key)
    if isinstance(spec, (int, float)):
        rates = np.full(world_size, float(spec))
    elif isinstance(spec, (list, tuple)):
        if len(spec) != world_size:
            raise ConfigError(f"{len(spec)} rates for {world_size} ranks; valid: one per rank",
                              key=key)
        rates = np.asarray([float(p) for p in spec])
    elif isinstance(spec, str) and ":" in spec:
        kind, _, args = spec.partition(":")
        try:
            lo, hi = (float(a) for a in args.split(","))
        except ValueError:
            raise ConfigError(f"{spec!r}; valid: {kind}:a,b with two numbers",
                              key=key) from None
        if not (0.0 < lo <= 1.0 and 0.0 < hi <= 1.0 and lo <= hi):
            raise ConfigError(f"{spec!r}: its bounds must satisfy 0 < a <= b <= 1 (rates are "
                              "probabilities of stepping); valid: 0 < p <= 1", key=key)
        rng = np.random.default_rng([seed, 6])
        if kind == "uniform":
            rates = rng.uniform(lo, hi, world_size)
        elif kind == "bimodal":  # half the ranks (at random) at lo, the rest at hi
            rates = np.where(rng.permutation(world_size) < world_size // 2, lo, hi)
        else:
            raise ConfigError(f"unknown distribution {kind!r}; valid: uniform, bimodal",
                              key=key)
    else:
        raise ConfigError(f"{spec!r}; valid: a number in (0, 1], a list per rank, "
                          "uniform:a,b or bimodal:lo,hi", key=key)
    bad = [p for p in rates if not 0.0 < p <= 1.0]
    if bad:
        raise ConfigError(f"rate {bad[0]:g} is not a probability of stepping; valid: "
                          "0 < p <= 1", key=key)
    return rates


def parse_groups(spec: Any, world_size: int) -> list[list[int]] | None:
    """Return the sub-networks' ranks from ``algorithm.groups`` (None: one per node)."""
    key = "algorithm.groups"
    if spec == "node":
        return None
    if isinstance(spec, int) and not isinstance(spec, bool):
        if not 1 <= spec <= world_size:
            raise ConfigError(f"{spec} groups of {world_size} ranks; valid: 1..{world_size}",
                              key=key)
        return [a.tolist() for a in np.array_split(np.arange(world_size), spec)]
    if isinstance(spec, (list, tuple)) and all(isinstance(g, (list, tuple)) for g in spec):
        groups = [sorted(int(r) for r in g) for g in spec]
        flat = sorted(r for g in groups for r in g)
        if flat != list(range(world_size)) or any(not g for g in groups):
            raise ConfigError(f"{spec!r} must hold every rank 0..{world_size - 1} exactly "
                              "once, in non-empty groups", key=key)
        return sorted(groups)
    raise ConfigError(f"{spec!r}; valid: a count, a list of lists of ranks, or node", key=key)


class MLLSGD(SynchronousAlgorithm):
    """Slots with random steps; sub-network averages every tau; hub gossip every q tau."""

    def setup(self) -> None:
        super().setup()
        ctx, cfg, t = self.ctx, self.cfg, self.ctx.transport
        groups = parse_groups(cfg.groups, ctx.size)
        if groups is None:  # one sub-network per physical node
            node = t.split_shared()
            members = node.allgather_obj(ctx.rank)
            node.free()
            groups = sorted({tuple(m) for m in t.allgather_obj(members)})
        self.groups = [list(g) for g in groups]
        self.gid = next(i for i, g in enumerate(self.groups) if ctx.rank in g)
        self.group = t.split(self.gid)
        self.hubs = [g[0] for g in self.groups]
        self.is_hub = ctx.rank == self.hubs[self.gid]
        self.hub_t = t.split(0 if self.is_hub else None)
        weight = 1.0
        if cfg.weights == "samples":
            weight = float(getattr(ctx.problem, "n_train", 0)) or 1.0
        weights = np.asarray(t.allgather_obj(weight), dtype=np.float64)
        mass = np.array([weights[g].sum() for g in self.groups])
        self.v = weight / mass[self.gid]  # this worker's share of its sub-network
        self.b = mass / mass.sum()  # the hub masses
        self.w_global = weight / weights.sum()
        self.topology = build_topology(cfg.hub_topology, len(self.groups), cfg.graph_seed,
                                       "algorithm.hub_topology")
        self.H = hub_mixing_matrix(self.topology, self.b)
        self.p = float(parse_rates(cfg.rates, ctx.size, ctx.cfg.run.seed)[ctx.rank])
        self.coins = np.random.default_rng([ctx.cfg.run.seed, 7, ctx.rank])
        if self.is_hub:
            d = self.gid
            self.peers = [(j, self.hubs[j]) for j in self.topology.neighbors(d)]
            self.incoming = {j: np.empty_like(self.x) for j, _ in self.peers}
            self.mixed = np.empty_like(self.x)
        self.taken = 0  # slots in which this worker stepped
        self.waited = 0.0  # seconds in sub-network and hub rounds

    def step(self, step: int, lr: float) -> float | None:
        """A slot: maybe a step (its loss; None when this worker idles), maybe a round."""
        cfg = self.cfg
        loss = None
        if cfg.wait or self.coins.random() < self.p:
            loss = self.local_gradient(step)
            self.opt.apply(self.x, self.g, self.state, lr)
            self.taken += 1
        if (step + 1) % cfg.tau == 0:
            self.average(hub_round=(step + 1) % (cfg.q * cfg.tau) == 0)
        return loss

    def average(self, hub_round: bool) -> None:
        """The sub-network round, then (``hub_round``) the hubs' gossip and a broadcast."""
        t0 = time.perf_counter()
        x = self.x
        x *= self.v
        self.group.allreduce(x, Channel.MODEL)  # y_d on every worker of the sub-network
        if hub_round and len(self.groups) > 1:
            if self.is_hub:
                self._gossip()
            self.group.bcast(x, root=0, channel=Channel.MODEL)
        self.waited += time.perf_counter() - t0

    def _gossip(self) -> None:
        """y_d <- sum_j H[j, d] y_j over this hub's neighbours and itself."""
        hub_t, d, x = self.hub_t, self.gid, self.x
        rank_of = {r: i for i, r in enumerate(self.hubs)}  # hub ranks are hub_t's ranks
        handles = [hub_t.irecv(self.incoming[j], rank_of[r], Channel.MODEL)
                   for j, r in self.peers]
        handles += [hub_t.isend(x, rank_of[r], Channel.MODEL) for j, r in self.peers]
        wait_all(handles)
        np.multiply(x, self.H[d, d], out=self.mixed)
        for j, _ in self.peers:
            self.mixed += self.H[j, d] * self.incoming[j]
        x[...] = self.mixed

    def finish(self) -> None:
        # The model of the run: the weighted global average of every worker's model.
        self.x *= self.w_global
        self.ctx.transport.allreduce(self.x, Channel.MODEL)

    def evaluate(self, step: int) -> dict:
        """The weighted global average model, with consensus distances within and across
        sub-networks (mean squared distance of the workers to their sub-network's average, and
        of the sub-networks' averages to the global one)."""
        ctx, t = self.ctx, self.ctx.transport
        avg, y = self.state.scratch, self.g
        np.multiply(self.x, self.v, out=y)
        self.group.allreduce(y, Channel.EVAL)  # this sub-network's average
        within = float(np.sum((self.x - y) ** 2))
        np.multiply(self.x, self.w_global, out=avg)
        t.allreduce(avg, Channel.EVAL)
        across = float(np.sum((y - avg) ** 2)) if self.is_hub else 0.0
        sums = np.array([within, across])
        t.allreduce(sums, Channel.EVAL)
        if ctx.rank != 0:
            return {}
        return {**ctx.problem.evaluate(avg),
                "consensus_within": sums[0] / ctx.size,
                "consensus_across": sums[1] / len(self.groups)}

    def summary_info(self) -> dict:
        return self.facts

    def run(self) -> None:
        super().run()
        ctx = self.ctx
        mine = {"taken": self.taken, "p": self.p, "waited_s": self.waited}
        every = ctx.transport.allgather_obj(mine)
        slots = max(ctx.steps_done, 1)
        self.facts = {
            "groups": self.groups, "hubs": self.hubs,
            "hub_masses": self.b.tolist(), "mixing_matrix": self.H.tolist(),
            "rates": [e["p"] for e in every],
            "steps_taken_per_rank": [e["taken"] for e in every],
            "waiting_s_per_rank": [round(e["waited_s"], 6) for e in every],
            "slot_s": ctx.elapsed() / slots,
        }
        self.group.free()
        if self.hub_t is not None:
            self.hub_t.free()


@ALGORITHMS.register("mll_sgd")
@dataclass(frozen=True)
class MLLSGDConfig(SGDConfig):
    """Multi-Level Local SGD: sub-networks with hubs, random worker rates, hub gossip."""

    groups: Any = param("node", "Sub-networks: a count (contiguous ranges of ranks), a list "
                        "of lists of ranks, or node (one per physical node). The lowest rank "
                        "of each is its hub.")
    hub_topology: Any = param("complete", "Graph over the hubs: complete, ring, torus, "
                              "hypercube, random_regular:k, or a list of [i, j] edges.")
    graph_seed: int = param(0, "Seed of random hub graphs.", low=0)
    weights: str = param("uniform", "Worker weights w_i: uniform (1) or samples (its shard's "
                         "size).", choices=WEIGHTS)
    rates: Any = param(1.0, "Probability p_i that a worker steps in a slot: one number, a "
                       "list per rank, uniform:a,b (drawn per rank), or bimodal:lo,hi (half "
                       "the ranks at lo, half at hi); 0 < p <= 1.")
    tau: int = param(4, "Slots between two sub-network averages.", low=1)
    q: int = param(2, "Sub-network rounds between two hub rounds.", low=1)
    wait: bool = param(False, "The waiting comparator: every worker steps in every slot, so "
                       "each round waits for the slowest worker's tau steps.")

    def check_world(self, world_size: int) -> None:
        parse_rates(self.rates, world_size, 0)
        groups = parse_groups(self.groups, world_size)
        if groups is not None:
            build_topology(self.hub_topology, len(groups), self.graph_seed,
                           "algorithm.hub_topology")

    def build(self, ctx) -> MLLSGD:
        return MLLSGD(self, ctx)
