"""CSIL++ agent properties on a small synthetic imitation problem (no simulator needed for these).

The demonstrator is a smooth deterministic policy on a low-dimensional manifold of a 10-d observation space;
what these tests check is the algorithm's contract: a bounded coherent reward, weight-normalised critic after
each fused update, and coherence (critic prefers the BC action, first actor updates stay near BC).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from csil import hetstat
from csil.config import AgentConfig, CriticConfig, HetStatConfig, algo_config
from csil.specs import ObsSpec
from learner.agent import CSILAgent
from learner.batch import Batch, sample_demos
from learner.pretrain import DemoTransitions, encoded_demos, pretrain_bc, pretrain_critic

OBS_DIM, LATENT, EP_LEN = 10, 3, 40
SPEC = ObsSpec(mode="state", state_keys=(("synthetic", OBS_DIM),))
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
    demos = DemoTransitions({"state": obs}, act, discount.astype(np.float32), {"state": nxt}, next_act,
                            last.astype(bool))
    off_manifold = np.linalg.qr(np.concatenate([embed, rng.normal(size=(OBS_DIM, 1))], axis=1))[0][:, -1]
    return demos, off_manifold.astype(np.float32)


@pytest.fixture(scope="module")
def pretrained():
    demos, off = synthetic_demos()
    agent = CSILAgent(SMALL, SPEC)
    key = jax.random.PRNGKey(0)
    bc, _ = pretrain_bc(agent, demos, key, steps=1500, progress=False)
    state = agent.init_state(key, bc)
    state, log = pretrain_critic(agent, state, demos, steps=1500, progress=False)
    return agent, state, demos, off, log


def test_demo_batches_are_drawn_on_the_device_from_every_demo_transition():
    """The learner's demo half (no Reverb table): the pool stores each observation once, draws whole transitions
    (next_obs the demo's own), uniformly over all of them, one batch per key, and a stack of keys draws exactly what
    the keys draw one by one (so K fused updates see the same demo batches as K single ones)."""
    demos, _ = synthetic_demos(num_episodes=5)
    pool = demos.on_device()
    assert len(pool.frames["state"]) == len(demos) + 5  # each observation once: T + 1 per demo of T steps
    keys = jax.random.split(jax.random.PRNGKey(3), 200)
    stacked = sample_demos(pool, keys, (4, 16))
    assert stacked.obs["state"].shape == (200, 4, 16, OBS_DIM) and stacked.action.shape == (200, 4, 16, 7)
    for i in (0, 7, 199):
        jax.tree_util.tree_map(np.testing.assert_array_equal, sample_demos(pool, keys[i], (4, 16)),
                               jax.tree_util.tree_map(lambda x: x[i], stacked))  # noqa: B023
    # each drawn row is one demo transition, all of its fields from the same index
    index = np.asarray(stacked.discount).size
    rows = {tuple(np.round(r, 5)): j for j, r in enumerate(demos.obs["state"])}
    drawn = np.array([rows[tuple(np.round(r, 5))] for r in np.asarray(stacked.obs["state"]).reshape(index, -1)])
    np.testing.assert_array_equal(np.asarray(stacked.action).reshape(index, 7), demos.action[drawn])
    np.testing.assert_array_equal(np.asarray(stacked.next_obs["state"]).reshape(index, -1),
                                  demos.next_obs["state"][drawn])
    counts = np.bincount(drawn, minlength=len(demos))
    assert counts.min() > 0 and counts.max() < 3 * counts.mean()  # 12,800 draws over 200 transitions
    assert not np.array_equal(stacked.action[0], stacked.action[1])


def test_reward_is_bounded_high_on_demos_and_flat_far_away(pretrained):
    agent, state, demos, off, _ = pretrained
    rng = np.random.default_rng(1)
    obs = {"state": demos.obs["state"][:512]}
    random_actions = rng.uniform(-1, 1, (512, 7)).astype(np.float32)
    saturated = np.sign(random_actions)
    r_demo = np.asarray(agent.reward(state.reward, obs, demos.action[:512]))
    r_random = np.asarray(agent.reward(state.reward, obs, random_actions))
    wild_obs = {"state": rng.normal(0, 20, (512, OBS_DIM)).astype(np.float32)}
    for r in (r_demo, r_random, agent.reward(state.reward, obs, saturated), agent.reward(state.reward, wild_obs,
                                                                                              saturated)):
        assert np.all(np.asarray(r) <= 0.0)
    assert r_demo.mean() > r_random.mean() + 0.05
    # Far from the data (off the demo manifold) the reward tends to -(1-gamma)B whatever the action.
    far_obs = {"state": obs["state"] + 6.0 * off}
    r_far = np.asarray(agent.reward(state.reward, far_obs, random_actions))
    floor = -(1 - SMALL.discount) * agent.shift
    assert abs(np.median(r_far) - floor) < 0.35 * abs(floor)
    assert r_far.std() < 0.5 * r_random.std()


def test_critic_pretraining_learns_demo_values(pretrained):
    _, _, _, _, log = pretrained
    assert log[-1]["critic_loss"] < log[0]["critic_loss"]
    assert log[-1]["target_clipped"] < 0.05  # demo returns live inside the [-8, 0] support


def test_critic_prefers_the_bc_action_on_demo_states(pretrained):
    agent, state, demos, _, _ = pretrained
    obs = {"state": jnp.asarray(demos.obs["state"][::3][:400])}
    a_bc = hetstat.mode(agent.policy_net.apply(state.policy, obs)[0])
    q_bc = agent.q_values(state.critic, obs, a_bc, state.atoms).min(0)
    rng = np.random.default_rng(2)
    q_random = agent.q_values(state.critic, obs, jnp.asarray(rng.uniform(-1, 1, a_bc.shape), jnp.float32),
                              state.atoms).min(0)
    assert float(jnp.mean(q_bc > q_random)) > 0.8


def test_fused_update_keeps_weight_norm_and_stays_near_bc(pretrained):
    """With β in the reward's units the anchor no longer pulls Adam's first full-size steps back within a few
    updates (here, without warmup: KL ≈ 20 nats after 10 updates at β = 5 in reward units, < 0.5 with the old
    per-nat β = 0.3); the actor-lr warmup keeps the first updates near BC."""
    agent, state, demos, _, _ = pretrained
    agent = CSILAgent(dataclasses.replace(SMALL, actor_warmup_steps=100), SPEC)
    state = state._replace(policy_opt=agent.policy_opt.init(state.policy))
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


def _kernel_norms(params, under: str) -> list[np.ndarray]:
    return [np.linalg.norm(np.asarray(leaf), axis=-2) for path, leaf in jax.tree_util.tree_leaves_with_path(params)
            if path[-1].key == "kernel" and under in [getattr(k, "key", None) for k in path]]


def test_vanilla_csil_mse_critic_is_coherent_and_runs_at_utd_1(pretrained):
    """Vanilla CSIL in the same code path: LayerNorm MSE critic (no weight norm), one-sample KL, UTD 1.

    Its critic is less coherent than CSIL++'s categorical one on this task (BC-beats-random rank ~0.6 vs > 0.8),
    which is the paper's motivation for the XQC critic; it must still prefer the BC action more often than not."""
    _, bc_state, demos, _, _ = pretrained
    cfg = algo_config("csil", SMALL)
    assert (cfg.critic.kind, cfg.kl_estimator, cfg.utd) == ("mse", "mc", 1)
    agent = CSILAgent(cfg, SPEC)
    state = agent.init_state(jax.random.PRNGKey(5), bc_state.bc)
    state, log = pretrain_critic(agent, state, demos, steps=1500, progress=False)
    assert log[-1]["critic_loss"] < 0.5 * log[0]["critic_loss"]
    obs = {"state": jnp.asarray(demos.obs["state"][::3][:400])}
    a_bc = hetstat.mode(agent.policy_net.apply(state.policy, obs)[0])
    random_actions = jnp.asarray(np.random.default_rng(2).uniform(-1, 1, a_bc.shape), jnp.float32)
    q_bc = agent.q_values(state.critic, obs, a_bc, state.atoms).min(0)
    q_random = agent.q_values(state.critic, obs, random_actions, state.atoms).min(0)
    assert float(jnp.mean(q_bc > q_random)) > 0.5 and float(q_bc.mean()) > float(q_random.mean())
    rng = np.random.default_rng(3)
    for i in range(5):
        state, metrics = agent.update(state, demos.sample(rng, (1, SMALL.batch_size)),
                                      demos.sample(rng, (1, SMALL.batch_size)), jax.random.PRNGKey(i))
    assert all(np.isfinite(float(v)) for v in metrics.values())
    assert float(metrics["grad_penalty"]) > 0  # CSIL's action-gradient penalty is on
    assert not all(np.allclose(n, 1.0) for n in _kernel_norms(state.critic["params"], "critics"))


def test_xqc_od_uses_sparse_reward_no_pretraining_and_learns_its_temperature(pretrained):
    _, bc_state, demos, _, _ = pretrained
    cfg = algo_config("xqc-od", SMALL)
    assert (cfg.reward, cfg.regularizer, cfg.critic_pretrain_steps, cfg.critic.kind) == (
        "sparse", "entropy", 0, "categorical")
    agent = CSILAgent(cfg, SPEC)
    state = agent.init_state(jax.random.PRNGKey(6), bc_state.bc)
    r = np.asarray(agent.rewards(state.reward, demos.obs, demos.action, demos.discount))
    np.testing.assert_allclose(r[demos.discount == 1], -(1 - cfg.discount))
    np.testing.assert_allclose(r[demos.discount == 0], 0.0)
    rng = np.random.default_rng(4)
    alphas = []
    for i in range(20):
        state, metrics = agent.update(state, demos.sample(rng, (cfg.utd, SMALL.batch_size)),
                                      demos.sample(rng, (cfg.utd, SMALL.batch_size)), jax.random.PRNGKey(i))
        alphas.append(float(metrics["alpha"]))
    assert "reward_loss" not in metrics and all(np.isfinite(float(v)) for v in metrics.values())
    # SAC's temperature rule: alpha falls while the entropy is above XQC's target (-d_a/2), rises below it.
    above_target = float(metrics["entropy"]) > cfg.target_entropy_per_dim * 7
    assert alphas[-1] != alphas[0] and (alphas[-1] < alphas[0]) == above_target
    with pytest.raises(ValueError, match="unknown algorithm"):
        algo_config("td3")


IMAGE_SPEC = ObsSpec(mode="image", state_keys=(("robot0_eef_pos", 3),), cameras=("agentview",), image_size=16)


def image_demos(rng: np.random.Generator, n: int = 64) -> DemoTransitions:
    """Random proprio + 16x16 agentview transitions (one step each) for the image agent's plumbing tests."""
    obs = {"state": rng.normal(size=(n, 3)).astype(np.float32),
           "agentview_image": rng.integers(0, 255, (n, 16, 16, 3), dtype=np.uint8)}
    actions = np.tanh(rng.normal(size=(n, 7))).astype(np.float32)
    return DemoTransitions(obs, actions, np.ones(n, np.float32), obs, actions, np.zeros(n, bool))


@pytest.mark.parametrize("policy_encoder", ["bc", "critic"])
def test_image_agent_encoders_online(policy_encoder):
    """The critic trains its encoder; the policy never sends gradients into one: it acts on the critic's (DrQ's
    "critic", default) or keeps its frozen BC encoder ("bc"). With the actor's learning rate at 0 only the
    encoder can move the policy: "bc" stays exactly π_BC, "critic" drifts away from it by the critic's steps
    alone. The BC anchor keeps its own; weight normalisation leaves the encoder alone."""
    from csil.config import EncoderConfig

    cfg = dataclasses.replace(SMALL, batch_size=8, bc_batch_size=8, utd=1, actor_lr=0.0, actor_warmup_steps=0,
                              encoder=EncoderConfig(channels=(4, 8), out_dim=8, shift=2, policy_encoder=policy_encoder))
    agent = CSILAgent(cfg, IMAGE_SPEC)
    rng = np.random.default_rng(0)
    demos = image_demos(rng)
    obs = demos.obs
    bc, _ = pretrain_bc(agent, demos, jax.random.PRNGKey(0), steps=20, progress=False)
    state = agent.init_state(jax.random.PRNGKey(1), bc)
    enc = lambda p: p["params"]["encoder"]  # noqa: E731
    jax.tree_util.tree_map(np.testing.assert_array_equal, enc(state.critic), enc(bc))
    for i in range(3):
        state, metrics = agent.update(state, demos.sample(rng, (cfg.utd, 8)), demos.sample(rng, (cfg.utd, 8)),
                                      jax.random.PRNGKey(i))
    assert all(np.isfinite(float(v)) for v in metrics.values()) and float(metrics["skipped"]) == 0
    jax.tree_util.tree_map(np.testing.assert_array_equal, enc(state.policy),
                           enc(bc) if policy_encoder == "bc" else enc(state.critic))
    jax.tree_util.tree_map(np.testing.assert_array_equal, enc(state.bc), enc(bc))
    moved = jax.tree_util.tree_map(lambda a, b: float(jnp.abs(a - b).max()), enc(state.critic), enc(bc))
    assert max(jax.tree_util.tree_leaves(moved)) > 0
    kl = hetstat.gaussian_kl(*agent.policy_net.apply(state.policy, obs), *agent.policy_net.apply(state.bc, obs))
    assert float(jnp.max(kl)) == 0.0 if policy_encoder == "bc" else float(jnp.mean(kl)) > 1e-5  # 5.6e-5 here
    assert all(np.allclose(n, 1.0, atol=1e-4) for n in _kernel_norms(state.critic["params"], "critics"))
    assert not all(np.allclose(n, 1.0) for n in _kernel_norms(state.critic["params"], "encoder"))
    mu, sigma = agent.policy_net.apply(state.policy, {k: v[:2] for k, v in obs.items()})
    assert hetstat.sample(jax.random.PRNGKey(0), mu, sigma)[0].shape == (2, 7)


@pytest.mark.parametrize("kind", ["categorical", "mse"])
def test_critic_gradient_from_features_encoded_once_is_the_gradient_through_the_encoder(kind):
    """The update encodes each batch once per encoder and shares the features between heads; the critic's encoder
    gradient then comes from ``jax.vjp`` of those features. It must be the critic loss's gradient through the whole
    critic, encoder included (with CSIL's action-gradient penalty where vanilla CSIL has it: the MSE critic)."""
    from csil.config import EncoderConfig

    cfg = dataclasses.replace(SMALL, batch_size=8, critic=dataclasses.replace(SMALL.critic, kind=kind),
                              encoder=EncoderConfig(channels=(4, 8), out_dim=8, shift=2))
    agent = CSILAgent(cfg, IMAGE_SPEC)
    rng = np.random.default_rng(0)
    demos = image_demos(rng)
    state = agent.init_state(jax.random.PRNGKey(1), agent.init_policy(jax.random.PRNGKey(0)))
    batch = Batch.concat(demos.sample(rng, (8,)), demos.sample(rng, (8,)))
    next_action = jnp.asarray(np.tanh(rng.normal(size=(16, 7))), jnp.float32)
    if kind == "categorical":
        target = jax.nn.softmax(jnp.asarray(rng.normal(size=(16, cfg.critic.num_atoms)), jnp.float32))
    else:
        target = jnp.asarray(rng.uniform(-4, 0, 16), jnp.float32)
    args = (state, batch, next_action, target, 8, 1.0 if kind == "mse" else 0.0)

    features, encoder_vjp, _ = agent._critic_features(state.critic["params"], batch)
    shared, _ = agent._critic_grads(state, batch, features, encoder_vjp, *args[2:])
    direct = jax.grad(lambda p: agent._critic_loss(p, agent._critic_features(p, batch)[0], *args)[0])(
        state.critic["params"])
    assert float(optax.global_norm(direct["encoder"])) > 0
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), shared, direct)


