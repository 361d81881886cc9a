"""The robosuite-1.4 actor environment (deploy/actor-env-rs14.sh): CsilEnv on robosuite 1.4's API, and
csil-launch's check of ``--actor-env``. A launch with its env actors and evaluator there while learner, replay
and inference stay here (1.5) is tests/test_launch.py's SIGTERM test.

Needs the second venv (conftest's ``actor_env``). Without it the probe skips, unless ``CSIL_ACTOR_ENV`` is set
(CI builds it and sets it: missing there is a failure)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cli.launch import build_parser
from csil.envs import CsilEnv
from csil.ray_utils import python_env

RS14 = "robosuite 1.4.1, mujoco 2.3.2"


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
    if actor_env is None:
        pytest.skip("no robosuite-1.4 actor environment: build it with deploy/actor-env-rs14.sh")
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
