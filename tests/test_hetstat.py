"""HETSTAT policy (density, KL, bound, faithful loss, BC, stationarity) and the image encoders.

Small widths throughout so the file runs in well under a minute on two shared CPU cores.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from csil import hetstat as H
from csil.encoders import MultiCameraEncoder, ResNetEncoder, SpatialSoftmax, random_shift

SMALL = H.HetStatConfig(hidden=(64, 64), bottleneck=8, features=64, action_dim=3)
OBS_DIM = 10


def _randomised(params: dict, key: jax.Array, scale: float = 0.5) -> dict:
    """A copy of init params whose zero-initialised heads (mean, Cholesky factor) are random instead."""
    k1, k2 = jax.random.split(key)
    inner = dict(params["params"])
    inner["mean_weights"] = 4 * scale * jax.random.normal(k1, inner["mean_weights"].shape)
    inner["scale_tril_raw"] = scale * jax.random.normal(k2, inner["scale_tril_raw"].shape)
    return {"params": inner}


def _init(cfg: H.HetStatConfig, seed: int) -> tuple[H.HetStatPolicy, dict]:
    net = H.HetStatPolicy(cfg)
    return net, jax.jit(net.init)(jax.random.PRNGKey(seed), jnp.zeros((1, OBS_DIM)))


# ---------------------------------------------------------------- distribution functions


def test_gaussian_kl_matches_monte_carlo_of_tanh_log_probs():
    """Closed-form latent KL == E_p[log p_tanh(a) - log q_tanh(a)] estimated with our clipped log_prob."""
    k = jax.random.split(jax.random.PRNGKey(0), 5)
    mu_p = jax.random.uniform(k[0], (4, 3), minval=-0.8, maxval=0.8)
    mu_q = jax.random.uniform(k[1], (4, 3), minval=-0.8, maxval=0.8)
    sigma_p = jax.random.uniform(k[2], (4, 3), minval=0.15, maxval=0.4)
    sigma_q = jax.random.uniform(k[3], (4, 3), minval=0.15, maxval=0.4)
    n = 200_000
    actions, _ = H.sample(k[4], jnp.broadcast_to(mu_p, (n, 4, 3)), jnp.broadcast_to(sigma_p, (n, 4, 3)))
    assert float(jnp.abs(actions).max()) < H.CLIP  # the estimate only means something inside the clip
    log_ratio = H.log_prob(mu_p, sigma_p, actions) - H.log_prob(mu_q, sigma_q, actions)  # (n, 4)
    mc = log_ratio.mean(0)
    stderr = log_ratio.std(0) / math.sqrt(n)
    kl = H.gaussian_kl(mu_p, sigma_p, mu_q, sigma_q)
    assert kl.shape == (4,)
    np.testing.assert_array_less(np.abs(np.asarray(mc - kl)), np.asarray(5 * stderr + 2e-3))


def test_gaussian_kl_zero_on_itself_and_non_negative_on_random_policies():
    net, params = _init(SMALL, 0)
    p = _randomised(params, jax.random.PRNGKey(1))
    q = _randomised(_init(SMALL, 2)[1], jax.random.PRNGKey(3), scale=1.0)
    obs = 2 * jax.random.normal(jax.random.PRNGKey(4), (256, OBS_DIM))
    apply = jax.jit(net.apply)
    (mu_p, sigma_p), (mu_q, sigma_q) = apply(p, obs), apply(q, obs)
    np.testing.assert_allclose(H.gaussian_kl(mu_p, sigma_p, mu_p, sigma_p), 0.0, atol=1e-6)
    kl = H.gaussian_kl(mu_p, sigma_p, mu_q, sigma_q)
    assert float(kl.min()) >= 0.0 and float(kl.mean()) > 0.1


@pytest.mark.parametrize("mu,sigma", [(0.0, 0.5), (0.3, 0.05), (1.5, 0.3), (3.0, 0.5), (-3.5, 0.3), (-1.0, 1.2)])
def test_log_prob_integrates_to_one_in_1d(mu, sigma):
    """Interior density over (-CLIP, CLIP) plus the two tail masses (density x tail width) sums to 1."""
    n = 400_000
    h = 2 * H.CLIP / n
    a = -H.CLIP + h * (np.arange(n) + 0.5)  # midpoints: all strictly inside the clip
    m, s = jnp.full((n, 1), mu), jnp.full((n, 1), sigma)
    interior = np.exp(np.asarray(H.log_prob(m, s, jnp.asarray(a[:, None], jnp.float32)), np.float64)).sum() * h
    tails = np.exp(np.asarray(H.log_prob(m[:2], s[:2], jnp.array([[-1.0], [1.0]])), np.float64)) * (1 - H.CLIP)
    assert interior + tails.sum() == pytest.approx(1.0, abs=2e-3)


def test_log_prob_is_change_of_variables_inside_clip_and_sample_agrees():
    rng = np.random.default_rng(0)
    mu, sigma = rng.uniform(-2, 2, (64, 3)), rng.uniform(0.05, 0.8, (64, 3))
    a = rng.uniform(-0.99, 0.99, (64, 3))
    x = np.arctanh(a)
    direct = (-0.5 * ((x - mu) / sigma) ** 2 - np.log(sigma) - 0.5 * np.log(2 * np.pi) - np.log(1 - a**2)).sum(-1)
    f32 = lambda v: jnp.asarray(v, jnp.float32)  # noqa: E731
    np.testing.assert_allclose(H.log_prob(f32(mu), f32(sigma), f32(a)), direct, rtol=1e-4, atol=1e-3)
    # sample()'s density (from the pre-tanh value) equals log_prob of the action it returns
    mu_s, sigma_s = f32(rng.uniform(-1, 1, (512, 3))), f32(rng.uniform(0.1, 0.4, (512, 3)))
    act, logp = H.sample(jax.random.PRNGKey(0), mu_s, sigma_s)
    assert float(jnp.abs(act).max()) < H.CLIP
    np.testing.assert_allclose(logp, H.log_prob(mu_s, sigma_s, act), rtol=1e-4, atol=2e-3)


def test_sample_is_reparameterised():
    grad = jax.grad(lambda m: H.sample(jax.random.PRNGKey(0), m, jnp.full((8, 3), 0.3))[0].sum())(jnp.zeros((8, 3)))
    assert float(jnp.abs(grad).min()) > 0.0


# ---------------------------------------------------------------- network at init, floor and bound


def test_init_mode_is_zero_and_sigma_in_range_default_config():
    cfg = H.HetStatConfig()
    net = H.HetStatPolicy(cfg)
    obs = jnp.concatenate([jax.random.normal(jax.random.PRNGKey(0), (8, OBS_DIM)), jnp.full((2, OBS_DIM), 1e3)])
    params = jax.jit(net.init)(jax.random.PRNGKey(1), obs)
    mu, sigma = jax.jit(net.apply)(params, obs)
    assert mu.shape == sigma.shape == (10, cfg.action_dim)
    np.testing.assert_array_equal(H.mode(mu), 0.0)
    assert float(sigma.min()) >= H.sigma_floor(cfg) and float(sigma.max()) <= math.sqrt(cfg.prior_var)
    assert float(sigma.min()) > 0.3  # broad at init: the BC prior starts close to uniform


def test_sigma_floor_and_log_ratio_bound_hold_for_any_state_params_and_action():
    cfg, d = SMALL, SMALL.action_dim
    net, params = _init(cfg, 0)
    bound = d * H.log_prob_upper_bound(cfg)
    floor = H.sigma_floor(cfg)
    worst, lowest_sigma = -np.inf, np.inf
    apply = jax.jit(net.apply)
    for seed in range(6):
        key = jax.random.PRNGKey(100 + seed)
        p = _randomised(params, key, scale=2.0)
        if seed % 2:  # "trained to minimal sigma": Cholesky diagonals -> 0, so the quadratic form -> 0
            raw = p["params"]["scale_tril_raw"]
            p["params"]["scale_tril_raw"] = jnp.where(H._raw_diag_mask(cfg.features), -30.0, raw * 1e-6)
        obs = jax.random.normal(key, (128, OBS_DIM)) * jnp.array([1.0, 1e4])[seed % 2]
        mu, sigma = apply(p, obs)
        lowest_sigma = min(lowest_sigma, float(sigma.min()))
        saturated = jnp.sign(jax.random.normal(key, mu.shape))
        for a in (jax.random.uniform(key, mu.shape, minval=-1, maxval=1), saturated, H.mode(mu), 0.9989 * saturated):
            worst = max(worst, float((H.log_prob(mu, sigma, a) - H.uniform_log_prob(d)).max()))
    assert lowest_sigma >= floor * (1 - 1e-6)
    assert lowest_sigma < 1.01 * floor  # the floor is reached, not just respected
    assert worst <= bound + 1e-3
    # the bound is tight: a policy at the floor centred at the largest interior Jacobian gets within 0.1 / dim
    a = jnp.full((1, d), 0.99899)
    peak = H.log_prob(jnp.arctanh(a), jnp.full((1, d), floor), a) - H.uniform_log_prob(d)
    assert bound - 0.1 * d <= float(peak[0]) <= bound + 1e-3


def test_log_prob_upper_bound_value():
    """Official sigma floor: interior case (Gaussian peak + Jacobian at the clip) dominates, ~11.9 per dim."""
    cfg = H.HetStatConfig()
    assert H.sigma_floor(cfg) == pytest.approx(math.sqrt(0.75) * math.tanh(math.sqrt(1e-5)))
    assert H.log_prob_upper_bound(cfg) == pytest.approx(11.89, abs=0.01)
    assert H.uniform_log_prob(7) == pytest.approx(-7 * math.log(2))


# ---------------------------------------------------------------- faithful loss


@pytest.mark.parametrize("faithful", [True, False])
def test_faithful_loss_separates_mean_and_variance_gradients(faithful):
    cfg = H.HetStatConfig(hidden=(32, 32), bottleneck=8, features=32, action_dim=3, faithful=faithful)
    net, params = _init(cfg, 0)
    params = _randomised(params, jax.random.PRNGKey(1))
    obs = jax.random.normal(jax.random.PRNGKey(2), (64, OBS_DIM))
    actions = jax.random.uniform(jax.random.PRNGKey(3), (64, 3), minval=-0.9, maxval=0.9)
    grads = {
        term: jax.jit(jax.grad(lambda p, t=term: H.bc_loss(net.apply, p, obs, actions)[1][t]))(params)["params"]
        for term in ("mse", "nll")
    }
    norm = lambda tree: float(optax.global_norm(tree))  # noqa: E731
    mean_side = lambda g: {k: v for k, v in g.items() if k != "scale_tril_raw"}  # noqa: E731
    assert norm(grads["mse"]["scale_tril_raw"]) == 0.0
    assert norm(grads["mse"]["mean_weights"]) > 0 and norm(grads["mse"]["torso_0"]) > 0
    assert norm(grads["nll"]["scale_tril_raw"]) > 0
    assert norm(grads["nll"]["mean_weights"]) == 0.0
    if faithful:
        assert norm(mean_side(grads["nll"])) == 0.0
    else:  # without the flag the NLL reaches the torso through the variance head
        assert norm(grads["nll"]["torso_0"]) > 0


# ---------------------------------------------------------------- BC and stationarity


def _manifold_data(seed: int = 0):
    """Robot-like states: a 3-d manifold embedded in R^10. Returns obs, targets and an orthonormal basis of the
    complement (directions no demo ever moves in)."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(OBS_DIM, OBS_DIM)))
    s = rng.uniform(-1.5, 1.5, size=(512, 3))
    obs = np.concatenate([s, np.sin(2 * s)], 1) @ q[:6]
    targets = 0.9 * np.tanh(np.sin(obs @ rng.normal(size=(OBS_DIM, 3)) / 2) + 0.5 * obs[:, :3])
    return jnp.asarray(obs, jnp.float32), jnp.asarray(targets, jnp.float32), q[6:]


