"""The local base policy: an action-chunking BC model in Flax, the CPU stand-in for pi0.5.

It honours openpi's policy contract (``openpi_client.base_policy.BasePolicy``): ``infer`` takes the
LIBERO-style observation dict that a pi0.5 server takes ("observation/state", "observation/image",
"observation/wrist_image", "prompt") and returns ``{"actions": (10, 7)}``, so the inference server can serve
either model. ``infer_batch`` is the batched call the server and actors use.

The prompt is accepted and ignored (one model per task). In state mode "observation/state" is the full
robomimic low-dim vector (proprioception + object state); in image mode it is proprioception and the two
camera images carry the scene.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple, Protocol, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from openpi_client.base_policy import BasePolicy

from csil import compile_cache
from csil.config import BaseTrainConfig
from csil.demos import flatten_obs
from csil.encoders import SpatialSoftmax, random_shift
from csil.specs import ACTION_DIM, OPENPI_KEYS, BaseObsSpec, ObsSpec


class ImageEncoder(nn.Module):
    """Small conv net per camera: stride-2 convs, then a pooling and a projection.

    ``pool="mean"`` averages each feature map over the image, which keeps what is seen but not where;
    ``"spatial_softmax"`` keeps each map's (x, y) keypoint, which precise placing (Square's peg) needs.
    """

    channels: Sequence[int]
    pool: str = "mean"

    @nn.compact
    def __call__(self, image: jax.Array) -> jax.Array:
        x = image.astype(jnp.float32) / 127.5 - 1.0
        for c in self.channels:
            x = nn.relu(nn.Conv(c, (3, 3), strides=(2, 2))(x))
        pooled = SpatialSoftmax()(x) if self.pool == "spatial_softmax" else x.mean(axis=(-3, -2))
        return nn.Dense(128)(pooled)


class ChunkingBC(nn.Module):
    """Normalised state (+ image features) -> MLP -> a chunk of ``chunk_length`` actions in [-1, 1]."""

    hidden: Sequence[int]
    chunk_length: int
    image_keys: Sequence[str] = ()
    image_channels: Sequence[int] = (32, 64, 64)
    image_pool: str = "mean"

    @nn.compact
    def __call__(self, state: jax.Array, images: dict[str, jax.Array]) -> jax.Array:
        feats = [state] + [ImageEncoder(self.image_channels, self.image_pool, name=f"encoder_{k}")(images[k])
                           for k in self.image_keys]
        x = jnp.concatenate(feats, axis=-1)
        for width in self.hidden:
            x = nn.gelu(nn.LayerNorm()(nn.Dense(width)(x)))
        x = nn.Dense(self.chunk_length * ACTION_DIM)(x)
        return jnp.tanh(x).reshape(x.shape[:-1] + (self.chunk_length, ACTION_DIM))


@dataclasses.dataclass
class ChunkDataset:
    """Every demo step t with its target chunk actions[t : t + L] (padded with the episode's last action)."""

    state: np.ndarray  # (T, D) float32
    images: dict[str, np.ndarray]  # key -> (T, H, W, 3) uint8
    chunks: np.ndarray  # (T, L, 7) float32

    @classmethod
    def from_episodes(cls, episodes, spec: ObsSpec, chunk_length: int) -> "ChunkDataset":
        states, images, chunks = [], {k: [] for k in spec.image_keys}, []
        for ep in episodes:
            flat = flatten_obs(ep.obs, spec)
            n = len(ep.actions)
            idx = np.minimum(np.arange(n)[:, None] + np.arange(chunk_length)[None, :], n - 1)
            states.append(flat["state"])
            chunks.append(np.asarray(ep.actions, np.float32)[idx])
            for k in spec.image_keys:
                images[k].append(flat[k])
        return cls(
            state=np.concatenate(states),
            images={k: np.concatenate(v) for k, v in images.items()},
            chunks=np.concatenate(chunks),
        )


class BCProgress(NamedTuple):
    """Where base-policy training stands: what a checkpoint holds so that a stopped run continues exactly."""

    params: Any
    opt_state: Any
    key: jax.Array
    step: int
    losses: list[float]  # the loss every 100 steps so far


class BCCheckpointer(Protocol):
    """Saves and restores a ``BCProgress`` (``orchestration.pipeline`` keeps one beside the output directory)."""

    def restore(self, fresh: BCProgress) -> BCProgress | None: ...  # ``fresh`` is the template; None: nothing saved

    def save(self, progress: BCProgress) -> None: ...


def train_base_policy(
    dataset: ChunkDataset, spec: ObsSpec, cfg: BaseTrainConfig, progress: bool = True,
    checkpointer: BCCheckpointer | None = None, checkpoint_every_s: float = 300.0,
    should_stop: Callable[[], bool] = lambda: False,
) -> tuple[dict, dict, list[float]]:
    """Train the chunking model; returns (params, normalisation stats, loss curve every 100 steps).

    With a ``checkpointer`` the run continues from its saved progress, saves it every ``checkpoint_every_s`` and
    when stopped (Ctrl-C, or ``should_stop()`` turning true: ``KeyboardInterrupt`` after the save). Image BC of a
    long task takes an hour or more of a CPU; a stopped run loses at most ``checkpoint_every_s`` of it."""
    from tqdm import tqdm

    model = ChunkingBC(cfg.hidden, cfg.chunk_length, spec.image_keys, cfg.image_channels, cfg.image_pool)
    mean = dataset.state.mean(0)
    std = dataset.state.std(0) + 1e-3
    stats = {"state_mean": mean.astype(np.float32), "state_std": std.astype(np.float32)}
    # The arrays go into the jitted step as arguments: closed over, they would be baked into the compiled program
    # as constants, which costs several copies of every demo frame (OOM on NutAssembly's 200 rendered demos).
    data = {"state": jnp.asarray((dataset.state - mean) / std),
            "images": {k: jnp.asarray(v) for k, v in dataset.images.items()},
            "chunks": jnp.asarray(dataset.chunks)}

    key = jax.random.PRNGKey(cfg.seed)
    key, init_key = jax.random.split(key)
    params = model.init(init_key, data["state"][:1], {k: v[:1] for k, v in data["images"].items()})
    schedule = optax.cosine_decay_schedule(cfg.learning_rate, cfg.steps)
    opt = optax.adamw(schedule, weight_decay=cfg.weight_decay)
    opt_state = opt.init(params)

    def loss_fn(p, data, idx, aug_key):
        batch_images = {k: v[idx] for k, v in data["images"].items()}
        if cfg.image_shift:
            keys = jax.random.split(aug_key, max(len(batch_images), 1))
            batch_images = {k: random_shift(kk, v, cfg.image_shift) for kk, (k, v) in zip(keys, batch_images.items())}
        err = model.apply(p, data["state"][idx], batch_images) - data["chunks"][idx]
        return jnp.mean(jnp.abs(err)) if cfg.loss == "l1" else jnp.mean(err**2)

    @jax.jit
    def train_step(p, o, k, data):
        k, idx_key, aug_key = jax.random.split(k, 3)
        idx = jax.random.randint(idx_key, (cfg.batch_size,), 0, data["state"].shape[0])
        loss, grads = jax.value_and_grad(loss_fn)(p, data, idx, aug_key)
        updates, o = opt.update(grads, o, p)
        return optax.apply_updates(p, updates), o, k, loss

    def advance(s: BCProgress) -> BCProgress:
        params, opt_state, key, loss = train_step(s.params, s.opt_state, s.key, data)
        logged = s.step % 100 == 0 or s.step == cfg.steps - 1
        return BCProgress(params, opt_state, key, s.step + 1, s.losses + [float(loss)] if logged else s.losses)

    state = BCProgress(params, opt_state, key, 0, [])
    state = (checkpointer and checkpointer.restore(state)) or state
    bar = tqdm(total=cfg.steps, initial=state.step, desc="base policy", disable=not progress, mininterval=1.0)
    saved_at = time.monotonic()
    try:
        while state.step < cfg.steps:
            if should_stop():
                raise KeyboardInterrupt(f"base-policy training stopped at step {state.step:,} of {cfg.steps:,}")
            previous, state = state, advance(state)  # one assignment: a Ctrl-C leaves ``state`` before or after a step
            # At most one step in flight: JAX dispatches asynchronously, and a loop that ran ahead of the device
            # made a stop wait for every queued step (a minute of image BC on a CPU) and the bar count dispatched steps.
            jax.block_until_ready(previous.key)
            bar.update(1)
            if state.losses and state.step % 100 == 1:
                bar.set_postfix(loss=f"{state.losses[-1]:.4f}")
            if checkpointer and time.monotonic() - saved_at >= checkpoint_every_s:
                checkpointer.save(state)
                saved_at = time.monotonic()
    except KeyboardInterrupt:
        if checkpointer:
            checkpointer.save(state)
        raise
    finally:
        bar.close()
    return state.params, stats, state.losses


def save_base_policy(out_dir: str | Path, params: dict, stats: dict, spec: ObsSpec, cfg: BaseTrainConfig,
                     meta: dict) -> Path:
    """Orbax checkpoint of params + normalisation stats, and a JSON file describing how to rebuild the model."""
    import orbax.checkpoint as ocp

    out = Path(out_dir).absolute()
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / "checkpoint"
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(ckpt, {"params": params, **stats}, force=True)
    (out / "base_policy.json").write_text(
        json.dumps({"obs_spec": json.loads(spec.to_json()), "train": dataclasses.asdict(cfg), **meta}, indent=2)
    )
    return out


class LocalBasePolicy(BasePolicy):
    """A trained chunking model loaded from ``csil-base train``'s output directory."""

    def __init__(self, ckpt_dir: str | Path):
        import orbax.checkpoint as ocp

        compile_cache.enable()
        path = Path(ckpt_dir).absolute()
        meta_file = path / "base_policy.json"
        if not meta_file.exists():
            raise FileNotFoundError(f"{path} is not a base-policy directory (no base_policy.json); "
                                    f"train one with `csil-base train --demos FILE --out {path}`")
        self.meta = json.loads(meta_file.read_text())
        self.spec = ObsSpec.from_json(json.dumps(self.meta["obs_spec"]))
        train = self.meta["train"]
        self.chunk_length = int(train["chunk_length"])
        self.model = ChunkingBC(tuple(train["hidden"]), self.chunk_length, self.spec.image_keys,
                                tuple(train["image_channels"]), train.get("image_pool", "mean"))
        arrays = self.spec.arrays()
        dummy_images = {k: arrays[k].zeros((1,)) for k in self.spec.image_keys}
        dim = self.spec.state_dim
        target = {
            "params": jax.eval_shape(self.model.init, jax.random.PRNGKey(0), np.zeros((1, dim), np.float32), dummy_images),
            "state_mean": np.zeros(dim, np.float32),
            "state_std": np.zeros(dim, np.float32),
        }
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        target = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), target)
        with ocp.StandardCheckpointer() as checkpointer:
            restored = checkpointer.restore(path / "checkpoint", target)
        self.params = restored["params"]
        self.mean = np.asarray(restored["state_mean"], np.float32)
        self.std = np.asarray(restored["state_std"], np.float32)
        self._apply = jax.jit(self.model.apply)

    @property
    def task(self) -> str:
        return self.meta["task"]

    @property
    def metadata(self) -> dict:
        """What a server of this model announces: the chunk shape, the wire spec of a request
        (``observation_spec``: key -> shape, dtype) and where each part comes from (``observation_sources``)."""
        wire = {OPENPI_KEYS[k]: {"shape": list(a.shape), "dtype": a.dtype} for k, a in self.spec.arrays().items()}
        wire["prompt"] = {"shape": [], "dtype": "str"}
        return {"action_horizon": self.chunk_length, "action_dim": ACTION_DIM, "observation_spec": wire,
                "observation_sources": BaseObsSpec.of_local(self.spec).to_metadata(), "task": self.task}

    def _stack(self, observations: Sequence[dict]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Validate and batch openpi-style observations; wrong keys or shapes name the problem."""
        wire = {"state": OPENPI_KEYS["state"], **{k: OPENPI_KEYS[k] for k in self.spec.image_keys}}
        arrays = self.spec.arrays()
        out = {}
        for ours, theirs in wire.items():
            try:
                batch = np.stack([np.asarray(o[theirs]) for o in observations])
            except KeyError:
                raise ValueError(f"observation lacks {theirs!r}; this base policy needs {sorted(wire.values())}")
            except ValueError as exc:
                raise ValueError(f"observations in the batch disagree in {theirs!r} shape: {exc}")
            if batch.shape[1:] != arrays[ours].shape:
                raise ValueError(f"{theirs!r} has shape {batch.shape[1:]}, expected {arrays[ours].shape}")
            out[ours] = batch
        state = (out.pop("state").astype(np.float32) - self.mean) / self.std
        return state, {k: v.astype(np.uint8) for k, v in out.items()}

    def infer_batch(self, observations: Sequence[dict]) -> np.ndarray:
        """(B, chunk_length, 7) float32 actions. Batches are padded to a power of two to bound recompiles."""
        n = len(observations)
        state, images = self._stack(observations)
        padded = 1 << max(0, (n - 1).bit_length())
        pad = lambda x: np.concatenate([x, np.repeat(x[-1:], padded - n, 0)]) if padded > n else x  # noqa: E731
        actions = self._apply(self.params, pad(state), {k: pad(v) for k, v in images.items()})
        return np.asarray(actions[:n], np.float32)

    def infer(self, obs: dict) -> dict:
        return {"actions": self.infer_batch([obs])[0]}
