"""Demo generation -> base-policy training -> evaluation, end to end on a tiny budget, plus the CLIs."""

import dataclasses
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from csil.acting import base_observation
from csil.base_policy import LocalBasePolicy
from csil.config import (BASE_POLICY_DEFAULTS, IMAGE_BASE_POLICY_DEFAULTS, BaseTrainConfig, DemoConfig,
                         base_policy_defaults)
from csil.demos import DemoWriter, read_demos
from csil.envs import CsilEnv
from orchestration.pipeline import ensure_base_policy, generate_demos, train_base_from_file

ROOT = Path(__file__).resolve().parents[1]
TINY = BaseTrainConfig(steps=300, batch_size=64, hidden=(64, 64))


@pytest.fixture(scope="module")
def lift_demos(tmp_path_factory, ray_local):
    path = tmp_path_factory.mktemp("demos") / "lift.hdf5"
    summary = generate_demos(DemoConfig(task="Lift", num=4, seed=0, workers=2), path, progress=False)
    return path, summary


@pytest.fixture(scope="module")
def lift_base(lift_demos, tmp_path_factory):
    out = tmp_path_factory.mktemp("base") / "lift"
    summary = train_base_from_file(lift_demos[0], out, TINY, progress=False)
    return out, summary


def test_generated_demos_are_successful_robomimic_episodes(lift_demos):
    path, summary = lift_demos
    assert summary["demos"] == 4 and summary["expert_success_rate"] >= 0.8
    data = read_demos(path)
    assert data.env_meta["env_name"] == "Lift" and data.env_meta["env_kwargs"]["control_freq"] == 20
    assert set(data.masks) == {"train", "valid"}
    for ep in data.episodes:
        assert ep.rewards[-1] == 1.0 and ep.dones[-1] == 1.0  # kept only successes; success ends the episode
        assert np.all(np.abs(ep.actions) <= 1.0) and ep.states.shape[0] == len(ep)
        np.testing.assert_allclose(ep.next_obs["object"][:-1], ep.obs["object"][1:])


def test_generation_is_independent_of_worker_count(lift_demos, tmp_path):
    path = tmp_path / "one_worker.hdf5"
    generate_demos(DemoConfig(task="Lift", num=2, seed=0, workers=1), path, progress=False)
    first_two = read_demos(lift_demos[0], num_demos=2).episodes
    for a, b in zip(read_demos(path).episodes, first_two):
        np.testing.assert_array_equal(a.obs["object"][0], b.obs["object"][0])


def test_stopped_generation_resumes_after_its_last_demo(lift_demos, tmp_path, monkeypatch, capsys):
    """Ctrl-C during generation keeps the demos written so far; the same command continues after the last one's
    seed and writes the file an uninterrupted run writes."""
    path = tmp_path / "resumed.hdf5"
    add = DemoWriter.add

    def add_then_stop(writer, episode):
        if len(writer.names) == 2:
            raise KeyboardInterrupt
        return add(writer, episode)

    monkeypatch.setattr(DemoWriter, "add", add_then_stop)
    with pytest.raises(KeyboardInterrupt):
        generate_demos(DemoConfig(task="Lift", num=4, seed=0, workers=1), path, progress=False)
    monkeypatch.setattr(DemoWriter, "add", add)
    assert not path.exists() and len(read_demos(f"{path}.partial").episodes) == 2
    summary = generate_demos(DemoConfig(task="Lift", num=4, seed=0, workers=1), path, progress=False)
    assert "resuming" in capsys.readouterr().out
    assert summary["demos"] == 4 and summary["attempted"] == lift_demos[1]["attempted"]
    for a, b in zip(read_demos(path).episodes, read_demos(lift_demos[0]).episodes, strict=True):
        np.testing.assert_array_equal(a.obs["object"], b.obs["object"])


def test_training_fits_the_demo_chunks(lift_base):
    out, summary = lift_base
    curve = json.loads((out / "base_policy.json").read_text())["loss_curve"]
    assert curve[-1] < 0.5 * curve[0]


