"""The single-process trainer end to end on a tiny budget: pretraining, Reverb-fed fused updates, evaluation,
Ctrl-C and resume."""

import dataclasses
import json
import os
import signal
import threading
import time

import numpy as np
import pytest

from csil.config import TrainConfig
from csil.video import FRAME_SIZE, expected_frames, read_frames
from orchestration.trainer import Trainer


def test_short_csil_training_run_logs_evals_keeps_utd_and_resumes_after_ctrl_c(lift_setup, tiny_agent,
                                                                               tensorboard_scalars, tmp_path):
    """A short run stopped by Ctrl-C twice: during pretraining (it returns within seconds and keeps nothing, so
    ``resume`` starts afresh), then right after its first updates (the signal lands during the evaluation at 30
    env steps: the evaluation is abandoned and the run checkpoints); ``resume`` evaluates at 30 again and runs it
    to the end of its budget."""
    _, demos, base = lift_setup
    run = tmp_path / "run"
    cfg = TrainConfig(task="Lift", env_steps=60, warmup=30, num_envs=2, eval_every=30, eval_episodes=1,
                      final_eval_rounds=1, eval_videos=1, video_stride=50, num_demos=3, demos=str(demos),
                      base_checkpoint=str(base), logdir=str(run), agent=tiny_agent)
    endless_bc = Trainer(dataclasses.replace(cfg, agent=dataclasses.replace(tiny_agent, bc_steps=10**7)),
                         progress=False)
    signalled = {}

    def ctrl_c_in_pretraining() -> None:
        while signal.getsignal(signal.SIGINT) != endless_bc._request_stop:  # train() has not started yet
            time.sleep(0.05)
        time.sleep(1)
        signalled["at"] = time.time()
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=ctrl_c_in_pretraining, daemon=True).start()
    pretraining = endless_bc.train()
    assert pretraining["interrupted"] and pretraining["phase"] == "pretraining"
    assert time.time() - signalled["at"] < 10 and not (run / "checkpoints").exists()

    trainer = Trainer(dataclasses.replace(cfg, resume=True), progress=False)  # nothing to resume: afresh

    def ctrl_c_after_the_first_updates() -> None:
        while trainer.learner.updates < 2:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=ctrl_c_after_the_first_updates, daemon=True).start()
    first = trainer.train()
    assert first["interrupted"] and first["env_steps"] == 30 and first["updates"] == 2
    assert "best_reevaluated" not in first and first["replay_sizes"]["online"] > 0
    assert [e["env_steps"] for e in trainer.evals] == [0]  # the one at 30 was cancelled, not recorded
    with pytest.raises(FileExistsError, match="--resume"):
        Trainer(cfg, progress=False)
    summary = Trainer(dataclasses.replace(cfg, resume=True), progress=False).train()
    assert summary["replay_restored"] == first["replay_sizes"]  # the tables as checkpointed
    assert summary["env_steps"] == 60
    # One fused update (UTD critic updates) per env step once warmup is reached, across the resume.
    assert summary["updates"] == 60 - 30 + 2
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["phase"] == "eval"]
    assert [e["env_steps"] for e in evals] == [0, 30, 60]
    # the paper's protocol: the best evaluation's parameters re-evaluated on fresh scenes
    assert summary["best_env_steps"] in (0, 30, 60) and len(summary["best_reevaluated"]) == 1
    assert summary["best_eval"] == max(e["success_rate"] for e in evals)
    assert [r for r in records if r["phase"] == "reevaluate"][0]["best_reevaluated"] == summary["best_reevaluated"]
    train = [r for r in records if r["phase"] == "train"]
    assert train and all(np.isfinite(r["critic_loss"]) and r["reward_online"] <= 0 for r in train)
    assert (run / "learning_curve.png").stat().st_size > 1000
    assert (run / "evals.csv").read_text().startswith("env_steps,updates,success_rate")
    assert json.loads((run / "config.json").read_text())["warmup"] == 30

    # TensorBoard: evaluations, learner metrics and rates against env steps, in the run directory
    scalars = tensorboard_scalars(run)
    assert [step for step, _ in scalars["eval/success_rate"]] == [0, 30, 60]
    assert [v for _, v in scalars["eval/mean_length"]] == [e["mean_length"] for e in evals]
    assert scalars["learner/critic_loss"] and all(np.isfinite(v) for _, v in scalars["learner/critic_loss"])
    assert all(v > 0 for _, v in scalars["system/env_steps_per_s"])
    assert scalars["eval/best_reevaluated"] == [(60, pytest.approx(np.mean(summary["best_reevaluated"])))]
    # one video per evaluation (its first episode), success or failure in the name, every 50th step filmed
    videos = sorted((run / "videos").glob("*.mp4"))
    assert [v.name.split("-")[1] for v in videos] == ["000000000", "000000030", "000000060"]
    for video, e in zip(videos, evals):
        assert video.stem.endswith("success" if e["success_rate"] == 1 else "failure")
        frames = read_frames(video)
        assert frames.shape == (expected_frames(int(e["mean_length"]), 50), FRAME_SIZE, 2 * FRAME_SIZE, 3)
        assert frames.std() > 10  # a rendered scene, not a blank frame


