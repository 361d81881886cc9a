"""The run's small shared state: the newest published weights, the replay's address, env-step counters, episode
statistics, component restarts, the stop flag.

A separate lightweight Ray actor (no CPU reserved) so that actors never call into the busy learner: the learner
``publish``es ``(version, ObjectRef)`` after ``ray.put`` (the weights travel once through the object store,
whatever the number of actors) and actors ``sync`` without blocking their env loop: one call reports their
progress and returns the newest weights reference only if it is newer than the one they hold.

After a restart, services find each other here: a restored learner publishes its checkpoint's (older) version
with ``restored=True`` and actors take any version other than the one they hold; a restarted replay server
has a new address, which learner and actors read with ``replay_address`` when their connection fails.

Per actor it keeps env steps, the seconds it was acting (between its syncs; a restart starts a new interval) and
the seconds its inserts were held back by the rate limiter, so throughput can be measured with and without waits.
"""

from __future__ import annotations

import collections
import time
from typing import Any

from csil import metrics

COMPONENTS = ("actor", "learner", "replay", "inference", "evaluation")


class Coordinator:
    """Made a Ray actor by the launcher (no CPU reserved)."""

    def __init__(self, env_steps: int = 0, episodes: int = 0):
        self.version, self.weights = -1, None  # weights: [ObjectRef] (a list, so Ray passes the ref, not the value)
        self.env_steps, self.episodes = env_steps, episodes
        self.per_actor: dict[int, int] = collections.Counter()
        self.active_s: dict[int, float] = collections.Counter()
        self.last_sync: dict[int, float] = {}
        self.incarnations: dict[int, int] = collections.Counter()
        self.simulators: dict[int, str] = {}  # what each actor steps: "robosuite X, mujoco Y" (its environment's)
        self.recent: collections.deque = collections.deque(maxlen=100)  # (return, length, success)
        self.staleness: collections.deque = collections.deque(maxlen=1000)  # learner version - acting version
        self.blocked_s: dict[int, float] = collections.Counter()
        self.stopped = False
        self.started = time.time()
        self.replay: str | None = None
        self.component_restarts: dict[str, int] = {c: 0 for c in COMPONENTS}
        for component in COMPONENTS:
            metrics.set_gauge("csil_component_restarts", 0, component=component)

    def register(self, actor_id: int, simulator: str) -> int:
        """A (re)started actor's incarnation number: restarts get fresh episode seeds. ``simulator``: what the
        actor's environment imports (``csil.envs.simulator_versions``), for the summary."""
        self.incarnations[actor_id] += 1
        self.simulators[actor_id] = simulator
        self.last_sync.pop(actor_id, None)
        if self.incarnations[actor_id] > 1:
            self.record_restart("actor")
        return self.incarnations[actor_id]

    def publish(self, version: int, weights: list, restored: bool = False) -> None:
        """The learner's newest weights; ``restored``: a restarted learner's checkpoint, older than what was out."""
        if version > self.version or restored:
            self.version, self.weights = version, weights

    def set_replay(self, address: str) -> None:
        self.replay = address

    def replay_address(self) -> str | None:
        return self.replay

    def record_restart(self, component: str) -> int:
        """A restarted component (one of ``COMPONENTS``); returns its count so far."""
        self.component_restarts[component] += 1
        metrics.set_gauge("csil_component_restarts", self.component_restarts[component], component=component)
        return self.component_restarts[component]

    def sync(self, actor_id: int, env_steps: int, episodes: list[tuple[float, int, bool]], blocked_s: float,
             acting_version: int) -> tuple[bool, int, list | None]:
        """Record an actor's progress; return (stop, newest version, its weights ref if newer than the actor's)."""
        now = time.time()
        if actor_id in self.last_sync:
            self.active_s[actor_id] += now - self.last_sync[actor_id]
        self.last_sync[actor_id] = now
        self.env_steps += env_steps
        self.per_actor[actor_id] += env_steps
        self.episodes += len(episodes)
        self.recent.extend(episodes)
        self.blocked_s[actor_id] += blocked_s
        if acting_version >= 0 and env_steps:
            self.staleness.append(max(self.version - acting_version, 0))
        newer = self.weights if self.version != acting_version else None  # a restored learner's may be older
        return self.stopped, self.version, newer

    def stop(self) -> None:
        self.stopped = True

    def stats(self) -> dict[str, Any]:
        recent = list(self.recent)
        return {
            "env_steps": self.env_steps, "episodes": self.episodes, "version": self.version,
            "actors": {i: {"env_steps": self.per_actor[i], "active_s": round(self.active_s[i], 3),
                           "blocked_s": round(self.blocked_s[i], 3), "restarts": n - 1,
                           "simulator": self.simulators[i]}
                       for i, n in sorted(self.incarnations.items())},
            "restarts": {k: v - 1 for k, v in self.incarnations.items()},
            "train_success": sum(r[2] for r in recent) / len(recent) if recent else None,
            "train_return": sum(r[0] for r in recent) / len(recent) if recent else None,
            "staleness": sum(self.staleness) / len(self.staleness) if self.staleness else None,
            "component_restarts": dict(self.component_restarts),
            "stopped": self.stopped,
        }
