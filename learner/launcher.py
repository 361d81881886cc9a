"""Starts and supervises the distributed system: inference server, coordinator, Reverb replay, learner, env actors,
evaluator.

The launcher process is the supervisor. It restarts the ``run`` of an actor that died (Ray restarts the actor
itself, ``max_restarts=-1``), evaluates the newest weights every ``eval_every`` env steps (on a background
thread: supervision, progress and the env-step budget do not wait for an evaluation), checkpoints learner and replay every ``checkpoint_every_s`` and on SIGTERM/SIGINT, and at the end
re-evaluates the best parameters ``final_eval_rounds`` × ``eval_episodes`` times (the paper's protocol).

``--resume`` continues a run from its checkpoints: learner state and counters, the replay tables, the eval
history and the best parameters so far (saved whenever an evaluation beats the previous best).

Placement: on a cluster from deploy/cluster.yaml the coordinator, replay and learner go to the head
(``csil_learner``), actors to CPU workers (``csil_actor``) and inference replicas to GPU workers
(``csil_inference``); on a plain Ray they go wherever Ray puts them.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import shutil
import signal
import time
from pathlib import Path

import ray

from csil.config import InferenceServerConfig, LaunchConfig, ReplayConfig
from learner.evaluation import crossed

log = logging.getLogger(__name__)


class System:
    def __init__(self, cfg: LaunchConfig, progress: bool = True):
        from csil.demos import read_demos
        from csil.pipeline import ensure_base_policy, ensure_demos, spec_from_demos
        from csil.ray_utils import ensure_ray
        from csil.tasks import get_task
        from learner.agent import CSILAgent

        if cfg.obs_mode != "state":
            raise ValueError("csil-launch runs state observations (the cached base policy and demos are state-based)")
        self.cfg, self.progress = cfg, progress
        self.task = get_task(cfg.task)
        self.logdir = Path(cfg.logdir)
        if cfg.resume and not (self.logdir / "checkpoints" / "learner").is_dir():
            raise FileNotFoundError(f"--resume: {self.logdir} holds no checkpoints/learner to resume from")
        if self.logdir.exists() and any(self.logdir.iterdir()) and not cfg.resume:
            raise FileExistsError(f"{self.logdir} already holds a run; pass --resume to continue it or pick --logdir")
        self.logdir.mkdir(parents=True, exist_ok=True)
        (self.logdir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2, default=str))
        self.demos_path = str(cfg.demos or ensure_demos(self.task.name))
        self.base_dir = str(cfg.base_checkpoint or ensure_base_policy(self.task.name))
        data = read_demos(self.demos_path, num_demos=cfg.num_demos)
        self.spec = spec_from_demos(self.demos_path, data.episodes[0].obs, "state")
        self.num_demo_transitions = sum(len(ep.actions) for ep in data.episodes)
        self.network = CSILAgent(cfg.agent, self.spec).policy_net  # the small policy's module (actors, evaluator)
        ensure_ray(cfg.address)
        self.evals: list[dict] = []
        self.best: tuple[dict, dict] | None = None
        if cfg.resume:
            self._load_eval_history()
        self.stop_requested = False
        self.inference = None
        self.evaluator = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="evaluator")
        self.pending_evals: list[concurrent.futures.Future] = []

    # --- start --------------------------------------------------------------------------------------

    def _start(self) -> None:
        from actors.actor import EnvActor
        from csil.ray_utils import role_resources
        from learner.coordinator import Coordinator
        from learner.service import LearnerService
        from replay.service import ReplayService

        cfg = self.cfg
        head = role_resources("head")
        replay_cfg = ReplayConfig(samples_per_insert=cfg.agent.utd * cfg.agent.batch_size, min_size=cfg.warmup)
        self.replay = ReplayService.options(resources=head).remote(
            replay_cfg, self.spec.to_json(), self.num_demo_transitions, str(self.logdir / "checkpoints" / "replay"),
            cfg.resume)
        address = ray.get(self.replay.get_address.remote())
        self.replay_restored = ray.get(self.replay.sizes.remote()) if cfg.resume else None
        self.coordinator = Coordinator.options(resources=head).remote()
        gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        self.learner = LearnerService.options(num_cpus=1, num_gpus=gpus, resources=head).remote(
            cfg, self.spec.to_json(), self.demos_path, address, self.coordinator, str(self.logdir))
        counters = self.learner.restore.remote() if cfg.resume else self.learner.pretrain.remote()
        ray.get(self.learner.stats.remote())  # placed (and holding its GPU) before inference replicas ask for one
        if cfg.base_policy == "local":  # started while the learner pretrains
            from inference_server import app

            # Reserves no CPU, like the other services of a run (an inference node's GPU is what it needs).
            self.inference = app.start(InferenceServerConfig(checkpoint=self.base_dir, task=cfg.task,
                                                             port=cfg.serve_port, grpc_port=None, num_cpus=0.0))
        counters = self._wait_for_pretraining(counters)
        self.env_steps_offset = counters.get("env_steps", 0) if cfg.resume else 0
        actor = EnvActor.options(resources=role_resources("actor"))
        self.actors = [actor.remote(i, cfg, address, self.coordinator, self.network) for i in range(cfg.actors)]
        self.runs = {i: a.run.remote() for i, a in enumerate(self.actors)}
        self.learner_run = self.learner.run.remote()

    def _wait_for_pretraining(self, ref) -> dict:
        """The learner's pretrain/restore result, with a progress bar of its BC + critic pretraining steps."""
        from tqdm import tqdm

        total = ray.get(self.learner.stats.remote())["pretrain"]["total"]
        with tqdm(total=total, desc="pretraining (BC + critic)", unit="step", mininterval=1.0,
                  disable=not self.progress or self.cfg.resume) as bar:
            while not ray.wait([ref], timeout=1.0)[0]:
                bar.update(ray.get(self.learner.stats.remote())["pretrain"]["steps"] - bar.n)
            bar.update(total - bar.n)
        return ray.get(ref)

    def _supervise_actors(self) -> None:
        for i, ref in list(self.runs.items()):
            if ray.wait([ref], timeout=0)[0]:
                try:
                    ray.get(ref)
                except ray.exceptions.RayActorError as e:
                    log.warning("actor %d died (%s); Ray restarts it, re-issuing its run", i, type(e).__name__)
                if not self.stop_requested:
                    self.runs[i] = self.actors[i].run.remote()

    # --- evaluation ---------------------------------------------------------------------------------

    def evaluate(self, env_steps: int) -> None:
        """Evaluate the learner's current weights in the background (one evaluation at a time, in order)."""
        if self.cfg.eval_episodes:
            version, params = ray.get(self.learner.params.remote())
            self.pending_evals.append(self.evaluator.submit(self._evaluate, env_steps, version, params))

    def _collect_evals(self, wait: bool = False) -> None:
        """Re-raise a failed evaluation; with ``wait``, finish all pending ones first."""
        for future in list(self.pending_evals):
            if wait or future.done():
                future.result()
                self.pending_evals.remove(future)

    def _evaluate(self, env_steps: int, version: int, params) -> dict:
        """Evaluate one snapshot of the weights; keep (and save) it if it is the best so far."""
        from learner.evaluation import evaluate_policy

        result = evaluate_policy(self.task, "state", self.base_dir, params, self.network, self.cfg.action_mode,
                                 self.cfg.eval_episodes)
        record = {"env_steps": env_steps, "updates": version, **result}
        if self.best is None or result["success_rate"] > self.best[0]["success_rate"]:
            self.best = (record, params)
            self._save_best()
        self.evals.append(record)
        with (self.logdir / "evals.jsonl").open("a") as f:
            f.write(json.dumps(record) + "\n")
        return record

    def _save_best(self) -> None:
        """checkpoints/best: the best policy parameters (orbax) and their eval record; replaced atomically."""
        import orbax.checkpoint as ocp

        record, params = self.best
        final, staging = self.logdir / "checkpoints" / "best", self.logdir / "checkpoints" / "best.new"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(staging / "params", params)
        (staging / "record.json").write_text(json.dumps(record))
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)

    def _load_eval_history(self) -> None:
        import orbax.checkpoint as ocp

        evals = self.logdir / "evals.jsonl"
        self.evals = [json.loads(line) for line in evals.read_text().splitlines()] if evals.exists() else []
        best = self.logdir / "checkpoints" / "best"
        if (best / "record.json").exists():
            with ocp.StandardCheckpointer() as checkpointer:
                self.best = (json.loads((best / "record.json").read_text()), checkpointer.restore(best / "params"))

    def _final_evaluation(self, env_steps: int) -> dict:
        from learner.evaluation import evaluate_policy

        self.evaluate(env_steps)
        self._collect_evals(wait=True)
        best, params = self.best
        rounds = [evaluate_policy(self.task, "state", self.base_dir, params, self.network, self.cfg.action_mode,
                                  self.cfg.eval_episodes, seed_offset=(r + 1) * 100_000)["success_rate"]
                  for r in range(self.cfg.final_eval_rounds)]
        return {"final_eval": self.evals[-1]["success_rate"], "best_eval": best["success_rate"],
                "best_env_steps": best["env_steps"], "best_reevaluated": rounds}

    # --- the run ------------------------------------------------------------------------------------

    def checkpoint(self, env_steps: int) -> None:
        ray.get([self.learner.checkpoint.remote(env_steps), self.replay.checkpoint.remote()])

    def run(self) -> dict:
        from tqdm import tqdm

        cfg = self.cfg
        start = time.time()
        previous = {s: signal.signal(s, self._request_stop) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            self._start()
            if not self.evals or self.evals[-1]["env_steps"] != self.env_steps_offset:
                self.evaluate(self.env_steps_offset)
            bar = tqdm(total=cfg.env_steps, initial=self.env_steps_offset, desc="csil-launch", unit="step",
                       disable=not self.progress, mininterval=1.0)
            acting_since, last_steps, last_ckpt = time.time(), self.env_steps_offset, time.time()
            progress = (self.logdir / "progress.jsonl").open("a")
            while not self.stop_requested:
                time.sleep(1.0)
                stats = ray.get(self.coordinator.stats.remote())
                env_steps = self.env_steps_offset + stats["env_steps"]
                if ray.wait([self.learner_run], timeout=0)[0]:
                    ray.get(self.learner_run)  # raises the learner's error (e.g. non-finite loss)
                self._supervise_actors()
                self._collect_evals()
                learner = ray.get(self.learner.stats.remote())
                progress.write(json.dumps({"time": round(time.time(), 3), "env_steps": env_steps,
                                           "updates": learner["updates"], "updates_per_s": learner["updates_per_s"],
                                           "blocked_s": sum(a["blocked_s"] for a in stats["actors"].values()),
                                           "staleness": stats["staleness"]}) + "\n")
                progress.flush()
                bar.update(env_steps - last_steps)
                bar.set_postfix({"updates/s": f"{learner['updates_per_s']:.1f}",
                                 "eval": f"{self.evals[-1]['success_rate']:.0%}" if self.evals else "-",
                                 "restarts": sum(stats["restarts"].values())})
                if cfg.eval_episodes and crossed(env_steps, last_steps, cfg.eval_every) and env_steps < cfg.env_steps:
                    self.evaluate(env_steps)
                last_steps = env_steps
                if time.time() - last_ckpt > cfg.checkpoint_every_s:
                    self.checkpoint(env_steps)
                    last_ckpt = time.time()
                if env_steps >= cfg.env_steps or (cfg.duration_s and time.time() - acting_since >= cfg.duration_s):
                    break
            bar.close()
            progress.close()
            return self._finish(start, acting_since)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            self._teardown()

    def _teardown(self) -> None:
        """Release everything this run started on the cluster (the next run in this Ray starts clean)."""
        self.evaluator.shutdown(wait=False, cancel_futures=True)
        for handle in [*getattr(self, "actors", []), *(getattr(self, n, None) for n in ("learner", "replay",
                                                                                       "coordinator"))]:
            if handle is not None:
                ray.kill(handle, no_restart=True)
        if self.inference is not None:
            from inference_server import app

            app.stop(self.inference.app_name)

    def _finish(self, start: float, acting_since: float) -> dict:
        """Stop actors and learner, checkpoint, evaluate (unless interrupted), write the summary."""
        from learner.evaluation import write_eval_results

        cfg = self.cfg
        ray.get(self.coordinator.stop.remote())
        ray.get(self.learner_run)
        acting_s = time.time() - acting_since
        ray.wait(list(self.runs.values()), num_returns=len(self.runs), timeout=30)
        stats = ray.get(self.coordinator.stats.remote())
        learner = ray.get(self.learner.stats.remote())
        env_steps = self.env_steps_offset + stats["env_steps"]
        self.checkpoint(env_steps)
        summary = {"task": cfg.task, "algo": cfg.algo, "env_steps": env_steps, "learner_updates": learner["updates"],
                   "interrupted": self.stop_requested, "actor_restarts": sum(stats["restarts"].values()),
                   "mean_staleness": stats["staleness"], "acting_s": round(acting_s, 1),
                   "replay_sizes": ray.get(self.replay.sizes.remote()), "replay_restored": self.replay_restored,
                   "actors": stats["actors"], "learner": {k: learner[k] for k in ("updates", "run_s", "wait_s")}}
        if not self.stop_requested and cfg.eval_episodes:
            summary.update(self._final_evaluation(env_steps))
        self._collect_evals(wait=True)
        if self.evals:
            write_eval_results(self.logdir, self.evals, f"{cfg.algo} ({cfg.action_mode})", self.task.name)
        summary.update(wall_s=round(time.time() - start, 1), logdir=str(self.logdir))
        (self.logdir / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary

    def _request_stop(self, signum, frame) -> None:
        log.warning("signal %d: stopping, checkpointing learner and replay", signum)
        self.stop_requested = True