def test_image_critic_pretraining_leaves_the_policy_at_bc():
    """Coherence at the switch to online training: critic pretraining (SARSA on demos) must not move the policy's
    encoder, or online training would start from a policy that is not π_BC while the KL anchor keeps BC's."""
    from csil.config import EncoderConfig

    cfg = dataclasses.replace(SMALL, batch_size=8, bc_batch_size=8, encoder=EncoderConfig(channels=(4, 8), out_dim=8,
                                                                                             shift=2))
    agent = CSILAgent(cfg, IMAGE_SPEC)
    demos = image_demos(np.random.default_rng(0))
    bc, _ = pretrain_bc(agent, demos, jax.random.PRNGKey(0), steps=20, progress=False)
    start = agent.init_state(jax.random.PRNGKey(1), bc)
    state, log = pretrain_critic(agent, start, demos, steps=300, progress=False)
    assert log[-1]["critic_loss"] < log[0]["critic_loss"], log  # it learns on the encoded demos
    policy, anchor = (agent.policy_net.apply(p, demos.obs) for p in (state.policy, state.bc))
    kl = hetstat.gaussian_kl(*policy, *anchor)  # on the demo states
    assert float(jnp.max(kl)) < 1e-6, kl
    # The encoder enters training online: its first step is Adam's first, at most the learning rate per parameter.
    online = demos.sample(np.random.default_rng(1), (1, cfg.batch_size))
    after, _ = CSILAgent(dataclasses.replace(cfg, utd=1), IMAGE_SPEC).update(state, online, online, jax.random.PRNGKey(2))
    step = jax.tree_util.tree_map(lambda a, b: float(jnp.abs(a - b).max()), after.critic["params"]["encoder"],
                                  state.critic["params"]["encoder"])
    assert 0 < max(jax.tree_util.tree_leaves(step)) <= 1.01 * cfg.critic_lr
    head_moved = jax.tree_util.tree_map(lambda a, b: float(jnp.abs(a - b).max()), state.critic["params"]["critics"],
                                        start.critic["params"]["critics"])
    assert max(jax.tree_util.tree_leaves(head_moved)) > 0  # the critic did learn, on the BC encoder's features


