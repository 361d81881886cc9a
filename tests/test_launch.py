"""csil-launch end to end on a tiny budget, and the actor's fault behaviour: real Ray actors, a real Reverb
server, the learner service and the inference server (Ray Serve) that csil-launch starts for ``local``."""

import dataclasses
import importlib.metadata
import json
import os
import signal
import sys
import threading
import time
import urllib.request
from pathlib import Path

import jax
import numpy as np
import pytest
import ray

from csil.config import LaunchConfig, ReplayConfig, TrainConfig
from csil.envs import simulator_versions
from csil.video import expected_frames, read_frames
from orchestration.launcher import System


def _sigterm_after(system: System, port: int, seen: dict, env_steps: int = 300, sigterm: bool = True) -> None:
    """Once the run has taken ``env_steps`` env steps, record the inference server's stats and SIGTERM."""
    deadline = time.time() + 600
    while time.time() < deadline:
        time.sleep(0.5)
        coordinator = getattr(system, "coordinator", None)
        if coordinator is None or ray.get(coordinator.stats.remote())["env_steps"] < env_steps:
            continue
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=10) as response:
            seen["inference"] = json.loads(response.read())
        if sigterm:
            os.kill(os.getpid(), signal.SIGTERM)
        return


def _stopped_by_sigterm(first: dict, seen: dict, low: int, high: int) -> None:
    """SIGTERM stopped the run between ``low`` and ``high`` env steps, after learning and acting on chunks from
    the inference server csil-launch started, with no final evaluation."""
    assert first["interrupted"] and "final_eval" not in first, first
    assert low <= first["env_steps"] < high and first["learner_updates"] > 0
    assert first["mean_staleness"] is not None and first["mean_staleness"] >= 0
    assert seen["inference"]["observations"] > 0


def _resume_from_checkpoints(cfg: LaunchConfig, first: dict) -> dict:
    """A SIGTERM'd run left learner and replay checkpoints, refuses to start over them without --resume, and
    --resume continues it from the replay tables as checkpointed; the resumed run's summary."""
    run = Path(cfg.logdir)
    assert list((run / "checkpoints" / "learner").glob("*/record.json"))
    assert any((run / "checkpoints" / "replay").glob("*/DONE"))
    with pytest.raises(FileExistsError, match="--resume"):
        System(cfg, progress=False)
    resumed = System(dataclasses.replace(cfg, resume=True), progress=False).run()
    assert resumed["replay_restored"] == first["replay_sizes"]  # the tables as checkpointed
    assert resumed["replay_restored"]["online"] > 0
    return resumed


def _learner_robosuite(system: System, seen: dict) -> None:
    """What the learner's process would import as robosuite (asked inside it while the run goes on)."""
    deadline = time.time() + 600
    while time.time() < deadline and "learner" not in seen:
        time.sleep(0.5)
        learner = getattr(system, "learner", None)
        if learner is not None:
            seen["learner"] = ray.get(learner.__ray_call__.remote(
                lambda self: (sys.executable, importlib.metadata.version("robosuite"))))


