"""The one acting step: observations + base-action chunk queues + small-policy params -> the executed actions.

Every place that turns an observation into an action goes through ``CombinedPolicy``: the env actors and the
single-process trainer (``act(..., key)``: a sample from the small policy), the evaluator (``act(..., None)``:
its mode), and residual-mode pretraining (``open_loop_base_actions``). The base policy's observations are built by
the caller (``CsilEnv.base_request``, from what the base's server asked for), only for slots that need a chunk. The base policy is anything with openpi's
``infer_batch`` (``ChunkSource``): the inference server's client, or the local model in-process. Each env slot
keeps a queue of base actions; a slot whose queue ran dry gets a fresh chunk, asked for all such slots at once,
and plays it open loop, as π0.5 does in the paper.

In residual mode the small policy also sees the base's plan (``"base_plan"``: the base action a_base it is added
to and that action's place k/H in its chunk): the correction that turns a base chunk into the demonstration
depends on what the base is doing and where in its chunk it is, not on the state alone. Transitions then need the
plan at ``next_obs`` too: ``CombinedPolicy.plan`` gives it without playing it (a chunk is asked for eagerly when a
queue ran dry, which is the request the next act would make anyway).
"""

from __future__ import annotations

import dataclasses
from collections import deque
from typing import Callable, Protocol, Sequence

import jax
import numpy as np

from csil import compile_cache, hetstat
from csil.specs import OPENPI_KEYS, ObsSpec

ACTION_MODES = ("ensemble", "residual", "alone")


def sees_base_plan(action_mode: str) -> bool:
    """Whether the small policy's observations carry ``"base_plan"`` (``ObsSpec.base_plan``): residual mode."""
    return action_mode == "residual"


def small_policy_spec(spec: ObsSpec, action_mode: str) -> ObsSpec:
    """What the small policy and critic see in ``action_mode``: the env's observations (``spec``), plus the base
    plan in residual mode. The trainer and the launcher build replay, networks and the learner from it."""
    return dataclasses.replace(spec, base_plan=sees_base_plan(action_mode))


def with_plan(obs: dict[str, np.ndarray], plan: np.ndarray | None) -> dict[str, np.ndarray]:
    """``obs`` as the small policy sees it: with its ``"base_plan"`` when there is one."""
    return obs if plan is None else {**obs, "base_plan": np.asarray(plan, np.float32)}


class ChunkSource(Protocol):
    """A base policy as the acting step needs it: openpi-style observations in, (B, H, 7) action chunks out;
    ``metadata`` says what an observation must carry (``csil.specs.BaseObsSpec.from_metadata``)."""

    metadata: dict

    def infer_batch(self, observations: Sequence[dict]) -> np.ndarray: ...


def base_observation(obs: dict[str, np.ndarray], prompt: str) -> dict:
    """Our flat observation dict -> the request an openpi server expects (keys renamed, prompt added)."""
    out = {OPENPI_KEYS[k]: v for k, v in obs.items() if k in OPENPI_KEYS}
    out["prompt"] = prompt
    return out


def combine_actions(base: np.ndarray, small: np.ndarray, mode: str) -> np.ndarray:
    """ensemble: the mean of the two (the paper's default); residual: their sum, clipped to the action box;
    alone: the small policy by itself (CSIL without a base policy, the paper's Fig. 6 setting).

    Replay stores ``small`` (a_pi) itself, not the result: the coherent reward and the critic are defined on
    the small policy's own actions.
    """
    if mode == "ensemble":
        return 0.5 * (base + small)
    if mode == "residual":
        return np.clip(base + small, -1.0, 1.0)
    if mode == "alone":
        return small
    raise ValueError(f"unknown action mode {mode!r}; choose one of {ACTION_MODES}")


def open_loop_base_actions(base: ChunkSource, obs: dict[str, np.ndarray], episode_step: np.ndarray, prompt: str,
                           batch: int = 256) -> np.ndarray:
    """(N, 8): the base plan (action and k/H) played at each of N stacked observations of recorded episodes
    (``episode_step``: each one's step within its episode) when the base acts as it does while acting: a chunk
    asked for at steps 0, H, 2H, ... of the episode and played open loop in between."""
    n = len(episode_step)
    rows = lambda idx: [base_observation({k: v[i] for k, v in obs.items()}, prompt) for i in idx]  # noqa: E731
    first = np.asarray(base.infer_batch(rows([0])), np.float32)
    horizon = first.shape[1]
    asked = np.flatnonzero(episode_step % horizon == 0)
    if len(asked) == 0 or asked[0] != 0:
        raise ValueError("episode_step must start each episode at 0")
    rest = [np.asarray(base.infer_batch(rows(asked[i:i + batch])), np.float32) for i in range(1, len(asked), batch)]
    chunks = np.concatenate([first, *rest])
    chunk = np.searchsorted(asked, np.arange(n), side="right") - 1  # the latest chunk asked for at or before i
    k = episode_step % horizon
    return np.concatenate([chunks[chunk, k], (k / horizon)[:, None]], axis=1).astype(np.float32)


