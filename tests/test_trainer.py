"""The single-process trainer end to end on a tiny budget: pretraining, Reverb-fed fused updates, evaluation."""

import dataclasses
import json

import numpy as np
import pytest

from csil.config import AgentConfig, BaseTrainConfig, CriticConfig, DemoConfig, HetStatConfig, TrainConfig
from csil.pipeline import generate_demos, train_base_from_file
from learner.trainer import Trainer

TINY_AGENT = AgentConfig(
    policy=HetStatConfig(hidden=(64, 64), bottleneck=16, features=64), critic=CriticConfig(hidden=(64, 64)),
    batch_size=16, bc_batch_size=64, bc_steps=200, critic_pretrain_steps=100,
)


@pytest.fixture(scope="module")
def lift_setup(tmp_path_factory, ray_local):
    root = tmp_path_factory.mktemp("trainer")
    demos = root / "lift.hdf5"
    generate_demos(DemoConfig(task="Lift", num=3, workers=2), demos, progress=False)
    base = root / "base"
    train_base_from_file(demos, base, BaseTrainConfig(steps=100, batch_size=32, hidden=(32,)), progress=False)
    return root, demos, base


def test_short_csil_training_run_logs_evals_and_keeps_utd(lift_setup):
    root, demos, base = lift_setup
    cfg = TrainConfig(task="Lift", env_steps=60, warmup=30, num_envs=2, eval_every=30, eval_episodes=2,
                      num_demos=3, demos=str(demos), base_policy=str(base), logdir=str(root / "run"),
                      agent=TINY_AGENT)
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