def test_critic_pretraining_reads_each_transition_encoded_once_per_shift():
    """Image critic pretraining runs its heads on features looked up per transition: each copy of the demos must
    map a transition to its own obs and next_obs, encoded by the critic's (BC's) encoder."""
    from csil.config import EncoderConfig

    cfg = dataclasses.replace(SMALL, critic_pretrain_shifts=3,
                              encoder=EncoderConfig(channels=(4, 8), out_dim=8, shift=0))  # no shift: exact lookup
    agent = CSILAgent(cfg, IMAGE_SPEC)
    demos = image_demos(np.random.default_rng(0), n=40)
    state = agent.init_state(jax.random.PRNGKey(1), agent.init_policy(jax.random.PRNGKey(0)))
    pool = encoded_demos(agent, state, demos, jax.random.PRNGKey(2), progress=False, chunk=16)
    assert len(pool.action) == 3 * len(demos)
    obs, next_obs = (np.asarray(agent.encode(state.critic, o)) for o in (demos.obs, demos.next_obs))
    rows = np.arange(3 * len(demos)) % len(demos)
    np.testing.assert_allclose(np.asarray(pool.frames)[np.asarray(pool.obs_row)], obs[rows], atol=1e-5)
    np.testing.assert_allclose(np.asarray(pool.frames)[np.asarray(pool.next_row)], next_obs[rows], atol=1e-5)
    np.testing.assert_array_equal(np.asarray(pool.action), np.tile(demos.action, (3, 1)))
    with pytest.raises(ValueError, match="reward"):  # π_R with another encoder cannot read the critic's features
        other = agent.init_policy(jax.random.PRNGKey(5))
        encoded_demos(agent, state._replace(reward=other), demos, jax.random.PRNGKey(2), progress=False)


