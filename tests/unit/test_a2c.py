"""A2C on CartPole: the numpy CartPole against gymnasium's, the returns, the gradient against
finite differences, replicas, evaluation, the data set none and the return curve."""

import sys

import numpy as np
import pytest

from mpiopt.errors import ConfigError
from mpiopt.problems.a2c import A2CConfig, ActorCritic, n_step_returns
from mpiopt.problems.cartpole import CartPoles, make_envs
from mpiopt.report import Run, episode_curve
from mpiopt.schema import config_from_dict

SMALL = {"hidden": (8, 6), "n_envs": 3, "n_steps": 4}


def problem(dtype=np.float32, **keys):
    return ActorCritic(A2CConfig(**{**SMALL, **keys}), dtype)


def test_numpy_cartpole_steps_as_gymnasium_does():
    gym = pytest.importorskip("gymnasium", reason="gymnasium is not installed (extra rl)")
    n, rng = 4, np.random.default_rng(0)
    ours = CartPoles(n)
    envs = [gym.make("CartPole-v1") for _ in range(n)]
    obs = ours.reset(rng)
    for i, env in enumerate(envs):  # the same start states in both
        env.reset(seed=i)
        env.unwrapped.state = ours.state[:, i].copy()
    ended = 0
    for _ in range(600):  # long enough for failures and for truncation at 500 steps
        action = rng.integers(0, 2, n) if rng.random() < 0.5 else (obs[:, 2] > 0).astype(int)
        obs, reward, terminated, truncated = ours.step(action)
        for i, env in enumerate(envs):
            o, r, term, trunc, _ = env.step(int(action[i]))
            np.testing.assert_array_equal(o, obs[i])
            np.testing.assert_array_equal(env.unwrapped.state, ours.state[:, i])  # float64
            assert (r, term, trunc) == (reward[i], terminated[i], truncated[i])
        done = terminated | truncated
        ended += int(done.sum())
        if done.any():  # restart both from our new start states
            obs = ours.reset(rng, done)
            for i in np.flatnonzero(done):
                envs[i].reset(seed=int(i))
                envs[i].unwrapped.state = ours.state[:, i].copy()
    assert ended > n and truncated.dtype == bool


def test_gymnasium_envs_follow_the_same_protocol():
    pytest.importorskip("gymnasium", reason="gymnasium is not installed (extra rl)")
    envs, rng = make_envs("gymnasium", 2), np.random.default_rng(1)
    obs = envs.reset(rng)
    assert obs.shape == (2, 4) and obs.dtype == np.float32 and np.abs(obs).max() <= 0.05
    obs, reward, terminated, truncated = envs.step(np.array([0, 1]))
    assert reward.tolist() == [1.0, 1.0] and not terminated.any() and not truncated.any()


def test_missing_gymnasium_names_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "gymnasium", None)  # import fails
    with pytest.raises(ConfigError, match=r"problem.env: gymnasium is not installed: pip "
                       r"install -e '.\[rl\]'.*valid without it: cartpole"):
        make_envs("gymnasium", 2)


def test_returns_by_hand():
    g = 0.5
    rewards = np.array([[1.0, 1.0], [1.0, 2.0], [1.0, 1.0]])
    ends = np.array([[False, False], [True, False], [False, False]])
    returns = n_step_returns(rewards, ends, np.array([4.0, 8.0]), g)
    # env 0: ends after step 1, so step 0 sees 1 + g*1 and step 2 bootstraps from 4.
    # env 1: no end: 1 + g(2 + g(1 + g*8)).
    np.testing.assert_allclose(returns[:, 0], [1.5, 1.0, 3.0])
    np.testing.assert_allclose(returns[:, 1], [1 + g * (2 + g * (1 + g * 8)), 2 + g * (1 + g * 8),
                                               1 + g * 8])


def test_truncated_episodes_bootstrap_from_where_they_stopped():
    p = problem(np.float64, n_steps=3, gamma=0.9)
    p.envs.max_steps = 2  # every copy is truncated after its second step
    rng = np.random.default_rng(2)
    x = p.init(rng)
    p.obs = p.envs.reset(rng)
    twin = CartPoles(SMALL["n_envs"])
    twin.state = p.envs.state.copy()
    p.rollout(x, rng)
    twin.step(p._actions[0])
    stopped, *_ = twin.step(p._actions[1])
    assert p._ends.tolist() == [[False] * 3, [True] * 3, [False] * 3]
    np.testing.assert_allclose(p._rewards[1], 1 + 0.9 * p.values(x, stopped))
    np.testing.assert_array_equal(p._rewards[[0, 2]], 1.0)
    assert [row[2:] for row in p.log.rows] == [(2, 6)] * 3  # length; steps of the 3 copies


@pytest.mark.parametrize("keys", [{}, {"shared": True, "activation": "relu"},
                                  {"normalize_advantage": True, "c_e": 0.1, "c_v": 0.7}])
def test_gradient_matches_finite_differences(keys):
    p = problem(np.float64, **{"c_e": 0.05, **keys})
    rng = np.random.default_rng(3)
    x = p.init(rng) + 0.1 * rng.standard_normal(p.dim)
    obs, actions, returns = p.rollout(x, rng)
    adv = p.advantages(x, obs, returns)  # held constant, as in the loss
    g = np.empty_like(x)
    p.loss_and_gradient(x, obs, actions, returns, adv, g)
    scratch, eps = np.empty_like(x), 1e-6

    def loss(v):
        return p.loss_and_gradient(v, obs, actions, returns, adv, scratch)["loss"]

    for i in rng.choice(p.dim, size=60, replace=False):
        e = np.zeros_like(x)
        e[i] = eps
        assert g[i] == pytest.approx((loss(x + e) - loss(x - e)) / (2 * eps), rel=1e-4,
                                     abs=1e-8)


