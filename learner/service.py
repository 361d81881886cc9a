"""The learner as a Ray actor: ``LearnerCore`` fed by Reverb, with weight publishing, checkpoints and metrics.

Reverb feeds the online half of each update; the demo half is drawn on the device (``LearnerCore``), so the host's
input cost per env step is one sampled online batch.

The launcher makes it a threaded actor (``max_concurrency``): ``run`` loops in one thread while ``checkpoint`` and ``stats``
answer from another (the launcher calls them on a timer and on SIGTERM). The loop never waits on a dead actor:
sampling has a timeout, after which it re-checks the stop flag and tries again. A non-finite metric stops the
loop with a FloatingPointError *before* anything is checkpointed, so the last checkpoint stays good.

Checkpoints (``learner.checkpoint``: orbax, leaves keyed by name, written atomically) hold the whole
``AgentState`` (networks, optimisers, target critic, atoms, temperature) and the counters; ``restore`` brings
them back and republishes the weights with the checkpointed version.

Prometheus (``csil.metrics``): updates and seconds waiting for samples (exported once a second), weights
published, and after the first fused call and every 100 updates the metrics dict (``csil_learner_stat{key=...}``)
and the mean seconds per update since the last record, sample waits excluded (``csil_learner_update_seconds``):
the first record shows a run's losses as soon as learning starts. JAX dispatches updates
asynchronously, so one update's time is not observable without a device sync per update; the window ends with
the metrics fetch, which is a sync, so its mean is right (publishing included; the first window includes the
update's compilation, the first record only that).
"""

from __future__ import annotations

import functools
import json
import logging
import threading
import time
from pathlib import Path
from typing import Callable

import ray

from csil import metrics as prom
from csil.demos import read_demos
from csil.specs import ONLINE_TABLE, ObsSpec
from csil.tasks import get_task
from inference_server.client import PatientChunkSource, RunStopped
from learner.batch import Batch
from learner.core import LearnerCore, finite_metrics
from learner.device_replay import single_samples
from learner.pretrain import DemoTransitions, PretrainingStopped
from replay.dataset import BatchIterator

log = logging.getLogger(__name__)

SAMPLE_TIMEOUT_MS = 5_000
DRAIN = 64  # replay on the device: new transitions taken from Reverb's queue per loop at most
EXPORT_EVERY_S = 1.0  # Prometheus counters of the update loop


def _crossed(updates: int, done: int, every: int) -> bool:
    """Whether the last ``done`` updates passed a multiple of ``every``."""
    return updates // every != (updates - done) // every


