"""Single-process CSIL++ trainer: pretraining, then online training against an in-process Reverb server.

The debugging path and the test bed for the distributed system: the same agent, the same replay tables
and rate limiter, the same combined policy as the actors, all in one process. Envs are stepped in lockstep
on the main thread; after warmup every env step is followed by one fused update (``utd`` critic updates).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections import deque
from pathlib import Path

import jax
import numpy as np

from actors.env_runner import EnvRunner
from csil.base_policy import LocalBasePolicy
from csil.tasks import get_task
from csil.config import TrainConfig
from learner.agent import Batch, CSILAgent
from learner.evaluation import crossed, evaluate_policy, write_eval_results
from learner.pretrain import DemoTransitions, initial_atoms, pretrain_bc, pretrain_critic


class Trainer:
    def __init__(self, cfg: TrainConfig, progress: bool = True):
        from csil.demos import read_demos
        from csil.pipeline import spec_from_demos, ensure_base_policy, ensure_demos

        if cfg.obs_mode != "state":
            raise ValueError("csil-train runs state observations only: the agent handles images (csil-bench learner "
                             "--obs image) but the cached base policy and demos here are state-based")
        self.cfg, self.progress = cfg, progress
        self.task = get_task(cfg.task)
        self.logdir = Path(cfg.logdir)
        self.logdir.mkdir(parents=True, exist_ok=True)
        (self.logdir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2, default=str))
        demos_path = cfg.demos or ensure_demos(self.task.name)
        self.base_dir = str(cfg.base_policy or ensure_base_policy(self.task.name))
        data = read_demos(demos_path, num_demos=cfg.num_demos)
        self.spec = spec_from_demos(demos_path, data.episodes[0].obs, "state")
        self.demos = DemoTransitions.from_episodes(data.episodes, self.spec)
        self.base_policy = LocalBasePolicy(self.base_dir)
        if cfg.action_mode == "residual":
            self.demos = self.demos.as_residuals(self.base_policy, self.task.prompt)
        self.agent = CSILAgent(cfg.agent, self.spec)
        self.key = jax.random.PRNGKey(cfg.seed)
        self.metrics_file = (self.logdir / "metrics.jsonl").open("w")  # no resume: a rerun starts afresh
        self.evals: list[dict] = []

    def episode_seed(self, episode: int) -> int:
        """Training scenes: disjoint from demo seeds (0, 1, ...) and evaluation seeds (1_000_000, ...)."""
        return 10_000_000 * (self.cfg.seed + 1) + episode

    def log(self, record: dict) -> None:
        self.metrics_file.write(json.dumps(record) + "\n")
        self.metrics_file.flush()

    def pretrain(self):
        cfg = self.cfg.agent
        self.key, bc_key, critic_key = jax.random.split(self.key, 3)
        bc, bc_log = pretrain_bc(self.agent, self.demos, bc_key, cfg.bc_steps, progress=self.progress)
        state = self.agent.init_state(critic_key, bc, atoms=initial_atoms(self.agent, bc, self.demos))
        state, critic_log = pretrain_critic(self.agent, state, self.demos, cfg.critic_pretrain_steps,
                                            seed=self.cfg.seed, progress=self.progress)
        self.log({"phase": "pretrain", "bc": bc_log[-1], "critic": critic_log[-1] if critic_log else None})
        return state

    def evaluate(self, state, env_steps: int) -> dict:
        """Deterministic evaluation of base + small policy on this seed's fixed evaluation scenes."""
        from csil.config import EvalConfig

        record = {"env_steps": env_steps, **evaluate_policy(
            self.task, "state", self.base_dir, jax.device_get(state.policy), self.agent.policy_net,
            self.cfg.action_mode, self.cfg.eval_episodes, seed_offset=self.cfg.seed * EvalConfig.seed_stride)}
        self.evals.append(record)
        self.log({"phase": "eval", **record})
        return record

    def train(self) -> dict:
        from tqdm import tqdm

        from replay.dataset import BatchIterator
        from replay.server import ReplayConfig, ReplayServer
        from replay.writer import TransitionWriter

        cfg, agent = self.cfg, self.agent
        start = time.time()
        state = self.pretrain()
        spi = cfg.agent.utd * cfg.agent.batch_size
        replay = ReplayServer(ReplayConfig(samples_per_insert=spi, min_size=cfg.warmup), self.spec,
                              num_demo_transitions=len(self.demos))
        with TransitionWriter(replay.address, table="demos") as demo_writer:
            demo_writer.write_batch(self.demos.replay_items())
        writer = TransitionWriter(replay.address, table="online")
        online = demo_iter = None

        runner = EnvRunner(self.task.name, "state", cfg.num_envs, self.base_policy,
                           agent.policy_net, cfg.action_mode, self.episode_seed, env_seed=cfg.seed)
        num_envs = len(runner.envs)
        self.evaluate(state, 0)
        env_steps, updates, successes = 0, 0, deque(maxlen=20)
        bar = tqdm(total=cfg.env_steps, desc="training", unit="step", disable=not self.progress, mininterval=1.0)
        while env_steps < cfg.env_steps:
            runner.set_params(state.policy, updates)
            self.key, act_key = jax.random.split(self.key)
            transitions, finished = runner.step(act_key)
            for transition in transitions:
                writer.write(transition)
            successes.extend(float(e.success) for e in finished)
            env_steps += num_envs
            bar.update(num_envs)
            if env_steps >= cfg.warmup:
                writer.flush()
                if online is None:
                    online = iter(BatchIterator(replay.address, "online", cfg.agent.batch_size, cfg.agent.utd,
                                                self.spec))
                    demo_iter = iter(BatchIterator(replay.address, "demos", cfg.agent.batch_size, cfg.agent.utd,
                                                   self.spec))
                for _ in range(num_envs):
                    self.key, update_key = jax.random.split(self.key)
                    state, metrics = agent.update(state, Batch.from_sample(next(online)), Batch.from_sample(next(demo_iter)),
                                                  update_key)
                    updates += 1
                if updates == num_envs or crossed(updates, updates - num_envs, 100):
                    record = {k: float(v) for k, v in metrics.items()}
                    if not all(np.isfinite(list(record.values()))):
                        raise FloatingPointError(f"non-finite learner metrics at update {updates}: {record}")
                    self.log({"phase": "train", "env_steps": env_steps, "updates": updates, **record})
            if crossed(env_steps, env_steps - num_envs, cfg.eval_every):
                last = self.evaluate(state, env_steps)
                recent = f"{np.mean(successes):.0%}" if successes else "n/a"
                bar.set_postfix(eval=f"{last['success_rate']:.0%}", train_success=recent, updates=updates)
        bar.close()
        runner.close()
        writer.close()
        replay.stop()
        write_eval_results(self.logdir, self.evals, f"{cfg.algo} ({cfg.action_mode})", self.task.name)
        best = max(self.evals, key=lambda e: e["success_rate"])
        return {"task": self.task.name, "env_steps": env_steps, "updates": updates,
                "first_eval": self.evals[0]["success_rate"], "final_eval": self.evals[-1]["success_rate"],
                "best_eval": best["success_rate"], "wall_s": round(time.time() - start, 1),
                "logdir": str(self.logdir)}
