"""Running episodes: K environments stepped in lockstep per Ray worker, the policy queried in batches.

This is the loop evaluation and demo generation share: each env keeps a queue of actions; whenever some envs
run dry, the policy is asked once for all of them (one combined action, or one action of a scripted expert).
Evaluation acts through ``csil.acting.CombinedPolicy``, like the env actors, and gets its base chunks through
the same client (``chunk_source``). Episode ``i`` always uses seed ``seed + i``, so results
do not depend on how many workers or envs ran them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
from collections import deque
from typing import Collection, Iterator, Protocol, Sequence

import numpy as np
import ray

from csil.acting import ChunkSource, CombinedPolicy
from csil.base_policy import LocalBasePolicy
from csil.envs import CsilEnv
from csil.experts import DEFAULT_NOISE, make_expert
from csil.ray_utils import ensure_ray
from csil.specs import STATE_KEYS, BaseObsSpec
from csil.video import FRAME_SIZE, encode
from inference_server.client import PatientChunkSource, connect_base_policy


class RolloutPolicy(Protocol):
    """What the rollout loop needs from a policy; ``base_spec``: what its base policy's requests carry (None:
    no base policy)."""

    base_spec: BaseObsSpec | None

    def start_episode(self, slot: int, env: CsilEnv, seed: int) -> None:
        """A new episode in ``slot`` on the scene ``env`` was just reset to with ``seed``."""

    def chunks(self, slots: Sequence[int], obs: Sequence[dict], envs: Sequence[CsilEnv]) -> np.ndarray:
        """(len(slots), L, 7) actions to execute open-loop, L >= 1."""


def chunk_source(target: str) -> ChunkSource:
    """The base policy at ``target``: the inference server (``local``: csil-launch's Serve app through a handle;
    ``ws://``/``grpc://``: any server by URL), the same client the env actors use; or a ``csil-base``
    checkpoint directory, loaded in this process. The run's own server (``local``) is waited for while Serve
    replaces a replica, like the actors do; a server given by URL fails after the client's timeout."""
    if target == "local":
        return PatientChunkSource(target, stopped=lambda: False, actor_id="evaluation")
    if target.startswith(("ws://", "wss://", "grpc://")):
        return connect_base_policy(target)
    return LocalBasePolicy(target)


class CombinedRollout:
    """The acting step of ``csil.acting`` in evaluation mode: the base policy's open-loop chunks plus, when
    ``params`` are given, the small policy's mode, combined. Without ``params`` it is the base policy alone."""

    def __init__(self, base: str, prompt: str, num_slots: int, params=None, network=None,
                 action_mode: str = "ensemble"):
        source = chunk_source(base)
        self.base_spec = BaseObsSpec.from_metadata(source.metadata)
        self.policy = CombinedPolicy(source, network if params is not None else None, action_mode, prompt, num_slots)
        self.params = params

    def start_episode(self, slot: int, env: CsilEnv, seed: int) -> None:
        self.policy.reset(slot)

    def chunks(self, slots, obs, envs) -> np.ndarray:
        return self.policy.act(self.params, obs, None, lambda i: envs[i].base_request(), slots).executed[:, None]


class ExpertRollout:
    """A scripted expert per env slot; it reads privileged simulator state, one action at a time. Its noise is
    seeded by the episode's scene, so an episode is the same whichever worker and slot run it."""

    base_spec = None

    def __init__(self, task: str, noise: float | None):
        self.task, self.noise = task, DEFAULT_NOISE if noise is None else noise
        self.experts: dict[int, object] = {}

    def start_episode(self, slot: int, env: CsilEnv, seed: int) -> None:
        self.experts[slot] = make_expert(self.task, noise=self.noise, seed=seed)
        self.experts[slot].reset(env)

    def chunks(self, slots, obs, envs) -> np.ndarray:
        return np.stack([self.experts[s].act(e)[None] for s, e in zip(slots, envs)])


def make_rollout_policy(spec: str | dict, task: str, prompt: str, num_slots: int,
                        noise: float | None = None) -> RolloutPolicy:
    """``base:TARGET`` -> the base policy alone (TARGET: a csil-base checkpoint dir, ``local``, ``ws://...`` or
    ``grpc://...``); ``expert`` -> the task's scripted expert; a dict ``{"base": TARGET, "params": ...,
    "network": SmallPolicy, "action_mode": ...}`` -> base + small policy."""
    if isinstance(spec, dict):
        return CombinedRollout(spec["base"], prompt, num_slots, spec["params"], spec["network"], spec["action_mode"])
    kind, _, arg = spec.partition(":")
    if kind == "base" and arg:
        return CombinedRollout(arg, prompt, num_slots)
    if kind == "expert":
        return ExpertRollout(task, noise)
    raise ValueError(f"unknown policy {spec!r}; use 'base:DIR' (a csil-base checkpoint), 'base:ws://HOST:PORT' "
                     "(a served base policy) or 'expert'")


@dataclasses.dataclass
class EpisodeResult:
    seed: int
    success: bool
    length: int
    env_return: float
    max_reward: float  # the best sparse reward reached: 1 on success; NutAssembly pays 0.5 per nut on its peg
    trajectory: dict | None = None  # recorded steps (robomimic keys), only when recording
    video: dict | None = None  # the cameras side by side (csil.video.encode), only for filmed episodes


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
    """Owns ``num_envs`` environments and a policy; runs batches of seeded episodes in lockstep. The envs render
    what the policy's base asks for (``base_spec``), besides ``obs_mode``."""

    def __init__(self, task: str, obs_mode: str, policy: str | dict, num_envs: int, prompt: str,
                 noise: float | None = None):
        self.policy = make_rollout_policy(policy, task, prompt, num_envs, noise=noise)
        # Fast rendering affects state-mode envs only where they are filmed (a renderer the base policy's images
        # need keeps robosuite's looks); image observations keep their looks.
        quality = "fast" if obs_mode == "state" else "default"
        self.envs = [CsilEnv(task, obs_mode, render_quality=quality, base_spec=self.policy.base_spec)
                     for _ in range(num_envs)]

    def reconstructed(self) -> bool:
        """Whether Ray restarted this worker (it died and its calls were retried)."""
        return ray.get_runtime_context().was_current_actor_reconstructed

    def run(self, seeds: Sequence[int], record: bool = False, film: Collection[int] = (),
            video_stride: int = 1) -> list[EpisodeResult]:
        """One episode per seed; ``record``: keep successful trajectories; ``film``: the seeds whose episodes are
        rendered into an MP4 (every ``video_stride``-th step, see ``csil.video``)."""
        if len(seeds) > len(self.envs):
            raise ValueError(f"{len(seeds)} seeds for {len(self.envs)} envs")
        obs, queues, returns, best, recorders, frames = {}, {}, {}, {}, {}, {}
        for slot, seed in enumerate(seeds):
            env = self.envs[slot]
            obs[slot] = env.reset(seed=seed)
            queues[slot], returns[slot], best[slot] = deque(), 0.0, 0.0
            self.policy.start_episode(slot, env, seed)
            if record:
                recorders[slot] = _Recorder(env, obs[slot])
            if seed in film:
                frames[slot] = [env.render_cameras(FRAME_SIZE)]
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
                best[s] = max(best[s], float(reward))
                if record:
                    recorders[s].record(state, action, reward, success or truncated, obs[s])
                if s in frames and (env.t % video_stride == 0 or success or truncated):
                    frames[s].append(env.render_cameras(FRAME_SIZE))
                if success or truncated:
                    traj = recorders[s].trajectory() if record and success else None
                    video = encode(frames.pop(s), video_stride) if s in frames else None
                    results[s] = EpisodeResult(seeds[s], bool(success), env.t, returns[s], best[s], traj, video)
        return [results[s] for s in range(len(seeds))]


WORKER_RETRIES = 3


class RolloutsCancelled(Exception):
    """``run_episodes``' ``stop`` event was set: its episodes were abandoned (their workers killed)."""


def default_workers() -> int:
    """One per local core, but no more than the cluster's unreserved CPUs (a worker reserves one: a worker
    that cannot be placed would hold its share of the seeds forever)."""
    return max(1, min(os.cpu_count() or 1, int(ray.available_resources().get("CPU", 1))))


def run_episodes(task: str, obs_mode: str, policy: str | dict, seeds: Iterator[int] | Sequence[int], *, prompt: str,
                 workers: int = 0, envs_per_worker: int = 1, record: bool = False, noise: float | None = None,
                 stats: dict | None = None, film: Collection[int] = (), video_stride: int = 1,
                 runtime_env: dict | None = None, stop: threading.Event | None = None) -> Iterator[EpisodeResult]:
    """Yield episode results as Ray workers finish them; ``seeds`` may be endless (stop iterating to stop).

    The episodes of the seeds in ``film`` come with an MP4 (``EpisodeResult.video``). Each worker gets up to
    ``envs_per_worker`` seeds per call; two calls per worker are kept in flight so
    a worker never idles while the driver collects results. A worker that dies (e.g. Ray's OOM monitor) is
    restarted by Ray and its calls re-run on the same seeds (episodes are deterministic given their seed), up to
    ``WORKER_RETRIES`` times; ``stats["worker_restarts"]`` then counts the workers that were restarted.
    ``runtime_env``: where the workers run (``csil.ray_utils.python_env``: another Python environment).
    Setting ``stop`` abandons the episodes within half a second (a user's Ctrl-C must not wait for an
    evaluation): the workers are killed and ``RolloutsCancelled`` is raised.
    """
    stop = stop or threading.Event()
    if stop.is_set():
        raise RolloutsCancelled
    ensure_ray()
    workers = workers or default_workers()
    remote_cls = ray.remote(num_cpus=1, max_restarts=WORKER_RETRIES, max_task_retries=WORKER_RETRIES,
                            runtime_env=runtime_env)(RolloutWorker)
    actors = [remote_cls.remote(task, obs_mode, policy, envs_per_worker, prompt, noise) for _ in range(workers)]
    seed_iter = iter(seeds)
    pending: dict = {}

    def submit(actor) -> None:
        batch = [s for _, s in zip(range(envs_per_worker), seed_iter)]
        if batch:
            pending[actor.run.remote(batch, record, [s for s in batch if s in film], video_stride)] = actor

    try:
        for actor in actors:
            submit(actor)
            submit(actor)
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
            if stop.is_set():
                raise RolloutsCancelled
            if not done:
                continue
            actor = pending.pop(done[0])
            results = ray.get(done[0])
            submit(actor)
            yield from results
        if stats is not None:
            stats["worker_restarts"] = sum(ray.get([actor.reconstructed.remote() for actor in actors]))
    finally:
        for ref in pending:  # episodes nobody will read: cancelled first, so Ray does not retry them on the kill
            ray.cancel(ref)
        for actor in actors:
            ray.kill(actor)
