"""Critics: XQC's distributional BatchNorm critic (CSIL++) and CSIL's LayerNorm MSE critic (vanilla CSIL).

``categorical`` follows XQC (reference/algorithm.md §5): BN on the raw input, ``Dense(no bias) -> BN -> ReLU``
blocks, two critics with separate parameters and BN statistics, every kernel column projected to unit norm after
each optimiser step, and a cross-entropy loss against a C51-projected target. Unlike XQC, the support may be
non-uniform (``quantile`` atoms, denser where the demo returns lie), so the projection interpolates between
neighbouring atoms found by ``searchsorted`` instead of by index arithmetic. ``mse`` is Acme's LayerNormMLP
(Dense -> LayerNorm -> tanh, then Dense -> ELU) with a scalar head, as CSIL uses it.

Both take the observation *dict*: one image encoder per camera (shared by the critics of the ensemble) runs
first when the spec has cameras; otherwise the input is ``obs["state"]``.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from csil.config import CriticConfig, EncoderConfig
from csil.encoders import MultiCameraEncoder

PyTree = Any
_RELU_ORTHOGONAL = nn.initializers.orthogonal(np.sqrt(2))


class _Critic(nn.Module):
    """One critic: BN embedder on concat(obs, action), pre-activation-BN blocks, categorical head (logits)."""

    config: CriticConfig
    train: bool

    def _bn(self, name: str) -> nn.BatchNorm:
        c = self.config
        return nn.BatchNorm(
            use_running_average=not self.train, momentum=c.bn_momentum, epsilon=c.bn_epsilon, name=name
        )

    @nn.compact
    def __call__(self, obs: jax.Array, action: jax.Array) -> jax.Array:
        x = self._bn("input_bn")(jnp.concatenate([obs, action], axis=-1))
        for i, width in enumerate(self.config.hidden):
            # No bias: the BN that follows would cancel it; orthogonal sqrt(2) is the ReLU-gain init XQC uses.
            dense = nn.Dense(width, use_bias=False, kernel_init=_RELU_ORTHOGONAL, name=f"dense_{i}")
            x = nn.relu(self._bn(f"bn_{i}")(dense(x)))
        return nn.Dense(self.config.num_atoms, name="head")(x)


class _LNCritic(nn.Module):
    """One CSIL critic: Acme's LayerNormMLP (Dense -> LayerNorm -> tanh, then Dense -> ELU), scalar head."""

    config: CriticConfig
    train: bool  # unused (no batch statistics); keeps the ensemble's call signature

    @nn.compact
    def __call__(self, obs: jax.Array, action: jax.Array) -> jax.Array:
        x = jnp.concatenate([obs, action], axis=-1)
        for i, width in enumerate(self.config.hidden):
            x = nn.Dense(width, kernel_init=nn.initializers.orthogonal(), name=f"dense_{i}")(x)
            x = jnp.tanh(nn.LayerNorm(name="input_norm")(x)) if i == 0 else nn.elu(x)
        return nn.Dense(1, kernel_init=nn.initializers.orthogonal(), name="head")(x)


class Critic(nn.Module):
    """``num_critics`` independent critics on encoded observations; returns (num_critics, B, num_atoms or 1).

    ``train=True`` normalises with the batch statistics and updates the running ones (call ``apply`` with
    ``mutable=["batch_stats"]``); ``train=False`` uses the running averages (the actor loss and evaluation).

    BN makes a sample's output depend on the rest of its batch, so the TD loss must run the joint batch
    ``[(s, a); (s', a')]`` through the network in one call: the online critic's normalisation then matches the
    target critic's, both see the same mixture of current and next state-actions, and the running statistics
    describe that mixture. ``joint_forward`` does this and splits the halves.
    """

    config: CriticConfig
    cameras: tuple[str, ...] = ()
    encoder: EncoderConfig = EncoderConfig()

    @nn.compact
    def __call__(self, obs: dict[str, jax.Array] | None, action: jax.Array, train: bool,
                 features: jax.Array | None = None) -> jax.Array:
        """``features`` (the encoder's output for ``obs``, computed once and shared) skip the encoder."""
        kinds = {"categorical": _Critic, "mse": _LNCritic}
        if self.config.kind not in kinds:
            raise ValueError(f"unknown critic kind {self.config.kind!r}; use one of {sorted(kinds)}")
        if features is None:
            features = MultiCameraEncoder.from_config(self.cameras, self.encoder, name="encoder")(obs)
        ensemble = nn.vmap(
            kinds[self.config.kind],
            variable_axes={"params": 0, "batch_stats": 0},
            split_rngs={"params": True},
            in_axes=None,
            out_axes=0,
            axis_size=self.config.num_critics,
        )
        return ensemble(self.config, train, name="critics")(features, action)


