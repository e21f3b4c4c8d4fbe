"""Graphs over ranks for gossip algorithms, and their Metropolis-Hastings mixing matrices.

A :class:`Topology` is an undirected simple graph on nodes ``0..n-1`` (usually MPI ranks, or the
hubs of Multi-Level Local SGD). SwarmSGD and AD-PSGD pick a random neighbour with
:meth:`Topology.random_neighbor`; D-PSGD averages with the weights of
:meth:`Topology.mixing_matrix`. :func:`build_topology` turns a configuration value (a name such
as ``"ring"`` or ``"random_regular:4"``, or an explicit list of ``[i, j]`` edges) into a
connected topology, raising :class:`~mpiopt.errors.ConfigError` when it does not fit ``n``.

This module is pure numpy/networkx: it never imports MPI.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from numbers import Integral
from typing import Any

import numpy as np

from mpiopt.errors import ConfigError

TOPOLOGY_NAMES = ("complete", "ring", "torus", "hypercube", "random_regular:k")
"""The named topologies :func:`build_topology` accepts (``k`` is the degree)."""

VALID_SPECS = ", ".join(TOPOLOGY_NAMES) + ", or a list of [i, j] edges"
RANDOM_REGULAR_TRIES = 100
_SHOW_COMPONENTS = 4
_SHOW_NODES = 8


@dataclass(frozen=True)
class Topology:
    """An undirected graph over ``n`` nodes without self loops or duplicate edges.

    Edges given in any order or orientation are normalized to a sorted tuple of ``(i, j)``
    pairs with ``i < j``; duplicates are merged. Neighbour lists are precomputed.

    Attributes:
        n: Number of nodes, at least 1.
        edges: Sorted tuple of ``(i, j)`` with ``0 <= i < j < n``.
        name: What the graph was built from (``"ring"``, ``"random_regular:3"``, ``"edges"``).

    Raises:
        ValueError: If ``n < 1``, an edge is a self loop, or a node is outside ``[0, n)``.
    """

    n: int
    edges: tuple[tuple[int, int], ...]
    name: str = "edges"
    _adjacency: tuple[tuple[int, ...], ...] = field(
        init=False, repr=False, compare=False, hash=False
    )

    def __post_init__(self) -> None:
        if not isinstance(self.n, Integral) or isinstance(self.n, bool) or self.n < 1:
            raise ValueError(f"a topology needs n >= 1 nodes, got {self.n!r}")
        object.__setattr__(self, "n", int(self.n))
        object.__setattr__(self, "edges", _normalize_edges(self.edges, self.n))
        object.__setattr__(self, "_adjacency", _adjacency(self.n, self.edges))

    def neighbors(self, i: int) -> tuple[int, ...]:
        """Return the sorted neighbours of node ``i``."""
        return self._adjacency[i]

    def degree(self, i: int) -> int:
        """Return the number of neighbours of node ``i``."""
        return len(self._adjacency[i])

    def degrees(self) -> tuple[int, ...]:
        """Return the degree of every node, in node order."""
        return tuple(len(adj) for adj in self._adjacency)

    def components(self) -> tuple[tuple[int, ...], ...]:
        """Return the connected components, each sorted, ordered by their smallest node."""
        seen = [False] * self.n
        found = []
        for start in range(self.n):
            if not seen[start]:
                found.append(self._component_of(start, seen))
        return tuple(found)

    def _component_of(self, start: int, seen: list[bool]) -> tuple[int, ...]:
        seen[start] = True
        stack, members = [start], [start]
        while stack:
            for j in self._adjacency[stack.pop()]:
                if not seen[j]:
                    seen[j] = True
                    stack.append(j)
                    members.append(j)
        return tuple(sorted(members))

    def is_connected(self) -> bool:
        """Return whether every node can reach every other (always true for ``n == 1``)."""
        return len(self.components()) == 1

    def mixing_matrix(self) -> np.ndarray:
        """Return the Metropolis-Hastings mixing matrix of the graph.

        ``W[i, j] = 1 / (1 + max(deg_i, deg_j))`` on edges, zero off the graph, and
        ``W[i, i] = 1 - sum_{j != i} W[i, j]`` (always positive). ``W`` is symmetric and doubly
        stochastic, as D-PSGD needs.

        Returns:
            A fresh ``(n, n)`` float64 array.
        """
        w = np.zeros((self.n, self.n), dtype=np.float64)
        if self.edges:
            deg = np.asarray(self.degrees())
            i, j = np.asarray(self.edges).T
            weights = 1.0 / (1.0 + np.maximum(deg[i], deg[j]))
            w[i, j] = weights
            w[j, i] = weights
        w[np.diag_indices(self.n)] = 1.0 - w.sum(axis=1)
        return w

    def spectral_gap(self) -> float:
        """Return ``1 - |lambda_2|`` of :meth:`mixing_matrix`.

        ``|lambda_2|`` is the second largest eigenvalue magnitude. The gap is in ``(0, 1]`` for
        a connected graph, 0 for a disconnected one, and 1.0 for ``n == 1``. Larger means
        faster averaging.
        """
        if self.n == 1:
            return 1.0
        magnitudes = np.sort(np.abs(np.linalg.eigvalsh(self.mixing_matrix())))
        return float(min(1.0, max(0.0, 1.0 - magnitudes[-2])))

    def random_neighbor(self, i: int, rng: np.random.Generator) -> int:
        """Return a neighbour of ``i`` chosen uniformly at random.

        Args:
            i: The node choosing a partner.
            rng: The caller's numpy random generator (one draw of ``rng.integers``).

        Raises:
            ValueError: If ``i`` has no neighbours (only possible for ``n == 1``).
        """
        adj = self._adjacency[i]
        if not adj:
            raise ValueError(f"node {i} of topology {self.name!r} has no neighbours")
        return adj[int(rng.integers(len(adj)))]

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON/YAML-friendly description: ``name``, ``n`` and ``edges``."""
        return {"name": self.name, "n": self.n, "edges": [[i, j] for i, j in self.edges]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Topology:
        """Rebuild a topology from :meth:`to_dict` output."""
        return cls(int(data["n"]), tuple(tuple(e) for e in data["edges"]), str(data["name"]))


def _normalize_edges(edges: Any, n: int) -> tuple[tuple[int, int], ...]:
    """Return sorted, oriented ``(i < j)``, de-duplicated edges; ValueError if invalid."""
    out = set()
    for edge in edges:
        i, j = (int(v) for v in edge)
        if i == j or not (0 <= i < n and 0 <= j < n):
            raise ValueError(f"invalid edge {(i, j)} for a topology on {n} nodes")
        out.add((min(i, j), max(i, j)))
    return tuple(sorted(out))


def _adjacency(n: int, edges: tuple[tuple[int, int], ...]) -> tuple[tuple[int, ...], ...]:
    adj: list[list[int]] = [[] for _ in range(n)]
    for i, j in edges:
        adj[i].append(j)
        adj[j].append(i)
    return tuple(tuple(sorted(a)) for a in adj)


# --- named graphs -------------------------------------------------------------------------


def complete_edges(n: int) -> list[tuple[int, int]]:
    """Return the edges of the complete graph on ``n`` nodes."""
    return [(i, j) for i in range(n) for j in range(i + 1, n)]


def ring_edges(n: int) -> list[tuple[int, int]]:
    """Return the edges of the cycle on ``n`` nodes (one edge for n = 2, none for n = 1)."""
    return [(i, (i + 1) % n) for i in range(n) if i != (i + 1) % n]


def torus_shape(n: int, key: str) -> tuple[int, int]:
    """Return ``(r, c)`` with ``r * c == n`` and ``r`` the largest divisor ``<= sqrt(n)``.

    Raises:
        ConfigError: If ``r < 2``, i.e. ``n`` is prime or smaller than 4.
    """
    r = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    if r < 2:
        raise ConfigError(
            f"a torus needs n = r x c ranks with r, c >= 2, and {n} is "
            f"{'prime' if n > 1 else 'too small'}; sizes that fit are composite numbers "
            f"(4, 6, 8, 9, 10, 12, ...)",
            key=key,
        )
    return r, n // r


def torus_edges(r: int, c: int) -> list[tuple[int, int]]:
    """Return the edges of the ``r x c`` wrap-around grid; node ``(a, b)`` is ``a * c + b``.

    A side of length 2 has a single edge instead of a doubled one, so a ``2 x c`` torus is a
    ladder with rungs (degree 3 for ``c >= 3``) and ``2 x 2`` is the 4-cycle.
    """
    edges = []
    for a in range(r):
        for b in range(c):
            here = a * c + b
            edges.append((here, a * c + (b + 1) % c))
            edges.append((here, ((a + 1) % r) * c + b))
    return [e for e in edges if e[0] != e[1]]


def hypercube_edges(n: int, key: str) -> list[tuple[int, int]]:
    """Return the edges of the ``log2(n)``-dimensional hypercube.

    Raises:
        ConfigError: If ``n`` is not a power of two.
    """
    if n & (n - 1):
        low = 1 << (n.bit_length() - 1)
        raise ConfigError(
            f"a hypercube needs a power-of-two number of ranks, got {n} "
            f"(nearest that fit: {low} and {2 * low})",
            key=key,
        )
    bits = n.bit_length() - 1
    return [(i, i ^ (1 << b)) for i in range(n) for b in range(bits) if i < i ^ (1 << b)]


def parse_random_regular(spec: str, n: int, key: str) -> int:
    """Return ``k`` from ``"random_regular:k"`` after checking that it fits ``n`` nodes.

    Raises:
        ConfigError: If ``k`` is not a positive integer, ``k >= n``, ``n * k`` is odd, or
            ``k == 1`` with ``n > 2`` (a perfect matching is never connected).
    """
    text = spec.split(":", 1)[1].strip()
    if not (text.isascii() and text.isdigit()) or int(text) < 1:
        raise ConfigError(
            f"random_regular:k needs a positive integer degree k, got {spec!r} "
            "(for example 'random_regular:3')",
            key=key,
        )
    k = int(text)
    if k >= n:
        raise ConfigError(f"random_regular:{k} needs k < n, got k={k} with n={n} ranks", key=key)
    if n * k % 2:
        raise ConfigError(
            f"random_regular:{k} on {n} ranks is impossible: n * k must be even", key=key
        )
    if k == 1 and n > 2:
        raise ConfigError(
            f"random_regular:1 on {n} ranks is a perfect matching and never connected; "
            "use k >= 2",
            key=key,
        )
    return k


def random_regular_edges(n: int, k: int, seed: int, key: str) -> list[tuple[int, int]]:
    """Return the edges of a connected random ``k``-regular graph, reproducible for ``seed``.

    The first try is ``networkx.random_regular_graph(k, n, seed)``; disconnected draws are
    retried with seeds derived from ``(seed, try)``, at most :data:`RANDOM_REGULAR_TRIES` times.

    Raises:
        ConfigError: If no try gives a connected graph.
    """
    import networkx as nx

    for attempt in range(RANDOM_REGULAR_TRIES):
        graph = nx.random_regular_graph(k, n, seed=_derived_seed(seed, attempt))
        if nx.is_connected(graph):
            return [(int(i), int(j)) for i, j in graph.edges()]
    raise ConfigError(
        f"random_regular:{k} on {n} ranks gave no connected graph in {RANDOM_REGULAR_TRIES} "
        "tries; use a larger k",
        key=key,
    )


def _derived_seed(seed: int, attempt: int) -> int:
    if attempt == 0:
        return seed
    return int(np.random.SeedSequence([seed, attempt]).generate_state(1)[0])


# --- explicit edge lists ------------------------------------------------------------------


def _is_int(value: Any) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def explicit_edges(spec: Sequence, n: int, key: str) -> list[tuple[int, int]]:
    """Validate a list of ``[i, j]`` edges over ``n`` nodes; duplicates are allowed (merged).

    Raises:
        ConfigError: If an item is not a pair of integers, a node is outside ``[0, n)``, or an
            edge is a self loop.
    """
    edges = []
    for pos, item in enumerate(spec):
        if isinstance(item, (str, bytes)) or not isinstance(item, Sequence) or len(item) != 2 \
                or not all(_is_int(v) for v in item):
            raise ConfigError(
                f"edge {pos} is {item!r}; every edge must be a pair of integer ranks [i, j]",
                key=key,
            )
        i, j = int(item[0]), int(item[1])
        if not (0 <= i < n and 0 <= j < n):
            raise ConfigError(
                f"edge {pos} [{i}, {j}] names a rank outside [0, {n - 1}] ({n} ranks)", key=key
            )
        if i == j:
            raise ConfigError(f"edge {pos} [{i}, {j}] is a self loop", key=key)
        edges.append((i, j))
    return edges


# --- entry point --------------------------------------------------------------------------


def build_topology(spec: Any, n: int, seed: int = 0, key: str = "algorithm.topology") -> Topology:
    """Build a connected topology over ``n`` nodes from a configuration value.

    Args:
        spec: ``"complete"``, ``"ring"``, ``"torus"``, ``"hypercube"``, ``"random_regular:k"``
            (names are case-insensitive), or a list of ``[i, j]`` edges.
        n: Number of nodes (ranks or hubs), at least 1.
        seed: Seed of ``random_regular`` graphs; ignored by the others.
        key: The configuration key reported in errors.

    Returns:
        The topology; ``name`` is the normalized spec, or ``"edges"`` for an edge list.

    Raises:
        ConfigError: If the spec is unknown or malformed, does not fit ``n``, or gives a
            disconnected graph.
        ValueError: If ``n < 1`` (a programming error, not a user one).
    """
    if not _is_int(n) or n < 1:
        raise ValueError(f"build_topology needs n >= 1, got {n!r}")
    name, edges = _named_or_explicit(spec, int(n), seed, key)
    top = Topology(int(n), tuple(edges), name)
    _check_connected(top, key)
    return top


def _named_or_explicit(spec: Any, n: int, seed: int, key: str) -> tuple[str, list]:
    if isinstance(spec, str):
        name = spec.strip().lower()
        edges = _named_edges(name, n, seed, key)
        if name.startswith("random_regular:"):
            name = f"random_regular:{int(name.split(':', 1)[1])}"
        return name, edges
    if isinstance(spec, (list, tuple)):
        return "edges", explicit_edges(spec, n, key)
    hint = ""
    if isinstance(spec, dict) and len(spec) == 1:
        hint = " (for a random regular graph write 'random_regular:k' with no space after ':')"
    raise ConfigError(f"unknown topology {spec!r}{hint}; valid: {VALID_SPECS}", key=key)


def _named_edges(name: str, n: int, seed: int, key: str) -> list[tuple[int, int]]:
    if name == "complete":
        return complete_edges(n)
    if name == "ring":
        return ring_edges(n)
    if name == "torus":
        return torus_edges(*torus_shape(n, key))
    if name == "hypercube":
        return hypercube_edges(n, key)
    if name.startswith("random_regular:"):
        return random_regular_edges(n, parse_random_regular(name, n, key), seed, key)
    raise ConfigError(f"unknown topology {name!r}; valid: {VALID_SPECS}", key=key)


def _check_connected(top: Topology, key: str) -> None:
    parts = top.components()
    if len(parts) == 1:
        return
    shown = "; ".join(_short_nodes(p) for p in parts[:_SHOW_COMPONENTS])
    more = f"; and {len(parts) - _SHOW_COMPONENTS} more" if len(parts) > _SHOW_COMPONENTS else ""
    raise ConfigError(
        f"the graph is not connected: components {shown}{more} "
        f"({len(parts)} components over {top.n} ranks)",
        key=key,
    )


def _short_nodes(nodes: tuple[int, ...]) -> str:
    if len(nodes) <= _SHOW_NODES:
        return "[" + ", ".join(map(str, nodes)) + "]"
    head = ", ".join(map(str, nodes[:_SHOW_NODES]))
    return f"[{head}, ... ({len(nodes)} ranks)]"


def describe(top: Topology) -> str:
    """Return a one-line summary: name, nodes, edges, degree range and spectral gap."""
    degs = top.degrees()
    return (
        f"{top.name}: n={top.n}, {len(top.edges)} edges, degree {min(degs)}..{max(degs)}, "
        f"spectral gap {top.spectral_gap():.4g}"
    )