def test_gradient_is_clipped_and_reports_the_rollout():
    p = problem(max_grad_norm=1e-3)
    rng = np.random.default_rng(4)
    x, out = p.init(rng), np.empty(p.dim, np.float32)
    episodes = []
    for _ in range(10):
        m = p.gradient(x, rng, out)
        assert np.linalg.norm(out) == pytest.approx(min(m["grad_norm"], 1e-3), rel=1e-4)
        assert m["env_steps"] == 12 and np.isfinite(m["loss"])
        episodes += m["episodes"]
    assert out.dtype == np.float32 and p.dim == 2 * (4 * 8 + 8 + 8 * 6 + 6) + 6 * 2 + 2 + 7
    assert p.env_steps == 120 and episodes == [row[1] for row in p.log.rows] and episodes


def test_replicas_are_independent_and_log_with_their_rank():
    p = problem()
    rng = np.random.default_rng(5)
    x, out = p.init(rng), np.empty(p.dim, np.float32)
    twin = problem()
    for _ in range(3):
        p.gradient(x, np.random.default_rng(6), out)
        twin.gradient(x, np.random.default_rng(6), out)
    r = p.replica()
    assert r.obs is None and r.envs is not p.envs and r.log is p.log
    for _ in range(30):
        r.gradient(x, np.random.default_rng(7), out)
    assert not np.array_equal(r.envs.state, p.envs.state)
    p.gradient(x, np.random.default_rng(8), out)  # the replica left p's copies alone
    twin.gradient(x, np.random.default_rng(8), out)
    np.testing.assert_array_equal(p.envs.state, twin.envs.state)
    assert p.log.env_steps() == p.env_steps + r.env_steps == 4 * 12 + 30 * 12
    assert len(p.log.rows) > len(twin.log.rows)  # the replica's episodes are the rank's


def test_warm_up_leaves_the_run_unchanged():
    p, q = problem(), problem()
    x = p.init(np.random.default_rng(0))
    a, b = np.empty(p.dim, np.float32), np.empty(p.dim, np.float32)
    p.warm_up(x, a)
    assert p.obs is None and p.env_steps == 0 and not p.log.rows
    p.gradient(x, np.random.default_rng(1), a)
    q.gradient(x, np.random.default_rng(1), b)
    np.testing.assert_array_equal(a, b)


def test_greedy_evaluation_is_repeatable():
    p = problem(eval_episodes=7)
    x = p.init(np.random.default_rng(0))
    first = p.evaluate(x)
    assert first == p.evaluate(x) and first["loss"] == -first["return"]
    assert 1 <= first["return_min"] <= first["return"] <= 500


def test_summary_combines_the_ranks():
    p = problem()
    infos = [{"env_steps": 0, "episodes": 0, "last": []},
             {"env_steps": 300, "episodes": 150, "last": [(t, 10.0) for t in range(100)]},
             {"env_steps": 100, "episodes": 50, "last": [(t + 50.5, 20.0) for t in range(50)]}]
    info = p.summary_info(infos, 2.0)
    assert info["env_steps"] == 400 and info["env_steps_per_s"] == 200.0
    assert info["env_steps_per_rank"] == [0, 300, 100] and info["episodes"] == 200
    # The last 100 by time: 50 of each rank.
    assert info["mean_return_last_100"] == pytest.approx(15.0)
    assert p.summary_info([{}], 1.0)["mean_return_last_100"] is None


def test_the_data_set_is_none_and_may_be_left_out():
    cfg = config_from_dict({"problem": {"name": "a2c"}, "algorithm": {"name": "allreduce"}})
    assert cfg.data.NAME == "none" and cfg.problem.NEEDS_DATA is False
    with pytest.raises(ConfigError, match="data.name: problem 'a2c' makes its own samples"):
        config_from_dict({"problem": {"name": "a2c"}, "data": {"name": "digits"},
                          "algorithm": {"name": "allreduce"}})
    with pytest.raises(ConfigError, match="data.name: problem 'mlp' learns from a data set; "
                       "valid: bow, digits, fashion_mnist, hdf5, news, reuters, synthetic, "
                       "synthetic_lda"):
        config_from_dict({"problem": {"name": "mlp"}, "data": {"name": "none"},
                          "algorithm": {"name": "allreduce"}})
    with pytest.raises(ConfigError, match="problem.env: 'atari' is not one of: cartpole, "
                       "gymnasium"):
        config_from_dict({"problem": {"name": "a2c", "env": "atari"},
                          "algorithm": {"name": "allreduce"}})


def test_return_curve_merges_the_ranks_by_time():
    series = {1: {"episode_time": np.array([1.0, 3.0]), "episode_return": np.array([10.0, 30.0]),
                  "episode_env_steps": np.array([100, 300])},
              2: {"episode_time": np.array([2.0]), "episode_return": np.array([20.0]),
                  "episode_env_steps": np.array([200])}}
    time, steps, mean = episode_curve(Run("r", {}, series=series))
    np.testing.assert_array_equal(time, [1, 2, 3])
    np.testing.assert_allclose(steps, [100 + 100, 200 + 200, 300 + 200])  # from 0 at t=0
    np.testing.assert_allclose(mean, [10, 15, 20])
    assert episode_curve(Run("s", {}, series={0: {"staleness": np.zeros(3)}})) is None