def joint_forward(
    apply_fn: Callable[..., Any],
    variables: PyTree,
    obs: dict[str, jax.Array],
    action: jax.Array,
    next_obs: dict[str, jax.Array],
    next_action: jax.Array,
    train: bool,
    features: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, PyTree]:
    """Run [(s, a); (s', a')] in one BN batch; return (out_sa, out_next, batch_stats after the call).

    ``apply_fn`` is ``Critic(...).apply``. In eval mode the batch statistics come back unchanged. ``features``:
    the encoder's output for [s; s'], already computed (the observations are then not encoded again).
    """
    joint_obs = None if features is not None else jax.tree_util.tree_map(
        lambda x, y: jnp.concatenate([x, y], axis=0), obs, next_obs)
    joint_action = jnp.concatenate([action, next_action], axis=0)
    if train:
        out, updates = apply_fn(variables, joint_obs, joint_action, train=True, mutable=["batch_stats"],
                                features=features)
        batch_stats = updates["batch_stats"]
    else:
        out = apply_fn(variables, joint_obs, joint_action, train=False, features=features)
        batch_stats = variables["batch_stats"]
    n = action.shape[0]
    return out[:, :n], out[:, n:], batch_stats


def weight_normalize(params: PyTree) -> PyTree:
    """Project every Dense kernel column (one per output unit) onto the unit sphere over the input dimension.

    XQC does this once at init and after every optimiser step. A hidden kernel is followed by BN, so its scale
    does not change the function; left alone, its norm grows and the effective learning rate decays. The head's
    columns are projected too (XQC's code always does, whatever its config flag says), which keeps the logit scale
    tied to the features. Biases (only the head has one) and BN scale/offset are untouched, and so is the image
    encoder (its convs and LayerNorm'd projection are not followed by BN). Works on single (in, out) and vmapped
    (num_critics, in, out) kernels alike, for the ``Critic``'s params or the bare ensemble's.
    """

    def project_leaf(path: tuple, leaf: jax.Array) -> jax.Array:
        keys = [getattr(k, "key", None) for k in path]
        if keys[-1] != "kernel" or "encoder" in keys:
            return leaf
        norm = jnp.linalg.norm(leaf, axis=-2, keepdims=True)
        return leaf / jnp.maximum(norm, 1e-12)

    return jax.tree_util.tree_map_with_path(project_leaf, params)


def uniform_atoms(v_min: float, v_max: float, n: int) -> np.ndarray:
    """XQC's support: ``n`` equally spaced atoms with both ends included."""
    return np.linspace(v_min, v_max, n)


def quantile_atoms(
    demo_returns: np.ndarray,
    n: int,
    v_min: float,
    v_max: float,
    uniform_fraction: float = 0.5,
    bandwidth: float = 0.05,
) -> np.ndarray:
    """``n`` atoms on [v_min, v_max], denser where the demo returns lie.

    Why: the critic's values on and near the demo distribution (where the BC-initialised policy starts and
    where the actor's gradient has to tell good from slightly worse actions) occupy a narrow band of the
    support; packing atoms there gives finer value resolution where it matters, while the rest of the support
    stays covered for out-of-distribution values (down to about -B) and for the TD targets' edges.

    Design: the atoms are equally spaced *in probability* under a mixture density
    ``p = uniform_fraction * U[v_min, v_max] + (1 - uniform_fraction) * KDE(demo returns)``, i.e.
    ``z_i = F^{-1}(i / (n - 1))``. The KDE uses a box kernel of half-width ``h = bandwidth * (v_max - v_min)``
    centred on the returns clipped into [v_min + h, v_max - h], so all of ``p``'s mass is inside the support.
    Consequences, none of which needs a repair step:
      * ``F`` is continuous and strictly increasing (the uniform part has positive density everywhere), so
        there are exactly ``n`` distinct atoms, strictly increasing, with ``z_0 = v_min`` and ``z_{n-1} = v_max``;
      * the density is bounded by ``uniform_fraction / L + (1 - uniform_fraction) / (2h)`` (L = v_max - v_min),
        so neighbouring atoms are at least ``1 / ((n - 1) * that bound)`` apart even if every demo return is
        equal (about 0.18 of the uniform spacing at the defaults), which keeps the projection well conditioned;
      * returns outside the support are clipped, so they pile atoms up at the nearest edge, not beyond it.
    ``F`` is piecewise linear with breakpoints at the kernel edges, so it is inverted exactly with ``np.interp``.
    Many returns are first summarised by 256 of their empirical quantiles (enough for ~100 atoms, and keeps
    the breakpoint evaluation small).
    """
    returns = np.asarray(demo_returns, dtype=np.float64).ravel()
    if returns.size == 0:
        raise ValueError("quantile_atoms needs at least one demo return")
    if not 0.0 < uniform_fraction <= 1.0:
        raise ValueError(f"uniform_fraction must be in (0, 1], got {uniform_fraction}")
    length = v_max - v_min
    h = bandwidth * length
    if not 0.0 < h <= length / 2:
        raise ValueError(f"bandwidth must be in (0, 0.5], got {bandwidth}")
    if returns.size > 256:
        returns = np.quantile(returns, (np.arange(256) + 0.5) / 256)
    centres = np.clip(returns, v_min + h, v_max - h)

    breaks = np.unique(np.concatenate([[v_min, v_max], centres - h, centres + h]))
    kde_cdf = np.clip((breaks[:, None] - (centres - h)) / (2 * h), 0.0, 1.0).mean(axis=1)
    cdf = uniform_fraction * (breaks - v_min) / length + (1 - uniform_fraction) * kde_cdf
    cdf /= cdf[-1]
    atoms = np.interp(np.linspace(0.0, 1.0, n), cdf, breaks)
    atoms[0], atoms[-1] = v_min, v_max
    return atoms


