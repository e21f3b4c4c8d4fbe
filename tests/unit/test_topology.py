"""Unit tests for mpiopt.comm.topology: named graphs, edge lists, mixing matrices, errors."""

from __future__ import annotations

import math

import networkx as nx
import numpy as np
import pytest

from mpiopt.comm import topology as topmod
from mpiopt.comm.topology import (
    TOPOLOGY_NAMES,
    Topology,
    build_topology,
    describe,
)
from mpiopt.errors import ConfigError

SIZES = (1, 2, 3, 4, 5, 6, 8, 9, 16)
TORUS_SIZES = (4, 6, 8, 9, 10, 12, 15, 16)
POW2_SIZES = (1, 2, 4, 8, 16)
KEY = "algorithm.topology"


def all_valid_topologies():
    """Yield (spec, n) for every named topology and size where it fits."""
    cases = [("complete", n) for n in SIZES] + [("ring", n) for n in SIZES]
    cases += [("torus", n) for n in TORUS_SIZES] + [("hypercube", n) for n in POW2_SIZES]
    cases += [("random_regular:3", n) for n in (4, 6, 8, 16)]
    cases += [("random_regular:4", n) for n in (5, 6, 9, 16)]
    cases += [([[0, 1], [1, 2], [1, 3], [3, 4]], 5)]
    return cases


def case_id(case):
    spec, n = case
    return f"{spec if isinstance(spec, str) else 'edges'}-{n}"


VALID = all_valid_topologies()


def raises_config(spec, n, *, match, key=KEY, seed=0):
    """Assert that building fails with a ConfigError naming ``key`` and matching ``match``."""
    with pytest.raises(ConfigError, match=match) as info:
        build_topology(spec, n, seed=seed, key=key)
    assert info.value.key == key
    assert str(info.value).startswith(f"{key}: ")
    return info.value


# --- structure common to every topology ---------------------------------------------------


@pytest.mark.parametrize("case", VALID, ids=[case_id(c) for c in VALID])
def test_structure_invariants(case):
    spec, n = case
    top = build_topology(spec, n)
    assert top.n == n
    assert list(top.edges) == sorted(set(top.edges))
    assert all(0 <= i < j < n for i, j in top.edges)
    assert top.is_connected()
    for i in range(n):
        nbrs = top.neighbors(i)
        assert list(nbrs) == sorted(set(nbrs))
        assert i not in nbrs
        assert top.degree(i) == len(nbrs)
        assert all(i in top.neighbors(j) for j in nbrs)
    assert sum(top.degrees()) == 2 * len(top.edges)


@pytest.mark.parametrize("case", VALID, ids=[case_id(c) for c in VALID])
def test_mixing_matrix_is_doubly_stochastic_on_the_graph(case):
    spec, n = case
    top = build_topology(spec, n)
    w = top.mixing_matrix()
    assert w.shape == (n, n) and w.dtype == np.float64
    np.testing.assert_allclose(w, w.T, atol=0)
    np.testing.assert_allclose(w.sum(axis=0), 1.0, atol=1e-12)
    np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-12)
    assert (w >= 0).all()
    support = np.eye(n, dtype=bool)
    for i, j in top.edges:
        support[i, j] = support[j, i] = True
    assert ((w > 0) == support).all()


@pytest.mark.parametrize("case", VALID, ids=[case_id(c) for c in VALID])
def test_spectral_gap_in_unit_interval(case):
    spec, n = case
    gap = build_topology(spec, n).spectral_gap()
    assert 0.0 < gap <= 1.0


def test_mixing_matrix_metropolis_hastings_values_on_irregular_graph():
    # Path 0 - 1 - 2 with a pendant 3 on 1: degrees 1, 3, 1, 1.
    top = build_topology([[0, 1], [1, 2], [1, 3]], 4)
    w = top.mixing_matrix()
    expected = np.array(
        [
            [3 / 4, 1 / 4, 0, 0],
            [1 / 4, 1 / 4, 1 / 4, 1 / 4],
            [0, 1 / 4, 3 / 4, 0],
            [0, 1 / 4, 0, 3 / 4],
        ]
    )
    np.testing.assert_allclose(w, expected, atol=1e-15)
    path = build_topology([[0, 1], [1, 2]], 3).mixing_matrix()
    np.testing.assert_allclose(np.diag(path), [2 / 3, 1 / 3, 2 / 3], atol=1e-15)
    assert path[0, 1] == path[1, 2] == pytest.approx(1 / 3)


def test_mixing_matrix_is_a_fresh_array():
    top = build_topology("ring", 5)
    top.mixing_matrix()[0, 0] = 99.0
    assert top.mixing_matrix()[0, 0] == pytest.approx(1 / 3)


# --- complete -----------------------------------------------------------------------------


