"""The one acting step (``csil.acting.CombinedPolicy``) with the real local base policy: open-loop chunks per env
slot, one batched request for the slots that ran dry, sample vs mode, the residual targets' base actions, and the
base plan a residual policy sees (in acting, in transitions and in the demos alike)."""

import jax
import numpy as np

from actors.env_runner import EnvRunner
from csil.acting import CombinedPolicy, base_observation, combine_actions, open_loop_base_actions, with_plan
from csil.base_policy import LocalBasePolicy
from csil.config import HetStatConfig
from csil.envs import CsilEnv
from csil.hetstat import SmallPolicy, mode
from csil.specs import BASE_PLAN_DIM, BaseObsSpec


class CountingSource:
    """The real base policy, with its requests counted (what the inference server's /stats would show)."""

    def __init__(self, base: LocalBasePolicy):
        self.base, self.requests, self.metadata = base, [], base.metadata

    def infer_batch(self, observations):
        self.requests.append(len(observations))
        return self.base.infer_batch(observations)


def _setup(base_dir, residual: bool = False):
    """Two Lift envs on scenes 0 and 1 and the base requests they build (what the local base asks for); a
    residual policy's network also takes the base plan."""
    spec = BaseObsSpec.from_metadata(LocalBasePolicy(base_dir).metadata)
    envs = [CsilEnv("Lift", "state", base_spec=spec) for _ in range(2)]
    obs = [env.reset(seed=s) for env, s in zip(envs, (0, 1))]
    network = SmallPolicy(HetStatConfig(hidden=(16,), bottleneck=8, features=16))
    params = network.init(jax.random.PRNGKey(0), with_plan({"state": obs[0]["state"][None]},
                                                          np.zeros((1, BASE_PLAN_DIM)) if residual else None))
    return obs, network, params, lambda i: envs[i].base_request()


def test_chunks_are_played_open_loop_and_requested_in_one_batch(lift_setup):
    _, _, base_dir = lift_setup
    obs, network, params, requests = _setup(base_dir)
    base = LocalBasePolicy(base_dir)
    source = CountingSource(base)
    policy = CombinedPolicy(source, network, "ensemble", "lift", num_slots=2)
    chunks = base.infer_batch([base_observation(o, "lift") for o in obs])  # a state base sees the full state
    steps = [policy.act(params, obs, None, requests) for _ in range(12)]
    assert source.requests == [2, 2]  # both slots at step 0 and step 10, one request each time
    np.testing.assert_allclose(np.stack([s.base for s in steps[:10]], 1), chunks, atol=1e-6)
    mu, _ = network.apply(params, {"state": np.stack([o["state"] for o in obs])})
    np.testing.assert_allclose(steps[3].small, np.asarray(mode(mu)), atol=1e-6)  # evaluation: the mode
    np.testing.assert_allclose(steps[3].executed, combine_actions(steps[3].base, steps[3].small, "ensemble"))

    policy.reset(1)  # a new episode in slot 1: its rest of the chunk is dropped, slot 0 plays on
    policy.act(params, obs, None, requests)
    assert source.requests == [2, 2, 1]


def test_sampling_acts_stochastically_and_base_alone_executes_the_base(lift_setup):
    _, _, base_dir = lift_setup
    obs, network, params, requests = _setup(base_dir, residual=True)
    base = LocalBasePolicy(base_dir)
    a = CombinedPolicy(base, network, "residual", "lift", 2).act(params, obs, jax.random.PRNGKey(1), requests)
    b = CombinedPolicy(base, network, "residual", "lift", 2).act(params, obs, jax.random.PRNGKey(2), requests)
    assert not np.allclose(a.small, b.small) and np.allclose(a.base, b.base)
    np.testing.assert_allclose(a.executed, np.clip(a.base + a.small, -1, 1), atol=1e-6)
    np.testing.assert_array_equal(a.plan, np.concatenate([a.base, np.zeros((2, 1))], 1))  # it saw a_base, k = 0
    alone = CombinedPolicy(base, None, "ensemble", "lift", 2).act(None, obs, None, requests)
    np.testing.assert_array_equal(alone.executed, alone.base)


def test_alone_mode_acts_with_the_small_policy_and_never_asks_the_base(lift_setup):
    """CSIL without a base (the paper's Fig. 6): the executed action is the small policy's, no request is sent."""
    _, _, base_dir = lift_setup
    obs, network, params, requests = _setup(base_dir)
    source = CountingSource(LocalBasePolicy(base_dir))
    step = CombinedPolicy(source, network, "alone", "lift", 2).act(params, obs, jax.random.PRNGKey(1), requests)
    assert source.requests == []
    np.testing.assert_array_equal(step.executed, step.small)
    np.testing.assert_array_equal(step.base, np.zeros_like(step.small))