def test_unrolled_utd_loop_computes_the_same_update(pretrained):
    """``unroll_utd`` only changes how XLA compiles the fused loop (images run it unrolled), not the result."""
    agent, state, demos, _, _ = pretrained
    rng = np.random.default_rng(3)
    online, demo = demos.sample(rng, (SMALL.utd, 64)), demos.sample(rng, (SMALL.utd, 64))
    unrolled = CSILAgent(dataclasses.replace(SMALL, unroll_utd=True), SPEC)
    assert unrolled.unroll_utd and not agent.unroll_utd
    (s1, m1), (s2, m2) = (a.update(state, online, demo, jax.random.PRNGKey(7)) for a in (agent, unrolled))
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5), s1, s2)
    assert m1.keys() == m2.keys()


def test_pretraining_reports_its_progress():
    """What a remote learner's progress bar is fed: every 100th step and the last, of BC and of the critic."""
    demos, _ = synthetic_demos(num_episodes=3)
    agent = CSILAgent(dataclasses.replace(SMALL, batch_size=16, bc_batch_size=16), SPEC)
    seen: list[tuple[str, int]] = []
    bc, _ = pretrain_bc(agent, demos, jax.random.PRNGKey(0), steps=150, progress=False,
                        on_log=lambda r: seen.append(("bc", r["step"])))
    pretrain_critic(agent, agent.init_state(jax.random.PRNGKey(1), bc), demos, steps=120, progress=False,
                    on_log=lambda r: seen.append(("critic", r["step"])))
    assert seen == [("bc", 0), ("bc", 100), ("bc", 149), ("critic", 0), ("critic", 100), ("critic", 119)]