@functools.lru_cache(maxsize=None)
def _bc_trained(layer_norm: bool):
    """400 Adam steps of the faithful loss; cached so the BC and stationarity tests share one run per flag."""
    cfg = H.HetStatConfig(hidden=(64, 64), bottleneck=32, features=256, action_dim=3, layer_norm=layer_norm)
    net, params = _init(cfg, 0)
    obs, targets, complement = _manifold_data()
    opt = optax.adam(1e-3)

    @jax.jit
    def step(p, o, idx):
        grads, _ = jax.grad(lambda q: H.bc_loss(net.apply, q, obs[idx], targets[idx]), has_aux=True)(p)
        updates, o = opt.update(grads, o, p)
        return optax.apply_updates(p, updates), o

    _, before = H.bc_loss(net.apply, params, obs, targets)
    trained, opt_state = params, opt.init(params)
    for idx in jax.random.randint(jax.random.PRNGKey(1), (400, 128), 0, obs.shape[0]):
        trained, opt_state = step(trained, opt_state, idx)
    _, after = H.bc_loss(net.apply, trained, obs, targets)
    return cfg, net, params, trained, obs, complement, before, after


LAYER_NORM = pytest.mark.parametrize("layer_norm", [True, False], ids=["layernorm", "no_layernorm"])


