"""CSIL++ agent properties on a small synthetic imitation problem (no simulator needed for these).

The demonstrator is a smooth deterministic policy on a low-dimensional manifold of a 10-d observation space;
what these tests check is the algorithm's contract: a bounded coherent reward, weight-normalised critic after
each fused update, and coherence (critic prefers the BC action, first actor updates stay near BC).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from csil.hetstat import HetStatConfig
from learner.agent import AgentConfig, CSILAgent
from learner.critic import CriticConfig
from learner.pretrain import DemoTransitions, pretrain_bc, pretrain_critic

OBS_DIM, LATENT, EP_LEN = 10, 3, 40
SMALL = AgentConfig(
    policy=HetStatConfig(hidden=(64, 64), bottleneck=16, features=64),
    critic=CriticConfig(hidden=(64, 64)),
    batch_size=64, bc_batch_size=128, utd=4,
)


def synthetic_demos(num_episodes: int = 30, seed: int = 0) -> tuple[DemoTransitions, np.ndarray]:
    """States z in a 3-d latent space embedded linearly in 10-d; the expert moves z towards the origin."""
    rng = np.random.default_rng(seed)
    embed = np.linalg.qr(rng.normal(size=(OBS_DIM, LATENT)))[0]  # orthonormal columns
    mix = rng.normal(size=(7, LATENT)) * 0.8
    obs, act, nxt, last = [], [], [], []
    for _ in range(num_episodes):
        z = rng.uniform(-1, 1, LATENT)
        for t in range(EP_LEN):
            a = np.tanh(mix @ z)
            z_next = 0.9 * z + 0.05 * a[:LATENT]
            obs.append(embed @ z), act.append(a), nxt.append(embed @ z_next), last.append(t == EP_LEN - 1)
            z = z_next
    obs, act, nxt, last = (np.asarray(x, np.float32) for x in (obs, act, nxt, last))
    next_act = np.concatenate([act[1:], act[-1:]])
    discount = 1.0 - last  # the episode "succeeds" at its last step
    demos = DemoTransitions(obs, act, discount.astype(np.float32), nxt, next_act, last.astype(bool))
    off_manifold = np.linalg.qr(np.concatenate([embed, rng.normal(size=(OBS_DIM, 1))], axis=1))[0][:, -1]
    return demos, off_manifold.astype(np.float32)


@pytest.fixture(scope="module")
def pretrained():
    demos, off = synthetic_demos()
    agent = CSILAgent(SMALL, OBS_DIM)
    key = jax.random.PRNGKey(0)
    bc, _ = pretrain_bc(agent, demos, key, steps=1500, progress=False)
    state = agent.init_state(key, bc)
    state, log = pretrain_critic(agent, state, demos, steps=1500, progress=False)
    return agent, state, demos, off, log


def test_reward_is_bounded_high_on_demos_and_flat_far_away(pretrained):
    agent, state, demos, off, _ = pretrained
    rng = np.random.default_rng(1)
    obs = demos.obs[:512]
    random_actions = rng.uniform(-1, 1, (512, 7)).astype(np.float32)
    saturated = np.sign(random_actions)
    r_demo = np.asarray(agent.reward(state.reward, obs, demos.action[:512]))
    r_random = np.asarray(agent.reward(state.reward, obs, random_actions))
    wild_obs = rng.normal(0, 20, (512, OBS_DIM)).astype(np.float32)
    for r in (r_demo, r_random, agent.reward(state.reward, obs, saturated), agent.reward(state.reward, wild_obs,
                                                                                              saturated)):
        assert np.all(np.asarray(r) <= 0.0)
    assert r_demo.mean() > r_random.mean() + 0.05
    # Far from the data (off the demo manifold) the reward tends to -(1-gamma)B whatever the action.
    far_obs = obs + 6.0 * off
    r_far = np.asarray(agent.reward(state.reward, far_obs, random_actions))
    floor = -(1 - SMALL.discount) * agent.shift
    assert abs(np.median(r_far) - floor) < 0.35 * abs(floor)
    assert r_far.std() < 0.5 * r_random.std()


def test_critic_pretraining_learns_demo_values(pretrained):
    _, _, _, _, log = pretrained
    assert log[-1]["critic_ce"] < log[0]["critic_ce"]
    assert log[-1]["target_clipped"] < 0.05  # demo returns live inside the [-8, 0] support


def test_critic_prefers_the_bc_action_on_demo_states(pretrained):
    agent, state, demos, _, _ = pretrained
    obs = jnp.asarray(demos.obs[::3][:400])
    a_bc = agent.act_deterministic(state.policy, obs)
    q_bc = agent.q_values(state.critic, obs, a_bc, state.atoms).min(0)
    rng = np.random.default_rng(2)
    q_random = agent.q_values(state.critic, obs, jnp.asarray(rng.uniform(-1, 1, a_bc.shape), jnp.float32),
                              state.atoms).min(0)
    assert float(jnp.mean(q_bc > q_random)) > 0.8


def test_fused_update_keeps_weight_norm_and_stays_near_bc(pretrained):
    agent, state, demos, _, _ = pretrained
    rng = np.random.default_rng(3)
    metrics = None
    for i in range(10):
        online = demos.sample(rng, (SMALL.utd, SMALL.batch_size))
        state, metrics = agent.update(state, online, demos.sample(rng, (SMALL.utd, SMALL.batch_size)),
                                      jax.random.PRNGKey(i))
    assert int(state.step) == 1500 + 10  # 1500 pretraining steps, then one per fused update
    assert all(np.isfinite(float(v)) for v in metrics.values())
    for path, kernel in jax.tree_util.tree_leaves_with_path(state.critic["params"]):
        if path[-1].key == "kernel":
            np.testing.assert_allclose(np.linalg.norm(np.asarray(kernel), axis=-2), 1.0, atol=1e-4)
    # Coherence: starting from BC with a BC-consistent critic, the actor barely moves away from BC.
    assert float(metrics["kl_to_bc"]) < 0.5
    target_gap = jax.tree_util.tree_map(lambda a, b: jnp.abs(a - b).max(), state.critic["params"],
                                        state.target_critic["params"])
    assert 0 < max(float(x) for x in jax.tree_util.tree_leaves(target_gap)) < 1.0  # Polyak lags behind


def test_quantile_atoms_from_demo_returns(pretrained):
    from learner.critic import make_atoms

    agent, state, demos, _, _ = pretrained
    rewards = np.asarray(agent.reward(state.reward, demos.obs, demos.action))
    returns = demos.discounted_returns(rewards, SMALL.discount)
    # First episode by hand: G_t = r_t + gamma * G_{t+1}, ending at the episode's success step.
    expected, running = [], 0.0
    for r in rewards[:EP_LEN][::-1]:
        running = r + SMALL.discount * running
        expected.append(running)
    np.testing.assert_allclose(returns[:EP_LEN], expected[::-1], rtol=1e-5)
    atoms = np.asarray(make_atoms(dataclasses.replace(SMALL.critic, atoms="quantile"), returns))
    median = np.median(returns)
    uniform = np.linspace(SMALL.critic.v_min, SMALL.critic.v_max, SMALL.critic.num_atoms)
    assert np.sum(np.abs(atoms - median) < 0.5) > 2 * np.sum(np.abs(uniform - median) < 0.5)