def test_residual_mode_bc_targets_are_what_the_small_policy_must_add_to_the_base(lift_setup, tiny_agent, tmp_path):
    """Residual BC on raw demo actions would execute base + demo-like action (twice the motion); the targets are
    a_demo − a_base, so that base + target gives back the demo action, with a_base what the base plays at that
    step while acting: action t mod 10 of the chunk it was asked for at step 10 * (t // 10) of the episode."""
    from csil.acting import base_observation, combine_actions
    from csil.base_policy import LocalBasePolicy

    _, demos, base = lift_setup
    cfg = TrainConfig(task="Lift", action_mode="residual", num_demos=3, demos=str(demos), base_checkpoint=str(base),
                      logdir=str(tmp_path / "residual"), agent=tiny_agent)
    residual = Trainer(cfg, progress=False).learner.demos
    raw = Trainer(dataclasses.replace(cfg, action_mode="ensemble"), progress=False).learner.demos
    rows = np.arange(0, len(raw), 7)
    phase = raw.episode_step()[rows] % 10
    observations = [base_observation({k: v[i] for k, v in raw.obs.items()}, "lift") for i in rows - phase]
    base_action = LocalBasePolicy(base).infer_batch(observations)[np.arange(len(rows)), phase]
    assert set(phase) > {0}  # rows inside chunks as well as at their starts
    np.testing.assert_allclose(residual.action[rows], np.clip(raw.action[rows] - base_action, -1, 1), atol=1e-5)
    executed = combine_actions(base_action, residual.action[rows], "residual")
    unclipped = np.abs(raw.action[rows] - base_action) < 1
    np.testing.assert_allclose(executed[unclipped], raw.action[rows][unclipped], atol=1e-5)
    assert not np.allclose(residual.action, raw.action)
    assert residual.next_action.shape == raw.next_action.shape and np.all(np.abs(residual.next_action) <= 1)
    # the residual policy sees that base action and its place in the chunk; next_obs has the next step's
    np.testing.assert_allclose(residual.obs["base_plan"][rows], np.c_[base_action, phase / 10], atol=1e-5)
    inner = np.flatnonzero(~raw.last)
    np.testing.assert_array_equal(residual.next_obs["base_plan"][inner], residual.obs["base_plan"][inner + 1])
    np.testing.assert_array_equal(residual.obs["state"], raw.obs["state"])
    assert "base_plan" not in raw.obs


def test_residual_mode_refuses_demos_without_what_the_base_policy_asks_for(lift_setup, lift_image_setup, tiny_agent,
                                                                          tmp_path):
    """Residual targets need a_base on the demo states: state demos cannot ask a camera-based base policy."""
    _, state_demos, _ = lift_setup
    _, _, image_base = lift_image_setup
    cfg = TrainConfig(task="Lift", action_mode="residual", num_demos=2, demos=str(state_demos),
                      base_checkpoint=str(image_base), logdir=str(tmp_path / "residual-on-image"), agent=tiny_agent)
    with pytest.raises(ValueError, match=r"cameras \[\('agentview', 84\).*state demos hold .*cameras \[\]"):
        Trainer(cfg, progress=False)