def stack_obs(obs: Sequence[dict]) -> dict[str, np.ndarray]:
    return {k: np.stack([o[k] for o in obs]) for k in obs[0]}


@dataclasses.dataclass
class Step:
    """One acting step for K slots: what the envs execute, the small policy's own action, the base action, and
    the base plan the small policy saw (residual mode; else None)."""

    executed: np.ndarray
    small: np.ndarray
    base: np.ndarray
    plan: np.ndarray | None = None


class CombinedPolicy:
    """The base policy's open-loop chunks (one queue per env slot) combined with the small HETSTAT policy.

    ``network`` is the small policy's Flax module (``csil.hetstat.SmallPolicy``); ``network=None`` acts with the
    base policy alone (the executed action is the base action).
    """

    def __init__(self, base: ChunkSource, network, action_mode: str, prompt: str, num_slots: int):
        if action_mode not in ACTION_MODES:
            raise ValueError(f"unknown action mode {action_mode!r}; choose one of {ACTION_MODES}")
        compile_cache.enable()
        self.base, self.network, self.action_mode, self.prompt = base, network, action_mode, prompt
        self.sees_plan = network is not None and sees_base_plan(action_mode)
        self.queues = [deque() for _ in range(num_slots)]
        self.chunk_length = [0] * num_slots  # of each slot's current chunk
        if network is not None:
            self._sample = jax.jit(lambda params, obs, key: hetstat.sample(key, *network.apply(params, obs))[0])
            self._mode = jax.jit(lambda params, obs: hetstat.mode(network.apply(params, obs)[0]))

    def reset(self, slot: int) -> None:
        """A new episode in ``slot``: its unplayed base actions are dropped."""
        self.queues[slot].clear()

    def _refill(self, requests: Callable[[int], dict], slots: Sequence[int]) -> None:
        """One batched request for the slots whose queue ran dry. ``requests(i)`` builds the base policy's
        observation for the i-th slot (called for dry slots only)."""
        dry = [i for i, s in enumerate(slots) if not self.queues[s]]
        if dry:
            chunks = self.base.infer_batch([{**requests(i), "prompt": self.prompt} for i in dry])
            for i, chunk in zip(dry, chunks):
                self.queues[slots[i]].extend(np.asarray(chunk, np.float32))
                self.chunk_length[slots[i]] = len(chunk)

    def base_actions(self, requests: Callable[[int], dict], slots: Sequence[int]) -> np.ndarray:
        """(len(slots), 7): each slot's next base action, played (taken off its queue)."""
        self._refill(requests, slots)
        return np.stack([self.queues[s].popleft() for s in slots])

    def plan(self, requests: Callable[[int], dict], slots: Sequence[int]) -> np.ndarray:
        """(len(slots), 8): each slot's next base action and its place k/H in its chunk, not played: what the
        small policy sees with the observation ``requests`` describes (residual mode)."""
        self._refill(requests, slots)
        return np.stack([np.append(self.queues[s][0], 1.0 - len(self.queues[s]) / self.chunk_length[s])
                         for s in slots]).astype(np.float32)

    def act(self, params, obs: Sequence[dict], key: jax.Array | None, requests: Callable[[int], dict],
            slots: Sequence[int] | None = None) -> Step:
        """Actions for ``obs`` (one per slot, all slots by default): the small policy samples with ``key``,
        or acts with its mode when ``key`` is None (evaluation). ``requests(i)``: the base policy's observation
        at ``obs[i]`` (``CsilEnv.base_request``: what the base's server asked for, not what the small policy sees)."""
        slots = range(len(self.queues)) if slots is None else slots
        if self.network is None:
            a_base = self.base_actions(requests, slots)
            return Step(a_base, np.zeros_like(a_base), a_base)
        if params is None:
            raise RuntimeError("CombinedPolicy.act without small-policy params: no weights received yet")
        plan = self.plan(requests, slots) if self.sees_plan else None
        batch = with_plan(stack_obs(obs), plan)
        a_pi = self._mode(params, batch) if key is None else self._sample(params, batch, key)
        a_pi = np.asarray(a_pi, np.float32)
        if not np.isfinite(a_pi).all():  # nothing downstream could say where it came from
            raise FloatingPointError("the small policy's action is not finite: the learner's weights it acts with "
                                     "diverged (see the learner's last finite metrics)")
        # "alone": the base policy is never asked (its slot in replay holds zeros)
        a_base = np.zeros_like(a_pi) if self.action_mode == "alone" else self.base_actions(requests, slots)
        return Step(combine_actions(a_base, a_pi, self.action_mode).astype(np.float32), a_pi, a_base, plan)