@LAYER_NORM
def test_bc_fits_and_shrinks_sigma(layer_norm):
    *_, before, after = _bc_trained(layer_norm)
    assert float(after["mse"]) < 0.05 * float(before["mse"])
    assert float(after["sigma"]) < 0.5 * float(before["sigma"])
    assert float(after["nll"]) < float(before["nll"]) - 1.0
    assert float(after["entropy"]) < float(before["entropy"])


def _ood_shift(layer_norm: bool, probe_fn) -> tuple[float, float, float, float]:
    """Mean |mu| and the gap between mean sigma and its prior (init-time) value, on the data and on the probe."""
    _, net, init_params, params, obs, complement, *_ = _bc_trained(layer_norm)
    probe = probe_fn(obs, complement)
    prior = float(net.apply(init_params, obs)[1].mean())
    (mu_in, s_in), (mu_out, s_out) = net.apply(params, obs), net.apply(params, probe)
    return (
        float(jnp.abs(mu_in).mean()),
        float(jnp.abs(mu_out).mean()),
        abs(prior - float(s_in.mean())),
        abs(prior - float(s_out.mean())),
    )


def _off_manifold(obs: jax.Array, complement: np.ndarray) -> jax.Array:
    """Each demo state moved by 3 along a random direction the demos never vary in."""
    offsets = np.random.default_rng(1).normal(size=(obs.shape[0], complement.shape[0])) @ complement
    return obs + jnp.asarray(3.0 * offsets / np.linalg.norm(offsets, axis=1, keepdims=True), jnp.float32)