@pytest.mark.timeout(1200)
def test_launch_stops_on_sigterm_with_checkpoints_then_resumes(lift_setup, lift_image_setup, tiny_agent, free_port,
                                                               actor_env, tmp_path, tensorboard_scalars):
    """The user's Ctrl-C and --resume (killed components are tests/test_chaos.py's), in π0.5's case: the base
    policy's server asks for both cameras, the small policy, replay and the learner see the state; the envs of
    actors and evaluator render for the base. Both runs log to TensorBoard in the run directory and film each
    evaluation's episode (every 25th step: rendering is slow). Where the robosuite-1.4 actor environment exists
    (always in CI), env actors and evaluator run in it while learner, replay and inference stay on 1.5."""
    _, demos, _ = lift_setup
    _, _, base = lift_image_setup
    port = free_port()
    cfg = LaunchConfig(task="Lift", actors=2, envs_per_actor=2, env_steps=300, warmup=40, eval_every=10**6,
                       eval_episodes=1, eval_videos=1, video_stride=25, final_eval_rounds=1, publish_every=2,
                       fuse_updates=2, num_demos=3,
                       demos=str(demos), base_checkpoint=str(base), serve_port=port, logdir=str(tmp_path / "run"),
                       agent=tiny_agent, actor_env=str(actor_env) if actor_env else None)
    system = System(cfg, progress=False)
    seen: dict = {}
    threading.Thread(target=_sigterm_after, args=(system, port, seen, 120), daemon=True).start()
    threading.Thread(target=_learner_robosuite, args=(system, seen), daemon=True).start()
    first = system.run()

    _stopped_by_sigterm(first, seen, 120, 300)
    simulator = "robosuite 1.4.1, mujoco 2.3.2" if actor_env else simulator_versions()
    assert {a["simulator"] for a in first["actors"].values()} == {simulator}
    assert seen["learner"] == (sys.executable, importlib.metadata.version("robosuite"))
    assert seen["learner"][1].startswith("1.5")
    assert seen["inference"]["observation_shapes"] == {
        "observation/state": [9], "observation/image": [84, 84, 3], "observation/wrist_image": [84, 84, 3]}
    assert system.spec.mode == "state" and not system.spec.cameras  # what replay and the learner hold
    run = tmp_path / "run"
    # the learner (a Ray actor) stored its compiled update where the resumed learner loads it from
    assert list((Path(os.environ["CSIL_CACHE"]) / "xla").glob("jit__update*-cache"))
    # the step-0 evaluation, if SIGTERM did not cancel it (a Ctrl-C does not wait for episodes)
    evals_file = run / "evals.jsonl"
    before = [json.loads(line)["env_steps"] for line in evals_file.read_text().splitlines()
              ] if evals_file.exists() else []
    assert before in ([], [0])
    resumed = _resume_from_checkpoints(cfg, first)
    assert resumed["env_steps"] >= 300 and resumed["learner_updates"] > first["learner_updates"]
    assert not resumed["interrupted"] and len(resumed["best_reevaluated"]) == 1
    evals = [json.loads(line) for line in evals_file.read_text().splitlines()]
    steps = [e["env_steps"] for e in evals]
    assert steps == before + [first["env_steps"], resumed["env_steps"]]  # history kept, counters go on
    updates = [json.loads(line)["updates"] for line in (run / "learner.jsonl").read_text().splitlines()]
    assert updates == sorted(updates)
    assert (run / "learning_curve.png").exists() and (run / "checkpoints" / "best" / "record.json").exists()

    # TensorBoard (both runs' event files, one TensorBoard run): evaluations, rates and learner losses
    scalars = tensorboard_scalars(run)
    assert [step for step, _ in scalars["eval/success_rate"]] == steps
    assert any(v > 0 for _, v in scalars["system/env_steps_per_s"])
    losses = scalars["learner/critic_loss"]
    assert len(losses) >= 2 and all(np.isfinite(v) for _, v in losses)  # each run's learner, however short the run
    assert {"system/updates_per_s", "system/rate_limited_fraction", "actors/episodes"} <= set(scalars)
    # an MP4 of each evaluation's episode, with every 25th step (and the last)
    videos = sorted(run.glob("videos/eval-*.mp4"))
    assert [int(v.name.split("-")[1]) for v in videos] == steps
    frames = read_frames(videos[0])
    assert len(frames) == expected_frames(int(evals[0]["mean_length"]), 25) and frames.std() > 10


@pytest.mark.timeout(900)
def test_image_launch_stops_on_sigterm_in_pretraining_and_in_acting(lift_image_setup, tiny_image_agent, free_port,
                                                                    tmp_path):
    """The paper's setting (image small policy, image base policy served by the inference server), stopped twice
    by the user's Ctrl-C: during pretraining, which answers within a step and keeps nothing of it, then, after
    --resume pretrained again, while acting, which checkpoints learner and replay. Replay stores the frames as
    JPEG here (``--frame-codec jpeg``: the actors encode, the learner's input pipeline decodes). --resume from
    acting checkpoints is the state run's above; image replay checkpoints (raw and JPEG) restore in
    tests/test_replay.py; killed components are tests/test_chaos.py's."""
    _, demos, base = lift_image_setup
    port = free_port()
    # few updates: an image update takes seconds on a CPU (results/learner.md)
    cfg = LaunchConfig(task="Lift", obs_mode="image", frame_codec="jpeg", actors=1, envs_per_actor=2, env_steps=64,
                       warmup=32, eval_every=10**6, eval_episodes=0, eval_videos=0, publish_every=2, num_demos=2,
                       demos=str(demos), base_checkpoint=str(base), serve_port=port,
                       logdir=str(tmp_path / "run"), agent=dataclasses.replace(tiny_image_agent, bc_steps=10**7))
    system = System(cfg, progress=False)
    signalled: dict = {}

    def stop_once_pretraining() -> None:
        deadline = time.time() + 300
        while time.time() < deadline:
            time.sleep(0.5)
            learner = getattr(system, "learner", None)
            if learner is not None and ray.get(learner.stats.remote())["pretrain"]["steps"] > 0:
                signalled["at"] = time.time()
                os.kill(os.getpid(), signal.SIGTERM)
                return

    threading.Thread(target=stop_once_pretraining, daemon=True).start()
    pretraining = system.run()
    assert pretraining["interrupted"] and pretraining["phase"] == "pretraining"
    assert time.time() - signalled["at"] < 10
    run = tmp_path / "run"
    assert not list((run / "checkpoints" / "learner").glob("*/record.json"))

    system = System(dataclasses.replace(cfg, resume=True, agent=tiny_image_agent), progress=False)
    seen: dict = {}
    threading.Thread(target=_sigterm_after, args=(system, port, seen, 36), daemon=True).start()
    first = system.run()

    _stopped_by_sigterm(first, seen, 36, 64)
    # what the server's spec asked for (the image base policy's training view), checked at the server
    assert seen["inference"]["observation_shapes"] == {
        "observation/state": [9], "observation/image": [84, 84, 3], "observation/wrist_image": [84, 84, 3]}
    newest = max((run / "checkpoints" / "learner").glob("*/record.json"), key=lambda p: int(p.parent.name))
    assert json.loads(newest.read_text())["env_steps"] == first["env_steps"]
    assert any((run / "checkpoints" / "replay").glob("*/DONE"))


