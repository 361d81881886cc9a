"""The learner without transport: pretraining, the fused update, parameters, checkpoints.

Updates take the online half of their batches from the caller; the demo half is drawn on the device from the demos
it holds there (``learner.batch.sample_demos``).

The single-process trainer (``csil-train``) calls it directly; the Ray learner service (``learner.service``)
wraps it with Reverb input, weight publishing and metrics. Both pretrain, update and checkpoint the same way.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from csil import compile_cache, seeds
from csil.config import AgentConfig
from csil.specs import ObsSpec
from learner.agent import AgentState, CSILAgent
from learner.batch import Batch, sample_demos
from learner.checkpoint import numbered_checkpoints, read_arrays, restore_checkpoint, save_checkpoint
from learner.device_replay import DeviceReplay
from learner.pretrain import DemoTransitions, initial_atoms, pretrain_bc, pretrain_critic

KEEP_CHECKPOINTS = 2
MAX_CONSECUTIVE_SKIPS = 50  # non-finite updates in a row (each dropped) before the learner gives up


class LearnerCore:
    """One agent's state and the operations on it. ``updates`` counts fused updates (one per env step)."""

    def __init__(self, cfg: AgentConfig, spec: ObsSpec, demos: DemoTransitions, seed: int,
                 dump_dir: str | Path | None = None, device_replay: int = 0):
        compile_cache.enable()  # a restarted learner loads its compiled updates
        self.cfg, self.spec, self.seed = cfg, spec, seed
        self.demos = demos
        self.dump_dir = dump_dir  # where a diverged learner leaves what reproduces its failing update
        self.agent = CSILAgent(cfg, spec)
        self.key = jax.random.PRNGKey(seeds.learner_key_seed(seed))
        self.state: AgentState | None = None
        self.updates = 0
        self.skipped_updates, self.consecutive_skips, self.last_metrics = 0, 0, None
        self.device_replay = device_replay  # capacity of the online replay on the device (0: the caller feeds batches)
        self.online: DeviceReplay | None = None

    @property
    def demos(self) -> DemoTransitions:
        return self._demos

    @demos.setter
    def demos(self, demos: DemoTransitions) -> None:
        """New demos (residual mode's targets) are put on the device at the next update."""
        self._demos, self._demo_pool = demos, None

    def _demo_batches(self, keys: jax.Array) -> Batch:
        """One demo batch (utd, batch_size) per key, drawn on the device."""
        if self._demo_pool is None:
            self._demo_pool = self._demos.on_device()
        return sample_demos(self._demo_pool, keys, (self.cfg.utd, self.cfg.batch_size))

    @property
    def pretrain_steps(self) -> int:
        return self.cfg.bc_steps + self.cfg.critic_pretrain_steps

    def pretrain(self, progress: bool = False, on_step: Callable[[int], None] | None = None,
                 should_stop: Callable[[], bool] | None = None) -> dict:
        """BC (the policy, the KL anchor, the initial reward), the critic's atoms and SARSA critic pretraining
        (none for XQC+OD). ``on_step(n)`` reports BC + critic steps done; ``should_stop`` interrupts
        (``learner.pretrain.PretrainingStopped``)."""
        cfg = self.cfg
        self.key, bc_key, critic_key = jax.random.split(self.key, 3)

        def report(offset: int):
            return None if on_step is None else (lambda record: on_step(offset + record["step"] + 1))

        bc, bc_log = pretrain_bc(self.agent, self.demos, bc_key, cfg.bc_steps, progress, report(0), should_stop)
        state = self.agent.init_state(critic_key, bc, atoms=initial_atoms(self.agent, bc, self.demos))
        self.state, critic_log = pretrain_critic(self.agent, state, self.demos, cfg.critic_pretrain_steps,
                                                 seed=self.seed, progress=progress, on_log=report(cfg.bc_steps),
                                                 should_stop=should_stop)
        return {"bc": bc_log[-1], "critic": critic_log[-1] if critic_log else None}

    def step(self, online: Batch) -> dict:
        """One fused update (UTD critic steps + one actor step) on ``online`` (utd, batch_size) and a demo batch
        drawn on the device; its metrics stay on the device until read."""
        return self.step_many([online])

    def step_many(self, online: list[Batch]) -> dict:
        """``len(online)`` fused updates in one call (``CSILAgent.update_many``): the same updates, keys and demo
        batches included, as that many ``step`` calls; metrics are the last update's."""
        return self._fused(len(online), lambda keys: online[0] if len(online) == 1 else Batch.stack(online))

    def add_online(self, transitions: Batch) -> None:
        """New online transitions (leading axis: transition) for ``step_on_device``, into the device replay of
        ``device_replay`` transitions (created at the first call)."""
        if self.online is None:
            self.online = DeviceReplay(self.device_replay, jax.tree_util.tree_map(lambda x: x[0], transitions))
        self.online.append(transitions)

    @property
    def online_added(self) -> int:
        """Online transitions the device replay was given since the run began (checkpoints included)."""
        return 0 if self.online is None else self.online.added

    def step_on_device(self, count: int) -> dict:
        """``count`` fused updates whose online half is drawn from the device replay (``add_online``), like the
        demo half: no batch crosses the host."""
        shape = (self.cfg.utd, self.cfg.batch_size)
        return self._fused(count, lambda keys: self.online.sample(keys, shape))

    def _fused(self, count: int, online_for: Callable[[jax.Array], Batch]) -> dict:
        """``count`` updates in one call: ``online_for(keys)`` gives their online halves from the keys their demo
        halves are drawn with (one per update, or one key and one half when ``count`` is 1)."""
        keys, demo_keys = [], []
        for _ in range(count):
            self.key, key, demo_key = jax.random.split(self.key, 3)
            keys.append(key)
            demo_keys.append(demo_key)
        if count == 1:
            online, demos, key = online_for(demo_keys[0]), self._demo_batches(demo_keys[0]), keys[0]
            self.state, metrics = self.agent.update(self.state, online, demos, key)
            last = {"online": online, "demos": demos, "key": key}
        else:
            demo_keys = jnp.stack(demo_keys)
            online, demos = online_for(demo_keys), self._demo_batches(demo_keys)
            self.state, metrics = self.agent.update_many(self.state, online, demos, jnp.stack(keys))
            last = jax.tree_util.tree_map(lambda x: x[-1], {"online": online, "demos": demos}) | {"key": keys[-1]}
        self.updates += count
        return self._count_skips(metrics, count, lambda: last)

    def _count_skips(self, metrics: dict, calls: int, last_update: Callable[[], dict]) -> dict:
        """Updates the agent dropped as non-finite (``CSILAgent._update``): counted (metric ``skipped_updates``),
        a FloatingPointError once ``MAX_CONSECUTIVE_SKIPS`` in a row were; a call whose last update was dropped
        returns the metrics of the last one applied. Reads one scalar per call (a device sync)."""
        skipped = int(metrics.pop("skipped"))
        self.skipped_updates += skipped
        self.consecutive_skips = self.consecutive_skips + skipped if skipped == calls else 0
        if self.consecutive_skips >= MAX_CONSECUTIVE_SKIPS:
            dumped = self._dump(last_update())
            raise FloatingPointError(
                f"the learner diverged: {self.consecutive_skips} updates in a row up to update {self.updates} came "
                f"out non-finite and were dropped (last applied metrics: {self.last_metrics})"
                + (f"; the state, batches and key of the last one are in {dumped}" if dumped else ""))
        if skipped and self.last_metrics is not None and not all(np.isfinite(float(v)) for v in metrics.values()):
            metrics = self.last_metrics
        self.last_metrics = metrics
        return {**metrics, "skipped_updates": self.skipped_updates}

    def _dump(self, update: dict) -> Path | None:
        """``dump_dir/state`` (the last finite agent state: a learner checkpoint, ``restore_checkpoint``) and
        ``dump_dir/update.pkl`` (a dropped update's ``online`` and ``demos`` batches and ``key``, as numpy): with
        them ``CSILAgent.update(state, online, demos, key)`` reproduces a non-finite update offline."""
        if self.dump_dir is None:
            return None
        path = Path(self.dump_dir)
        save_checkpoint(path / "state", self.state, {"updates": self.updates})
        with open(path / "update.pkl", "wb") as f:
            pickle.dump(jax.device_get(update), f)
        return path

    def policy_params(self):
        """The small policy's parameters on the host (what actors and the evaluator act with)."""
        return jax.device_get(self.state.policy)

    # --- checkpoints ----------------------------------------------------------------------------------

    def save(self, directory: str | Path, **counters) -> Path:
        """``<directory>/<updates>``: the whole agent state, the device replay's transitions (if it holds them),
        ``updates`` and ``counters``; keeps the newest two."""
        path, record = Path(directory) / str(self.updates), {"updates": self.updates, **counters}
        if (path / "record.json").exists() and self.online is None:  # no update since: newer counters (warmup)
            partial = path / "record.json.partial"
            partial.write_text(json.dumps(record))
            partial.rename(path / "record.json")
        else:
            save_checkpoint(path, self.state, record, self.online.state() if self.online is not None else None)
        for old in numbered_checkpoints(directory)[:-KEEP_CHECKPOINTS]:
            shutil.rmtree(old, ignore_errors=True)
        return path

    def restore(self, directory: str | Path) -> dict:
        """The newest checkpoint under ``directory``; returns its counters (``updates`` and what ``save`` got)."""
        found = numbered_checkpoints(directory)
        if not found:
            raise FileNotFoundError(f"no learner checkpoint under {directory}")
        key = jax.random.PRNGKey(0)
        template = self.agent.init_state(key, self.agent.init_policy(key))
        self.state, counters = restore_checkpoint(found[-1], template)
        self.updates = counters["updates"]
        online = read_arrays(found[-1]) if self.device_replay else None
        self.online = None if online is None else DeviceReplay.from_state(self.device_replay, online)
        return counters


def finite_metrics(metrics: dict, updates: int) -> dict[str, float]:
    """The metrics as floats; a FloatingPointError naming the non-finite ones otherwise."""
    record = {k: float(v) for k, v in metrics.items()}
    bad = [k for k, v in record.items() if not np.isfinite(v)]
    if bad:
        raise FloatingPointError(f"non-finite learner metrics {bad} at update {updates}: {record}")
    return record