@pytest.mark.parametrize("n", SIZES)
def test_complete(n):
    top = build_topology("complete", n)
    assert top.name == "complete"
    assert len(top.edges) == n * (n - 1) // 2
    assert set(top.degrees()) == {n - 1}
    np.testing.assert_allclose(top.mixing_matrix(), np.full((n, n), 1.0 / n), atol=1e-15)
    assert top.spectral_gap() == pytest.approx(1.0, abs=1e-12)


# --- ring ---------------------------------------------------------------------------------


@pytest.mark.parametrize("n", SIZES)
def test_ring_edges_and_degrees(n):
    top = build_topology("ring", n)
    expected_edges = {1: 0, 2: 1}.get(n, n)
    assert len(top.edges) == expected_edges
    assert set(top.degrees()) == {min(n - 1, 2)}
    for i in range(n):
        assert set(top.neighbors(i)) == {(i - 1) % n, (i + 1) % n} - {i}


def test_ring_small_cases():
    assert build_topology("ring", 1).edges == ()
    assert build_topology("ring", 2).edges == ((0, 1),)
    assert build_topology("ring", 3).edges == build_topology("complete", 3).edges


@pytest.mark.parametrize("n", (3, 4, 5, 6, 8, 9, 16, 33))
def test_ring_spectrum_matches_closed_form(n):
    # Every degree is 2, so W = (I + A) / 3 with eigenvalues 1/3 + 2/3 cos(2 pi k / n).
    top = build_topology("ring", n)
    closed = 1 / 3 + 2 / 3 * np.cos(2 * np.pi * np.arange(n) / n)
    np.testing.assert_allclose(
        np.sort(np.linalg.eigvalsh(top.mixing_matrix())), np.sort(closed), atol=1e-12
    )
    assert top.spectral_gap() == pytest.approx(1 - np.max(np.abs(closed[1:])), abs=1e-12)


# --- torus --------------------------------------------------------------------------------


@pytest.mark.parametrize("n, r, c", [(9, 3, 3), (12, 3, 4), (15, 3, 5), (16, 4, 4)])
def test_torus_with_sides_at_least_three(n, r, c):
    top = build_topology("torus", n)
    assert topmod.torus_shape(n, KEY) == (r, c)
    assert len(top.edges) == 2 * n
    assert set(top.degrees()) == {4}
    node = c + 1  # (row 1, column 1)
    assert top.neighbors(node) == tuple(sorted({1, 2 * c + 1, c, c + 2}))
    # W = (I + A) / 5; eigenvalues (1 + 2 cos(2 pi a / r) + 2 cos(2 pi b / c)) / 5.
    a, b = np.meshgrid(np.arange(r), np.arange(c), indexing="ij")
    closed = ((1 + 2 * np.cos(2 * np.pi * a / r) + 2 * np.cos(2 * np.pi * b / c)) / 5).ravel()
    np.testing.assert_allclose(
        np.sort(np.linalg.eigvalsh(top.mixing_matrix())), np.sort(closed), atol=1e-12
    )


@pytest.mark.parametrize("n", (6, 8, 10, 14))
def test_torus_with_a_side_of_two_is_a_ladder(n):
    # r = 2, c = n / 2 >= 3: the length-2 side has one edge, not a doubled one, so every node
    # has degree 3 and there are n (around the rings) + n / 2 (rungs) = 3n / 2 edges.
    top = build_topology("torus", n)
    c = n // 2
    assert topmod.torus_shape(n, KEY) == (2, c)
    assert len(top.edges) == 3 * n // 2
    assert set(top.degrees()) == {3}
    assert top.neighbors(0) == tuple(sorted({1, c - 1, c}))
    assert top.spectral_gap() > 0


def test_torus_two_by_two_is_the_four_cycle():
    # Nodes (a, b) -> 2a + b: the cycle 0 - 1 - 3 - 2 - 0.
    top = build_topology("torus", 4)
    assert top.edges == ((0, 1), (0, 2), (1, 3), (2, 3))
    assert set(top.degrees()) == {2}


@pytest.mark.parametrize("n", (1, 2, 3, 5, 7, 11, 13))
def test_torus_rejects_prime_or_small_sizes(n):
    err = raises_config("torus", n, match="torus needs n = r x c")
    assert "composite" in str(err) and str(n) in str(err)


# --- hypercube ----------------------------------------------------------------------------


@pytest.mark.parametrize("n", POW2_SIZES)
def test_hypercube(n):
    top = build_topology("hypercube", n)
    d = int(math.log2(n))
    assert len(top.edges) == n * d // 2
    assert set(top.degrees()) == {d}
    for i, j in top.edges:
        assert bin(i ^ j).count("1") == 1
    # W = (I + A) / (d + 1); eigenvalues (1 + d - 2m) / (d + 1), so the gap is 2 / (d + 1).
    assert top.spectral_gap() == pytest.approx(2 / (d + 1) if d > 1 else 1.0, abs=1e-12)