class LearnerService:
    """Made a Ray actor by the launcher (``ray.remote(max_restarts=0, max_concurrency=4)``)."""

    def __init__(self, cfg, spec_json: str, demos_path: str, replay_address: str, coordinator, logdir: str):
        self.cfg, self.coordinator, self.replay_address = cfg, coordinator, replay_address
        self.spec = ObsSpec.from_json(spec_json)
        self.logdir = Path(logdir)
        self.ckpt_dir = self.logdir / "checkpoints" / "learner"
        demos = DemoTransitions.from_episodes(read_demos(demos_path, num_demos=cfg.num_demos).episodes, self.spec)
        replay = cfg.replay()
        self.lead = replay.queue_size  # replay on the device: updates the learner may run ahead of its transitions
        self.core = LearnerCore(cfg.agent, self.spec, demos, cfg.seed, dump_dir=self.logdir / "diverged",
                                device_replay=replay.online_size if replay.on_device else 0)
        self.lock = threading.Lock()
        self.stop_pretraining = threading.Event()
        self.metrics: dict[str, float] = {}
        self.update_time_s = 0.0
        self.run_s, self.wait_s = 0.0, 0.0  # in run(): wall time, and the part spent waiting for samples
        self.recent_rate: tuple[float, int] = (time.perf_counter(), 0)  # (time, updates) for updates/s
        self.updates_per_s = 0.0
        # BC + critic pretraining steps done (stats() answers while pretrain() runs: the launcher's progress bar)
        self.pretrain_progress = {"steps": 0, "total": self.core.pretrain_steps}
        self.exported = (0, 0.0)  # (updates, wait_s) already added to the Prometheus counters

    @property
    def updates(self) -> int:
        return self.core.updates

    # --- start ----------------------------------------------------------------------------------------

    def pretrain(self) -> dict:
        """Pretraining (``LearnerCore.pretrain``) and weights version 0. ``interrupt`` (from another thread) ends
        it within one step with ``PretrainingStopped``."""
        self._residual_demos()
        logs = self.core.pretrain(on_step=lambda n: self.pretrain_progress.update(steps=n),
                                  should_stop=self.stop_pretraining.is_set)
        self.publish()
        return logs

    def _residual_demos(self) -> None:
        """Residual mode: the demo actions become a_demo − a_base(s) (``DemoTransitions.as_residuals``), fresh or
        restored. The base-policy server may still be starting: wait for it like the actors do."""
        if self.cfg.action_mode != "residual":
            return
        source = PatientChunkSource(self.cfg.base_policy, stopped=self.stop_pretraining.is_set,
                                    timeout_s=self.cfg.base_policy_timeout_s, actor_id="learner")
        try:
            self.core.demos = self.core.demos.as_residuals(source, get_task(self.cfg.task).prompt, self.spec)
        except RunStopped as e:
            raise PretrainingStopped("stopped while waiting for the base-policy server") from e
        finally:
            source.close()

    def interrupt(self) -> None:
        """Stop pretraining (SIGINT/SIGTERM during it): ``pretrain`` raises within one step."""
        self.stop_pretraining.set()

    def restore(self) -> dict:
        """The newest learner checkpoint: state, update counter and the env steps it was taken at."""
        self._residual_demos()
        counters = self.core.restore(self.ckpt_dir)
        self.publish(restored=True)
        log.info("learner restored from %s (%s)", self.ckpt_dir, counters)
        return counters

    # --- the loop -------------------------------------------------------------------------------------

    def publish(self, restored: bool = False) -> None:
        self.coordinator.publish.remote(self.updates, [ray.put(self.core.policy_params())], restored)
        prom.inc("csil_learner_weights_published_total")

    def _export(self) -> None:
        """Add the updates and sample-wait seconds since the last call to the Prometheus counters."""
        updates, wait_s = self.updates, self.wait_s
        prom.inc("csil_learner_updates_total", updates - self.exported[0])
        prom.inc("csil_learner_sample_wait_seconds_total", wait_s - self.exported[1])
        self.exported = (updates, wait_s)

    def _batches(self) -> BatchIterator:
        """The online stream from the replay at ``replay_address``: batches of (utd, batch_size), or with the
        replay on the device its new transitions one by one."""
        if self.cfg.replay_on_device:  # few held ready: a transition taken from the queue frees a place in it
            return BatchIterator(self.replay_address, ONLINE_TABLE, 1, 1, self.spec, timeout_ms=SAMPLE_TIMEOUT_MS,
                                 ready_batches=self.cfg.fuse_updates)
        return BatchIterator(self.replay_address, ONLINE_TABLE, self.cfg.agent.batch_size, self.cfg.agent.utd,
                             self.spec, timeout_ms=SAMPLE_TIMEOUT_MS, ready_batches=self.cfg.fuse_updates)

    def _reconnect(self, stream: BatchIterator) -> BatchIterator:
        """A stream from the replay's current address (the coordinator's), once a server answers there."""
        stream.close()
        while not ray.get(self.coordinator.stats.remote())["stopped"]:
            self.replay_address = ray.get(self.coordinator.replay_address.remote()) or self.replay_address
            try:
                return self._batches()
            except ConnectionError:
                time.sleep(1.0)
        return stream

    def run(self) -> dict:
        """Fused updates until the coordinator says stop; publishes every ``publish_every`` updates.

        K = ``fuse_updates`` env steps' updates go in one call when the rate limiter has already admitted that many
        (the learner is behind the actors: fewer dispatches); otherwise one update per call as data comes (data
        trickles in: the actors get fresh weights). So only two programs are ever compiled.
        """
        online = self._batches()
        stop = self.coordinator.stats.remote()
        self.metrics_file = (self.logdir / "learner.jsonl").open("a")
        started = exported_at = time.perf_counter()
        self.exported = (self.updates, self.wait_s)
        self.window = (started, self.updates, self.wait_s)  # start of the current window (since the last record)
        while True:
            now = time.perf_counter()
            self.run_s = now - started
            if now - exported_at >= EXPORT_EVERY_S:
                self._export()
                exported_at = now
            if ray.wait([stop], timeout=0)[0]:
                if ray.get(stop)["stopped"]:
                    break
                stop = self.coordinator.stats.remote()
            waiting = time.perf_counter()
            try:
                calls = self._device_updates(online) if self.cfg.replay_on_device else self._sampled_updates(online)
            except TimeoutError as e:  # actors are warming up, blocked or restarting: never give up, never hang
                log.info("learner waiting for data: %s", e)
                continue
            except ConnectionError as e:  # the replay server died: the launcher restarts it at a new address
                log.warning("learner lost the replay server (%s); reconnecting", e)
                online = self._reconnect(online)
                continue
            finally:
                self.wait_s += time.perf_counter() - waiting
            for count, call in calls:
                self._update(count, call)
        online.close()  # stop sampling: each sample lets the rate limiter admit inserts the final checkpoint misses
        self.metrics_file.close()
        self._export()
        self.publish()
        return {"updates": self.updates}

    def _sampled_updates(self, online: BatchIterator) -> list[tuple[int, Callable[[], dict]]]:
        """Batches the rate limiter admitted (waiting for one): one call of K updates if K are ready, else one
        call per batch."""
        pending = [Batch.from_sample(next(online))]
        while len(pending) < self.cfg.fuse_updates and online.ready():
            pending.append(Batch.from_sample(next(online)))
        groups = [pending] if len(pending) == self.cfg.fuse_updates else [[batch] for batch in pending]
        return [(len(group), functools.partial(self.core.step_many, group)) for group in groups]

    def _device_updates(self, online: BatchIterator) -> list[tuple[int, Callable[[], dict]]]:
        """The replay on the device: the new transitions Reverb's queue has ready go into it (waiting for one only
        when no update is owed), then the next call of the updates owed (``_owed``: the UTD control the rate
        limiter is otherwise)."""
        items = [] if self._owed() else [next(online)]
        while len(items) < DRAIN and online.ready():
            items.append(next(online))
        if items:
            self.core.add_online(single_samples(items))
        owed, k = self._owed(), self.cfg.fuse_updates
        count = k if owed >= k else min(owed, 1)
        return [(count, functools.partial(self.core.step_on_device, count))] if count else []

    def _owed(self) -> int:
        """Updates due and not run: one per online transition beyond warmup, and from warmup on up to the queue's
        size ahead, as Reverb's limiter lets a learner run ``error_buffer`` samples ahead of the inserts."""
        added = self.core.online_added
        if added < self.cfg.warmup:
            return 0
        return max(0, added - self.cfg.warmup + self.lead - self.updates)

    def _update(self, done: int, call: Callable[[], dict]) -> None:
        """One call of ``done`` fused updates; publishes and records metrics when their counts are crossed."""
        start = time.perf_counter()
        with self.lock:
            metrics = call()
        if _crossed(self.updates, done, self.cfg.publish_every):
            self.publish()
        if _crossed(self.updates, done, 100) or not self.metrics:  # and this learner's first call (fresh or restored)
            record = finite_metrics(metrics, self.updates)  # raises before anything is checkpointed
            self.update_time_s = time.perf_counter() - start
            self.metrics = record
            self.metrics_file.write(json.dumps({"updates": self.updates, "time": time.time(), **record}) + "\n")
            self.metrics_file.flush()
            now, (then, updates, wait_s) = time.perf_counter(), self.window
            prom.observe("csil_learner_update_seconds", max(
                (now - then - (self.wait_s - wait_s)) / (self.updates - updates), 1e-9))
            self.window = (now, self.updates, self.wait_s)
            for k, v in record.items():
                prom.set_gauge("csil_learner_stat", v, key=k)

    # --- answered while run() loops -------------------------------------------------------------------

    def stats(self) -> dict:
        """Counters, timings (``wait_s``: waiting for samples, i.e. for actors/rate limiter) and the last metrics
        (``metrics``: the loss/Q/reward dict of the newest record: the first call, then every 100 updates)."""
        now, updates = time.perf_counter(), self.updates
        then, before = self.recent_rate
        if now - then >= 1.0:
            self.updates_per_s, self.recent_rate = (updates - before) / (now - then), (now, updates)
        return {"updates": updates, "updates_per_s": self.updates_per_s, "update_time_s": self.update_time_s,
                "pretrain": dict(self.pretrain_progress),
                "run_s": self.run_s, "wait_s": self.wait_s, "metrics": dict(self.metrics)}

    def params(self) -> tuple[int, dict]:
        with self.lock:
            return self.updates, self.core.policy_params()

    def checkpoint(self, env_steps: int) -> str:
        """Save state + counters under checkpoints/learner/<updates>; keeps the two newest."""
        with self.lock:
            return str(self.core.save(self.ckpt_dir, env_steps=env_steps))
