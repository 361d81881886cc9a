"""Single-process CSIL++ trainer: pretraining, then online training against an in-process Reverb server.

The debugging path and the test bed for the distributed system: the same learner core, the same replay tables
and rate limiter, the same acting step as the actors, all in one process. Envs are stepped in lockstep on the
main thread; after warmup every env step is followed by one fused update (``utd`` critic updates).

Like csil-launch, a run survives being stopped: learner and replay are checkpointed right after pretraining,
after each evaluation, every ``checkpoint_every_s`` and on SIGINT/SIGTERM (which end the run after the current
step; a second signal interrupts at once), and ``resume`` continues from the newest checkpoints: learner state
and counters, the replay tables, the evaluation history and best parameters. Episodes in progress are not kept
(the resumed run starts new ones, on the scenes that come next), nor the learner's sampling key, so a resumed
run is not bit-identical to an uninterrupted one. A stop during pretraining keeps nothing of it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import shutil
import signal
import threading
import time
from collections import deque
from pathlib import Path

import jax
import numpy as np
from tqdm import tqdm

from actors.env_runner import EnvRunner
from actors.rollout import RolloutsCancelled
from csil import seeds
from csil.acting import small_policy_spec
from csil.base_policy import LocalBasePolicy
from csil.config import TrainConfig
from csil.demos import read_demos, spec_from_demos
from csil.specs import ONLINE_TABLE
from csil.tasks import get_task
from learner.batch import Batch
from learner.checkpoint import numbered_checkpoints
from learner.core import LearnerCore, finite_metrics
from learner.pretrain import DemoTransitions, PretrainingStopped
from orchestration.evaluator import Evaluator, crossed, evaluate_policy, write_eval_results
from orchestration.pipeline import ensure_base_policy, ensure_demos
from orchestration.tracking import RunTracker
from replay.dataset import BatchIterator
from replay.server import ReplayConfig, ReplayServer
from replay.writer import TransitionWriter

log = logging.getLogger(__name__)


def resumable(logdir: str | Path) -> bool:
    """Whether ``logdir`` holds a run with a learner checkpoint to continue from (``TrainConfig.resume``)."""
    return bool(numbered_checkpoints(Path(logdir) / "checkpoints" / "learner"))


class Trainer:
    def __init__(self, cfg: TrainConfig, progress: bool = True, wandb_group: str | None = None,
                 wandb_name: str | None = None):
        self.cfg, self.progress = cfg, progress
        self.task = get_task(cfg.task)
        self.logdir = Path(cfg.logdir)
        self.checkpoints = self.logdir / "checkpoints"
        self.resuming = self._resuming()
        self.logdir.mkdir(parents=True, exist_ok=True)
        (self.logdir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2, default=str))
        demos_path = cfg.demos or ensure_demos(self.task.name, cfg.obs_mode, cfg.num_demos)
        # the base policy's observations are its own (its metadata): a state base under an image small policy works
        self.base_dir = str(cfg.base_checkpoint or ensure_base_policy(self.task.name, obs_mode=cfg.base_obs))
        data = read_demos(demos_path, num_demos=cfg.num_demos)
        self.spec = small_policy_spec(spec_from_demos(demos_path, data.episodes[0].obs, cfg.obs_mode), cfg.action_mode)
        demos = DemoTransitions.from_episodes(data.episodes, self.spec)
        self.base_policy = LocalBasePolicy(self.base_dir)
        if cfg.action_mode == "residual":
            demos = demos.as_residuals(self.base_policy, self.task.prompt, self.spec)
        self.learner = LearnerCore(cfg.agent, self.spec, demos, cfg.seed, dump_dir=self.logdir / "diverged")
        self.tracker = RunTracker(self.logdir, dataclasses.asdict(cfg), cfg.wandb, wandb_group, wandb_name)
        self.evaluator = Evaluator(functools.partial(self._evaluate, self.learner.agent.policy_net),
                                   cfg.eval_episodes, cfg.seed, logdir=self.logdir, videos=cfg.eval_videos,
                                   tracker=self.tracker)
        self.key = jax.random.PRNGKey(cfg.seed)  # acting
        self.metrics_file = (self.logdir / "metrics.jsonl").open("a" if self.resuming else "w")
        self.stop_requested = False

    def _resuming(self) -> bool:
        """Whether this run continues from checkpoints in ``logdir``. A fresh run refuses a directory holding a
        resumable run, and clears what a run stopped before its first checkpoint left (evaluations, replay)."""
        found = resumable(self.logdir)
        if found and not self.cfg.resume:
            raise FileExistsError(f"{self.logdir} holds a resumable run (checkpoints/learner); pass --resume to "
                                  "continue it or pick another --logdir")
        if self.cfg.resume and not found:
            log.warning("--resume: %s holds no learner checkpoint (none yet, or the run stopped during "
                        "pretraining): starting afresh", self.logdir)
        if not found:
            shutil.rmtree(self.checkpoints, ignore_errors=True)
            (self.logdir / "evals.jsonl").unlink(missing_ok=True)
        return found

    @property
    def evals(self) -> list[dict]:
        return self.evaluator.history

    def _evaluate(self, network, params, first_scene: int, episodes: int, videos: int, stop) -> dict:
        return evaluate_policy(self.task, self.cfg.obs_mode, self.base_dir, params, network, self.cfg.action_mode,
                               episodes, first_scene, videos, self.cfg.video_stride, stop=stop)

    def log(self, record: dict) -> None:
        self.metrics_file.write(json.dumps(record) + "\n")
        self.metrics_file.flush()

    def evaluate(self, env_steps: int) -> dict | None:
        """Deterministic evaluation of base + small policy on this seed's fixed evaluation scenes (None with
        ``eval_episodes=0``, or when a stop request cancelled it)."""
        if not self.cfg.eval_episodes:
            return None
        try:
            record = self.evaluator.evaluate(env_steps, self.learner.updates, self.learner.policy_params())
        except RolloutsCancelled:
            return None
        self.log({"phase": "eval", **record})
        return record

    def checkpoint(self, replay: ReplayServer, env_steps: int, episodes: int) -> None:
        """Learner (the newest two kept) and replay (the newest kept) as of ``env_steps``."""
        self.learner.save(self.checkpoints / "learner", env_steps=env_steps, episodes=episodes)
        replay.checkpoint()

    def _request_stop(self, signum, frame) -> None:
        if self.stop_requested:
            raise KeyboardInterrupt
        log.warning("signal %d: stopping after this step (after pretraining, learner and replay are checkpointed; "
                    "--resume continues); again to stop at once", signum)
        self.stop_requested = True
        self.evaluator.cancel()

    def train(self) -> dict:
        """The run; SIGINT/SIGTERM end it early with ``interrupted`` in the summary (on the main thread)."""
        handlers = {}
        if threading.current_thread() is threading.main_thread():
            handlers = {s: signal.signal(s, self._request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            return self._train(time.time())
        finally:
            for s, handler in handlers.items():
                signal.signal(s, handler)
            self.evaluator.close()
            self.tracker.close()

    def _start(self) -> tuple[ReplayServer, dict]:
        """Pretrained learner and an empty replay, or both restored: (replay, counters)."""
        cfg, learner = self.cfg, self.learner
        replay_cfg = ReplayConfig(samples_per_insert=cfg.agent.utd * cfg.agent.batch_size, min_size=cfg.warmup,
                                  frame_codec=cfg.frame_codec)
        if self.resuming:
            counters = learner.restore(self.checkpoints / "learner")
            self.evaluator.load(learner.policy_params())
            replay = ReplayServer(replay_cfg, self.spec, checkpoint_dir=str(self.checkpoints / "replay"), restore=True)
            self.replay_restored = replay.sizes()
            log.info("resumed %s at %d env steps, %d updates; replay %s", self.logdir, counters["env_steps"],
                     counters["updates"], self.replay_restored)
            return replay, counters
        self.log({"phase": "pretrain", **learner.pretrain(progress=self.progress,
                                                          should_stop=lambda: self.stop_requested)})
        replay = ReplayServer(replay_cfg, self.spec, checkpoint_dir=str(self.checkpoints / "replay"))
        return replay, {"env_steps": 0, "episodes": 0}

    def _train(self, start: float) -> dict:
        cfg, learner = self.cfg, self.learner
        try:
            replay, counters = self._start()
        except PretrainingStopped:
            return {"task": self.task.name, "interrupted": True, "phase": "pretraining", "env_steps": 0,
                    "updates": 0, "wall_s": round(time.time() - start, 1), "logdir": str(self.logdir)}
        env_steps, first_episode = counters["env_steps"], counters["episodes"]
        self.key = jax.random.fold_in(self.key, env_steps)
        writer = TransitionWriter(replay.address, table=ONLINE_TABLE)
        online = None
        episode_seed = lambda episode: seeds.trainer_episode_seed(cfg.seed, first_episode + episode)  # noqa: E731
        runner = EnvRunner(self.task.name, cfg.obs_mode, cfg.num_envs, self.base_policy, learner.agent.policy_net,
                           cfg.action_mode, episode_seed, env_seed=cfg.seed + env_steps)
        num_envs = len(runner.envs)
        last_eval = self.evals[-1]["env_steps"] if self.evals else None
        if last_eval is None or (last_eval != env_steps and crossed(env_steps, env_steps - num_envs, cfg.eval_every)):
            self.evaluate(env_steps)  # the step-0 evaluation, or the one a stop request cancelled
        if not self.resuming:
            self.checkpoint(replay, 0, 0)  # pretraining is kept from here on
        successes, returns = deque(maxlen=20), deque(maxlen=20)
        last_track = (time.time(), env_steps, learner.updates)  # (time, env steps, updates) of the last tracked record
        last_checkpoint = time.time()
        bar = tqdm(total=cfg.env_steps, initial=env_steps, desc="training", unit="step", disable=not self.progress,
                   mininterval=1.0)
        postfix: dict = {}  # the last evaluation and the learner's progress, refreshed as they come
        while env_steps < cfg.env_steps and not self.stop_requested:
            runner.set_params(learner.state.policy, learner.updates)
            self.key, act_key = jax.random.split(self.key)
            transitions, finished = runner.step(act_key)
            for slot, transition in enumerate(transitions):
                writer.write(transition, slot)
            successes.extend(float(e.success) for e in finished)
            returns.extend(e.ret for e in finished)
            env_steps += num_envs
            bar.update(num_envs)
            if env_steps >= cfg.warmup:
                writer.flush()
                if online is None:
                    online = iter(BatchIterator(replay.address, ONLINE_TABLE, cfg.agent.batch_size, cfg.agent.utd,
                                                self.spec))
                for _ in range(num_envs):
                    metrics = learner.step(Batch.from_sample(next(online)))
                if learner.updates == num_envs or crossed(learner.updates, learner.updates - num_envs, 100):
                    record = finite_metrics(metrics, learner.updates)
                    self.log({"phase": "train", "env_steps": env_steps, "updates": learner.updates, **record})
                    now, (then, steps_then, updates_then) = time.time(), last_track
                    self.tracker.scalars(env_steps, {
                        **{f"learner/{k}": v for k, v in record.items()}, "learner/updates": learner.updates,
                        "system/env_steps_per_s": (env_steps - steps_then) / (now - then),
                        "system/updates_per_s": (learner.updates - updates_then) / (now - then),
                        "actors/train_success": np.mean(successes) if successes else None,
                        "actors/episode_return": np.mean(returns) if returns else None})
                    last_track = (now, env_steps, learner.updates)
                    postfix.update(updates=learner.updates, critic_loss=f"{record['critic_loss']:.3g}")
                    bar.set_postfix(postfix)
            evaluated = crossed(env_steps, env_steps - num_envs, cfg.eval_every) and self.evaluate(env_steps)
            if evaluated:
                postfix.update(eval=f"{evaluated['success_rate']:.0%}", updates=learner.updates,
                               train_success=f"{np.mean(successes):.0%}" if successes else "n/a")
                bar.set_postfix(postfix)
            if evaluated or self.stop_requested or time.time() - last_checkpoint > cfg.checkpoint_every_s:
                writer.flush()
                self.checkpoint(replay, env_steps, first_episode + runner.next_episode)
                last_checkpoint = time.time()
        bar.close()
        runner.close()
        writer.close()
        summary = {"task": self.task.name, "env_steps": env_steps, "updates": learner.updates,
                   "replay_sizes": replay.sizes()}
        replay.stop()
        if self.resuming:
            summary["replay_restored"] = self.replay_restored
        if self.stop_requested:
            summary["interrupted"] = True
        elif self.evals:
            summary["first_eval"] = self.evals[0]["success_rate"]
            try:
                summary.update(self.evaluator.reevaluate_best(cfg.final_eval_rounds))
                self.log({"phase": "reevaluate", **summary})
            except RolloutsCancelled:  # stopped during the re-evaluation
                summary["interrupted"] = True
        if self.evals:
            write_eval_results(self.logdir, self.evals, f"{cfg.algo} ({cfg.action_mode})", self.task.name)
        return {**summary, "wall_s": round(time.time() - start, 1), "logdir": str(self.logdir)}
