"""The single-process trainer end to end on a tiny budget: pretraining, Reverb-fed fused updates, evaluation."""

import json

import numpy as np

from csil.config import TrainConfig
from learner.trainer import Trainer


def test_short_csil_training_run_logs_evals_and_keeps_utd(lift_setup, tiny_agent):
    root, demos, base = lift_setup
    cfg = TrainConfig(task="Lift", env_steps=60, warmup=30, num_envs=2, eval_every=30, eval_episodes=1,
                      num_demos=3, demos=str(demos), base_policy=str(base), logdir=str(root / "run"),
                      agent=tiny_agent)
    summary = Trainer(cfg, progress=False).train()
    assert summary["env_steps"] == 60
    # One fused update (UTD critic updates) per env step once warmup is reached.
    assert summary["updates"] == 60 - 30 + 2
    records = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["phase"] == "eval"]
    assert [e["env_steps"] for e in evals] == [0, 30, 60]
    train = [r for r in records if r["phase"] == "train"]
    assert train and all(np.isfinite(r["critic_loss"]) and r["reward_online"] <= 0 for r in train)
    assert (root / "run" / "learning_curve.png").stat().st_size > 1000
    assert (root / "run" / "evals.csv").read_text().startswith("env_steps,success_rate")
    assert json.loads((root / "run" / "config.json").read_text())["warmup"] == 30