def make_atoms(config: CriticConfig, demo_returns: np.ndarray | None = None) -> jax.Array:
    """The fixed support of ``config`` as float32; ``quantile`` needs the demo returns (e.g. pretraining MC returns)."""
    if config.atoms == "uniform":
        atoms = uniform_atoms(config.v_min, config.v_max, config.num_atoms)
    elif config.atoms == "quantile":
        if demo_returns is None:
            raise ValueError('atoms="quantile" needs demo_returns to place the atoms')
        atoms = quantile_atoms(demo_returns, config.num_atoms, config.v_min, config.v_max)
    else:
        raise ValueError(f'unknown atoms layout {config.atoms!r}: expected "uniform" or "quantile"')
    return jnp.asarray(atoms, dtype=jnp.float32)


def project(target_values: jax.Array, probs: jax.Array, atoms: jax.Array) -> jax.Array:
    """C51 projection of mass ``probs`` (B, N) sitting at ``target_values`` (B, N) onto the support ``atoms`` (N,).

    Each shifted atom is clipped into [atoms[0], atoms[-1]] and its mass split between the two support atoms
    around it in proportion to closeness (linear interpolation), which conserves mass and, inside the support,
    the mean. Works for any strictly increasing support: the neighbours come from ``searchsorted``, so a value
    exactly on an atom gives that atom all of its mass.
    """
    n = atoms.shape[0]
    t = jnp.clip(target_values, atoms[0], atoms[-1])
    lower = jnp.clip(jnp.searchsorted(atoms, t, side="right") - 1, 0, n - 2)
    upper_weight = jnp.clip((t - atoms[lower]) / (atoms[lower + 1] - atoms[lower]), 0.0, 1.0)[..., None]
    # A (B, N, N) interpolation matrix and one contraction: ~4x faster than a scatter-add on CPU, a matmul on GPU.
    # HIGHEST precision: GPUs would otherwise use TF32 (10-bit mantissa) and lose mass at the 1e-3 level.
    spread = jax.nn.one_hot(lower, n) * (1.0 - upper_weight) + jax.nn.one_hot(lower + 1, n) * upper_weight
    return jnp.einsum("bj,bjn->bn", probs, spread, precision=jax.lax.Precision.HIGHEST)


def expected_value(logits: jax.Array, atoms: jax.Array) -> jax.Array:
    """Q = sum_j softmax(logits)_j z_j, over the last axis."""
    return jnp.sum(jax.nn.softmax(logits, axis=-1) * atoms, axis=-1)


def cross_entropy(logits: jax.Array, target_probs: jax.Array) -> jax.Array:
    """Per-sample -sum_j target_j log p_j; the caller averages over the batch and sums over critics."""
    return -jnp.sum(target_probs * jax.nn.log_softmax(logits, axis=-1), axis=-1)


def select_min_critic(logits: jax.Array, atoms: jax.Array) -> jax.Array:
    """(B, N) probabilities of, per sample, the critic with the smallest expected value (XQC's pessimistic target)."""
    best = jnp.argmin(expected_value(logits, atoms), axis=0)
    probs = jax.nn.softmax(logits, axis=-1)
    return jnp.take_along_axis(probs, best[None, :, None], axis=0)[0]


def clipped_fraction(target_values: jax.Array, atoms: jax.Array) -> jax.Array:
    """Fraction of shifted atoms outside the support: how much the reward scale overflows [v_min, v_max]."""
    return jnp.mean((target_values < atoms[0]) | (target_values > atoms[-1]))
