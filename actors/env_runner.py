"""K environments stepped in lockstep with the combined policy: the acting loop of the actors and the trainer.

Every step: envs whose chunk queue is empty get a fresh 10-action chunk from the base policy in *one* batched
call, the small policy acts for all K envs in one call, the two actions are combined, and each env steps.
Each step yields the transitions to write (with the small policy's own action ``a_pi``, the base action, the
policy version and the episode id) and the episodes that ended.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from typing import Callable, Protocol, Sequence

import jax
import numpy as np

from csil.actions import combine_actions
from csil.base_policy import openpi_observation
from csil.envs import CsilEnv
from csil.tasks import get_task


class ChunkSource(Protocol):
    """What the runner needs from a base policy: openpi-style observations in, (B, H, 7) action chunks out."""

    def infer_batch(self, observations: Sequence[dict]) -> np.ndarray: ...


@dataclasses.dataclass
class EpisodeStats:
    episode_id: int
    ret: float
    length: int
    success: bool


class EnvRunner:
    """``num_envs`` envs of one task, the base policy's chunk queues, and the small policy's stochastic action."""

    def __init__(self, task: str, obs_mode: str, num_envs: int, base: ChunkSource, network, action_mode: str,
                 episode_seed: Callable[[int], int], env_seed: int = 0):
        self.task = get_task(task)
        self.envs = [CsilEnv(self.task, obs_mode, seed=env_seed) for _ in range(num_envs)]
        self.base, self.network, self.action_mode = base, network, action_mode
        self.episode_seed = episode_seed
        self._act = jax.jit(self._sample)
        self.params, self.version = None, -1
        self.next_episode = 0
        self.obs, self.queues, self.episode_ids, self.returns, self.lengths = [], [], [], [], []
        for env in self.envs:
            self.obs.append(env.reset(seed=self.episode_seed(self.next_episode)))
            self.queues.append(deque())
            self.episode_ids.append(self.next_episode)
            self.returns.append(0.0), self.lengths.append(0)
            self.next_episode += 1

    def _sample(self, params, obs, key):
        from csil import hetstat

        mu, sigma = self.network.apply(params, obs)
        return hetstat.sample(key, mu, sigma)[0]

    def set_params(self, params, version: int) -> None:
        self.params, self.version = params, version

    def base_actions(self) -> np.ndarray:
        """(K, 7): the next base action of every env, querying one batched chunk for the envs that ran out."""
        need = [i for i, q in enumerate(self.queues) if not q]
        if need:
            chunks = self.base.infer_batch([openpi_observation(self.obs[i], self.task.prompt) for i in need])
            for i, chunk in zip(need, chunks):
                self.queues[i].extend(np.asarray(chunk, np.float32))
        return np.stack([q.popleft() for q in self.queues])

    def step(self, key: jax.Array) -> tuple[list[dict], list[EpisodeStats]]:
        if self.params is None:
            raise RuntimeError("EnvRunner.step before set_params: the small policy has no weights yet")
        a_base = self.base_actions()
        batch_obs = {k: np.stack([o[k] for o in self.obs]) for k in self.obs[0]}
        a_pi = np.asarray(self._act(self.params, batch_obs, key), np.float32)
        a_env = combine_actions(a_base, a_pi, self.action_mode)
        transitions, finished = [], []
        for i, env in enumerate(self.envs):
            next_obs, reward, success, truncated, _ = env.step(a_env[i])
            transitions.append({
                "obs": self.obs[i], "action": a_pi[i], "base_action": a_base[i], "reward": np.float32(reward),
                "discount": np.float32(0.0 if success else 1.0), "next_obs": next_obs, "next_action": a_pi[i],
                "policy_version": np.int64(self.version), "episode_id": np.int64(self.episode_ids[i])})
            self.returns[i] += float(reward)
            self.lengths[i] += 1
            self.obs[i] = next_obs
            if success or truncated:
                finished.append(EpisodeStats(self.episode_ids[i], self.returns[i], self.lengths[i], bool(success)))
                self.obs[i] = env.reset(seed=self.episode_seed(self.next_episode))
                self.queues[i].clear()
                self.episode_ids[i], self.returns[i], self.lengths[i] = self.next_episode, 0.0, 0
                self.next_episode += 1
        return transitions, finished

    def close(self) -> None:
        for env in self.envs:
            env.close()
