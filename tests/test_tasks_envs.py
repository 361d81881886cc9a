"""Task registry, observation specs and the env wrapper, on real robosuite environments."""

import dataclasses
import json

import numpy as np
import pytest

from csil.envs import CsilEnv
from csil.specs import ObsSpec
from csil.tasks import MIMICGEN_TASKS, ROBOSUITE_TASKS, TaskUnavailableError, UnknownTaskError, get_task

# robomimic low-dim obs: eef pos (3) + eef quat (4) + gripper qpos (2) + object state.
EXPECTED_STATE_DIM = {"Lift": 19, "Can": 23, "Square": 23, "NutAssembly": 37, "Stack": 32}


def test_registry_lists_robomimic_tasks_with_their_settings():
    assert set(ROBOSUITE_TASKS) == set(EXPECTED_STATE_DIM)
    assert get_task("NutAssemblySquare").name == "Square"  # robosuite class names resolve too
    assert get_task("Can").env_name == "PickPlaceCan"
    assert all(t.horizon in (400, 500) for t in ROBOSUITE_TASKS.values())


def test_unknown_task_lists_what_exists():
    with pytest.raises(UnknownTaskError) as err:
        get_task("Sqaure")
    for name in list(ROBOSUITE_TASKS) + list(MIMICGEN_TASKS):
        assert name in str(err.value)


@pytest.mark.parametrize("name", sorted(MIMICGEN_TASKS))
def test_mimicgen_task_names_what_to_install(name):
    with pytest.raises(TaskUnavailableError) as err:
        CsilEnv(name)
    assert "robosuite 1.4.1" in str(err.value) and "mujoco 2.3.2" in str(err.value) and "MimicGen" in str(err.value)


@pytest.mark.parametrize("name", sorted(EXPECTED_STATE_DIM))
def test_state_obs_follow_the_spec_and_seeds(name):
    env = CsilEnv(name, "state")
    assert env.spec.state_dim == EXPECTED_STATE_DIM[name]
    assert [k for k, _ in env.spec.state_keys] == ["robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos", "object"]
    first = env.reset(seed=3)
    env.spec.check(first)
    assert env.reset(seed=3)["state"].tolist() == first["state"].tolist()  # same seed, same scene
    assert not np.allclose(env.reset(seed=4)["state"], first["state"])
    obs, reward, success, truncated, info = env.step(np.zeros(7))
    env.spec.check(obs)
    assert obs["state"].dtype == np.float32 and reward == 0.0 and not success and not truncated
    assert ObsSpec.from_json(env.spec.to_json()) == env.spec


def test_object_state_is_valid_right_after_reset():
    """robosuite returns zeros for the nut-to-eef pose in the first observation after reset; we do not."""
    env = CsilEnv("Square", "state")
    obs = env.reset(seed=0)
    nut_to_eef = obs["state"][env.spec.state_slices()["object"]][:7]
    assert np.abs(nut_to_eef).sum() > 0.01
    after_step = env.step(np.zeros(7))[0]["state"][env.spec.state_slices()["object"]][:7]
    np.testing.assert_allclose(nut_to_eef[:3], after_step[:3], atol=0.02)


def test_horizon_truncates_and_bad_actions_are_refused():
    env = CsilEnv(dataclasses.replace(get_task("Lift"), horizon=3))
    env.reset(seed=0)
    flags = [env.step(np.zeros(7))[3] for _ in range(3)]
    assert flags == [False, False, True]
    with pytest.raises(ValueError, match="shape"):
        env.step(np.zeros(6))
    with pytest.raises(ValueError, match="NaN"):
        env.step(np.full(7, np.nan))


def test_unknown_obs_key_lists_existing_keys():
    with pytest.raises(ValueError) as err:
        CsilEnv("Lift", state_keys=("robot0_eef_pos", "cube_velocity"))
    assert "cube_velocity" in str(err.value) and "robot0_joint_pos" in str(err.value)


def test_image_obs_render_offscreen_on_cpu():
    env = CsilEnv("Lift", "image")
    assert set(env.spec.arrays()) == {"state", "agentview_image", "robot0_eye_in_hand_image"}
    obs = env.reset(seed=0)
    env.spec.check(obs)
    for key in env.spec.image_keys:
        assert obs[key].shape == (84, 84, 3) and obs[key].dtype == np.uint8
        assert obs[key].std() > 10  # a rendered scene, not a blank frame
    # robomimic's orientation (upright): the robot and dark backdrop at the top, the bright table below.
    image = obs["agentview_image"].astype(float)
    assert image[:10].mean() + 30 < image[-10:].mean()
    env.spec.check(env.step(np.zeros(7))[0])


def test_fast_render_quality_still_renders_the_scene():
    env = CsilEnv("Lift", "image", render_quality="fast")
    obs = env.reset(seed=0)
    assert obs["agentview_image"].std() > 10
    with pytest.raises(ValueError, match="render quality"):
        CsilEnv("Lift", "image", render_quality="ultra")


def test_env_benchmark_prints_one_json_line_with_ratio(capsys):
    from cli.bench import main

    main(["env", "--task", "Lift", "--steps", "40", "--rounds", "1", "--render-quality", "fast"])
    lines = capsys.readouterr().out.strip().splitlines()
    record = json.loads(lines[-1])
    assert record["bench"] == "env" and record["raw_steps_per_s"] > 0 and record["wrapped_steps_per_s"] > 0
    assert record["render_quality"] == "fast"
    assert record["ratio"] == pytest.approx(record["wrapped_steps_per_s"] / record["raw_steps_per_s"], rel=0.01)


def test_success_needs_the_full_sparse_reward():
    """NutAssembly pays 0.5 per nut on its peg: one nut of two is neither a success nor a terminal demo step."""
    import numpy as np

    from csil.specs import ObsSpec
    from csil.tasks import is_success
    from learner.pretrain import DemoTransitions
    from test_demos import make_episode

    assert is_success(1.0) and not is_success(0.5) and not is_success(0.0)
    episode = make_episode(4, np.random.default_rng(0))
    episode.rewards = np.asarray([0.0, 0.5, 0.5, 1.0], np.float32)
    demos = DemoTransitions.from_episodes([episode], ObsSpec("state", (("robot0_eef_pos", 3), ("robot0_eef_quat", 4),
                                                                        ("robot0_gripper_qpos", 2), ("object", 10))))
    assert demos.discount.tolist() == [1.0, 1.0, 1.0, 0.0]