@pytest.mark.timeout(600)
def test_actor_waits_for_an_unreachable_base_policy_server(lift_setup, tiny_agent, free_port, ray_local):
    """No crash loop: the actor logs and retries until the server appears, then acts."""
    from openpi_server import WebsocketPolicyServer

    from csil.base_policy import LocalBasePolicy
    from csil.demos import read_demos, spec_from_demos
    from learner.agent import CSILAgent
    from orchestration.launcher import ROLES
    from replay.server import ReplayServer

    _, demos, base = lift_setup
    port = free_port()
    target = f"ws://127.0.0.1:{port}"
    spec = spec_from_demos(str(demos), read_demos(str(demos)).episodes[0].obs, "state")
    agent = CSILAgent(tiny_agent, spec)
    cfg = LaunchConfig(task="Lift", envs_per_actor=1, base_policy=target, base_policy_timeout_s=1.0, agent=tiny_agent)
    replay_cfg = ReplayConfig(samples_per_insert=1.0, min_size=1, error_buffer_fraction=1e9)
    with ReplayServer(replay_cfg, spec) as replay:
        coordinator = ROLES["coordinator"].remote()
        actor = None
        try:  # the session's Ray has 2 CPUs: a failure here must not leave the actor holding one
            coordinator.publish.remote(0, [ray.put(agent.init_policy(jax.random.PRNGKey(0)))])
            actor = ROLES["actor"].remote(0, cfg, replay.address, coordinator, agent.policy_net)
            run = actor.run.remote()
            deadline = time.time() + 120
            while not _worker_logs_contain(f"base policy {target} unreachable") and time.time() < deadline:
                time.sleep(0.5)
            assert _worker_logs_contain("the actor keeps waiting")
            time.sleep(3)  # several more timeouts: still waiting, not restarted, no steps
            stats = ray.get(coordinator.stats.remote())
            assert stats["env_steps"] == 0 and stats["restarts"] == {0: 0} and not ray.wait([run], timeout=0)[0]

            # openpi's own server, announcing what the model needs (a stock server without it gets LIBERO's layout)
            policy = LocalBasePolicy(base)
            server = WebsocketPolicyServer(policy, "127.0.0.1", port, metadata=policy.metadata)
            threading.Thread(target=server.serve_forever, daemon=True).start()
            deadline = time.time() + 300  # reconnecting, then the first act's compile: minutes on a loaded machine
            while ray.get(coordinator.stats.remote())["env_steps"] == 0 and time.time() < deadline:
                time.sleep(0.5)
            coordinator.stop.remote()
            assert ray.get(run, timeout=60) > 0
            assert ray.get(coordinator.stats.remote())["restarts"] == {0: 0}
        finally:
            for handle in (actor, coordinator):
                if handle is not None:
                    ray.kill(handle)


def _worker_logs_contain(text: str) -> bool:
    logs = ray._private.worker._global_node.get_logs_dir_path()
    return any(text in open(os.path.join(logs, f), errors="replace").read() for f in os.listdir(logs)
               if f.startswith("worker-") and f.endswith((".err", ".out")))


@pytest.mark.parametrize("command", ["launch", "train"])
def test_resume_uses_the_saved_config(command, tmp_path, tiny_agent):
    """csil-launch --resume and csil-train --resume: the run's saved config, only --env-steps changed."""
    cli = importlib.import_module(f"cli.{command}")
    cls = {"launch": LaunchConfig, "train": TrainConfig}[command]
    saved = cls(task="Square", num_demos=7, env_steps=1000, agent=tiny_agent, logdir=str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps(dataclasses.asdict(saved), default=str))
    args = ["--resume", "--logdir", str(tmp_path), "--env-steps", "5000"]
    assert cli.config_from_args(cli.build_parser().parse_args(args)) == dataclasses.replace(
        saved, env_steps=5000, resume=True)
    with pytest.raises(SystemExit, match="does not exist"):
        cli.config_from_args(cli.build_parser().parse_args(["--resume", "--logdir", str(tmp_path / "nope")]))
