"""K environments stepped in lockstep with the combined policy: the acting loop of the actors and the trainer.

Every step the combined policy (``csil.acting.CombinedPolicy``: batched base-policy chunks + the small policy's
sample) acts for all K envs, and each env steps. The envs render what the base policy's server asked for
(its metadata's ``observation_sources``) besides what the small policy sees (``obs_mode``, and in residual mode the
base plan). Each step yields the transitions to write (with the small policy's own action ``a_pi``, the base action,
the policy version and the episode id) and the episodes that ended.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import numpy as np

from csil.acting import ChunkSource, CombinedPolicy, Step, with_plan
from csil.envs import CsilEnv
from csil.specs import BaseObsSpec, Transition
from csil.tasks import get_task


@dataclasses.dataclass
class EpisodeStats:
    episode_id: int
    ret: float
    length: int
    success: bool


class EnvRunner:
    """``num_envs`` envs of one task acting with the combined policy; fresh seeded scenes as episodes end."""

    def __init__(self, task: str, obs_mode: str, num_envs: int, base: ChunkSource, network, action_mode: str,
                 episode_seed: Callable[[int], int], env_seed: int = 0):
        self.task = get_task(task)
        base_spec = BaseObsSpec.from_metadata(base.metadata)  # what the base's server asks for
        self.envs = [CsilEnv(self.task, obs_mode, seed=env_seed, base_spec=base_spec) for _ in range(num_envs)]
        self.policy = CombinedPolicy(base, network, action_mode, self.task.prompt, num_envs)
        self.episode_seed = episode_seed
        self.params, self.version = None, -1
        self.next_episode = 0
        self.obs, self.episode_ids, self.returns, self.lengths = [], [], [], []
        for env in self.envs:
            self.obs.append(env.reset(seed=self.episode_seed(self.next_episode)))
            self.episode_ids.append(self.next_episode)
            self.returns.append(0.0), self.lengths.append(0)
            self.next_episode += 1

    def set_params(self, params, version: int) -> None:
        self.params, self.version = params, version

    def step(self, key: jax.Array) -> tuple[list[Transition], list[EpisodeStats]]:
        if self.params is None:
            raise RuntimeError("EnvRunner.step before set_params: the small policy has no weights yet")
        act = self.policy.act(self.params, self.obs, key, lambda i: self.envs[i].base_request())
        results = [env.step(action) for env, action in zip(self.envs, act.executed)]
        next_plans = self._next_plans(act, [success for _, _, success, _, _ in results])
        transitions, finished = [], []
        for i, (env, (next_obs, reward, success, truncated, _)) in enumerate(zip(self.envs, results)):
            transitions.append(Transition(
                obs=with_plan(self.obs[i], None if act.plan is None else act.plan[i]), action=act.small[i],
                base_action=act.base[i], reward=np.float32(reward), discount=np.float32(0.0 if success else 1.0),
                next_obs=with_plan(next_obs, None if next_plans is None else next_plans[i]),
                next_action=act.small[i], policy_version=np.int64(self.version),
                episode_id=np.int64(self.episode_ids[i])))
            self.returns[i] += float(reward)
            self.lengths[i] += 1
            self.obs[i] = next_obs
            if success or truncated:
                finished.append(EpisodeStats(self.episode_ids[i], self.returns[i], self.lengths[i], bool(success)))
                self.obs[i] = env.reset(seed=self.episode_seed(self.next_episode))
                self.policy.reset(i)
                self.episode_ids[i], self.returns[i], self.lengths[i] = self.next_episode, 0.0, 0
                self.next_episode += 1
        return transitions, finished

    def _next_plans(self, act: Step, success: list[bool]) -> np.ndarray | None:
        """Residual mode: the base plan at each env's new state (before any reset), for ``next_obs``: the critic's
        target evaluates the policy there. A terminal state's plan is never used (discount 0): zeros, no query."""
        if act.plan is None:
            return None
        plans = np.zeros_like(act.plan)
        live = [i for i, done in enumerate(success) if not done]
        if live:
            plans[live] = self.policy.plan(lambda j: self.envs[live[j]].base_request(), live)
        return plans

    def close(self) -> None:
        for env in self.envs:
            env.close()
