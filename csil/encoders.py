"""Image encoders for the policy, critic and reward on image observations (CSIL++: one ResNet per camera).

Observations are the flat dicts of ``csil.specs``: ``"state"`` plus one uint8 (H, W, 3) array per camera under
``f"{camera}_image"``. Augmentation (``random_shift``) is applied by the caller to the image arrays of a
training batch, so the encoders stay deterministic functions of their input.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from csil.config import EncoderConfig


def random_shift(key: jax.Array, images: jax.Array, pad: int) -> jax.Array:
    """DrQ augmentation: edge-pad (B, H, W, C) images by ``pad`` and crop back at a random offset per image."""
    n, h, w, c = images.shape
    padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="edge")
    offsets = jax.random.randint(key, (n, 2), 0, 2 * pad + 1)
    crop = lambda img, off: jax.lax.dynamic_slice(img, (off[0], off[1], 0), (h, w, c))  # noqa: E731
    return jax.vmap(crop)(padded, offsets)


class SpatialSoftmax(nn.Module):
    """(B, H, W, C) -> (B, 2C): per channel, the softmax-weighted mean (x, y) position on [-1, 1]^2.

    Keypoints keep *where* a feature fires, which manipulation needs and global pooling throws away; the
    learnable temperature sets how sharply each map is peaked.
    """

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        log_temp = self.param("log_temperature", nn.initializers.zeros, ())
        logits = x.reshape(b, h * w, c) / jnp.exp(log_temp)
        weights = jax.nn.softmax(logits, axis=1)  # over positions
        ys, xs = jnp.meshgrid(jnp.linspace(-1.0, 1.0, h), jnp.linspace(-1.0, 1.0, w), indexing="ij")
        grid = jnp.stack([xs.reshape(-1), ys.reshape(-1)], axis=-1)  # (H*W, 2)
        keypoints = jnp.einsum("bpc,pk->bck", weights, grid)
        return keypoints.reshape(b, 2 * c)


class ResNetEncoder(nn.Module):
    """uint8 (B, H, W, 3) -> (B, out_dim) in (-1, 1).

    Per entry of ``channels``: a stride-2 conv then one residual block. GroupNorm (or none), never BatchNorm:
    the encoder is shared by actor, critic and reward and is called on single observations by actors.
    """

    channels: Sequence[int] = (16, 32, 64, 128)
    out_dim: int = 64
    group_norm: bool = True
    dtype: str = "float32"  # the convolutions' (and norms') compute dtype; parameters and the head stay float32

    def _norm(self, x: jax.Array) -> jax.Array:
        return nn.GroupNorm(num_groups=math.gcd(8, x.shape[-1]), dtype=self.dtype)(x) if self.group_norm else x

    @nn.compact
    def __call__(self, image: jax.Array) -> jax.Array:
        x = image.astype(self.dtype) / 127.5 - 1.0
        for c in self.channels:
            x = nn.relu(self._norm(nn.Conv(c, (3, 3), strides=(2, 2), dtype=self.dtype)(x)))
            y = nn.relu(self._norm(nn.Conv(c, (3, 3), dtype=self.dtype)(x)))
            y = self._norm(nn.Conv(c, (3, 3), dtype=self.dtype)(y))
            x = nn.relu(x + y)
        x = SpatialSoftmax()(x.astype(jnp.float32))
        return jnp.tanh(nn.LayerNorm()(nn.Dense(self.out_dim)(x)))


class MultiCameraEncoder(nn.Module):
    """Observation dict -> (B, state_dim [+ base_plan] + len(cameras) * out_dim): the state, the base plan if the
    observation has one, then one ResNet per camera."""

    cameras: Sequence[str]
    channels: Sequence[int] = (16, 32, 64, 128)
    out_dim: int = 64
    dtype: str = "float32"

    @staticmethod
    def from_config(cameras: Sequence[str], cfg: EncoderConfig, name: str | None = None) -> "MultiCameraEncoder":
        return MultiCameraEncoder(tuple(cameras), cfg.channels, cfg.out_dim, cfg.compute_dtype, name=name)

    @nn.compact
    def __call__(self, obs: Mapping[str, jax.Array]) -> jax.Array:
        feats = [
            ResNetEncoder(self.channels, self.out_dim, dtype=self.dtype, name=f"encoder_{cam}")(obs[f"{cam}_image"])
            for cam in self.cameras
        ]
        plan = [obs["base_plan"]] if "base_plan" in obs else []  # residual mode: the base action and its phase
        return jnp.concatenate([obs["state"].astype(jnp.float32), *plan, *feats], axis=-1)
