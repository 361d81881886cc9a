"""The one acting step (``csil.acting.CombinedPolicy``) with the real local base policy: open-loop chunks per env
slot, one batched request for the slots that ran dry, sample vs mode, and the residual targets' base actions."""

import jax
import numpy as np

from csil.acting import CombinedPolicy, base_observation, combine_actions, first_base_actions
from csil.base_policy import LocalBasePolicy
from csil.config import HetStatConfig
from csil.envs import CsilEnv
from csil.hetstat import SmallPolicy, mode


class CountingSource:
    """The real base policy, with its requests counted (what the inference server's /stats would show)."""

    def __init__(self, base: LocalBasePolicy):
        self.base, self.requests = base, []

    def infer_batch(self, observations):
        self.requests.append(len(observations))
        return self.base.infer_batch(observations)


def _setup(base_dir):
    env = CsilEnv("Lift", "state")
    obs = [env.reset(seed=s) for s in (0, 1)]
    network = SmallPolicy(HetStatConfig(hidden=(16,), bottleneck=8, features=16))
    params = network.init(jax.random.PRNGKey(0), {"state": obs[0]["state"][None]})
    return obs, network, params


def test_chunks_are_played_open_loop_and_requested_in_one_batch(lift_setup):
    _, _, base_dir = lift_setup
    obs, network, params = _setup(base_dir)
    base = LocalBasePolicy(base_dir)
    source = CountingSource(base)
    policy = CombinedPolicy(source, network, "ensemble", "lift", num_slots=2)
    chunks = base.infer_batch([base_observation(o, "lift") for o in obs])
    steps = [policy.act(params, obs, None) for _ in range(12)]
    assert source.requests == [2, 2]  # both slots at step 0 and step 10, one request each time
    np.testing.assert_allclose(np.stack([s.base for s in steps[:10]], 1), chunks, atol=1e-6)
    mu, _ = network.apply(params, {"state": np.stack([o["state"] for o in obs])})
    np.testing.assert_allclose(steps[3].small, np.asarray(mode(mu)), atol=1e-6)  # evaluation: the mode
    np.testing.assert_allclose(steps[3].executed, combine_actions(steps[3].base, steps[3].small, "ensemble"))

    policy.reset(1)  # a new episode in slot 1: its rest of the chunk is dropped, slot 0 plays on
    policy.act(params, obs, None)
    assert source.requests == [2, 2, 1]


def test_sampling_acts_stochastically_and_base_alone_executes_the_base(lift_setup):
    _, _, base_dir = lift_setup
    obs, network, params = _setup(base_dir)
    base = LocalBasePolicy(base_dir)
    a = CombinedPolicy(base, network, "residual", "lift", 2).act(params, obs, jax.random.PRNGKey(1))
    b = CombinedPolicy(base, network, "residual", "lift", 2).act(params, obs, jax.random.PRNGKey(2))
    assert not np.allclose(a.small, b.small) and np.allclose(a.base, b.base)
    np.testing.assert_allclose(a.executed, np.clip(a.base + a.small, -1, 1), atol=1e-6)
    alone = CombinedPolicy(base, None, "ensemble", "lift", 2).act(None, obs, None)
    np.testing.assert_array_equal(alone.executed, alone.base)


def test_first_base_actions_are_the_first_of_each_chunk(lift_setup):
    _, _, base_dir = lift_setup
    obs, _, _ = _setup(base_dir)
    base = LocalBasePolicy(base_dir)
    stacked = {"state": np.stack([o["state"] for o in obs])}
    expected = base.infer_batch([base_observation(o, "lift") for o in obs])[:, 0]
    np.testing.assert_allclose(first_base_actions(base, stacked, "lift", batch=1), expected, atol=1e-6)
