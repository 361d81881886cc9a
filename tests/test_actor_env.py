"""The robosuite-1.4 actor environment (deploy/actor-env-rs14.sh): CsilEnv on robosuite 1.4's API, and
csil-launch with its env actors and evaluator there while learner, replay and inference stay here (1.5).

Needs the second venv: ``$CSIL_ACTOR_ENV`` or ``.venv-rs14`` in the checkout. Without it these tests skip,
unless ``CSIL_ACTOR_ENV`` is set (CI builds it and sets it: missing there is a failure)."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import ray

from cli.launch import build_parser
from csil.config import LaunchConfig
from csil.envs import CsilEnv
from csil.ray_utils import python_env
from orchestration.launcher import System

ACTOR_ENV = Path(os.environ.get("CSIL_ACTOR_ENV") or Path(__file__).resolve().parents[1] / ".venv-rs14")
RS14 = "robosuite 1.4.1, mujoco 2.3.2"


@pytest.fixture(scope="module")
def actor_env() -> Path:
    if not (ACTOR_ENV / "bin" / "python").exists():
        if os.environ.get("CSIL_ACTOR_ENV"):
            pytest.fail(f"CSIL_ACTOR_ENV={ACTOR_ENV} has no bin/python: deploy/actor-env-rs14.sh did not build it")
        pytest.skip(f"no robosuite-1.4 actor environment at {ACTOR_ENV}: build it with deploy/actor-env-rs14.sh")
    return ACTOR_ENV


# Runs in the actor environment: CsilEnv's spec, seeded scenes and a few steps on robosuite 1.4, as JSON.
_PROBE = """
import json, numpy as np
from csil.envs import CsilEnv, simulator_versions
env = CsilEnv("Lift", "state", seed=0)
first, again, other = env.reset(seed=3), env.reset(seed=3), env.reset(seed=4)
obs, reward, success, truncated, _ = env.step(np.zeros(7, np.float32))
image = CsilEnv("Lift", "image", seed=0).reset(seed=3)["agentview_image"]
print(json.dumps({"rows": image.mean(axis=(1, 2)).tolist(),"simulator": simulator_versions(), "spec": env.spec.state_keys, "obs": first["state"].tolist(),
                  "same_seed_same_scene": bool(np.array_equal(first["state"], again["state"])),
                  "other_seed_other_scene": not np.array_equal(first["state"], other["state"]),
                  "stepped": obs["state"].shape[0], "controller": env.make_kwargs["controller_configs"]["type"]}))
"""


def test_csil_env_on_robosuite_14(actor_env):
    """The same wrapper on robosuite 1.4's API: its controller config, the same observation layout as 1.5,
    scenes seeded by ``reset(seed)``, images the same way up."""
    probe = subprocess.run([str(actor_env / "bin" / "python"), "-c", _PROBE], capture_output=True, text=True,
                           timeout=300, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert probe.returncode == 0, probe.stderr[-3000:]
    found = json.loads(probe.stdout.strip().splitlines()[-1])
    assert found["simulator"] == RS14 and found["controller"] == "OSC_POSE"
    assert found["same_seed_same_scene"] and found["other_seed_other_scene"]
    here = CsilEnv("Lift", "state", seed=0)
    assert [tuple(k) for k in found["spec"]] == list(here.spec.state_keys)  # one layout, whichever robosuite
    assert found["stepped"] == len(found["obs"]) == here.spec.state_dim
    here.close()
    # Row brightness of agentview (table below, wall above): it matches 1.5's upright image, not the flipped one.
    rows = np.asarray(found["rows"])
    upright = CsilEnv("Lift", "image", seed=0).reset(seed=3)["agentview_image"].mean(axis=(1, 2))
    assert np.corrcoef(rows, upright)[0, 1] > max(0.5, np.corrcoef(rows, upright[::-1])[0, 1])


def test_actor_env_is_checked_up_front(tmp_path, capsys):
    with pytest.raises(SystemExit):  # csil-launch refuses it before starting anything
        build_parser().parse_args(["--actor-env", str(tmp_path / "missing")])
    assert "actor-env-rs14.sh" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="actor-env-rs14.sh"):
        python_env(str(tmp_path / "missing"))
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "python").symlink_to("/bin/false")
    with pytest.raises(RuntimeError, match="importing ray failed"):
        python_env(str(tmp_path))
    assert python_env(sys.executable) == {"py_executable": sys.executable}


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
def test_launch_with_actors_in_the_robosuite_14_env(actor_env, lift_setup, tiny_agent, free_port, tmp_path):
    _, demos, base = lift_setup
    cfg = LaunchConfig(task="Lift", actors=1, envs_per_actor=2, env_steps=120, warmup=40, eval_every=10**6,
                       eval_episodes=1, final_eval_rounds=1, publish_every=2, num_demos=3, demos=str(demos),
                       base_checkpoint=str(base), serve_port=free_port(), logdir=str(tmp_path / "run"),
                       agent=tiny_agent, actor_env=str(actor_env))
    system = System(cfg, progress=False)
    seen: dict = {}
    threading.Thread(target=_learner_robosuite, args=(system, seen), daemon=True).start()
    summary = system.run()

    assert not summary.get("failed") and summary["env_steps"] >= 120 and summary["learner_updates"] > 0
    assert summary["replay_sizes"]["online"] > 0  # the 1.4 actors' transitions reached the replay here
    assert [a["simulator"] for a in summary["actors"].values()] == [RS14]
    assert seen["learner"] == (sys.executable, importlib.metadata.version("robosuite"))
    assert seen["learner"][1].startswith("1.5")
    assert len(summary["best_reevaluated"]) == 1  # the evaluator's workers ran there too
