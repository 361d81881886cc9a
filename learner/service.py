"""The learner as a Ray actor: pretraining, the Reverb-fed fused update loop, weight publishing, checkpoints.

It is a threaded actor (``max_concurrency``): ``run`` loops in one thread while ``checkpoint`` and ``stats``
answer from another (the launcher calls them on a timer and on SIGTERM). The loop never waits on a dead actor:
sampling has a timeout, after which it re-checks the stop flag and tries again. A non-finite metric stops the
loop with a FloatingPointError *before* anything is checkpointed, so the last checkpoint stays good.

Checkpoints (orbax) hold the whole ``AgentState`` (networks, optimisers, target critic, atoms, temperature) and
the counters; ``restore`` brings them back and republishes the weights with the checkpointed version.

Prometheus (``csil.metrics``): updates and seconds waiting for samples (exported once a second), weights
published, and every 100 updates the metrics dict (``csil_learner_stat{key=...}``) and the mean seconds per
update over those 100 updates, sample waits excluded (``csil_learner_update_seconds``). JAX dispatches updates
asynchronously, so one update's time is not observable without a device sync per update; the window ends with
the metrics fetch, which is a sync, so its mean is right (publishing included; the first window includes the
update's compilation).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

import jax
import numpy as np
import ray

from csil import metrics as prom

log = logging.getLogger(__name__)

SAMPLE_TIMEOUT_MS = 5_000
EXPORT_EVERY_S = 1.0  # Prometheus counters of the update loop


@ray.remote(max_restarts=0, max_concurrency=4)
class LearnerService:
    def __init__(self, cfg, spec_json: str, demos_path: str, replay_address: str, coordinator, logdir: str):
        from csil.demos import read_demos
        from csil.specs import ObsSpec
        from learner.agent import CSILAgent
        from learner.pretrain import DemoTransitions

        self.cfg, self.coordinator, self.replay_address = cfg, coordinator, replay_address
        self.spec = ObsSpec.from_json(spec_json)
        self.logdir = Path(logdir)
        self.ckpt_dir = self.logdir / "checkpoints" / "learner"
        self.demos = DemoTransitions.from_episodes(read_demos(demos_path, num_demos=cfg.num_demos).episodes, self.spec)
        self.agent = CSILAgent(cfg.agent, self.spec)
        self.state = None
        self.updates, self.env_steps_at_restore = 0, 0
        self.lock = threading.Lock()
        self.metrics: dict[str, float] = {}
        self.update_time_s = 0.0
        self.run_s, self.wait_s = 0.0, 0.0  # in run(): wall time, and the part spent waiting for samples
        self.recent_rate: tuple[float, int] = (time.perf_counter(), 0)  # (time, updates) for updates/s
        self.updates_per_s = 0.0
        # BC + critic pretraining steps done (stats() answers while pretrain() runs: the launcher's progress bar)
        self.pretrain_progress = {"steps": 0, "total": cfg.agent.bc_steps + cfg.agent.critic_pretrain_steps}
        self.exported = (0, 0.0)  # (updates, wait_s) already added to the Prometheus counters
        self.key = jax.random.PRNGKey(cfg.seed + 1)

    # --- start ----------------------------------------------------------------------------------------

    def pretrain(self) -> dict:
        """BC, reward init and critic pretraining (unless XQC+OD), the demo table, and weights version 0."""
        from learner.pretrain import initial_atoms, pretrain_bc, pretrain_critic
        from replay.writer import TransitionWriter

        cfg = self.cfg.agent
        self.key, bc_key, critic_key = jax.random.split(self.key, 3)
        if self.cfg.action_mode == "residual":  # demo actions become a_demo − a_base(s); the base-policy server
            # may still be starting: wait for it like the actors do
            from actors.base_source import PatientChunkSource
            from csil.tasks import get_task

            source = PatientChunkSource(self.cfg.base_policy, stopped=lambda: False,
                                        timeout_s=self.cfg.base_policy_timeout_s, actor_id="learner")
            self.demos = self.demos.as_residuals(source, get_task(self.cfg.task).prompt)
            source.close()

        def report(offset: int):
            return lambda record: self.pretrain_progress.update(steps=offset + record["step"] + 1)

        bc, bc_log = pretrain_bc(self.agent, self.demos, bc_key, cfg.bc_steps, progress=False, on_log=report(0))
        state = self.agent.init_state(critic_key, bc, atoms=initial_atoms(self.agent, bc, self.demos))
        state, critic_log = pretrain_critic(self.agent, state, self.demos, cfg.critic_pretrain_steps,
                                            seed=self.cfg.seed, progress=False, on_log=report(cfg.bc_steps))
        self.state = state
        with TransitionWriter(self.replay_address, table="demos") as writer:
            writer.write_batch(self.demos.replay_items())
        self.publish()
        return {"bc": bc_log[-1], "critic": critic_log[-1] if critic_log else None}

    def restore(self) -> dict:
        """The newest learner checkpoint: state, update counter and the env steps it was taken at."""
        import orbax.checkpoint as ocp

        steps = sorted(int(p.name) for p in self.ckpt_dir.glob("[0-9]*") if (p / "counters.json").exists())
        if not steps:
            raise FileNotFoundError(f"--resume: no learner checkpoint under {self.ckpt_dir}")
        path = self.ckpt_dir / str(steps[-1])
        template = self.agent.init_state(jax.random.PRNGKey(0), self.agent.init_policy(jax.random.PRNGKey(0)))
        leaves, treedef = jax.tree_util.tree_flatten(template)
        with ocp.StandardCheckpointer() as checkpointer:
            restored = checkpointer.restore(path / "state", {f"{i:05d}": x for i, x in enumerate(leaves)})
        self.state = jax.tree_util.tree_unflatten(treedef, [restored[f"{i:05d}"] for i in range(len(leaves))])
        counters = json.loads((path / "counters.json").read_text())
        self.updates, self.env_steps_at_restore = counters["updates"], counters["env_steps"]
        self.publish()
        log.info("learner restored from %s (%s)", path, counters)
        return counters

    # --- the loop -------------------------------------------------------------------------------------

    def publish(self) -> None:
        params = jax.device_get(self.state.policy)
        self.coordinator.publish.remote(self.updates, [ray.put(params)])
        prom.inc("csil_learner_weights_published_total")

    def _export(self) -> None:
        """Add the updates and sample-wait seconds since the last call to the Prometheus counters."""
        updates, wait_s = self.updates, self.wait_s
        prom.inc("csil_learner_updates_total", updates - self.exported[0])
        prom.inc("csil_learner_sample_wait_seconds_total", wait_s - self.exported[1])
        self.exported = (updates, wait_s)

    def run(self) -> dict:
        """Fused updates until the coordinator says stop; publishes every ``publish_every`` updates."""
        from learner.agent import Batch
        from replay.dataset import BatchIterator

        cfg = self.cfg
        online = BatchIterator(self.replay_address, "online", cfg.agent.batch_size, cfg.agent.utd, self.spec,
                               timeout_ms=SAMPLE_TIMEOUT_MS)
        demos = BatchIterator(self.replay_address, "demos", cfg.agent.batch_size, cfg.agent.utd, self.spec,
                              timeout_ms=SAMPLE_TIMEOUT_MS)
        stop = self.coordinator.stats.remote()
        metrics_file = (self.logdir / "learner.jsonl").open("a")
        started = exported_at = time.perf_counter()
        self.exported = (self.updates, self.wait_s)
        window = (started, self.updates, self.wait_s)  # start of the current 100-update window
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
                batch_online, batch_demos = Batch.from_sample(next(online)), Batch.from_sample(next(demos))
            except TimeoutError as e:  # actors are warming up, blocked or restarting: never give up, never hang
                log.info("learner waiting for data: %s", e)
                continue
            finally:
                self.wait_s += time.perf_counter() - waiting
            start = time.perf_counter()
            self.key, key = jax.random.split(self.key)
            with self.lock:
                self.state, metrics = self.agent.update(self.state, batch_online, batch_demos, key)
                self.updates += 1
            if self.updates % cfg.publish_every == 0:
                self.publish()
            if self.updates % 100 == 0:
                record = {k: float(v) for k, v in metrics.items()}
                self.update_time_s = time.perf_counter() - start
                if not all(np.isfinite(list(record.values()))):
                    raise FloatingPointError(f"non-finite learner metrics at update {self.updates}: {record}; the "
                                             "last checkpoint is left as it was")
                self.metrics = record
                metrics_file.write(json.dumps({"updates": self.updates, "time": time.time(), **record}) + "\n")
                metrics_file.flush()
                now = time.perf_counter()
                prom.observe("csil_learner_update_seconds", max(
                    (now - window[0] - (self.wait_s - window[2])) / (self.updates - window[1]), 1e-9))
                window = (now, self.updates, self.wait_s)
                for k, v in record.items():
                    prom.set_gauge("csil_learner_stat", v, key=k)
        metrics_file.close()
        self._export()
        self.publish()
        return {"updates": self.updates}

    # --- answered while run() loops -------------------------------------------------------------------

    def stats(self) -> dict:
        """Counters, timings (``wait_s``: waiting for samples, i.e. for actors/rate limiter) and the last metrics."""
        now, updates = time.perf_counter(), self.updates
        then, before = self.recent_rate
        if now - then >= 1.0:
            self.updates_per_s, self.recent_rate = (updates - before) / (now - then), (now, updates)
        return {"updates": updates, "updates_per_s": self.updates_per_s, "update_time_s": self.update_time_s,
                "pretrain": dict(self.pretrain_progress),
                "run_s": self.run_s, "wait_s": self.wait_s, **self.metrics}

    def params(self) -> tuple[int, dict]:
        with self.lock:
            return self.updates, jax.device_get(self.state.policy)

    def checkpoint(self, env_steps: int) -> str:
        """Save state + counters under checkpoints/learner/<updates>; keeps the two newest."""
        import shutil

        import orbax.checkpoint as ocp

        with self.lock:
            leaves = jax.device_get(jax.tree_util.tree_leaves(self.state))
            updates = self.updates
        path = self.ckpt_dir / str(updates)
        if (path / "counters.json").exists():
            return str(path)
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(path / "state", {f"{i:05d}": x for i, x in enumerate(leaves)})
        (path / "counters.json").write_text(json.dumps({"updates": updates, "env_steps": env_steps}))
        for old in sorted((p for p in self.ckpt_dir.glob("[0-9]*")), key=lambda p: int(p.name))[:-2]:
            shutil.rmtree(old, ignore_errors=True)
        return str(path)
