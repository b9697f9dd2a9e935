"""Soft Actor-Critic in numpy: the agent AutoDFP's search trains (Haarnoja et al., 2018/2019).

- **actor**: an MLP giving the mean and log-deviation of a Gaussian per action coordinate; the
  action is ``tanh`` of a sample (actions live in [-1, 1]), its log-probability corrected for
  the squashing;
- **critics**: two Q networks ``Q(s, a)`` and a slow copy of each (Polyak averaging, ``tau``);
  the regression target is ``r + gamma (1 - done) (min Q'(s', a') - alpha log pi(a'|s'))`` with
  ``a'`` drawn from the actor, the minimum of the two copies keeping the estimate from
  running away;
- **temperature**: ``alpha`` is tuned so that the policy's entropy stays near ``-action
  dimensions`` (the second SAC paper's rule), not fixed;
- every update draws a minibatch from the replay buffer; Adam is written out here.

Everything is float64 and draws from one seeded generator, so a seed gives the same agent,
the same actions and the same plan.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

LOG_STD = (-5.0, 2.0)
_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


class Mlp:
    """ReLU hidden layers, a linear output; ``forward`` keeps what ``backward`` needs."""

    def __init__(self, sizes: list[int], rng: np.random.Generator, out_scale: float = 1.0):
        self.params = []
        for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            bound = math.sqrt(6.0 / (n_in + n_out)) * (out_scale if i == len(sizes) - 2 else 1.0)
            self.params += [rng.uniform(-bound, bound, (n_in, n_out)), np.zeros(n_out)]

    def forward(self, x: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        cache = [x]
        layers = len(self.params) // 2
        for i in range(layers):
            x = x @ self.params[2 * i] + self.params[2 * i + 1]
            if i < layers - 1:
                x = np.maximum(x, 0.0)
            cache.append(x)
        return x, cache

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.forward(x)[0]

    def backward(self, cache: list[np.ndarray], grad: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
        """(gradients of the parameters, gradient of the input) for ``grad`` at the output."""
        grads = [None] * len(self.params)
        layers = len(self.params) // 2
        for i in reversed(range(layers)):
            if i < layers - 1:
                grad = grad * (cache[i + 1] > 0)
            grads[2 * i] = cache[i].T @ grad
            grads[2 * i + 1] = grad.sum(axis=0)
            grad = grad @ self.params[2 * i].T
        return grads, grad

    def copy(self) -> Mlp:
        other = object.__new__(Mlp)
        other.params = [p.copy() for p in self.params]
        return other


class Adam:
    """Adam over a list of arrays, updated in place."""

    def __init__(self, params: list[np.ndarray], lr: float, betas=(0.9, 0.999), eps: float = 1e-8):
        self.params, self.lr, self.betas, self.eps = params, lr, betas, eps
        self.m = [np.zeros_like(p) for p in params]
        self.v = [np.zeros_like(p) for p in params]
        self.t = 0

    def step(self, grads: list[np.ndarray]) -> None:
        self.t += 1
        b1, b2 = self.betas
        correction = math.sqrt(1 - b2**self.t) / (1 - b1**self.t)
        for p, g, m, v in zip(self.params, grads, self.m, self.v):
            m *= b1
            m += (1 - b1) * g
            v *= b2
            v += (1 - b2) * g * g
            p -= self.lr * correction * m / (np.sqrt(v) + self.eps)


class ReplayBuffer:
    """Transitions (state, action, reward, next state, done) in a ring of ``capacity``."""

    def __init__(self, state_dim: int, action_dim: int, capacity: int):
        self.states = np.zeros((capacity, state_dim))
        self.actions = np.zeros((capacity, action_dim))
        self.rewards = np.zeros(capacity)
        self.next_states = np.zeros((capacity, state_dim))
        self.done = np.zeros(capacity)
        self.capacity, self.size, self._next = capacity, 0, 0

    def add(self, state, action, reward: float, next_state, done: bool) -> None:
        i = self._next
        self.states[i], self.actions[i], self.rewards[i] = state, action, reward
        self.next_states[i], self.done[i] = next_state, float(done)
        self._next = (i + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def sample(self, rng: np.random.Generator, batch: int):
        idx = rng.integers(0, self.size, size=min(batch, self.size))
        return self.states[idx], self.actions[idx], self.rewards[idx], self.next_states[idx], self.done[idx]


@dataclass
class SacConfig:
    hidden: int = 64
    lr: float = 1e-3
    gamma: float = 1.0   # episodic, the reward at the end: no discount
    tau: float = 0.01
    batch: int = 64
    capacity: int = 100_000


class SoftActorCritic:
    def __init__(self, state_dim: int, action_dim: int, rng: np.random.Generator, config: SacConfig | None = None):
        c = self.config = config or SacConfig()
        self.rng, self.action_dim = rng, action_dim
        self.actor = Mlp([state_dim, c.hidden, c.hidden, 2 * action_dim], rng, out_scale=0.1)
        self.critics = [Mlp([state_dim + action_dim, c.hidden, c.hidden, 1], rng) for _ in range(2)]
        self.targets = [q.copy() for q in self.critics]
        self.log_alpha = np.zeros(1)
        self.target_entropy = -float(action_dim)
        self.actor_opt = Adam(self.actor.params, c.lr)
        self.critic_opts = [Adam(q.params, c.lr) for q in self.critics]
        self.alpha_opt = Adam([self.log_alpha], c.lr)
        self.buffer = ReplayBuffer(state_dim, action_dim, c.capacity)

    @property
    def alpha(self) -> float:
        return float(np.exp(self.log_alpha[0]))

    def _policy(self, states: np.ndarray, noise: np.ndarray | None):
        """(actions, log-probabilities, what the actor gradient needs) for ``states``."""
        out, cache = self.actor.forward(states)
        mean, raw = out[:, :self.action_dim], out[:, self.action_dim:]
        log_std = np.clip(raw, *LOG_STD)
        std = np.exp(log_std)
        eps = np.zeros_like(mean) if noise is None else noise
        action = np.tanh(mean + std * eps)
        squash = 1 - action**2
        logp = (-0.5 * eps**2 - log_std - _HALF_LOG_2PI - np.log(squash + 1e-6)).sum(axis=1)
        return action, logp, (cache, raw, std, eps, action, squash)

    def act(self, state: np.ndarray, deterministic: bool = False) -> np.ndarray:
        noise = None if deterministic else self.rng.standard_normal((1, self.action_dim))
        return self._policy(state[None], noise)[0][0]

    def _q(self, nets: list[Mlp], states: np.ndarray, actions: np.ndarray) -> list[np.ndarray]:
        x = np.concatenate([states, actions], axis=1)
        return [q(x)[:, 0] for q in nets]

    def update(self) -> None:
        """One gradient step of both critics, the actor and the temperature."""
        c = self.config
        s, a, r, s2, done = self.buffer.sample(self.rng, c.batch)
        n = len(s)
        a2, logp2, _ = self._policy(s2, self.rng.standard_normal((n, self.action_dim)))
        next_q = np.minimum(*self._q(self.targets, s2, a2)) - self.alpha * logp2
        y = r + c.gamma * (1 - done) * next_q
        x = np.concatenate([s, a], axis=1)
        for q, opt in zip(self.critics, self.critic_opts):
            pred, cache = q.forward(x)
            grads, _ = q.backward(cache, (2.0 / n) * (pred[:, 0] - y)[:, None])
            opt.step(grads)
        self._update_actor(s)
        for q, target in zip(self.critics, self.targets):
            for p, tp in zip(q.params, target.params):
                tp *= 1 - c.tau
                tp += c.tau * p

    def _update_actor(self, s: np.ndarray) -> None:
        """Minimise ``alpha log pi(a|s) - min Q(s, a)`` through the reparameterised sample, then
        move ``log alpha`` towards the target entropy."""
        n, k = len(s), self.action_dim
        action, logp, (cache, raw, std, eps, _, squash) = self._policy(s, self.rng.standard_normal((n, k)))
        x = np.concatenate([s, action], axis=1)
        outs = [q.forward(x) for q in self.critics]
        pick = outs[0][0][:, 0] <= outs[1][0][:, 0]  # the smaller critic, per sample
        dq_da = np.zeros((n, k))
        for i, (q, (_, cache_q)) in enumerate(zip(self.critics, outs)):
            rows = pick if i == 0 else ~pick
            _, dx = q.backward(cache_q, rows[:, None].astype(float))
            dq_da += dx[:, -k:]
        alpha = self.alpha
        tanh_term = 2 * action * squash / (squash + 1e-6)  # d(-log(1 - a^2)) / du
        d_mean = (alpha * tanh_term - dq_da * squash) / n
        d_log_std = (alpha * (-1 + tanh_term * std * eps) - dq_da * squash * std * eps) / n
        d_log_std *= (raw > LOG_STD[0]) & (raw < LOG_STD[1])
        grads, _ = self.actor.backward(cache, np.concatenate([d_mean, d_log_std], axis=1))
        self.actor_opt.step(grads)
        self.alpha_opt.step([np.array([-(logp + self.target_entropy).mean()])])
