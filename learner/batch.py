"""What an update eats: ``Batch``, transitions as the learner consumes them, and ``DemoPool``, transitions held on the
learner's device with each observation once, from which ``sample_demos`` draws batches without crossing the host
(the demo half of every update, and the online half with ``learner.device_replay``)."""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from csil.specs import Transition

Obs = dict[str, jax.Array]


class Batch(NamedTuple):
    """Transitions as the learner consumes them; ``discount`` is 0 at terminal (success) steps, else 1."""

    obs: Obs
    action: jax.Array  # the small policy's own action a_pi (pre-combination)
    discount: jax.Array
    next_obs: Obs
    next_action: jax.Array  # the next demo action (SARSA pretraining); unused online

    @staticmethod
    def from_sample(sample: Transition | dict) -> "Batch":
        """A replay sample (``replay.dataset.BatchIterator``'s dict of ``Transition`` fields) as the learner's Batch."""
        if isinstance(sample, Transition):
            sample = sample._asdict()
        return Batch(sample["obs"], sample["action"], sample["discount"], sample["next_obs"], sample["next_action"])

    @staticmethod
    def stack(batches: list["Batch"]) -> "Batch":
        """K batches as one with a leading K axis (on the host): the input of ``CSILAgent.update_many``."""
        return jax.tree_util.tree_map(lambda *xs: np.stack(xs), *batches)

    @staticmethod
    def concat(a: "Batch", b: "Batch", axis: int = 0) -> "Batch":
        return jax.tree_util.tree_map(lambda x, y: jnp.concatenate([x, y], axis=axis), a, b)


class DemoPool(NamedTuple):
    """Transitions held on the device with each observation once: transition i is (frames[obs_row[i]], action[i],
    discount[i], frames[next_row[i]], next_action[i]). Within a demo, next_obs of step t is obs of step t + 1, so
    camera frames take half the memory of an obs + next_obs layout (``learner.pretrain.DemoTransitions.on_device``)."""

    frames: Obs
    obs_row: jax.Array
    next_row: jax.Array
    action: jax.Array
    discount: jax.Array
    next_action: jax.Array

    @staticmethod
    def of(batch: Batch) -> "DemoPool":
        """A flat batch (leading axis: transition) as a pool that stores obs and next_obs both (no sharing)."""
        n = len(batch.action)
        frames = jax.tree_util.tree_map(lambda a, b: np.concatenate([a, b]), batch.obs, batch.next_obs)
        rows = np.arange(n, dtype=np.int32)
        return DemoPool(frames, rows, rows + n, batch.action, batch.discount, batch.next_action)


@functools.partial(jax.jit, static_argnums=2)
def sample_demos(pool: DemoPool, keys: jax.Array, shape: tuple[int, ...], size: jax.Array | None = None) -> Batch:
    """A batch of ``shape`` transitions drawn uniformly with replacement from ``pool`` per key: ``keys`` of shape
    (..., 2) give batches of shape (..., *shape), each from its own key. How the learner's demo half never crosses
    the host. ``size``: draw from the first ``size`` transitions only (a pool still filling:
    ``learner.device_replay``); every one by default."""
    n = pool.action.shape[0] if size is None else size
    draws = jax.vmap(lambda k: jax.random.randint(k, shape, 0, n))(keys.reshape(-1, keys.shape[-1]))
    index = draws.reshape(keys.shape[:-1] + shape)

    def frames(rows: jax.Array) -> Obs:
        return jax.tree_util.tree_map(lambda x: x[rows[index]], pool.frames)

    return Batch(frames(pool.obs_row), pool.action[index], pool.discount[index], frames(pool.next_row),
                 pool.next_action[index])