def test_stopped_training_continues_where_it_stopped(lift_demos, lift_base, tmp_path):
    """A stopped training (Ctrl-C, SIGTERM, ``should_stop``) keeps its progress in its output directory; the same
    call continues it to what an uninterrupted run gives. Other settings on that progress are refused by name."""
    out, calls = tmp_path / "stopped", itertools.count()
    with pytest.raises(KeyboardInterrupt, match="step 150 of 300"):
        train_base_from_file(lift_demos[0], out, TINY, progress=False, should_stop=lambda: next(calls) >= 150)
    assert json.loads((out / "progress" / "record.json").read_text())["step"] == 150
    assert not (out / "base_policy.json").exists()
    with pytest.raises(ValueError, match="'steps': \\(300, 400\\)"):
        train_base_from_file(lift_demos[0], out, dataclasses.replace(TINY, steps=400), progress=False)
    rest = itertools.count()
    summary = train_base_from_file(lift_demos[0], out, TINY, progress=False, should_stop=lambda: next(rest) < 0)
    assert next(rest) == 150  # the second call ran the last 150 steps only
    assert summary["steps"] == 300 and not (out / "progress").exists()
    resumed, straight = (json.loads((d / "base_policy.json").read_text())["loss_curve"] for d in (out, lift_base[0]))
    np.testing.assert_allclose(resumed, straight, rtol=1e-5)


def _stop_when(process: subprocess.Popen, log: Path, reached, timeout_s: float = 180) -> tuple[float, str]:
    """SIGTERM ``process`` once its output so far (``log``) satisfies ``reached``; (seconds it took to exit after
    the signal, its output)."""
    deadline = time.time() + timeout_s
    while not reached(log.read_text(errors="replace")):
        assert process.poll() is None, log.read_text(errors="replace")[-2000:]
        assert time.time() < deadline, f"not reached in {timeout_s} s: {log.read_text(errors='replace')[-2000:]}"
        time.sleep(0.2)
    signalled = time.time()
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=60)
    return time.time() - signalled, log.read_text(errors="replace")