def test_actor_lr_warmup_removes_the_first_steps_jump_away_from_bc(pretrained):
    """Adam's first steps move every weight by ~lr whatever its gradient: without warmup the policy jumps away
    from BC (and the KL term then pulls it back); a linear warmup keeps the first updates near BC."""
    agent, state, demos, _, _ = pretrained
    worst = {}
    for warmup in (0, 100):
        agent_w = CSILAgent(dataclasses.replace(SMALL, actor_warmup_steps=warmup), SPEC)
        s = state._replace(policy_opt=agent_w.policy_opt.init(state.policy))
        rng, kls = np.random.default_rng(3), []
        for i in range(8):
            s, metrics = agent_w.update(s, demos.sample(rng, (SMALL.utd, SMALL.batch_size)),
                                        demos.sample(rng, (SMALL.utd, SMALL.batch_size)), jax.random.PRNGKey(i))
            kls.append(float(metrics["kl_to_bc"]))
        worst[warmup] = max(kls)
    assert worst[100] < 0.1 < 0.5 < worst[0]


def test_kl_in_reward_units_lets_the_critic_move_the_policy_off_bc():
    """CSIL's coherence: the KL anchor must carry the reward's coefficient per nat. With a fixed reward network
    (no refinement) whose mode is Δ away from BC's mean in action dimension 0, the coherent one-step optimum is
    π ∝ π_BC·π_R (half-way for equal widths). β in the reward's units (``beta_units="reward"``, β_eff = (1−γ)/d_a)
    moves the policy mean a good part of the way towards the reward's action; the old per-nat β = 0.3 (here
    0.3·d_a/(1−γ) = 21× the reward's coefficient, optimum ≈ Δ/22) keeps it at BC.

    γ = 0.9 rather than 0.99: the action-dependent part of Q is ~(1−γ) of its range, and at 0.99 this small critic
    cannot resolve it in a test's budget (its Q was flat in Δ within noise after 1k SARSA steps)."""
    demos, _ = synthetic_demos(num_episodes=20, seed=4)
    rng = np.random.default_rng(0)
    shift = 0.3  # Δ, ≈ 3 σ of both policies
    noisy = dataclasses.replace(demos, action=np.clip(demos.action + rng.normal(0, 0.03, demos.action.shape),
                                                      -0.95, 0.95).astype(np.float32))
    preferred = noisy.action.copy()
    preferred[:, 0] = np.clip(preferred[:, 0] + shift, -0.95, 0.95)
    cfg = dataclasses.replace(SMALL, refine_reward=False, batch_size=64, discount=0.9)
    agent = CSILAgent(cfg, SPEC)
    bc, _ = pretrain_bc(agent, noisy, jax.random.PRNGKey(0), steps=1500, progress=False)
    reward, _ = pretrain_bc(agent, dataclasses.replace(noisy, action=preferred), jax.random.PRNGKey(1), steps=1500,
                            progress=False)
    # Explored actions around the demonstrator's (SARSA targets use its next action), so that the critic sees
    # how Q varies with the action.
    explored = dataclasses.replace(noisy, action=np.clip(noisy.action + rng.normal(0, 0.2, noisy.action.shape),
                                                         -0.95, 0.95).astype(np.float32))
    state = agent.init_state(jax.random.PRNGKey(2), bc)._replace(reward=reward)
    state, _ = pretrain_critic(agent, state, explored, steps=1500, progress=False)
    obs = {"state": jnp.asarray(noisy.obs["state"][::4])}
    mode = lambda params: np.asarray(hetstat.mode(agent.policy_net.apply(params, obs)[0]))  # noqa: E731
    start = mode(state.policy)
    moved = {}
    for units, beta in (("nats", 0.3), ("reward", 1.0)):
        agent_b = CSILAgent(dataclasses.replace(cfg, beta_units=units, beta=beta), SPEC)
        s, rng = state, np.random.default_rng(5)
        for i in range(100):
            s, metrics = agent_b.update(s, explored.sample(rng, (cfg.utd, cfg.batch_size)),
                                        noisy.sample(rng, (cfg.utd, cfg.batch_size)), jax.random.PRNGKey(i))
        moved[units] = float(np.mean(mode(s.policy)[:, 0] - start[:, 0]))
    assert abs(moved["nats"]) < 0.1 * shift  # pinned at BC
    assert moved["reward"] > 0.3 * shift  # towards π_R's action