@LAYER_NORM
def test_stationary_off_the_demo_manifold(layer_norm):
    """Away from the demos the mean falls back towards 0 and sigma rises back towards its prior value."""
    mu_in, mu_out, gap_in, gap_out = _ood_shift(layer_norm, _off_manifold)
    assert mu_out < 0.5 * mu_in
    assert gap_out < 0.6 * gap_in


def test_stationary_for_scaled_up_states_without_layernorm():
    """obs x 100, without LayerNorm only: LN divides the input's scale out, so for the default (LN) torso a
    scaled-up demo state is not far from the demos at all (see HetStatPolicy's docstring)."""
    mu_in, mu_out, gap_in, gap_out = _ood_shift(False, lambda obs, _: 100.0 * obs)
    assert mu_out < 0.5 * mu_in
    assert gap_out < 0.6 * gap_in


# ---------------------------------------------------------------- encoders


def test_random_shift_keeps_shape_crops_padded_image_and_pad0_is_identity():
    images = jax.random.randint(jax.random.PRNGKey(0), (6, 12, 12, 3), 0, 256).astype(jnp.uint8)
    np.testing.assert_array_equal(random_shift(jax.random.PRNGKey(1), images, 0), images)
    shifted = np.asarray(random_shift(jax.random.PRNGKey(1), images, 2))
    assert shifted.shape == images.shape and shifted.dtype == np.uint8
    padded = np.pad(np.asarray(images), ((0, 0), (2, 2), (2, 2), (0, 0)), mode="edge")
    for img, pad_img in zip(shifted, padded):
        windows = [pad_img[y : y + 12, x : x + 12] for y in range(5) for x in range(5)]
        assert any(np.array_equal(img, w) for w in windows)
    assert any(not np.array_equal(s, i) for s, i in zip(shifted, np.asarray(images)))


