"""Single-process CSIL++ trainer: pretraining, then online training against an in-process Reverb server.

The debugging path and the test bed for the distributed system: the same learner core, the same replay tables
and rate limiter, the same acting step as the actors, all in one process. Envs are stepped in lockstep on the
main thread; after warmup every env step is followed by one fused update (``utd`` critic updates).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from collections import deque
from pathlib import Path

import jax
import numpy as np
from tqdm import tqdm

from actors.env_runner import EnvRunner
from csil import seeds
from csil.acting import small_policy_spec
from csil.base_policy import LocalBasePolicy
from csil.config import TrainConfig
from csil.demos import read_demos, spec_from_demos
from csil.specs import DEMO_TABLE, ONLINE_TABLE
from csil.tasks import get_task
from learner.agent import Batch
from learner.core import LearnerCore, finite_metrics
from learner.pretrain import DemoTransitions
from orchestration.evaluator import Evaluator, crossed, evaluate_policy, write_eval_results
from orchestration.pipeline import ensure_base_policy, ensure_demos
from orchestration.tracking import RunTracker
from replay.dataset import BatchIterator
from replay.server import ReplayConfig, ReplayServer
from replay.writer import TransitionWriter


class Trainer:
    def __init__(self, cfg: TrainConfig, progress: bool = True, wandb_group: str | None = None,
                 wandb_name: str | None = None):
        self.cfg, self.progress = cfg, progress
        self.task = get_task(cfg.task)
        self.logdir = Path(cfg.logdir)
        self.logdir.mkdir(parents=True, exist_ok=True)
        (self.logdir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2, default=str))
        demos_path = cfg.demos or ensure_demos(self.task.name, cfg.obs_mode, cfg.num_demos)
        # the base policy's observations are its own (its metadata): a state base under an image small policy works
        self.base_dir = str(cfg.base_checkpoint or ensure_base_policy(self.task.name))
        data = read_demos(demos_path, num_demos=cfg.num_demos)
        self.spec = small_policy_spec(spec_from_demos(demos_path, data.episodes[0].obs, cfg.obs_mode), cfg.action_mode)
        demos = DemoTransitions.from_episodes(data.episodes, self.spec)
        self.base_policy = LocalBasePolicy(self.base_dir)
        if cfg.action_mode == "residual":
            demos = demos.as_residuals(self.base_policy, self.task.prompt, self.spec)
        self.learner = LearnerCore(cfg.agent, self.spec, demos, cfg.seed, dump_dir=self.logdir / "diverged")
        self.tracker = RunTracker(self.logdir, dataclasses.asdict(cfg), cfg.wandb, wandb_group, wandb_name)
        self.evaluator = Evaluator(functools.partial(self._evaluate, self.learner.agent.policy_net),
                                   cfg.eval_episodes, cfg.seed, videos=cfg.eval_videos, tracker=self.tracker)
        self.key = jax.random.PRNGKey(cfg.seed)  # acting
        self.metrics_file = (self.logdir / "metrics.jsonl").open("w")  # no resume: a rerun starts afresh

    @property
    def evals(self) -> list[dict]:
        return self.evaluator.history

    def _evaluate(self, network, params, first_scene: int, episodes: int, videos: int) -> dict:
        return evaluate_policy(self.task, self.cfg.obs_mode, self.base_dir, params, network, self.cfg.action_mode,
                               episodes, first_scene, videos, self.cfg.video_stride)

    def log(self, record: dict) -> None:
        self.metrics_file.write(json.dumps(record) + "\n")
        self.metrics_file.flush()

    def evaluate(self, env_steps: int) -> dict | None:
        """Deterministic evaluation of base + small policy on this seed's fixed evaluation scenes (None with
        ``eval_episodes=0``: no evaluation at all)."""
        if not self.cfg.eval_episodes:
            return None
        record = self.evaluator.evaluate(env_steps, self.learner.updates, self.learner.policy_params())
        self.log({"phase": "eval", **record})
        return record

    def train(self) -> dict:
        cfg, learner = self.cfg, self.learner
        start = time.time()
        self.log({"phase": "pretrain", **learner.pretrain(progress=self.progress)})
        replay = ReplayServer(ReplayConfig(samples_per_insert=cfg.agent.utd * cfg.agent.batch_size,
                                           min_size=cfg.warmup, frame_codec=cfg.frame_codec),
                              self.spec, num_demo_transitions=len(learner.demos))
        with TransitionWriter(replay.address, table=DEMO_TABLE) as demo_writer:
            demo_writer.write_batch(learner.demos.replay_items())
        writer = TransitionWriter(replay.address, table=ONLINE_TABLE)
        online = demos = None
        runner = EnvRunner(self.task.name, cfg.obs_mode, cfg.num_envs, self.base_policy, learner.agent.policy_net,
                           cfg.action_mode, functools.partial(seeds.trainer_episode_seed, cfg.seed),
                           env_seed=cfg.seed)
        num_envs = len(runner.envs)
        self.evaluate(0)
        env_steps, successes, returns = 0, deque(maxlen=20), deque(maxlen=20)
        last_track = (time.time(), 0, learner.updates)  # (time, env steps, updates) of the last tracked record
        bar = tqdm(total=cfg.env_steps, desc="training", unit="step", disable=not self.progress, mininterval=1.0)
        postfix: dict = {}  # the last evaluation and the learner's progress, refreshed as they come
        while env_steps < cfg.env_steps:
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
                    demos = iter(BatchIterator(replay.address, DEMO_TABLE, cfg.agent.batch_size, cfg.agent.utd,
                                               self.spec))
                for _ in range(num_envs):
                    metrics = learner.step(Batch.from_sample(next(online)), Batch.from_sample(next(demos)))
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
            if crossed(env_steps, env_steps - num_envs, cfg.eval_every) and (last := self.evaluate(env_steps)):
                postfix.update(eval=f"{last['success_rate']:.0%}", updates=learner.updates,
                               train_success=f"{np.mean(successes):.0%}" if successes else "n/a")
                bar.set_postfix(postfix)
        bar.close()
        runner.close()
        writer.close()
        replay.stop()
        summary = {"task": self.task.name, "env_steps": env_steps, "updates": learner.updates}
        if self.evals:
            summary["first_eval"] = self.evals[0]["success_rate"]
            summary.update(self.evaluator.reevaluate_best(cfg.final_eval_rounds))
            self.log({"phase": "reevaluate", **summary})
            write_eval_results(self.logdir, self.evals, f"{cfg.algo} ({cfg.action_mode})", self.task.name)
        self.evaluator.close()
        self.tracker.close()
        return {**summary, "wall_s": round(time.time() - start, 1), "logdir": str(self.logdir)}