def _chained_vs_fused(cfg: AgentConfig, spec: ObsSpec, demos: DemoTransitions, bc, k: int = 3):
    """The same k updates, keys and device-drawn demo batches included, through k ``step`` calls and one
    ``step_many`` call."""
    from learner.core import LearnerCore

    rng = np.random.default_rng(11)
    batches = [demos.sample(rng, (cfg.utd, cfg.batch_size)) for _ in range(k)]
    cores = [LearnerCore(cfg, spec, demos, seed=0) for _ in range(2)]
    for core in cores:
        core.state = core.agent.init_state(jax.random.PRNGKey(1), bc)
    for online in batches:
        chained = cores[0].step(online)
    fused = cores[1].step_many(batches)
    assert cores[0].updates == cores[1].updates == k
    close = jax.tree_util.tree_map(lambda a, b: bool(np.allclose(a, b, rtol=1e-4, atol=1e-5)), cores[0].state,
                                   cores[1].state)
    assert all(jax.tree_util.tree_leaves(close))
    np.testing.assert_allclose(float(chained["critic_loss"]), float(fused["critic_loss"]), rtol=1e-4)


def test_k_fused_updates_equal_k_chained_ones_state(pretrained):
    agent, state, demos, _, _ = pretrained
    _chained_vs_fused(dataclasses.replace(SMALL, batch_size=32), SPEC, demos, state.bc)


