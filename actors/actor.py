"""The Ray actor that steps K environments and writes transitions to Reverb.

Weights are pulled without blocking (Acme's VariableClient pattern): a ``Coordinator.sync`` call is kept in
flight and checked with ``ray.wait(timeout=0)`` every step; when it answers with a newer version the actor
fetches that object and acts with it from the next step on. Every transition carries the version it was acted
with, so staleness is measurable. Inserts that the replay's rate limiter holds back (the learner is behind) are
timed and reported, and never block shutdown: writes use a timeout and re-check the stop flag.

Prometheus metrics (``csil.metrics``, tag ``actor``): env steps, episodes, successes, returns and lengths, seconds
held back by the rate limiter (all recorded in one batch at each sync, every ``SYNC_EVERY_S``), the weight version
lag (at each sync reply) and base-policy chunk request latency (``inference_server.client.PatientChunkSource``).

The base policy comes from the inference server (``local``: csil-launch's Serve app through a handle;
``ws://``/``grpc://``: any server by URL). While it is unreachable the actor waits and logs, it does not crash
(``inference_server.client.PatientChunkSource``).

Restarts: the actor is created with ``max_restarts=-1``; a restarted incarnation registers again and gets
fresh episode seeds, and the launcher re-issues ``run``. When the replay server dies, writes fail with
ConnectionError and the actor reconnects to the address the launcher's restarted server has (coordinator).
"""

from __future__ import annotations

import logging
import time

import jax
import ray

from actors.env_runner import EnvRunner
from csil import metrics
from csil.envs import simulator_versions
from csil.seeds import actor_episode_seed
from csil.specs import ONLINE_TABLE
from inference_server.client import PatientChunkSource, RunStopped
from replay.writer import TransitionWriter

log = logging.getLogger(__name__)

SYNC_EVERY_S = 0.5


class EnvActor:
    """Made a Ray actor by the launcher (restarted by Ray whenever it dies)."""

    def __init__(self, actor_id: int, cfg, replay_address: str, coordinator, network):
        self.actor_id, self.cfg, self.coordinator = actor_id, cfg, coordinator
        incarnation = ray.get(coordinator.register.remote(actor_id, simulator_versions()))
        self.base = PatientChunkSource(cfg.base_policy, self._stopped, cfg.base_policy_timeout_s, actor_id=actor_id)
        seed_base = actor_episode_seed(cfg.seed, actor_id, incarnation, 0)
        self.runner = EnvRunner(cfg.task, cfg.obs_mode, cfg.envs_per_actor, self.base, network, cfg.action_mode,
                                episode_seed=lambda i: seed_base + i, env_seed=cfg.seed)
        self._connect_replay(replay_address)  # a restarted actor finds a restarted replay through the coordinator
        self.key = jax.random.PRNGKey(seed_base)
        log.info("actor %d (incarnation %d) ready with %d envs", actor_id, incarnation, cfg.envs_per_actor)

    def _stopped(self) -> bool:
        return ray.get(self.coordinator.stats.remote())["stopped"]

    def _wait_for_weights(self) -> bool:
        while True:
            stop, version, weights = ray.get(self.coordinator.sync.remote(self.actor_id, 0, [], 0.0, -1))
            if stop:
                return False
            if weights is not None:
                self.runner.set_params(ray.get(weights[0]), version)
                return True
            time.sleep(0.2)

    def _write(self, transition: dict, slot: int) -> float | None:
        """Insert one transition of env ``slot``; the seconds the rate limiter held it back, or None if the run
        stopped meanwhile."""
        start = time.perf_counter()
        insert = self.writer.write
        while True:
            try:
                insert(transition, slot)
                return time.perf_counter() - start
            except TimeoutError:  # the learner is behind (or gone): keep waiting unless the run is over
                if self._stopped():
                    return None
                insert = lambda *_: self.writer.settle()  # noqa: E731
            except ConnectionError as e:  # the replay server died; the launcher restarts it at a new address
                log.warning("actor %d lost the replay server (%s); reconnecting", self.actor_id, e)
                if not self._connect_replay():
                    return None
                insert = self.writer.write  # what the dead server had not confirmed is lost with it

    def _connect_replay(self, address: str | None = None) -> bool:
        """A writer to the replay's current address (the coordinator's); False if the run stopped meanwhile."""
        while not self._stopped():
            address = ray.get(self.coordinator.replay_address.remote()) or address
            try:
                self.writer = TransitionWriter(address, table=ONLINE_TABLE, timeout_ms=1000)
                return True
            except ConnectionError:
                time.sleep(1.0)
        return False

    def _export(self, steps: int, episodes: list, blocked: float) -> None:
        """Prometheus (csil.metrics): what this actor reports to the coordinator at a sync, in one batch."""
        actor = self.actor_id
        metrics.inc("csil_actor_env_steps_total", steps, actor=actor)
        metrics.inc("csil_actor_rate_limited_seconds_total", blocked, actor=actor)
        metrics.inc("csil_actor_episodes_total", len(episodes), actor=actor)
        metrics.inc("csil_actor_episode_successes_total", sum(e[2] for e in episodes), actor=actor)
        for ret, length, _ in episodes:
            metrics.observe("csil_actor_episode_return", ret, actor=actor)
            metrics.observe("csil_actor_episode_length", length, actor=actor)

    def run(self) -> int:
        """Act until the coordinator says stop; returns this incarnation's env steps."""
        if not self._wait_for_weights():
            return 0
        steps_total, steps, episodes, blocked = 0, 0, [], 0.0
        pending = None
        last_sync = time.perf_counter()
        while True:
            self.key, key = jax.random.split(self.key)
            try:
                transitions, finished = self.runner.step(key)
            except RunStopped:
                break
            waits = [self._write(t, slot) for slot, t in enumerate(transitions)]
            if None in waits:
                break
            blocked += sum(waits)
            steps += len(transitions)
            episodes.extend((e.ret, e.length, e.success) for e in finished)
            if pending is not None and ray.wait([pending], timeout=0)[0]:
                stop, version, weights = ray.get(pending)
                pending = None
                metrics.set_gauge("csil_actor_weight_version_lag", max(version - self.runner.version, 0),
                                  actor=self.actor_id)
                if stop:
                    break
                if weights is not None:
                    self.runner.set_params(ray.get(weights[0]), version)
            if pending is None and time.perf_counter() - last_sync > SYNC_EVERY_S:
                pending = self.coordinator.sync.remote(self.actor_id, steps, episodes, blocked, self.runner.version)
                self._export(steps, episodes, blocked)
                steps_total += steps
                steps, episodes, blocked, last_sync = 0, [], 0.0, time.perf_counter()
        if steps:  # report the tail, so the run's counters are exact
            ray.get(self.coordinator.sync.remote(self.actor_id, steps, episodes, blocked, self.runner.version))
            self._export(steps, episodes, blocked)
        self.writer.close(timeout_ms=1000, expect_loss=True)  # the learner has stopped sampling
        self.runner.close()
        self.base.close()
        return steps_total + steps