def test_csil_base_train_stops_on_sigterm_with_its_progress_and_the_same_command_continues(lift_demos, tmp_path):
    """The CLI's signal path (the loop's stop-and-continue is the test above): SIGTERM ends `csil-base train`
    within seconds, with its progress saved and a message saying so; the same command then continues from the
    saved step."""
    out = tmp_path / "base"
    command = [sys.executable, "-m", "cli.base", "train", "--demos", str(lift_demos[0]), "--out", str(out),
               "--steps", "100000", "--batch-size", "8"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # its messages reach the log as they are printed
    steps_done = lambda text: re.findall(r"(\d+)/100000", text)  # noqa: E731 - tqdm's "n/total"
    log = tmp_path / "first.log"
    with log.open("w") as err:
        first = subprocess.Popen(command, stdout=err, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    took, text = _stop_when(first, log, lambda text: any(int(n) > 0 for n in steps_done(text)))
    assert first.returncode == 1 and took < 20, (first.returncode, took)
    assert "its progress is saved: the same command continues it" in text
    saved = json.loads((out / "progress" / "record.json").read_text())["step"]
    assert 0 < saved < 100000 and not (out / "base_policy.json").exists()

    log = tmp_path / "second.log"
    with log.open("w") as err:
        second = subprocess.Popen(command, stdout=err, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    _stop_when(second, log, lambda text: f"continuing base-policy training from step {saved:,}" in text)
    assert second.returncode == 1
    assert json.loads((out / "progress" / "record.json").read_text())["step"] >= saved


def test_base_policy_speaks_openpi_contract(lift_base, lift_demos):
    policy = LocalBasePolicy(lift_base[0])
    env = CsilEnv("Lift", "state")
    obs = base_observation(env.reset(seed=0), "lift the red cube")
    out = policy.infer(obs)
    assert out["actions"].shape == (10, 7) and out["actions"].dtype == np.float32
    assert np.all(np.abs(out["actions"]) <= 1.0)
    batch = policy.infer_batch([obs] * 3)
    np.testing.assert_allclose(batch[1], out["actions"], atol=1e-5)
    # Reloading gives the same function.
    np.testing.assert_allclose(LocalBasePolicy(lift_base[0]).infer(obs)["actions"], out["actions"], atol=1e-6)
    # It imitates: on demo states its first action is closer to the demo action than a zero action is.
    ep = read_demos(lift_demos[0]).episodes[0]
    state = np.concatenate([ep.obs[k][5] for k in ("robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos", "object")])
    pred = policy.infer({"observation/state": state.astype(np.float32), "prompt": ""})["actions"][0]
    assert np.abs(pred - ep.actions[5]).mean() < np.abs(ep.actions[5]).mean()


def test_bad_observations_get_clear_errors(lift_base):
    policy = LocalBasePolicy(lift_base[0])
    with pytest.raises(ValueError, match="observation/state"):
        policy.infer({"prompt": "x"})
    with pytest.raises(ValueError, match=r"\(5,\).*\(19,\)"):
        policy.infer({"observation/state": np.zeros(5, np.float32)})
    with pytest.raises(FileNotFoundError, match="csil-base train"):
        LocalBasePolicy(lift_base[0].parent / "nothing_here")


def test_eval_cli_reports_json(lift_base, capsys, ray_local, tmp_path):
    from cli.evaluate import main

    main(["--task", "Lift", "--policy", f"base:{lift_base[0]}", "--episodes", "3", "--workers", "1",
          "--envs-per-worker", "3", "--out", str(tmp_path / "episodes.json")])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["episodes"] == 3 and 0.0 <= summary["success_rate"] <= 1.0
    assert 1 <= summary["mean_episode_length"] <= 400
    episodes = json.loads((tmp_path / "episodes.json").read_text())["episodes"]
    assert [e["seed"] for e in episodes] == [summary["seed"] + i for i in range(3)]
    # Lift's sparse reward is 1 exactly on success: the best reward of an episode is its success
    assert [e["max_reward"] for e in episodes] == [float(e["success"]) for e in episodes]
    assert summary["mean_max_reward"] == summary["success_rate"]


def test_expert_eval_succeeds(capsys, ray_local):
    from cli.evaluate import main

    main(["--task", "Lift", "--policy", "expert", "--episodes", "4", "--workers", "2", "--envs-per-worker", "2"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["success_rate"] == 1.0 and summary["mean_episode_length"] < 100
    assert summary["mean_max_reward"] == 1.0


def test_image_base_policy_is_built_once_in_the_cache_and_infers(ray_local):
    """`csil-base prepare --obs image` / `--base-obs image`: the task's base policy on both cameras (π0.5's case),
    its demos rendered on first use, cached, and reused by the next call."""
    cfg = dataclasses.replace(TINY, steps=20, num_demos=1)
    out = ensure_base_policy("Lift", cfg, obs_mode="image")
    assert out.name.startswith("Lift_image_")
    meta = json.loads((out / "base_policy.json").read_text())
    assert meta["num_demos"] == 1 and meta["obs_spec"]["cameras"]
    assert read_demos(meta["demos"]).episodes[0].obs["agentview_image"].shape[1:] == (84, 84, 3)
    built = (out / "base_policy.json").stat().st_mtime_ns
    assert ensure_base_policy("Lift", cfg, obs_mode="image") == out
    assert (out / "base_policy.json").stat().st_mtime_ns == built
    policy = LocalBasePolicy(out)
    obs = base_observation(CsilEnv("Lift", "image").reset(seed=0), "lift")
    assert set(obs) == {"observation/state", "observation/image", "observation/wrist_image", "prompt"}
    assert policy.infer(obs)["actions"].shape == (10, 7)
    with pytest.raises(ValueError, match="observation/wrist_image"):
        policy.infer({k: v for k, v in obs.items() if k != "observation/wrist_image"})


def test_a_task_without_a_measured_image_setting_gets_its_state_budget_with_keypoint_pooling():
    """NutAssembly's image base has no measured setting: it trains like its state base (200 demos, 20,000 x 256),
    with the spatial-softmax pooling every measured image task uses, never the mean pooling that misses placements."""
    assert base_policy_defaults("NutAssembly", "image") == dataclasses.replace(
        BASE_POLICY_DEFAULTS["NutAssembly"], image_pool="spatial_softmax")
    assert base_policy_defaults("Stack", "image").image_pool == "spatial_softmax"
    assert base_policy_defaults("Square", "image") == IMAGE_BASE_POLICY_DEFAULTS["Square"]
    assert base_policy_defaults("NutAssembly") == BASE_POLICY_DEFAULTS["NutAssembly"]
    with pytest.raises(ValueError, match="observation mode 'rgb'"):
        base_policy_defaults("Lift", "rgb")


def test_image_training_on_state_only_demos_names_the_missing_keys(lift_demos, tmp_path):
    with pytest.raises(ValueError, match="agentview_image"):
        train_base_from_file(lift_demos[0], tmp_path / "x", TINY, obs_mode="image", progress=False)


def test_image_pool_is_a_training_flag_the_saved_policy_remembers(lift_image_setup, tmp_path, capsys):
    """`csil-base train --image-pool spatial_softmax` (keypoints: where a feature fires) is rebuilt on loading;
    a directory written before the flag existed loads with the mean pooling it was trained with."""
    from cli.base import main as base_main

    _, demos, _ = lift_image_setup
    out = tmp_path / "ss"
    base_main(["train", "--demos", str(demos), "--out", str(out), "--obs", "image", "--steps", "3",
               "--batch-size", "4", "--image-pool", "spatial_softmax"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["out"] == str(out.absolute())
    policy = LocalBasePolicy(out)
    assert policy.meta["train"]["image_pool"] == "spatial_softmax"
    assert "log_temperature" in str(policy.params)
    obs = base_observation(CsilEnv("Lift", "image").reset(seed=0), "lift")
    assert np.isfinite(policy.infer(obs)["actions"]).all()

    meta_file = lift_image_setup[2] / "base_policy.json"
    old = json.loads(meta_file.read_text())
    old["train"].pop("image_pool")
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "checkpoint").symlink_to(lift_image_setup[2] / "checkpoint")
    (legacy / "base_policy.json").write_text(json.dumps(old))
    assert LocalBasePolicy(legacy).model.image_pool == "mean"


_PEAK_MEMORY_PROBE = """
import resource, sys
import numpy as np
from csil.base_policy import ChunkDataset, train_base_policy
from csil.config import BaseTrainConfig
from csil.specs import ObsSpec
frames = int(sys.argv[1])
spec = ObsSpec("image", (("robot0_eef_pos", 3),), cameras=("agentview", "robot0_eye_in_hand"))
rng = np.random.default_rng(0)
data = ChunkDataset(state=rng.normal(size=(frames, 3)).astype(np.float32),
                    images={k: rng.integers(0, 255, (frames, 84, 84, 3), np.uint8) for k in spec.image_keys},
                    chunks=rng.uniform(-1, 1, (frames, 10, 7)).astype(np.float32))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
train_base_policy(data, spec, BaseTrainConfig(steps=3, batch_size=8, hidden=(32,), image_channels=(8, 8, 8)),
                  progress=False)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""


def test_image_training_holds_the_frames_about_once(tmp_path):
    """The frames must enter the jitted step as arguments: closed over, XLA bakes them into the program as
    constants, ~10 copies of every frame (200 rendered NutAssembly demos were OOM-killed at 24 GB)."""
    import subprocess
    import sys

    frames = 4000  # 2 cameras: 169 MB of frames
    out = subprocess.run([sys.executable, "-c", _PEAK_MEMORY_PROBE, str(frames)], capture_output=True, text=True,
                         timeout=300, check=True)
    growth = int(out.stdout.split()[-1])
    assert growth < 3 * frames * 2 * 84 * 84 * 3, f"training grew the peak RSS by {growth / 1e6:.0f} MB"
