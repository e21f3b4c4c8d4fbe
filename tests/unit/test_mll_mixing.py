"""Multi-Level Local SGD: the hubs' mixing matrix, rates and sub-networks from the config."""

import numpy as np
import pytest

from mpiopt.algorithms.mll_sgd import hub_mixing_matrix, parse_groups, parse_rates
from mpiopt.comm.topology import build_topology
from mpiopt.errors import ConfigError

TOPOLOGIES = ["complete", "ring", "torus", "hypercube", "random_regular:2"]


def graphs():
    for hubs in range(2, 7):
        for name in TOPOLOGIES:
            try:
                yield build_topology(name, hubs, seed=1)
            except ConfigError:  # a torus or hypercube that does not fit this many hubs
                continue


@pytest.mark.parametrize("masses", ["uniform", "random"])
def test_mixing_matrix_properties_on_every_hub_graph(masses):
    rng = np.random.default_rng(0)
    seen = set()
    for top in graphs():
        seen.add(top.name)
        b = np.ones(top.n) if masses == "uniform" else rng.uniform(0.2, 3.0, top.n)
        b = b / b.sum()
        h = hub_mixing_matrix(top, b)
        np.testing.assert_allclose(h.sum(axis=0), 1.0, atol=1e-12)  # column-stochastic
        edges = np.eye(top.n, dtype=bool)
        for i, j in top.edges:
            edges[i, j] = edges[j, i] = True
        assert (h[edges] > 0).all() and (h[~edges] == 0).all(), (top.name, h)
        balance = b[None, :] * h  # b_d H[j, d], indexed [j, d]
        np.testing.assert_allclose(balance, balance.T, atol=1e-12)  # = b_j H[d, j]
        np.testing.assert_allclose(h @ b, b, atol=1e-12)  # the weighted average is kept
        y = rng.standard_normal((top.n, 5))
        np.testing.assert_allclose(b @ (h.T @ y), b @ y, atol=1e-12)
        if top.name == "complete":  # one round: every hub holds the weighted average
            np.testing.assert_allclose(h.T @ y, np.tile(b @ y, (top.n, 1)), atol=1e-12)
    assert seen == {"complete", "ring", "torus", "hypercube", "random_regular:2"}


def test_rates_parse_and_validate():
    assert parse_rates(0.5, 3, 0).tolist() == [0.5, 0.5, 0.5]
    assert parse_rates([1, 0.25], 2, 0).tolist() == [1.0, 0.25]
    u = parse_rates("uniform:0.1,1.0", 1000, 0)
    assert 0.1 <= u.min() and u.max() <= 1.0 and abs(u.mean() - 0.55) < 0.03
    assert np.array_equal(u, parse_rates("uniform:0.1,1.0", 1000, 0))  # seeded
    bi = parse_rates("bimodal:0.1,1.0", 6, 0)
    assert sorted(bi.tolist()) == [0.1] * 3 + [1.0] * 3
    for bad in (0, 1.5, -1, [0.5, 0], "uniform:0,1", "normal:0.1,0.2", "uniform:x", True,
                [0.5]):
        with pytest.raises(ConfigError) as e:
            parse_rates(bad, 2, 0)
        assert e.value.key == "algorithm.rates"
    with pytest.raises(ConfigError, match=r"valid: 0 < p <= 1"):
        parse_rates(1.5, 2, 0)


def test_groups_parse_and_validate():
    assert parse_groups(2, 5) == [[0, 1, 2], [3, 4]]
    assert parse_groups([[3, 1], [0, 2]], 4) == [[0, 2], [1, 3]]
    assert parse_groups("node", 4) is None
    for bad in (0, 6, [[0, 1], [1, 2]], [[0, 1]], [[0, 1, 2], []], "nodes", 1.5):
        with pytest.raises(ConfigError) as e:
            parse_groups(bad, 3 if bad != 6 else 5)
        assert e.value.key == "algorithm.groups"
