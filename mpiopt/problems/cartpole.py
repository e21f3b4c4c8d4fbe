"""CartPole-v1 for reinforcement learning: a vectorised numpy copy, and gymnasium's own.

:class:`CartPoles` steps ``n`` copies of gymnasium's ``CartPole-v1`` at once with numpy: the
same dynamics (Euler integration of Barto, Sutton and Anderson's cart-pole, the constants and
the order of the floating-point operations of ``gymnasium.envs.classic_control.cartpole``, in
float64), the same termination (the cart beyond 2.4, the pole beyond 12 degrees), reward 1 for
every step, and truncation after 500 steps (``TimeLimit``). It needs no gymnasium and steps
all copies in a handful of numpy calls. :class:`GymCartPoles` wraps ``n`` of gymnasium's
environments behind the same interface (the extra ``rl``); tests step both side by side.

Both follow one protocol: ``reset(rng, which=None) -> obs`` draws new start states (for the
copies where the boolean mask ``which`` is set, or all) from the numpy generator ``rng`` and
returns every copy's observation; ``step(action) -> (obs, reward, terminated, truncated)``
steps every copy. Observations are float32 ``(n, 4)``: cart position and velocity, pole angle
and angular velocity. A copy whose episode ended must be reset before it is stepped again.
"""

from __future__ import annotations

import math

import numpy as np

from mpiopt.errors import ConfigError

ENVS = ("cartpole", "gymnasium")
OBS_DIM, N_ACTIONS = 4, 2
MAX_STEPS = 500  # CartPole-v1's TimeLimit
GRAVITY, MASSCART, MASSPOLE, LENGTH, FORCE, TAU = 9.8, 1.0, 0.1, 0.5, 10.0, 0.02
TOTAL_MASS = MASSPOLE + MASSCART
POLEMASS_LENGTH = MASSPOLE * LENGTH
THETA_LIMIT = 12 * 2 * math.pi / 360
X_LIMIT = 2.4


class CartPoles:
    """``n`` CartPole-v1 copies stepped together in numpy.

    Attributes:
        state: float64 ``(4, n)``: rows x, x_dot, theta, theta_dot (one column per copy).
        t: steps taken in each copy's current episode.
    """

    def __init__(self, n: int, max_steps: int = MAX_STEPS):
        self.n, self.max_steps = n, max_steps
        self.state = np.zeros((4, n))
        self.t = np.zeros(n, dtype=np.int64)
        self._force = np.array([-FORCE, FORCE])
        self._rate = np.empty((4, n))
        self._limits = np.array([[X_LIMIT], [THETA_LIMIT]])
        self._reward = np.ones(n)
        self._reward.flags.writeable = False

    def reset(self, rng, which=None) -> np.ndarray:
        """Draw start states uniform in [-0.05, 0.05] for the copies ``which`` (all if None)."""
        if which is None:
            self.state[...] = rng.uniform(-0.05, 0.05, (self.n, 4)).T
            self.t[...] = 0
        else:
            idx = np.flatnonzero(which)
            self.state[:, idx] = rng.uniform(-0.05, 0.05, (idx.size, 4)).T
            self.t[idx] = 0
        return self.observe()

    def observe(self) -> np.ndarray:
        """Return every copy's observation, float32 ``(n, 4)``."""
        return self.state.T.astype(np.float32)

    def step(self, action):
        """Push each cart left (action 0) or right (1); return obs, reward, terminated, truncated.

        The arithmetic is gymnasium's, operation for operation, so a copy follows the same
        trajectory as gymnasium's environment from the same state.
        """
        state, rate = self.state, self._rate
        theta, theta_dot = state[2], state[3]
        costheta, sintheta = np.cos(theta), np.sin(theta)
        temp = (self._force[action] + POLEMASS_LENGTH * np.square(theta_dot) * sintheta) / (
            TOTAL_MASS)
        thetaacc = (GRAVITY * sintheta - costheta * temp) / (
            LENGTH * (4.0 / 3.0 - MASSPOLE * np.square(costheta) / TOTAL_MASS))
        rate[0::2] = state[1::2]  # d(x, theta)/dt: the velocities
        rate[1] = temp - POLEMASS_LENGTH * thetaacc * costheta / TOTAL_MASS
        rate[3] = thetaacc
        rate *= TAU
        state += rate  # Euler, every variable from the old state
        # |x| > 2.4 or |theta| > 12 degrees (as x < -2.4 or x > 2.4 ...: no NaN arises)
        terminated = (np.abs(state[0::2]) > self._limits).any(axis=0)
        self.t += 1
        return self.observe(), self._reward, terminated, self.t >= self.max_steps


class GymCartPoles:
    """``n`` of gymnasium's ``CartPole-v1`` environments behind the :class:`CartPoles` protocol.

    Each reset seeds the environment from ``rng``, so a run is a function of its seed. Needs
    the extra ``rl`` (gymnasium); stepped one environment at a time, it is much slower than
    :class:`CartPoles` and is there to check it and for users who want gymnasium's own.
    """

    def __init__(self, n: int):
        gym = import_gymnasium()
        self.n = n
        self.envs = [gym.make("CartPole-v1") for _ in range(n)]
        self.obs = np.zeros((n, OBS_DIM), dtype=np.float32)

    def reset(self, rng, which=None) -> np.ndarray:
        """Reset the environments ``which`` (all if None), each seeded from ``rng``."""
        idx = range(self.n) if which is None else np.flatnonzero(which)
        for i in idx:
            self.obs[i] = self.envs[i].reset(seed=int(rng.integers(2**31)))[0]
        return self.obs.copy()

    def step(self, action):
        """Step every environment with its action; return obs, reward, terminated, truncated."""
        reward = np.zeros(self.n)
        terminated = np.zeros(self.n, dtype=bool)
        truncated = np.zeros(self.n, dtype=bool)
        for i, env in enumerate(self.envs):
            self.obs[i], reward[i], terminated[i], truncated[i], _ = env.step(int(action[i]))
        return self.obs.copy(), reward, terminated, truncated


def import_gymnasium():
    """Import gymnasium, or raise a ConfigError saying how to install it."""
    try:
        import gymnasium
    except ImportError:
        raise ConfigError("gymnasium is not installed: pip install -e '.[rl]' (or pip install "
                          "gymnasium); valid without it: cartpole", key="problem.env") from None
    return gymnasium


def make_envs(kind: str, n: int):
    """Return ``n`` CartPole copies: ``cartpole`` (numpy) or ``gymnasium``."""
    if kind == "cartpole":
        return CartPoles(n)
    if kind == "gymnasium":
        return GymCartPoles(n)
    raise ConfigError(f"unknown environment {kind!r}; valid: {', '.join(ENVS)}",
                      key="problem.env")
