"""Starts and supervises the distributed system: coordinator, Reverb replay, learner, env actors, evaluator.

The launcher process is the supervisor. It restarts the ``run`` of an actor that died (Ray restarts the actor
itself, ``max_restarts=-1``), evaluates the newest weights every ``eval_every`` env steps, checkpoints learner and
replay every ``checkpoint_every_s`` and on SIGTERM/SIGINT, and at the end re-evaluates the best parameters
``final_eval_rounds`` × ``eval_episodes`` times (the paper's protocol).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import signal
import time
from pathlib import Path

import ray

from csil.config import LaunchConfig, ReplayConfig

log = logging.getLogger(__name__)


def _crossed(value: int, previous: int, every: int) -> bool:
    return value // every != previous // every


class System:
    def __init__(self, cfg: LaunchConfig, progress: bool = True):
        from csil.demos import read_demos
        from csil.pipeline import ensure_base_policy, ensure_demos, spec_from_demos
        from csil.ray_utils import ensure_ray
        from csil.tasks import get_task

        if cfg.obs_mode != "state":
            raise ValueError("csil-launch runs state observations (the cached base policy and demos are state-based)")
        self.cfg, self.progress = cfg, progress
        self.task = get_task(cfg.task)
        self.logdir = Path(cfg.logdir)
        if self.logdir.exists() and any(self.logdir.iterdir()) and not cfg.resume:
            raise FileExistsError(f"{self.logdir} already holds a run; pass --resume to continue it or pick --logdir")
        self.logdir.mkdir(parents=True, exist_ok=True)
        (self.logdir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2, default=str))
        self.demos_path = str(cfg.demos or ensure_demos(self.task.name))
        self.base_dir = str(cfg.base_checkpoint or ensure_base_policy(self.task.name))
        data = read_demos(self.demos_path, num_demos=cfg.num_demos)
        self.spec = spec_from_demos(self.demos_path, data.episodes[0].obs, "state")
        self.num_demo_transitions = sum(len(ep.actions) for ep in data.episodes)
        ensure_ray(cfg.address)
        self.evals: list[dict] = []
        self.stop_requested = False

    def _start(self):
        from actors.actor import EnvActor
        from learner.coordinator import Coordinator
        from learner.service import LearnerService
        from replay.service import ReplayService

        cfg = self.cfg
        replay_cfg = ReplayConfig(samples_per_insert=cfg.agent.utd * cfg.agent.batch_size, min_size=cfg.warmup)
        self.replay = ReplayService.remote(replay_cfg, self.spec.to_json(), self.num_demo_transitions,
                                           str(self.logdir / "checkpoints" / "replay"), cfg.resume)
        address = ray.get(self.replay.get_address.remote())
        self.coordinator = Coordinator.remote()
        gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        self.learner = LearnerService.options(num_gpus=gpus).remote(
            cfg, self.spec.to_json(), self.demos_path, address, self.coordinator, str(self.logdir))
        counters = ray.get(self.learner.restore.remote() if cfg.resume else self.learner.pretrain.remote())
        self.env_steps_offset = counters.get("env_steps", 0) if cfg.resume else 0
        self.actors = [EnvActor.remote(i, cfg, address, self.coordinator, self._network(), self.base_dir)
                       for i in range(cfg.actors)]
        self.runs = {i: a.run.remote() for i, a in enumerate(self.actors)}
        self.learner_run = self.learner.run.remote()

    def _supervise_actors(self) -> None:
        for i, ref in list(self.runs.items()):
            if ray.wait([ref], timeout=0)[0]:
                try:
                    ray.get(ref)
                except ray.exceptions.RayActorError as e:
                    log.warning("actor %d died (%s); Ray restarts it, re-issuing its run", i, type(e).__name__)
                if not self.stop_requested:
                    self.runs[i] = self.actors[i].run.remote()

    def evaluate(self, env_steps: int) -> dict:
        """Evaluate the learner's current weights; keep them if they are the best so far."""
        from learner.evaluation import evaluate_policy

        version, params = ray.get(self.learner.params.remote())
        result = evaluate_policy(self.task, "state", self.base_dir, params, self._network(), self.cfg.action_mode,
                                 self.cfg.eval_episodes)
        record = {"env_steps": env_steps, "updates": version, **result}
        if not self.evals or result["success_rate"] > max(e["success_rate"] for e in self.evals):
            self.best = (record, params)
        self.evals.append(record)
        with (self.logdir / "evals.jsonl").open("a") as f:
            f.write(json.dumps(record) + "\n")
        return record

    def checkpoint(self, env_steps: int) -> None:
        ray.get([self.learner.checkpoint.remote(env_steps), self.replay.checkpoint.remote()])

    def run(self) -> dict:
        from tqdm import tqdm

        from learner.evaluation import evaluate_policy, write_eval_results

        cfg = self.cfg
        start = time.time()
        previous = {s: signal.signal(s, self._request_stop) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            self._start()
            self.evaluate(self.env_steps_offset)
            bar = tqdm(total=cfg.env_steps, initial=self.env_steps_offset, desc="csil-launch", unit="step",
                       disable=not self.progress, mininterval=1.0)
            last_steps, last_ckpt = self.env_steps_offset, time.time()
            while not self.stop_requested:
                time.sleep(1.0)
                stats = ray.get(self.coordinator.stats.remote())
                env_steps = self.env_steps_offset + stats["env_steps"]
                if ray.wait([self.learner_run], timeout=0)[0]:
                    ray.get(self.learner_run)  # raises the learner's error (e.g. non-finite loss)
                self._supervise_actors()
                learner = ray.get(self.learner.stats.remote())
                bar.update(env_steps - last_steps)
                bar.set_postfix(updates=learner["updates"], eval=f"{self.evals[-1]['success_rate']:.0%}",
                                restarts=sum(stats["restarts"].values()))
                if _crossed(env_steps, last_steps, cfg.eval_every):
                    self.evaluate(env_steps)
                last_steps = env_steps
                if time.time() - last_ckpt > cfg.checkpoint_every_s:
                    self.checkpoint(env_steps)
                    last_ckpt = time.time()
                if env_steps >= cfg.env_steps:
                    break
            bar.close()
            ray.get(self.coordinator.stop.remote())
            updates = ray.get(self.learner_run)["updates"]
            ray.wait(list(self.runs.values()), num_returns=len(self.runs), timeout=30)
            stats = ray.get(self.coordinator.stats.remote())
            env_steps = self.env_steps_offset + stats["env_steps"]
            self.checkpoint(env_steps)
            summary = {"task": cfg.task, "algo": cfg.algo, "env_steps": env_steps, "learner_updates": updates,
                       "interrupted": self.stop_requested, "actor_restarts": sum(stats["restarts"].values()),
                       "mean_staleness": stats["staleness"]}
            if not self.stop_requested:
                self.evaluate(env_steps)
                best, params = self.best
                network = self._network()
                rounds = [evaluate_policy(self.task, "state", self.base_dir, params, network, cfg.action_mode,
                                          cfg.eval_episodes, seed_offset=(r + 1) * 100_000)["success_rate"]
                          for r in range(cfg.final_eval_rounds)]
                summary.update(final_eval=self.evals[-1]["success_rate"], best_eval=best["success_rate"],
                               best_env_steps=best["env_steps"], best_reevaluated=rounds)
            write_eval_results(self.logdir, self.evals, f"{cfg.algo} ({cfg.action_mode})", self.task.name)
            summary.update(wall_s=round(time.time() - start, 1), logdir=str(self.logdir))
            (self.logdir / "summary.json").write_text(json.dumps(summary, indent=2))
            return summary
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _network(self):
        from learner.agent import CSILAgent

        return CSILAgent(self.cfg.agent, self.spec).policy_net

    def _request_stop(self, signum, frame) -> None:
        log.warning("signal %d: stopping, checkpointing learner and replay", signum)
        self.stop_requested = True