def test_k_fused_updates_equal_k_chained_ones_image():
    from csil.config import EncoderConfig

    cfg = dataclasses.replace(SMALL, batch_size=8, bc_batch_size=8, utd=1,  # utd 1: image updates compile slowly
                              encoder=EncoderConfig(channels=(4,), out_dim=8, shift=2))
    bc = CSILAgent(cfg, IMAGE_SPEC).init_policy(jax.random.PRNGKey(0))
    _chained_vs_fused(cfg, IMAGE_SPEC, image_demos(np.random.default_rng(0)), bc, k=2)


def test_both_forms_of_the_non_finite_guard_drop_the_same_updates(pretrained):
    """``nonfinite_guard`` "select" (no branch, for GPUs) keeps a finite update and drops a poisoned one exactly as
    the default "cond" does."""
    _, state, demos, _, _ = pretrained
    rng = np.random.default_rng(6)
    online, demo = (demos.sample(rng, (SMALL.utd, SMALL.batch_size)) for _ in range(2))
    obs = online.obs["state"].copy()
    obs[0, 3, 0] = np.nan
    poisoned = online._replace(obs={"state": obs})
    agents = [CSILAgent(dataclasses.replace(SMALL, nonfinite_guard=g), SPEC) for g in ("cond", "select")]
    (good_cond, m1), (good_select, m2) = (a.update(state, online, demo, jax.random.PRNGKey(0)) for a in agents)
    jax.tree_util.tree_map(np.testing.assert_array_equal, good_cond, good_select)
    assert float(m1["skipped"]) == float(m2["skipped"]) == 0.0
    for agent in agents:
        after, metrics = agent.update(state, poisoned, demo, jax.random.PRNGKey(0))
        assert float(metrics["skipped"]) == 1.0
        jax.tree_util.tree_map(np.testing.assert_array_equal, after, state)
    with pytest.raises(ValueError, match="nonfinite_guard"):
        CSILAgent(dataclasses.replace(SMALL, nonfinite_guard="where"), SPEC)


def test_a_non_finite_update_is_dropped_and_a_diverging_learner_stops(pretrained, tmp_path):
    """One batch that makes the update non-finite (here a NaN observation; in a 20k-step Lift run something
    did after 3,100 good updates) must not reach the weights actors act with: the update is dropped and counted,
    the caller gets the last applied update's metrics; a learner whose updates keep coming out non-finite stops
    with an error that says so."""
    from learner.core import MAX_CONSECUTIVE_SKIPS, LearnerCore

    _, state, demos, _, _ = pretrained
    core = LearnerCore(SMALL, SPEC, demos, seed=0, dump_dir=tmp_path / "diverged")
    core.state = state
    rng = np.random.default_rng(5)

    def batch(poisoned: bool) -> Batch:
        online = demos.sample(rng, (SMALL.utd, SMALL.batch_size))
        if poisoned:
            obs = online.obs["state"].copy()
            obs[0, 3, 0] = np.nan
            online = online._replace(obs={"state": obs})
        return online

    good = core.step(batch(False))
    assert good["skipped_updates"] == 0 and all(np.isfinite(float(v)) for v in good.values())
    before = core.state
    dropped = core.step(batch(True))
    assert dropped["skipped_updates"] == 1 and core.updates == 2
    assert {k: float(v) for k, v in dropped.items() if k != "skipped_updates"} == {
        k: float(v) for k, v in good.items() if k != "skipped_updates"}
    jax.tree_util.tree_map(np.testing.assert_array_equal, core.state, before)
    fused = core.step_many([batch(i == 1) for i in range(3)])  # the middle one of three is dropped
    assert fused["skipped_updates"] == 2 and all(np.isfinite(float(v)) for v in fused.values())
    assert not jax.tree_util.tree_all(jax.tree_util.tree_map(lambda a, b: np.array_equal(a, b), core.state, before))
    with pytest.raises(FloatingPointError, match=f"{MAX_CONSECUTIVE_SKIPS} updates in a row.*diverged"):
        for _ in range(MAX_CONSECUTIVE_SKIPS):
            core.step(batch(True))
    # what it left reproduces the failing update offline
    import pickle

    from learner.checkpoint import restore_checkpoint

    update = pickle.loads((tmp_path / "diverged" / "update.pkl").read_bytes())
    restored, _ = restore_checkpoint(tmp_path / "diverged" / "state", core.state)
    _, metrics = core.agent.update(restored, update["online"], update["demos"], update["key"])
    assert int(metrics["skipped"]) == 1


