"""A2C, advantage actor-critic, as a problem: the reinforcement-learning instance of DPSGD.

HSA2C (ALGORITHMS.md section 4) is DPSGD whose direction is the A2C gradient: ``dpsgd`` with
problem ``a2c`` (``jobs/configs/hsa2c-cartpole.yaml``). The problem is stateful, one per core:
it keeps ``n_envs`` copies of the environment running between calls, and each
:meth:`ActorCritic.gradient` plays them ``n_steps`` steps further with the policy at ``x``
(actions drawn from the stream it is given), then writes the gradient of the A2C loss on those
``n_steps * n_envs`` transitions:

    R_t = r_t + gamma R_{t+1} (0 at the end of an episode), R_n = V(s_n)   (n-step returns)
    A_t = R_t - V(s_t)                                                    (advantage, constant)
    loss = mean(-log pi(a_t|s_t) A_t) + c_v mean((R_t - V(s_t))^2) - c_e mean(H(pi(.|s_t)))

A truncated episode (500 steps) is not a failure: its last reward is bootstrapped with the
value of the state it stopped in. The gradient is clipped to norm ``max_grad_norm``; the
algorithm applies it (``x <- x - lr * out``, with momentum if configured).

The network is an MLP on the observation: separate actor and critic networks (``shared:
false``, each ``hidden`` wide, as stable-baselines3's A2C) or one trunk with a policy head and
a value head (``shared: true``). The flat vector holds, block after block (trunk, then policy,
then value; or policy, then value), each layer's weight matrix (fan_in x fan_out, row-major)
and then its bias. Weights start orthogonal (gain sqrt(2) for hidden layers, 0.01 for the
policy head, 1 for the value head), biases zero.

Quality is :meth:`ActorCritic.evaluate`'s: the mean return of ``eval_episodes`` greedy
episodes (the most likely action), from start states drawn from ``eval_seed``, the same for
every evaluation. Training episodes are recorded as they finish (``series/<r>/episode_*`` in
``metrics.h5``); the summary's ``problem_info`` has the environment steps, their rate and the
mean return of the last 100 training episodes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from mpiopt.config import param
from mpiopt.errors import ConfigError
from mpiopt.problems import PROBLEMS
from mpiopt.problems.base import Problem, ProblemConfig
from mpiopt.problems.cartpole import ENVS, N_ACTIONS, OBS_DIM, make_envs

ACTIVATIONS = ("tanh", "relu")
LAST = 100  # the training episodes summarised by mean_return_last_100
_EVAL_STREAM = 7  # purpose of the evaluation's start-state stream


def n_step_returns(rewards, ends, bootstrap, gamma: float):
    """Return the discounted returns of a rollout, bootstrapped from the last values.

    Args:
        rewards: ``(n_steps, n_envs)`` rewards (a truncated episode's last one already holds
            ``gamma V(s)`` of the state it stopped in).
        ends: ``(n_steps, n_envs)`` True where an episode ended at that step.
        bootstrap: ``(n_envs,)`` values of the states after the last step.
        gamma: the discount factor.
    """
    out = np.empty(rewards.shape, dtype=np.result_type(rewards, bootstrap))
    ret = bootstrap
    keep = gamma * ~ends
    for t in range(rewards.shape[0] - 1, -1, -1):
        ret = rewards[t] + keep[t] * ret
        out[t] = ret
    return out


def _orthogonal(rng, shape, gain: float) -> np.ndarray:
    """Return an orthogonal ``shape`` matrix times ``gain`` (as stable-baselines3 starts)."""
    q, r = np.linalg.qr(rng.standard_normal((max(shape), min(shape))))
    q *= np.sign(np.diag(r))
    return gain * (q if shape[0] >= shape[1] else q.T)


class _Stack:
    """Dense layers on a slice of the flat vector; the activation after each but the last
    (and after the last too if ``act_last``)."""

    def __init__(self, sizes, offset: int, act_last: bool, out_gain: float):
        self.shapes = list(zip(sizes[:-1], sizes[1:]))
        self.offset, self.act_last, self.out_gain = offset, act_last, out_gain
        self.size = sum(a * b + b for a, b in self.shapes)

    def split(self, flat) -> list:
        out, at = [], self.offset
        for a, b in self.shapes:
            out.append((flat[at: at + a * b].reshape(a, b), flat[at + a * b: at + a * b + b]))
            at += a * b + b
        return out


class EpisodeLog:
    """The training episodes of one rank: its problem's and its replicas' (threads).

    ``rows`` holds ``(perf_counter time, return, length, rank's environment steps)`` of every
    finished episode, appended by whichever core finished it (a list append is atomic).
    """

    def __init__(self):
        self.rows: list[tuple[float, float, int, int]] = []
        self.members: list[ActorCritic] = []

    def env_steps(self) -> int:
        """Return the environment steps of every member so far."""
        return sum(m.env_steps for m in self.members)


class ActorCritic(Problem):
    """An MLP actor-critic trained by A2C on ``n_envs`` copies of CartPole (module doc).

    Args:
        cfg: the problem's keys (:class:`A2CConfig`).
        dtype: floating type of parameters (float32 in runs; float64 for checks).
        log: the episode log to share (a replica's is its rank's); a new one if None.
    """

    def __init__(self, cfg: A2CConfig, dtype=np.float32, log: EpisodeLog | None = None):
        self.cfg, self.dtype = cfg, np.dtype(dtype)
        self.xp = np
        h = list(cfg.hidden)
        root2 = float(np.sqrt(2.0))
        if cfg.shared:
            self.trunk = _Stack([OBS_DIM, *h], 0, True, root2)
            at, width = self.trunk.size, h[-1]
        else:
            self.trunk, at, width = None, 0, OBS_DIM
        self.pi = _Stack([width, *([] if cfg.shared else h), N_ACTIONS], at, False, 0.01)
        self.v = _Stack([width, *([] if cfg.shared else h), 1], at + self.pi.size, False, 1.0)
        self.dim = at + self.pi.size + self.v.size
        self.relu = cfg.activation == "relu"
        self.envs = make_envs(cfg.env, cfg.n_envs)
        self.obs = None  # the copies start on the first gradient, from its stream
        self.ep_return = np.zeros(cfg.n_envs)
        self.ep_length = np.zeros(cfg.n_envs, dtype=np.int64)
        self.env_steps = 0
        self.log = log if log is not None else EpisodeLog()
        self.log.members.append(self)
        shape = (cfg.n_steps, cfg.n_envs)
        self._obs = np.empty((*shape, OBS_DIM), self.dtype)
        self._actions = np.empty(shape, np.int64)
        self._rewards = np.empty(shape)
        self._ends = np.empty(shape, bool)
        self._views: list = []
        self._eval_envs = None

    # ------------------------------------------------------------------ network

    def views(self, flat):
        """Return ``(trunk, policy, value)`` layer views of ``flat`` (trunk None if separate).

        The views of the last few vectors are kept: every call asks for the same buffers.
        """
        for seen, views in self._views:
            if seen is flat:
                return views
        views = (None if self.trunk is None else self.trunk.split(flat), self.pi.split(flat),
                 self.v.split(flat))
        self._views = [(flat, views), *self._views[:3]]
        return views

    def init(self, rng):
        """Draw orthogonal weights (gains sqrt(2), 0.01 policy head, 1 value head), zero biases."""
        x = np.zeros(self.dim, dtype=self.dtype)
        for stack, layers in zip((self.trunk, self.pi, self.v), self.views(x)):
            for i, (w, _) in enumerate(layers or ()):
                last = i == len(layers) - 1 and not stack.act_last
                w[...] = _orthogonal(rng, w.shape, stack.out_gain if last else np.sqrt(2.0))
        return x

    def _run(self, layers, h, act_last: bool, acts=None):
        """Apply ``layers`` to ``h``; append every output to ``acts`` if given."""
        for i, (w, b) in enumerate(layers):
            h = h @ w
            h += b
            if act_last or i < len(layers) - 1:
                np.maximum(h, 0, out=h) if self.relu else np.tanh(h, out=h)
            if acts is not None:
                acts.append(h)
        return h

    def _back(self, layers, grads, acts, delta, act_last: bool, need_input: bool):
        """Backpropagate ``delta`` (at the output of ``layers``) into ``grads``.

        ``acts`` are the layers' inputs and outputs (``acts[0]`` the input). Returns the
        gradient at the input if ``need_input``.
        """
        n = len(layers)
        for i in range(n - 1, -1, -1):
            if act_last or i < n - 1:
                a = acts[i + 1]
                delta = delta * (a > 0) if self.relu else delta * (1.0 - a * a)
            gw, gb = grads[i]
            np.matmul(acts[i].T, delta, out=gw)
            delta.sum(axis=0, out=gb)
            if i or need_input:
                delta = delta @ layers[i][0].T
        return delta

    def _features(self, layers, obs, acts=None):
        return obs if self.trunk is None else self._run(layers[0], obs, True, acts)

    def logits(self, x, obs):
        """Return the policy's logits at ``obs`` (``(n, 2)``)."""
        layers = self.views(x)
        return self._run(layers[1], self._features(layers, obs), False)

    def values(self, x, obs):
        """Return the critic's values at ``obs`` (``(n,)``)."""
        layers = self.views(x)
        return self._run(layers[2], self._features(layers, obs), False)[:, 0]

    # ------------------------------------------------------------------ rollout

    def rollout(self, x, rng):
        """Play every copy ``n_steps`` further; return observations, actions and returns."""
        cfg = self.cfg
        if self.obs is None:
            self.obs = self.envs.reset(rng)
        obs = self.obs
        for t in range(cfg.n_steps):
            self._obs[t] = obs
            z = self.logits(x, obs)
            z += rng.gumbel(size=z.shape)  # argmax(z + Gumbel noise) samples softmax(z)
            action = z.argmax(axis=1)
            obs, reward, terminated, truncated = self.envs.step(action)
            self._actions[t], self._rewards[t] = action, reward
            ended = terminated | truncated
            self._ends[t] = ended
            if ended.any():
                cut = truncated & ~terminated  # not a failure: bootstrap from where it stopped
                if cut.any():
                    self._rewards[t, cut] += cfg.gamma * self.values(x, obs[cut])
                obs = self._finish_episodes(rng, reward, ended, (t + 1) * cfg.n_envs)
            else:
                self.ep_return += reward
                self.ep_length += 1
        self.obs = obs
        self.env_steps += cfg.n_steps * cfg.n_envs
        returns = n_step_returns(self._rewards, self._ends, self.values(x, obs), cfg.gamma)
        n = cfg.n_steps * cfg.n_envs
        return self._obs.reshape(n, OBS_DIM), self._actions.reshape(n), returns.reshape(n)

    def _finish_episodes(self, rng, reward, ended, played: int):
        """Log the episodes that ended; restart those copies; return the observations.

        ``played``: the environment steps of this rollout so far (not yet in the count).
        """
        self.ep_return += reward
        self.ep_length += 1
        now, steps = time.perf_counter(), self.log.env_steps() + played
        for i in np.flatnonzero(ended):
            self.log.rows.append((now, float(self.ep_return[i]), int(self.ep_length[i]), steps))
        self.ep_return[ended] = 0.0
        self.ep_length[ended] = 0
        return self.envs.reset(rng, ended)

    # ------------------------------------------------------------------ loss

    def advantages(self, x, obs, returns):
        """Return ``R - V(s)`` (normalised per rollout if ``normalize_advantage``)."""
        adv = returns - self.values(x, obs)
        if self.cfg.normalize_advantage and adv.size > 1:
            adv = (adv - adv.mean()) / (adv.std() + 1e-8)
        return adv

    def loss_and_gradient(self, x, obs, actions, returns, adv, out) -> dict:
        """Write the gradient of the A2C loss on a rollout into ``out``, unclipped.

        ``adv`` is held constant (no gradient flows through it). Returns the loss and its
        parts.
        """
        cfg, layers, grads = self.cfg, self.views(x), self.views(out)
        n = obs.shape[0]
        trunk_acts = [obs]
        h = self._features(layers, obs, trunk_acts)
        pi_acts, v_acts = [h], [h]
        z = self._run(layers[1], h, False, pi_acts)
        value = self._run(layers[2], h, False, v_acts)[:, 0]
        z = z - z.max(axis=1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        p = np.exp(logp)
        entropy = -(p * logp).sum(axis=1)
        rows = np.arange(n)
        err = value - returns
        policy_loss = -float((logp[rows, actions] * adv).mean())
        value_loss = float((err * err).mean())
        # d/dz of -log p(a) A: (p - onehot(a)) A; of -c_e H: c_e p (log p + H).
        dz = p * adv[:, None]
        dz[rows, actions] -= adv
        if cfg.c_e:
            dz += cfg.c_e * p * (logp + entropy[:, None])
        dz /= n
        dv = ((2.0 * cfg.c_v / n) * err)[:, None].astype(self.dtype)
        need = self.trunk is not None
        dh = self._back(layers[1], grads[1], pi_acts, dz.astype(self.dtype, copy=False),
                        False, need)
        dh2 = self._back(layers[2], grads[2], v_acts, dv, False, need)
        if need:
            self._back(layers[0], grads[0], trunk_acts, dh + dh2, True, False)
        loss = policy_loss + cfg.c_v * value_loss - cfg.c_e * float(entropy.mean())
        return {"loss": loss, "policy_loss": policy_loss, "value_loss": value_loss,
                "entropy": float(entropy.mean())}

    def gradient(self, x, rng, out) -> dict:
        """Play ``n_steps`` on every copy and write the clipped A2C gradient into ``out``.

        Returns the loss and its parts, ``env_steps`` (of this call), ``episodes`` (the
        returns of the episodes that ended) and ``grad_norm`` (before clipping).
        """
        before = len(self.log.rows)
        obs, actions, returns = self.rollout(x, rng)
        adv = self.advantages(x, obs, returns)
        metrics = self.loss_and_gradient(x, obs, actions, returns, adv, out)
        norm = float(np.sqrt(np.dot(out, out)))
        limit = self.cfg.max_grad_norm
        if limit is not None and norm > limit:
            out *= limit / norm
        metrics.update(grad_norm=norm, env_steps=len(actions),
                       episodes=[row[1] for row in self.log.rows[before:]])
        return metrics

    # ------------------------------------------------------------------ copies

    def replica(self) -> ActorCritic:
        """Return a core of the same rank: fresh copies of the environment, started from the
        stream of its first gradient, its episodes logged with this rank's."""
        return ActorCritic(self.cfg, self.dtype, self.log)

    def warm_up(self, x, out, calls: int = 8) -> None:
        """Compute gradients on a throwaway copy (its own environments and log)."""
        scratch = ActorCritic(self.cfg, self.dtype)
        rng = np.random.default_rng(0)
        for _ in range(calls):
            scratch.gradient(x, rng, out)

    # ------------------------------------------------------------------ quality

    def evaluate(self, x) -> dict:
        """Play ``eval_episodes`` greedy episodes at once; return their mean return.

        ``loss`` is the negative mean return, so that lower is better as for every problem.
        """
        n = self.cfg.eval_episodes
        if self._eval_envs is None:
            self._eval_envs = make_envs(self.cfg.env, n)
        envs = self._eval_envs
        rng = np.random.default_rng([self.cfg.eval_seed, _EVAL_STREAM])
        obs = envs.reset(rng)
        total, alive = np.zeros(n), np.ones(n, dtype=bool)
        while alive.any():
            obs, reward, terminated, truncated = envs.step(self.logits(x, obs).argmax(axis=1))
            total += reward * alive
            ended = terminated | truncated
            alive &= ~ended
            if ended.any():  # restarted, not counted: only each copy's first episode is
                obs = envs.reset(rng, ended)
        mean = float(total.mean())
        return {"return": mean, "return_std": float(total.std()),
                "return_min": float(total.min()), "loss": -mean}

    # ------------------------------------------------------------------ records

    def series(self, origin: float) -> dict:
        rows = np.array(self.log.rows, dtype=np.float64).reshape(-1, 4)
        if not len(rows):
            return {}
        return {
            "episode_time": (rows[:, 0] - origin, "run time (s) at which a training episode "
                             "ended, in the order they ended"),
            "episode_return": (rows[:, 1], "return of that episode (its undiscounted sum of "
                               "rewards)"),
            "episode_length": (rows[:, 2].astype(np.int64), "steps of that episode"),
            "episode_env_steps": (rows[:, 3].astype(np.int64), "environment steps this rank "
                                  "had taken (all its cores) when that episode ended"),
        }

    def info(self, origin: float) -> dict:
        rows = self.log.rows[-LAST:]
        return {"env_steps": self.log.env_steps(), "episodes": len(self.log.rows),
                "last": [(t - origin, ret) for t, ret, _, _ in rows]}

    def summary_info(self, infos: list[dict], wall_time_s: float) -> dict:
        steps = [int(i.get("env_steps", 0)) for i in infos]
        last = sorted(row for i in infos for row in i.get("last", ()))[-LAST:]
        return {
            "env_steps": sum(steps), "env_steps_per_rank": steps,
            "env_steps_per_s": sum(steps) / wall_time_s if wall_time_s > 0 else None,
            "episodes": sum(int(i.get("episodes", 0)) for i in infos),
            "mean_return_last_100": float(np.mean([r for _, r in last])) if last else None,
        }


@PROBLEMS.register("a2c")
@dataclass(frozen=True)
class A2CConfig(ProblemConfig):
    """Advantage actor-critic (A2C) on CartPole-v1; no data set (it plays its own)."""

    NEEDS_DATA = False
    HOST_ONLY = True
    HEADLINE = "return"

    env: str = param("cartpole", "The environment: cartpole (CartPole-v1 in numpy, vectorised "
                     "over the copies) or gymnasium (gymnasium's CartPole-v1; extra rl).",
                     choices=ENVS)
    hidden: tuple[int, ...] = param((64, 64), "Widths of the hidden layers (of the trunk, or "
                                    "of each of the actor and the critic).", low=1)
    shared: bool = param(False, "One trunk with a policy head and a value head (true), or "
                         "separate actor and critic networks (false).")
    activation: str = param("tanh", "Activation of the hidden layers.", choices=ACTIVATIONS)
    n_envs: int = param(8, "Copies of the environment each core plays.", low=1)
    n_steps: int = param(5, "Steps each copy plays per gradient (the n of n-step returns).",
                         low=1)
    gamma: float = param(0.99, "Discount factor.", low=0, high=1)
    c_v: float = param(0.5, "Weight of the value loss.", low=0)
    c_e: float = param(0.0, "Weight of the entropy bonus.", low=0)
    max_grad_norm: float | None = param(0.5, "Clip the gradient to this norm; null: never.",
                                        low=0, low_open=True)
    normalize_advantage: bool = param(False, "Normalise the advantages of each rollout to "
                                      "mean 0 and standard deviation 1.")
    eval_episodes: int = param(100, "Greedy episodes of each evaluation (played at once).",
                               low=1)
    eval_seed: int = param(0, "Seed of the evaluation episodes' start states (the same for "
                           "every evaluation).", low=0)

    def validate(self) -> None:
        if self.shared and not self.hidden:
            raise ConfigError("a shared trunk needs at least one hidden layer",
                              key="problem.hidden")

    def build(self, shard, batch_size: int, xp=np) -> ActorCritic:
        """Return the actor-critic (``shard`` and ``batch_size`` are not used: no data)."""
        return ActorCritic(self)