@pytest.mark.parametrize("n", (3, 5, 6, 9, 12))
def test_hypercube_rejects_other_sizes(n):
    raises_config("hypercube", n, match="power-of-two")


# --- random regular -----------------------------------------------------------------------


@pytest.mark.parametrize("k, n", [(3, 4), (3, 8), (3, 16), (4, 9), (5, 16), (2, 5)])
def test_random_regular_degrees(k, n):
    top = build_topology(f"random_regular:{k}", n, seed=7)
    assert top.name == f"random_regular:{k}"
    assert set(top.degrees()) == {k}
    assert len(top.edges) == n * k // 2
    assert top.is_connected()


def test_random_regular_is_deterministic_per_seed():
    a = build_topology("random_regular:3", 16, seed=1)
    b = build_topology("random_regular:3", 16, seed=1)
    c = build_topology("random_regular:3", 16, seed=2)
    assert a == b and a.edges == b.edges
    assert a.edges != c.edges


def test_random_regular_first_try_is_networkx_with_the_seed():
    top = build_topology("random_regular:3", 16, seed=5)
    graph = nx.random_regular_graph(3, 16, seed=5)
    assert nx.is_connected(graph)
    assert top.edges == tuple(sorted((min(e), max(e)) for e in graph.edges()))


def test_random_regular_retries_until_connected():
    seed = next(
        s for s in range(100) if not nx.is_connected(nx.random_regular_graph(2, 16, seed=s))
    )
    top = build_topology("random_regular:2", 16, seed=seed)
    assert top.is_connected()  # a single 16-cycle
    assert set(top.degrees()) == {2}
    assert top == build_topology("random_regular:2", 16, seed=seed)


def test_random_regular_gives_up_after_bounded_tries(monkeypatch):
    monkeypatch.setattr(topmod, "RANDOM_REGULAR_TRIES", 0)
    raises_config("random_regular:3", 8, match="no connected graph in 0 tries")


@pytest.mark.parametrize(
    "spec, n, match",
    [
        ("random_regular:x", 8, "positive integer degree"),
        ("random_regular:", 8, "positive integer degree"),
        ("random_regular:0", 8, "positive integer degree"),
        ("random_regular:-2", 8, "positive integer degree"),
        ("random_regular:2.5", 8, "positive integer degree"),
        ("random_regular:8", 8, "k < n"),
        ("random_regular:3", 2, "k < n"),
        ("random_regular:3", 9, "must be even"),
        ("random_regular:1", 6, "never connected"),
    ],
)
def test_random_regular_rejects_bad_specs(spec, n, match):
    raises_config(spec, n, match=match)


def test_random_regular_one_on_two_nodes_is_an_edge():
    assert build_topology("random_regular:1", 2).edges == ((0, 1),)


# --- explicit edge lists ------------------------------------------------------------------


def test_explicit_edges_are_normalized_and_merged():
    top = build_topology([[1, 0], [0, 1], [2, 1], [1, 2], [3, 2]], 4)
    assert top.name == "edges"
    assert top.edges == ((0, 1), (1, 2), (2, 3))
    assert top.neighbors(1) == (0, 2)


def test_explicit_edges_accept_tuples_and_numpy_ints():
    top = build_topology(((0, 1), (np.int64(1), np.int32(2))), 3)
    assert top.edges == ((0, 1), (1, 2))
    assert all(type(v) is int for e in top.edges for v in e)


def test_explicit_empty_list_fits_one_node_only():
    assert build_topology([], 1).edges == ()
    raises_config([], 3, match="not connected")


def test_explicit_disconnected_list_names_components():
    err = raises_config([[0, 1], [2, 3]], 5, match="the graph is not connected")
    assert "[0, 1]; [2, 3]; [4]" in str(err)


def test_disconnected_message_is_bounded():
    err = raises_config([[i, i + 1] for i in range(20)], 40, match="not connected")
    assert "... (21 ranks)" in str(err) and "more" in str(err)
    assert len(str(err)) < 300


@pytest.mark.parametrize(
    "spec, match",
    [
        ([[0, 4]], r"outside \[0, 3\]"),
        ([[-1, 2]], "outside"),
        ([[0, 1], [2, 2]], "edge 1 .* self loop"),
        ([[0, 1, 2]], "pair of integer"),
        ([[0]], "pair of integer"),
        ([[0, 1.0]], "pair of integer"),
        ([[0, True]], "pair of integer"),
        ([["0", "1"]], "pair of integer"),
        (["01"], "pair of integer"),
        ([7], "pair of integer"),
    ],
)
def test_explicit_edges_rejected(spec, match):
    raises_config(spec, 4, match=match)


