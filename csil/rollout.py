"""Running episodes: K environments stepped in lockstep per Ray worker, the policy queried in batches.

This is the loop evaluation and demo generation share (and the shape the RL actors take): each env keeps a
queue of actions; whenever some envs run dry, the policy is asked once for all of them (a chunk of 10 for
the base policy, one action for a scripted expert). Episode ``i`` always uses seed ``seed + i``, so results
do not depend on how many workers or envs ran them.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections import deque
from typing import Iterator, Protocol, Sequence

import numpy as np

from csil.envs import CsilEnv
from csil.specs import STATE_KEYS


class RolloutPolicy(Protocol):
    """What the rollout loop needs from a policy."""

    def start_episode(self, slot: int, env: CsilEnv) -> None: ...

    def chunks(self, slots: Sequence[int], obs: Sequence[dict], envs: Sequence[CsilEnv]) -> np.ndarray:
        """(len(slots), L, 7) actions to execute open-loop, L >= 1."""


class BasePolicyRollout:
    """The local base policy executed open-loop in chunks, as pi0.5 is in the paper."""

    def __init__(self, ckpt_dir: str, prompt: str):
        from csil.base_policy import LocalBasePolicy

        self.policy = LocalBasePolicy(ckpt_dir)
        self.prompt = prompt

    def start_episode(self, slot: int, env: CsilEnv) -> None:
        pass

    def chunks(self, slots, obs, envs) -> np.ndarray:
        from csil.base_policy import openpi_observation

        return self.policy.infer_batch([openpi_observation(o, self.prompt) for o in obs])


class ExpertRollout:
    """A scripted expert per env slot; it reads privileged simulator state, one action at a time."""

    def __init__(self, task: str, noise: float | None, seed: int):
        from csil.experts import DEFAULT_NOISE, make_expert

        noise = DEFAULT_NOISE if noise is None else noise
        self.make = lambda slot: make_expert(task, noise=noise, seed=seed + slot)
        self.experts: dict[int, object] = {}

    def start_episode(self, slot: int, env: CsilEnv) -> None:
        self.experts.setdefault(slot, self.make(slot)).reset(env)

    def chunks(self, slots, obs, envs) -> np.ndarray:
        return np.stack([self.experts[s].act(e)[None] for s, e in zip(slots, envs)])


class CombinedRollout:
    """Base policy (open-loop chunks) plus the small HETSTAT policy every step, combined (deterministic mode).

    This is how the fine-tuned system acts at evaluation time; ``network`` is the small policy's Flax module
    (``csil.hetstat.SmallPolicy``) and ``params`` its weights.
    """

    def __init__(self, ckpt_dir: str, prompt: str, params, network, action_mode: str):
        self.base = BasePolicyRollout(ckpt_dir, prompt)
        self.net = network
        self.params = params
        self.action_mode = action_mode
        self.queues: dict[int, deque] = {}

    def start_episode(self, slot: int, env: CsilEnv) -> None:
        self.queues[slot] = deque()

    def chunks(self, slots, obs, envs) -> np.ndarray:
        from csil.actions import combine_actions
        from csil.hetstat import mode

        empty = [i for i, s in enumerate(slots) if not self.queues[s]]
        if empty:
            chunks = self.base.chunks([slots[i] for i in empty], [obs[i] for i in empty], None)
            for i, chunk in zip(empty, chunks):
                self.queues[slots[i]].extend(chunk)
        base = np.stack([self.queues[s].popleft() for s in slots])
        mu, _ = self.net.apply(self.params, {k: np.stack([o[k] for o in obs]) for k in obs[0]})
        return combine_actions(base, np.asarray(mode(mu)), self.action_mode)[:, None]


def make_rollout_policy(spec: str | dict, task: str, prompt: str, seed: int = 0,
                        noise: float | None = None) -> RolloutPolicy:
    """``base:DIR`` -> the local base policy in DIR; ``expert`` -> the task's scripted expert; a dict
    ``{"base": DIR, "params": ..., "network": SmallPolicy, "action_mode": ...}`` -> base + small policy."""
    if isinstance(spec, dict):
        return CombinedRollout(spec["base"], prompt, spec["params"], spec["network"], spec["action_mode"])
    kind, _, arg = spec.partition(":")
    if kind == "base" and arg:
        return BasePolicyRollout(arg, prompt)
    if kind == "expert":
        return ExpertRollout(task, noise, seed)
    raise ValueError(f"unknown policy {spec!r}; use 'base:DIR' (a csil-base checkpoint) or 'expert'")


@dataclasses.dataclass
class EpisodeResult:
    seed: int
    success: bool
    length: int
    env_return: float
    trajectory: dict | None = None  # recorded steps (robomimic keys), only when recording


class _Recorder:
    """Collects one episode in robomimic's layout: per-key obs/next_obs, actions, rewards, dones, states.

    All of robomimic's low-dim keys are stored whatever the observation mode, so a file generated with
    images can still train a state policy.
    """

    def __init__(self, env: CsilEnv, obs: dict):
        self.env = env
        self.keys = list(dict.fromkeys(list(STATE_KEYS) + [k for k, _ in env.spec.state_keys]))
        self.steps: list[dict] = []
        self.obs = self._snapshot(obs)
        self.model_file = env.env.sim.model.get_xml()
        self.ep_meta = env.env.get_ep_meta() if hasattr(env.env, "get_ep_meta") else {}

    def _snapshot(self, obs: dict) -> dict:
        snap = {k: np.asarray(self.env.raw_obs[k], np.float32) for k in self.keys}
        snap.update({k: obs[k] for k in self.env.spec.image_keys})
        return snap

    def record(self, state: np.ndarray, action: np.ndarray, reward: float, done: bool, next_obs: dict) -> None:
        nxt = self._snapshot(next_obs)
        self.steps.append(dict(obs=self.obs, next_obs=nxt, action=action, reward=reward, done=done, state=state))
        self.obs = nxt

    def trajectory(self) -> dict:
        def stack(field: str) -> dict:
            return {k: np.stack([s[field][k] for s in self.steps]) for k in self.steps[0][field]}

        return dict(
            obs=stack("obs"), next_obs=stack("next_obs"),
            actions=np.stack([s["action"] for s in self.steps]).astype(np.float32),
            rewards=np.asarray([s["reward"] for s in self.steps], np.float32),
            dones=np.asarray([s["done"] for s in self.steps], np.float32),
            states=np.stack([s["state"] for s in self.steps]),
            model_file=self.model_file, ep_meta=json.dumps(self.ep_meta),
        )


class RolloutWorker:
    """Owns ``num_envs`` environments and a policy; runs batches of seeded episodes in lockstep."""

    def __init__(self, task: str, obs_mode: str, policy: str | dict, num_envs: int, prompt: str,
                 seed: int = 0, noise: float | None = None):
        self.envs = [CsilEnv(task, obs_mode) for _ in range(num_envs)]
        self.policy = make_rollout_policy(policy, task, prompt, seed=seed, noise=noise)

    def run(self, seeds: Sequence[int], record: bool = False) -> list[EpisodeResult]:
        if len(seeds) > len(self.envs):
            raise ValueError(f"{len(seeds)} seeds for {len(self.envs)} envs")
        obs, queues, returns, recorders = {}, {}, {}, {}
        for slot, seed in enumerate(seeds):
            env = self.envs[slot]
            obs[slot] = env.reset(seed=seed)
            queues[slot], returns[slot] = deque(), 0.0
            self.policy.start_episode(slot, env)
            if record:
                recorders[slot] = _Recorder(env, obs[slot])
        results: dict[int, EpisodeResult] = {}
        while len(results) < len(seeds):
            active = [s for s in range(len(seeds)) if s not in results]
            empty = [s for s in active if not queues[s]]
            if empty:
                actions = self.policy.chunks(empty, [obs[s] for s in empty], [self.envs[s] for s in empty])
                for s, chunk in zip(empty, actions):
                    queues[s].extend(np.asarray(chunk, np.float32))
            for s in active:
                env, action = self.envs[s], queues[s].popleft()
                state = env.sim_state() if record else None
                obs[s], reward, success, truncated, _ = env.step(action)
                returns[s] += reward
                if record:
                    recorders[s].record(state, action, reward, success or truncated, obs[s])
                if success or truncated:
                    traj = recorders[s].trajectory() if record and success else None
                    results[s] = EpisodeResult(seeds[s], bool(success), env.t, returns[s], traj)
        return [results[s] for s in range(len(seeds))]


def default_workers() -> int:
    """One per local core, but no more than the cluster's unreserved CPUs (a worker reserves one: a worker
    that cannot be placed would hold its share of the seeds forever)."""
    import ray

    return max(1, min(os.cpu_count() or 1, int(ray.available_resources().get("CPU", 1))))


def run_episodes(task: str, obs_mode: str, policy: str | dict, seeds: Iterator[int] | Sequence[int], *, prompt: str,
                 workers: int = 0, envs_per_worker: int = 1, record: bool = False, noise: float | None = None,
                 worker_seed: int = 0) -> Iterator[EpisodeResult]:
    """Yield episode results as Ray workers finish them; ``seeds`` may be endless (stop iterating to stop).

    Each worker gets up to ``envs_per_worker`` seeds per call; two calls per worker are kept in flight so
    a worker never idles while the driver collects results.
    """
    import ray

    from csil.ray_utils import ensure_ray

    ensure_ray()
    workers = workers or default_workers()
    remote_cls = ray.remote(num_cpus=1)(RolloutWorker)
    actors = [remote_cls.remote(task, obs_mode, policy, envs_per_worker, prompt, worker_seed + 1000 * i, noise)
              for i in range(workers)]
    seed_iter = iter(seeds)
    pending: dict = {}

    def submit(actor) -> None:
        batch = [s for _, s in zip(range(envs_per_worker), seed_iter)]
        if batch:
            pending[actor.run.remote(batch, record)] = actor

    try:
        for actor in actors:
            submit(actor)
            submit(actor)
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            actor = pending.pop(done[0])
            results = ray.get(done[0])
            submit(actor)
            yield from results
    finally:
        for actor in actors:
            ray.kill(actor)