def test_spatial_softmax_keypoints_locate_activation_and_stay_in_range():
    module = SpatialSoftmax()
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 7, 9, 4))
    params = module.init(jax.random.PRNGKey(1), x)
    out = module.apply(params, x)
    assert out.shape == (2, 8) and float(jnp.abs(out).max()) <= 1.0
    hot = jnp.zeros((1, 7, 9, 1)).at[0, 6, 0, 0].set(50.0)  # bottom-left pixel -> (x, y) = (-1, 1)
    np.testing.assert_allclose(module.apply(params, hot)[0], [-1.0, 1.0], atol=1e-3)


@pytest.mark.parametrize("group_norm", [True, False])
def test_resnet_encoder_output(group_norm):
    enc = ResNetEncoder(channels=(8, 16), out_dim=16, group_norm=group_norm)
    images = jax.random.randint(jax.random.PRNGKey(0), (3, 84, 84, 3), 0, 256).astype(jnp.uint8)
    params = enc.init(jax.random.PRNGKey(1), images)
    out = enc.apply(params, images)
    assert out.shape == (3, 16) and float(jnp.abs(out).max()) < 1.0
    assert not any("BatchNorm" in k for k in params["params"])


def test_bf16_encoder_keeps_float32_parameters_and_matches_float32_features():
    """Mixed precision (``EncoderConfig.compute_dtype="bfloat16"``): the same parameters (float32, so checkpoints
    and optimiser states do not change), features in float32 within bf16's rounding of the float32 ones, and finite
    float32 gradients."""
    images = jax.random.randint(jax.random.PRNGKey(0), (4, 84, 84, 3), 0, 256).astype(jnp.uint8)
    fp32, bf16 = (ResNetEncoder(channels=(8, 16), out_dim=16, dtype=d) for d in ("float32", "bfloat16"))
    params = fp32.init(jax.random.PRNGKey(1), images)
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(bf16.init(jax.random.PRNGKey(1), images))
    ref, out = fp32.apply(params, images), bf16.apply(params, images)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, ref, atol=0.05)
    assert float(jnp.abs(out - ref).max()) > 0  # it did compute in bf16
    grads = jax.grad(lambda p: jnp.sum(bf16.apply(p, images) ** 2))(params)
    assert all(g.dtype == jnp.float32 and bool(jnp.isfinite(g).all()) for g in jax.tree_util.tree_leaves(grads))


def test_multi_camera_encoder_has_separate_params_per_camera():
    cams = ("agentview", "robot0_eye_in_hand")
    enc = MultiCameraEncoder(cams, channels=(8, 16), out_dim=16)
    key = jax.random.split(jax.random.PRNGKey(0), 3)
    obs = {"state": jax.random.normal(key[0], (2, 5))}
    for cam, k in zip(cams, key[1:]):
        obs[f"{cam}_image"] = jax.random.randint(k, (2, 32, 32, 3), 0, 256).astype(jnp.uint8)
    params = enc.init(jax.random.PRNGKey(1), obs)
    assert set(params["params"]) == {f"encoder_{c}" for c in cams}
    a, b = (jax.tree_util.tree_leaves(params["params"][f"encoder_{c}"]) for c in cams)
    assert not all(np.array_equal(x, y) for x, y in zip(a, b))
    out = enc.apply(params, obs)
    assert out.shape == (2, 5 + 2 * 16)
    np.testing.assert_array_equal(out[:, :5], obs["state"])
    # changing the wrist image moves only the wrist slice
    moved = enc.apply(params, {**obs, "robot0_eye_in_hand_image": 255 - obs["robot0_eye_in_hand_image"]})
    np.testing.assert_array_equal(moved[:, : 5 + 16], out[:, : 5 + 16])
    assert not np.allclose(moved[:, 5 + 16 :], out[:, 5 + 16 :])