def test_reward_refinement_steps_are_bounded_by_the_gradient_clip(pretrained):
    """π_R's likelihood is sharp where BC's σ is near its floor (Lift: σ ≈ 0.01 in 6 of 7 dims), and CSIL's plain
    SGD at lr 1e-3 then oscillates into NaN (results/reward-refinement). With ``reward_grad_clip`` one step moves
    π_R by at most lr × clip, whatever the gradient; unclipped it moves by lr × the gradient's norm."""
    _, state, demos, _, _ = pretrained
    rng = np.random.default_rng(11)
    online, demo = demos.sample(rng, (SMALL.batch_size,)), demos.sample(rng, (SMALL.batch_size,))
    batch = Batch.concat(online._replace(action=online.action * 0.5), demo)  # online actions off the demos'

    def moved(clip: float) -> tuple[float, float]:
        agent = CSILAgent(dataclasses.replace(SMALL, reward_grad_clip=clip), SPEC)
        start = state._replace(reward_opt=agent.reward_opt.init(state.reward))
        after, metrics, _ = agent.reward_step(start, batch, SMALL.batch_size)
        delta = jax.tree_util.tree_map(lambda a, b: a - b, after.reward, start.reward)
        return float(optax.global_norm(delta)), float(metrics["reward_grad_norm"])

    step, grad_norm = moved(0.0)
    clip = grad_norm / 10
    assert step == pytest.approx(SMALL.reward_lr * grad_norm, rel=1e-3)
    clipped, same_grad = moved(clip)
    assert same_grad == pytest.approx(grad_norm, rel=1e-5)  # the metric is the raw gradient's norm
    assert clipped == pytest.approx(SMALL.reward_lr * clip, rel=1e-3)


def test_bc_holdout_keeps_the_parameters_before_the_noise_is_memorised():
    """Few noisy demos (the residual mode's case: a_demo − a_base is mostly the demonstrator's noise): trained to
    the end, BC fits the noise and replays it as confident actions on fresh states; holding out demo episodes
    and keeping the lowest held-out loss returns earlier parameters that are closer to the noise-free expert."""
    everything, _ = synthetic_demos(num_episodes=16, seed=5)  # one expert: 6 episodes to learn from, 10 fresh
    demos, fresh = everything.split_episodes(10 / 16)
    rng = np.random.default_rng(0)
    noisy = dataclasses.replace(demos, action=np.clip(demos.action + rng.normal(0, 0.2, demos.action.shape),
                                                      -0.95, 0.95).astype(np.float32))
    kept, held = noisy.split_episodes(0.2)
    assert (len(kept), len(held)) == (5 * EP_LEN, EP_LEN) and held.last.sum() == 1  # one whole episode
    error = {}
    for holdout in (0.0, 0.2):
        agent = CSILAgent(dataclasses.replace(SMALL, bc_holdout=holdout), SPEC)
        params, log = pretrain_bc(agent, noisy, jax.random.PRNGKey(0), steps=2000, progress=False)
        mu, _ = agent.policy_net.apply(params, {"state": jnp.asarray(fresh.obs["state"])})
        error[holdout] = float(np.mean((np.asarray(hetstat.mode(mu)) - fresh.action) ** 2))
    assert 0 < log[-1]["selected_step"] < 1999 and log[-1]["held_out_loss"] > min(e["held_out_loss"] for e in log)
    assert error[0.2] < 0.9 * error[0.0], error