def test_open_loop_base_actions_are_what_the_base_plays_while_acting(lift_setup):
    """Residual targets need the base action each demo step will meet: two recorded episodes (13 and 5 steps)
    in which the base acted alone; recomputed from their observations, the same actions, asking only at steps
    0 and 10 of each episode."""
    _, _, base_dir = lift_setup
    base = LocalBasePolicy(base_dir)
    spec = BaseObsSpec.from_metadata(base.metadata)
    observations, played, episode_step = [], [], []
    for scene, length in ((0, 13), (1, 5)):
        env = CsilEnv("Lift", "state", base_spec=spec)
        obs, policy = env.reset(seed=scene), CombinedPolicy(base, None, "ensemble", "lift", num_slots=1)
        for t in range(length):
            step = policy.act(None, [obs], None, lambda i: env.base_request())
            observations.append(obs)
            played.append(step.base[0])
            episode_step.append(t)
            obs = env.step(step.executed[0])[0]
    source = CountingSource(base)
    stacked = {"state": np.stack([o["state"] for o in observations])}
    found = open_loop_base_actions(source, stacked, np.asarray(episode_step), "lift", batch=2)
    np.testing.assert_allclose(found[:, :7], np.stack(played), atol=1e-5)
    np.testing.assert_allclose(found[:, 7], np.asarray(episode_step) % 10 / 10)  # k/H: the place in its chunk
    assert source.requests == [1, 2]  # episode 0's step 0, then its step 10 and episode 1's step 0


def test_residual_transitions_carry_the_base_plan_at_obs_and_next_obs(lift_setup):
    """The critic's target evaluates the policy at next_obs, so next_obs needs the plan the next act will see:
    written transitions chain (next_obs's plan is the next transition's obs plan), the plan's action is the
    base action played, its phase cycles through the chunk, and knowing it early costs no extra base request."""
    _, _, base_dir = lift_setup
    _, network, params, _ = _setup(base_dir, residual=True)
    source = CountingSource(LocalBasePolicy(base_dir))
    runner = EnvRunner("Lift", "state", 2, source, network, "residual", episode_seed=lambda i: i)
    runner.set_params(params, 0)
    steps = [runner.step(jax.random.PRNGKey(t))[0] for t in range(21)]
    assert source.requests == [2, 2, 2]  # steps 0, 10 and 20: as many as without the plan
    for slot in range(2):
        written = [step[slot] for step in steps]
        plans = np.stack([t.obs["base_plan"] for t in written])
        np.testing.assert_array_equal(plans[:, :7], np.stack([t.base_action for t in written]))
        np.testing.assert_allclose(plans[:, 7], np.arange(21) % 10 / 10)
        for now, then in zip(written, written[1:]):
            np.testing.assert_array_equal(now.next_obs["base_plan"], then.obs["base_plan"])
            np.testing.assert_array_equal(now.next_obs["state"], then.obs["state"])


def test_base_requests_carry_what_the_base_asked_for_not_what_the_small_policy_sees():
    """π0.5's case: a state small policy, an image base policy (LIBERO's layout: 8-d state, two 224x224 cameras
    rotated 180°); an 84x84 image base reuses the small policy's own frames."""
    from csil.specs import PI05_LIBERO, CameraRequest

    env = CsilEnv("Lift", "state", base_spec=PI05_LIBERO)
    obs = env.reset(seed=0)
    request = env.base_request()
    assert set(obs) == {"state"} and obs["state"].shape == (19,)  # the small policy's view is unchanged
    assert request["observation/state"].shape == (8,) and request["observation/state"].dtype == np.float32
    np.testing.assert_allclose(request["observation/state"][:3], env.raw_obs["robot0_eef_pos"], atol=1e-6)
    for key in ("observation/image", "observation/wrist_image"):
        assert request[key].shape == (224, 224, 3) and request[key].dtype == np.uint8 and request[key].std() > 5
    rows = BaseObsSpec(PI05_LIBERO.state_keys, (CameraRequest("observation/image", "agentview", 224, "rows"),))
    upright = CsilEnv("Lift", "state", base_spec=rows)
    upright.reset(seed=0)
    np.testing.assert_array_equal(upright.base_request()["observation/image"][:, ::-1], request["observation/image"])

    small = BaseObsSpec(("robot0_eef_pos",), (CameraRequest("observation/image", "agentview", 84),))
    image_env = CsilEnv("Lift", "image", base_spec=small)
    image_obs = image_env.reset(seed=0)
    np.testing.assert_array_equal(image_env.base_request()["observation/image"], image_obs["agentview_image"])

    # an image small policy on a state base: the base gets the full low-dim state (object included), no camera
    state_base = BaseObsSpec(("robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos", "object"))
    image_env = CsilEnv("Lift", "image", base_spec=state_base)
    image_obs = image_env.reset(seed=0)
    assert image_obs["state"].shape == (9,)  # what the small policy sees: proprioception and the cameras
    request = image_env.base_request()
    assert set(request) == {"observation/state"} and request["observation/state"].shape == (19,)
    np.testing.assert_allclose(request["observation/state"], obs["state"], atol=1e-6)  # the state env's vector


def test_a_base_spec_the_env_cannot_produce_is_refused_naming_both():
    import pytest

    from csil.specs import CameraRequest

    with pytest.raises(ValueError, match="camera 'sideview_cam'.*has cameras"):
        CsilEnv("Lift", "state", base_spec=BaseObsSpec(("robot0_eef_pos",),
                                                       (CameraRequest("observation/image", "sideview_cam", 64),)))
    with pytest.raises(ValueError, match="needs .*robot0_joint_torque.*low-dim keys"):
        CsilEnv("Lift", "state", base_spec=BaseObsSpec(("robot0_eef_pos", "robot0_joint_torque")))
    with pytest.raises(ValueError, match="no 'observation_sources'"):
        BaseObsSpec.from_metadata({"server": "csil", "action_horizon": 10})
