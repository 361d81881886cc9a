"""The online replay on the learner's device (``csil-launch --replay-on-device``): what keeps a fast learner fed.

Sampling a transition out of Reverb costs ~20 µs of host CPU, and one env step's update (UTD 4 × batch 128) samples
512 of them: ~140 env steps/s per core (results/learner.md), less than half of what one H200 update consumes.
Here Reverb's ``online`` table is a FIFO queue that hands each new transition to the learner once; the learner
appends it to this ring (the newest ``capacity`` transitions, on its device) and draws the 512 per env step there,
inside jitted code. So a transition crosses Reverb and the host-to-device link once, not ~512 / 4 times.

The ring keeps Reverb's semantics: uniform sampling with replacement over what it holds, the oldest dropped first
at capacity. It is part of the learner's checkpoint (``state``/``load``); transitions the learner had not drained
yet stay in the Reverb checkpoint.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from learner.batch import Batch, DemoPool, sample_demos

MIN_BLOCK = 8  # appends are padded to a power of two ≥ this many rows: a handful of compiled shapes, not one per n
INITIAL_ROWS = 1024  # allocated at first; doubled as transitions come


def single_samples(items: list[dict]) -> Batch:
    """Replay samples of one transition each (``BatchIterator`` with batch 1, UTD 1: shaped (1, 1, ...)) as one
    Batch with a leading transition axis, oldest first: what ``DeviceReplay.append`` takes."""
    return Batch.from_sample(jax.tree_util.tree_map(
        lambda *xs: np.concatenate([x.reshape(-1, *x.shape[2:]) for x in xs]), *items))


@functools.partial(jax.jit, donate_argnums=0)  # in place: no copy of the whole ring per append
def _write(pool: DemoPool, rows: jax.Array, block: Batch) -> DemoPool:
    """``block``'s transitions into rows ``rows`` of ``pool`` (their next_obs one pool length further down its
    frames); out-of-range rows (padding) are dropped."""
    length = pool.action.shape[0]

    def put(column, values, at=rows):
        return column.at[at].set(values, mode="drop")

    frames = jax.tree_util.tree_map(lambda f, o, n: put(put(f, o), n, rows + length), pool.frames, block.obs,
                                    block.next_obs)
    return pool._replace(frames=frames, action=put(pool.action, block.action),
                         discount=put(pool.discount, block.discount),
                         next_action=put(pool.next_action, block.next_action))


@functools.partial(jax.jit, static_argnums=2)
def _draw(pool: DemoPool, keys: jax.Array, shape: tuple[int, ...], size: jax.Array) -> Batch:
    """``sample_demos`` with keys folded into keys of its own."""
    own = jax.vmap(lambda key: jax.random.fold_in(key, 1))(keys.reshape(-1, keys.shape[-1])).reshape(keys.shape)
    return sample_demos(pool, own, shape, size)


class DeviceReplay:
    """The newest ``capacity`` online transitions on the device, stored as a ``DemoPool`` (obs in rows
    [0, rows), next_obs in [rows, 2 rows)), so ``sample_demos`` draws from it as from the demos. The rows double as
    transitions come, up to ``capacity``: memory follows what it holds (250k image transitions are ~21 GB)."""

    def __init__(self, capacity: int, example: Batch):
        """``example``: one transition (host arrays, no leading axis) that fixes every column's shape and dtype."""
        if capacity < 1:
            raise ValueError(f"a device replay needs a capacity of at least 1 transition, not {capacity}")
        self.capacity = capacity
        self.rows = min(capacity, INITIAL_ROWS)  # allocated

        def zeros(x, rows=self.rows):
            x = np.asarray(x)
            return jnp.zeros((rows, *x.shape), x.dtype)

        index = jnp.arange(self.rows, dtype=jnp.int32)
        self.pool = DemoPool(jax.tree_util.tree_map(lambda x: zeros(x, 2 * self.rows), example.obs), index,
                             index + self.rows, zeros(example.action), zeros(example.discount),
                             zeros(example.next_action))
        self.size = 0  # transitions held
        self.position = 0  # the row the next transition goes to (rows fill from 0; once full, the oldest's)
        self.added = 0  # transitions appended since the run began (checkpoints included)

    def __len__(self) -> int:
        return self.size

    def append(self, block: Batch) -> None:
        """Transitions with a leading axis (host arrays), oldest first."""
        n = len(block.action)
        if n > self.capacity:  # only the newest fit
            block = jax.tree_util.tree_map(lambda x: x[n - self.capacity:], block)
            self.added += n - self.capacity
            n = self.capacity
        while self.rows < min(self.capacity, self.size + n):
            self._grow(min(self.capacity, 2 * self.rows))
        padded = max(MIN_BLOCK, 1 << (n - 1).bit_length())
        rows = np.full(padded, 2 * self.rows, np.int32)  # out of range: dropped
        rows[:n] = (self.position + np.arange(n)) % self.capacity  # below self.rows: it grows before it wraps
        block = jax.tree_util.tree_map(lambda x: np.concatenate([x, np.zeros((padded - n, *x.shape[1:]), x.dtype)]),
                                       block)
        self.pool = _write(self.pool, rows, block)
        self.added += n
        self.size = min(self.capacity, self.size + n)
        self.position = (self.position + n) % self.capacity

    def _grow(self, rows: int) -> None:
        """``rows`` rows, the held transitions (rows [0, size): it has not wrapped yet) copied over."""
        old, held = self.pool, self.rows

        def widen(x):
            return jnp.zeros((rows, *x.shape[1:]), x.dtype).at[:held].set(x)

        index = jnp.arange(rows, dtype=jnp.int32)
        self.pool = DemoPool(jax.tree_util.tree_map(lambda f: jnp.concatenate([widen(f[:held]), widen(f[held:])]),
                                                    old.frames),
                             index, index + rows, widen(old.action), widen(old.discount), widen(old.next_action))
        self.rows = rows

    def sample(self, keys: jax.Array, shape: tuple[int, ...]) -> Batch:
        """Per key a batch of ``shape`` drawn uniformly with replacement from what the ring holds, independent of
        ``sample_demos``' draws with the same keys (the learner draws both halves of an update from one key)."""
        if self.size == 0:
            raise ValueError("the device replay is empty: nothing to sample")
        return _draw(self.pool, keys, shape, jnp.int32(self.size))

    # --- checkpoints ------------------------------------------------------------------------------------

    def state(self) -> dict[str, np.ndarray]:
        """What it holds, oldest first, as named host arrays (``obs/<key>``, ``action``, ...) and the count
        ``added``: the learner checkpoint's ``arrays``."""
        order = (self.position - self.size + np.arange(self.size)) % self.capacity
        pool = jax.device_get(self.pool)
        out = {"added": np.int64(self.added), "action": pool.action[order], "discount": pool.discount[order],
               "next_action": pool.next_action[order]}
        for key, frames in pool.frames.items():
            out[f"obs/{key}"], out[f"next_obs/{key}"] = frames[order], frames[order + self.rows]
        return out

    @staticmethod
    def transitions(state: dict[str, np.ndarray]) -> Batch:
        """The transitions of a ``state()``, oldest first."""
        obs = {k.split("/", 1)[1]: v for k, v in state.items() if k.startswith("obs/")}
        return Batch(obs, state["action"], state["discount"], {k: state[f"next_obs/{k}"] for k in obs},
                     state["next_action"])

    @classmethod
    def from_state(cls, capacity: int, state: dict[str, np.ndarray]) -> DeviceReplay:
        """A device replay of ``capacity`` holding a ``state()``."""
        replay = cls(capacity, jax.tree_util.tree_map(lambda x: x[0], cls.transitions(state)))
        replay.load(state)
        return replay

    def load(self, state: dict[str, np.ndarray]) -> None:
        """Replace the contents with a ``state()`` (a smaller capacity keeps the newest that fit)."""
        transitions = self.transitions(state)
        self.size, self.position, self.added = 0, 0, int(state["added"]) - len(transitions.action)
        if len(transitions.action):
            self.append(transitions)