# --- names, keys and other errors ---------------------------------------------------------


def test_names_constant():
    assert TOPOLOGY_NAMES == ("complete", "ring", "torus", "hypercube", "random_regular:k")


@pytest.mark.parametrize("spec", ["star", "", "rings", "random_regular", None, 3, 2.5])
def test_unknown_spec_lists_valid_names(spec):
    err = raises_config(spec, 4, match="unknown topology")
    for name in TOPOLOGY_NAMES:
        assert name in str(err)
    assert "a list of [i, j] edges" in str(err)


def test_mapping_spec_gets_a_hint():
    raises_config({"random_regular": 3}, 8, match="no space after")


def test_names_are_trimmed_and_case_insensitive():
    assert build_topology(" Ring ", 5).name == "ring"
    assert build_topology("RANDOM_REGULAR: 03", 8).name == "random_regular:3"


@pytest.mark.parametrize(
    "spec, n",
    [("torus", 7), ("hypercube", 6), ("random_regular:3", 5), ("nope", 4), ([[0, 9]], 4),
     ([[0, 1]], 3)],
)
def test_errors_name_the_given_key(spec, n):
    raises_config(spec, n, match=".", key="algorithm.hub_topology")


@pytest.mark.parametrize("n", (0, -1, 2.0, True))
def test_bad_node_count_is_a_programming_error(n):
    with pytest.raises(ValueError):
        build_topology("ring", n)


# --- random_neighbor ----------------------------------------------------------------------


def test_random_neighbor_is_uniform():
    # 5 neighbours, 20,000 draws with a fixed seed: Pearson's chi-square statistic (4 degrees
    # of freedom) must stay below 18.47, its 0.1% critical value.
    top = build_topology("complete", 6)
    rng = np.random.default_rng(1234)
    draws = [top.random_neighbor(0, rng) for _ in range(20_000)]
    counts = np.bincount(draws, minlength=6)
    assert counts[0] == 0
    expected = len(draws) / 5
    chi2 = float(((counts[1:] - expected) ** 2 / expected).sum())
    assert chi2 < 18.47


@pytest.mark.parametrize("spec, n", [("ring", 8), ("torus", 12), ("hypercube", 16)])
def test_random_neighbor_returns_only_neighbours(spec, n):
    top = build_topology(spec, n)
    rng = np.random.default_rng(0)
    for i in range(n):
        picks = {top.random_neighbor(i, rng) for _ in range(200)}
        assert picks == set(top.neighbors(i))
        assert all(type(p) is int for p in picks)


def test_random_neighbor_is_reproducible():
    top = build_topology("ring", 8)
    a = [top.random_neighbor(3, np.random.default_rng(9)) for _ in range(5)]
    assert len(set(a)) == 1


def test_random_neighbor_without_neighbours():
    with pytest.raises(ValueError, match="no neighbours"):
        build_topology("complete", 1).random_neighbor(0, np.random.default_rng(0))


# --- the Topology class -------------------------------------------------------------------


def test_topology_normalizes_edges():
    top = Topology(4, ((3, 2), (0, 1), (1, 0)), "mine")
    assert top.edges == ((0, 1), (2, 3))
    assert not top.is_connected()
    assert top.components() == ((0, 1), (2, 3))
    assert top.spectral_gap() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("n, edges", [(0, ()), (3, ((1, 1),)), (3, ((0, 3),)), (3, ((-1, 0),))])
def test_topology_rejects_invalid_graphs(n, edges):
    with pytest.raises(ValueError):
        Topology(n, edges)


def test_topology_is_frozen_and_hashable():
    top = build_topology("ring", 4)
    with pytest.raises(AttributeError):
        top.n = 5
    assert len({top, Topology(4, top.edges, "ring")}) == 1
    assert top != Topology(4, top.edges, "torus")


def test_single_node():
    top = build_topology("complete", 1)
    assert top.is_connected() and top.degree(0) == 0
    np.testing.assert_array_equal(top.mixing_matrix(), [[1.0]])
    assert top.spectral_gap() == 1.0


def test_to_dict_round_trip():
    top = build_topology("random_regular:3", 8, seed=3)
    data = top.to_dict()
    assert data["name"] == "random_regular:3" and data["n"] == 8
    assert data["edges"][0] == list(top.edges[0]) and len(data["edges"]) == 12
    assert Topology.from_dict(data) == top
    assert build_topology(data["edges"], data["n"]).edges == top.edges


def test_describe_is_one_line():
    text = describe(build_topology("torus", 6))
    assert "\n" not in text
    assert text == "torus: n=6, 9 edges, degree 3..3, spectral gap 0.5"
    assert "degree 1..3" in describe(build_topology([[0, 1], [1, 2], [1, 3]], 4))
