"""XQC critic: C51 projection on uniform and quantile supports, quantile atoms, weight normalisation, BN ensemble."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from csil.config import CriticConfig
from learner.critic import (
    Critic,
    clipped_fraction,
    cross_entropy,
    expected_value,
    joint_forward,
    make_atoms,
    project,
    quantile_atoms,
    select_min_critic,
    uniform_atoms,
    weight_normalize,
)

N = 101
V_MIN, V_MAX = -8.0, 0.0
project_jit = jax.jit(project)
SMALL = CriticConfig(hidden=(32, 32), num_atoms=21)


def _supports() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "uniform": uniform_atoms(V_MIN, V_MAX, N),
        "quantile": quantile_atoms(rng.normal(-2.0, 0.3, 1000), N, V_MIN, V_MAX),
    }


SUPPORTS = _supports()


def _random_case(rng: np.random.Generator, b: int, lo: float, hi: float) -> tuple[np.ndarray, np.ndarray]:
    targets = rng.uniform(lo, hi, (b, N))
    probs = rng.dirichlet(np.full(N, 0.3), b)
    return targets.astype(np.float32), probs.astype(np.float32)


def _project_reference(targets: np.ndarray, probs: np.ndarray, atoms: np.ndarray) -> np.ndarray:
    """Obviously correct, slow: for each shifted atom, find its neighbours by scanning and interpolate."""
    out = np.zeros_like(probs, dtype=np.float64)
    for b in range(targets.shape[0]):
        for j in range(targets.shape[1]):
            t, p = min(max(float(targets[b, j]), atoms[0]), atoms[-1]), float(probs[b, j])
            for k in range(len(atoms) - 1):
                if atoms[k] <= t <= atoms[k + 1]:
                    w = (t - atoms[k]) / (atoms[k + 1] - atoms[k])
                    out[b, k] += (1 - w) * p
                    out[b, k + 1] += w * p
                    break
    return out


@pytest.mark.parametrize("layout", ["uniform", "quantile"])
def test_project_conserves_mass_and_mean(layout: str):
    atoms = SUPPORTS[layout]
    targets, probs = _random_case(np.random.default_rng(1), 64, -30.0, 20.0)  # much of it far off-support
    out = np.asarray(project_jit(targets, probs, jnp.asarray(atoms, jnp.float32)))
    assert (out >= 0).all()
    np.testing.assert_allclose(out.sum(-1), 1.0, atol=2e-6)
    clipped_mean = (probs * np.clip(targets, V_MIN, V_MAX)).sum(-1)
    np.testing.assert_allclose(out @ atoms, clipped_mean, atol=2e-5)


@pytest.mark.parametrize("layout", ["uniform", "quantile"])
def test_project_matches_reference(layout: str):
    atoms = SUPPORTS[layout]
    targets, probs = _random_case(np.random.default_rng(2), 6, -9.0, 1.0)
    out = np.asarray(project_jit(targets, probs, jnp.asarray(atoms, jnp.float32)))
    np.testing.assert_allclose(out, _project_reference(targets, probs, atoms.astype(np.float32)), atol=2e-6)


@pytest.mark.parametrize("layout", ["uniform", "quantile"])
def test_project_identity_and_exact_hits(layout: str):
    atoms = jnp.asarray(SUPPORTS[layout], jnp.float32)
    _, probs = _random_case(np.random.default_rng(3), 8, 0.0, 1.0)
    reward, gamma = 0.0, 1.0
    same = project_jit(jnp.broadcast_to(reward + gamma * atoms, probs.shape), probs, atoms)
    np.testing.assert_allclose(np.asarray(same), probs, atol=1e-7)

    for k in (0, 37, N - 1):  # a point mass (on atom 5) shifted exactly onto atom k
        probs = jax.nn.one_hot(jnp.array([5]), N)
        targets = jnp.full((1, N), 123.0).at[0, 5].set(atoms[k])  # the other atoms carry no mass
        np.testing.assert_array_equal(np.asarray(project_jit(targets, probs, atoms))[0], np.eye(N)[k])


def test_project_interpolates_on_nonuniform_support_and_clips_to_edges():
    atoms = jnp.array([-8.0, -5.0, -4.5, -1.0, 0.0])
    probs = jnp.array([[0.0, 1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 1.0], [0.5, 0.0, 0.0, 0.0, 0.5]])
    targets = jnp.array(
        [
            [0.0, -4.6, 0.0, 0.0, 0.0],  # between -5 and -4.5: 0.2 / 0.8 by closeness
            [0.0, 0.0, 0.0, 0.0, -3.0],  # between -4.5 and -1: (1.5 / 3.5) to -4.5, (2 / 3.5) to -1
            [-100.0, 0.0, 0.0, 0.0, 7.0],  # below and above the support -> the edge atoms
        ]
    )
    out = np.asarray(project_jit(targets, probs, atoms))
    np.testing.assert_allclose(out[0], [0.0, 0.2, 0.8, 0.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(out[1], [0.0, 0.0, 2.0 / 3.5, 1.5 / 3.5, 0.0], atol=1e-6)
    np.testing.assert_allclose(out[2], [0.5, 0.0, 0.0, 0.0, 0.5], atol=1e-7)
    assert float(clipped_fraction(targets, atoms)) == pytest.approx(2 / 15)


@pytest.mark.parametrize(
    "returns",
    [
        np.random.default_rng(4).normal(-2.0, 0.3, 5000),  # typical: a narrow band of demo returns
        np.full(50, -3.0),  # degenerate: all equal
        np.array([5.0, 12.0, -20.0]),  # all outside the support
        np.array([-8.0]),  # a single return on the edge
    ],
)
def test_quantile_atoms(returns: np.ndarray):
    atoms = quantile_atoms(returns, N, V_MIN, V_MAX)
    uniform = uniform_atoms(V_MIN, V_MAX, N)
    assert atoms.shape == (N,)
    assert atoms[0] == V_MIN and atoms[-1] == V_MAX
    assert np.diff(atoms).min() > 0.1 * (V_MAX - V_MIN) / (N - 1)  # a real minimum gap, not just "increasing"
    centre = np.clip(np.median(returns), V_MIN, V_MAX)
    near = lambda z: np.sum(np.abs(z - centre) <= 0.5)  # noqa: E731
    assert near(atoms) >= 2 * near(uniform)


def test_make_atoms():
    assert np.allclose(make_atoms(CriticConfig()), np.linspace(-8, 0, 101))
    assert make_atoms(CriticConfig(atoms="quantile"), np.full(5, -1.0)).dtype == jnp.float32
    with pytest.raises(ValueError, match="demo_returns"):
        make_atoms(CriticConfig(atoms="quantile"))
    with pytest.raises(ValueError, match="at least one"):
        quantile_atoms(np.array([]), N, V_MIN, V_MAX)
    with pytest.raises(ValueError, match="unknown atoms"):
        make_atoms(CriticConfig(atoms="log"))


def _init(config: CriticConfig, b: int = 16, obs_dim: int = 5, act_dim: int = 2, seed: int = 0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    obs = jax.random.normal(keys[0], (b, obs_dim)) * 2.0 + 1.0  # far from BN's initial running stats (0, 1)
    action = jax.random.uniform(keys[1], (b, act_dim), minval=-1, maxval=1)
    critic = Critic(config)
    obs = {"state": obs}
    return critic, critic.init(keys[2], obs, action, train=False), obs, action


def _kernels(params) -> list[jax.Array]:
    return [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(params) if path[-1].key == "kernel"]


def _assert_unit_columns(params, n_kernels: int):
    kernels = _kernels(params)
    assert len(kernels) == n_kernels
    for k in kernels:
        np.testing.assert_allclose(np.linalg.norm(k, axis=-2), 1.0, atol=1e-5)


def _fit(critic: Critic, variables, obs, action, target, steps: int, lr: float = 3e-3):
    """Adam on the cross-entropy to ``target`` (train-mode BN) with weight normalisation after every step."""
    opt = optax.adam(lr)

    def loss_fn(p, batch_stats):
        logits, upd = critic.apply(
            {"params": p, "batch_stats": batch_stats}, obs, action, train=True, mutable=["batch_stats"]
        )
        return cross_entropy(logits, target).mean(-1).sum(), upd["batch_stats"]

    def step(carry, _):
        p, opt_state, batch_stats = carry
        grads, batch_stats = jax.grad(loss_fn, has_aux=True)(p, batch_stats)
        updates, opt_state = opt.update(grads, opt_state)
        return (weight_normalize(optax.apply_updates(p, updates)), opt_state, batch_stats), None

    p = variables["params"]
    carry = (p, opt.init(p), variables["batch_stats"])
    p, _, batch_stats = jax.jit(lambda c: jax.lax.scan(step, c, None, length=steps)[0])(carry)
    return p, batch_stats


def test_weight_normalize_projects_kernels_only_and_survives_adam():
    critic, variables, obs, action = _init(SMALL)
    params = variables["params"]
    assert not np.allclose(np.linalg.norm(_kernels(params)[-1], axis=-2), 1.0)
    normed = jax.jit(weight_normalize)(params)
    _assert_unit_columns(normed, n_kernels=3)  # two hidden + head, each (num_critics, in, out)
    for name in ("input_bn", "bn_0", "bn_1"):
        for leaf in ("scale", "bias"):
            np.testing.assert_array_equal(normed["critics"][name][leaf], params["critics"][name][leaf])
    np.testing.assert_array_equal(normed["critics"]["head"]["bias"], params["critics"]["head"]["bias"])

    target = jax.nn.softmax(jax.random.normal(jax.random.PRNGKey(1), (action.shape[0], SMALL.num_atoms)))
    p, batch_stats = _fit(critic, {"params": normed, "batch_stats": variables["batch_stats"]}, obs, action, target, 5)
    _assert_unit_columns(p, n_kernels=3)
    assert not np.allclose(p["critics"]["head"]["kernel"], normed["critics"]["head"]["kernel"])

    # vmapped ensemble: different params per critic, and BN statistics kept per critic
    for k in _kernels(p):
        assert not np.allclose(k[0], k[1])
    for name in ("bn_0", "bn_1"):
        assert batch_stats["critics"][name]["mean"].shape[0] == SMALL.num_critics
        assert not np.allclose(batch_stats["critics"][name]["mean"][0], batch_stats["critics"][name]["mean"][1])


def test_critic_modes_shapes_and_joint_forward():
    critic, variables, obs, action = _init(SMALL, b=16)
    logits, upd = critic.apply(variables, obs, action, train=True, mutable=["batch_stats"])
    assert logits.shape == (SMALL.num_critics, 16, SMALL.num_atoms)
    before, after = variables["batch_stats"]["critics"], upd["batch_stats"]["critics"]
    # bn_0's batch mean is 0 by construction (BN'd input, bias-free Dense), so check the means BN can move
    for name, stat in [("input_bn", "mean"), ("input_bn", "var"), ("bn_0", "var"), ("bn_1", "mean"), ("bn_1", "var")]:
        assert not np.allclose(before[name][stat], after[name][stat]), (name, stat)
    eval_logits, upd_eval = critic.apply(variables, obs, action, train=False, mutable=["batch_stats"])
    jax.tree_util.tree_map(np.testing.assert_array_equal, variables["batch_stats"], upd_eval["batch_stats"])
    assert not np.allclose(logits, eval_logits)  # running stats (0, 1) are far from this batch's

    s, a, s2, a2 = {"state": obs["state"][:8]}, action[:8], {"state": obs["state"][8:]}, action[8:]
    sa, nxt, stats = joint_forward(critic.apply, variables, s, a, s2, a2, train=True)
    np.testing.assert_allclose(sa, logits[:, :8], atol=1e-5)
    np.testing.assert_allclose(nxt, logits[:, 8:], atol=1e-5)
    jax.tree_util.tree_map(np.testing.assert_array_equal, stats, upd["batch_stats"])
    alone = critic.apply(variables, s, a, train=True, mutable=["batch_stats"])[0]
    assert not np.allclose(sa, alone, atol=1e-3)  # BN really saw both halves

    sa, nxt, stats = joint_forward(critic.apply, variables, s, a, s2, a2, train=False)
    np.testing.assert_allclose(sa, critic.apply(variables, s, a, train=False), atol=1e-5)
    np.testing.assert_allclose(nxt, critic.apply(variables, s2, a2, train=False), atol=1e-5)
    assert stats is variables["batch_stats"]


def test_select_min_critic_and_expected_value():
    atoms = jnp.linspace(-1.0, 1.0, 3)
    logits = jnp.log(jnp.array([[[0.1, 0.1, 0.8], [0.8, 0.1, 0.1]], [[0.8, 0.1, 0.1], [0.1, 0.1, 0.8]]]))
    np.testing.assert_allclose(expected_value(logits, atoms), [[0.7, -0.7], [-0.7, 0.7]], atol=1e-6)
    np.testing.assert_allclose(select_min_critic(logits, atoms), [[0.8, 0.1, 0.1], [0.8, 0.1, 0.1]], atol=1e-6)


def test_tiny_fit_reaches_target_means():
    config = CriticConfig(hidden=(64, 64), num_atoms=51, bn_momentum=0.9)
    atoms = make_atoms(config)
    critic, variables, obs, action = _init(config, b=8, obs_dim=4, act_dim=2)
    means = jnp.linspace(-6.5, -0.5, 8)
    point_mass = jax.nn.one_hot(jnp.zeros(8, int), config.num_atoms)
    target = project(jnp.broadcast_to(means[:, None], point_mass.shape), point_mass, atoms)
    np.testing.assert_allclose(target @ atoms, means, atol=1e-5)
    normed = {**variables, "params": weight_normalize(variables["params"])}
    p, batch_stats = _fit(critic, normed, obs, action, target, steps=200)
    q = expected_value(critic.apply({"params": p, "batch_stats": batch_stats}, obs, action, train=False), atoms)
    np.testing.assert_allclose(q, jnp.broadcast_to(means, q.shape), atol=0.25)
