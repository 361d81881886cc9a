"""``csil-bench learner``: fused-update throughput on device-resident batches vs. the same update fed by Reverb.

The question is whether the learner's input path (Reverb sampling → tf.data batching → prefetch thread → numpy →
host-to-device copy) keeps up with the jitted update, i.e. whether training is compute-bound as it should be.
Both paths run the same ``agent.update`` on the same agent state in one process, in interleaved rounds (the
machines here are noisy, so only same-run ratios mean anything), and the medians are reported:

- ``synthetic``: one random batch put on the device once and reused; nothing but the update runs.
- ``reverb``: a real in-process ``ReplayServer`` filled with random transitions, read through two
  ``BatchIterator``s (online and demos) exactly as ``orchestration.trainer`` reads them.
- ``input_only``: the reverb path without the update (next() on both iterators + device_put), i.e. how many
  batches per second the input path can deliver when it has the machine to itself.

The online table's rate limiter is configured so that it never blocks: this measures the input path, not the
UTD control (in training the limiter deliberately holds the learner back to the actors' pace).
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import time
from collections.abc import Callable

import jax
import numpy as np
from tqdm import tqdm

from csil import compile_cache
from csil.config import SIZES as PRESET_SIZES
from csil.config import AgentConfig, ReplayConfig, agent_config
from csil.specs import CAMERAS, DEMO_TABLE, ONLINE_TABLE, PROPRIO_KEYS, STATE_KEYS, ObsSpec, Transition
from learner.agent import Batch, CSILAgent
from replay.server import BatchIterator, ReplayServer, TransitionWriter

# Lift's state layout (eef pos, eef quat, gripper qpos, 10-d object state: 19-d); image mode keeps the proprio part.
WIDTHS = {"robot0_eef_pos": 3, "robot0_eef_quat": 4, "robot0_gripper_qpos": 2, "object": 10}
SIZES = (*PRESET_SIZES, "tiny")  # tiny: smoke tests only


def obs_spec(obs_mode: str) -> ObsSpec:
    """State: Lift's 19-d low-dim vector. Image: proprio state plus both cameras at 84x84."""
    if obs_mode == "state":
        return ObsSpec("state", tuple((k, WIDTHS[k]) for k in STATE_KEYS))
    if obs_mode == "image":
        return ObsSpec("image", tuple((k, WIDTHS[k]) for k in PROPRIO_KEYS), cameras=CAMERAS)
    raise ValueError(f"unknown obs mode {obs_mode!r}; use 'state' or 'image'")


def bench_agent_config(size: str, algo: str = "csil++", batch_size: int | None = None, utd: int | None = None,
                       unroll_utd: bool | None = None) -> AgentConfig:
    """``csil.config.agent_config`` (sizes paper, cpu or tiny); ``batch_size``, ``utd`` and ``unroll_utd``
    override the preset (so ``--utd`` also applies to vanilla CSIL's UTD 1)."""
    cfg = agent_config(algo, size)
    overrides = {"batch_size": batch_size, "utd": utd, "unroll_utd": unroll_utd}
    return dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None})


def random_transitions(spec: ObsSpec, n: int, rng: np.random.Generator) -> Transition:
    """``n`` transitions in the replay signature's layout; actions stay inside (-1, 1) where tanh policies have
    finite log-densities, and about 2% are terminal so both branches of the TD target are exercised."""

    def obs() -> dict[str, np.ndarray]:
        out = {"state": rng.standard_normal((n, spec.state_dim), np.float32)}
        for key in spec.image_keys:
            out[key] = rng.integers(0, 256, (n, spec.image_size, spec.image_size, 3), np.uint8)
        return out

    def actions() -> np.ndarray:
        return rng.uniform(-0.9, 0.9, (n, 7)).astype(np.float32)

    discount = (rng.random(n) > 0.02).astype(np.float32)
    return Transition(obs=obs(), action=actions(), base_action=actions(), reward=1.0 - discount, discount=discount,
                      next_obs=obs(), next_action=actions(), policy_version=np.zeros(n, np.int64),
                      episode_id=np.arange(n, dtype=np.int64))


def _batch(transitions: Transition, utd: int, batch_size: int) -> Batch:
    """The first utd x batch_size transitions as a Batch with leading (utd, batch_size) dims."""
    def shape(x: np.ndarray) -> np.ndarray:
        return x[:utd * batch_size].reshape(utd, batch_size, *x.shape[1:])

    return Batch.from_sample(jax.tree_util.tree_map(shape, transitions))


def bench_learner(obs_mode: str, updates: int, size: str, algo: str = "csil++", batch_size: int | None = None,
                  utd: int | None = None, rounds: int = 3, warmup: int = 3, items: int = 2048, seed: int = 0,
                  unroll_utd: bool | None = None, progress: bool = True, fuse: int = 1) -> dict:
    """Env steps/s and critic updates/s of the fused update, synthetic vs. Reverb-fed; see the module docstring.

    One fused update is one env step (``utd`` critic updates and one actor update), so env steps/s = updates/s
    and critic updates/s = ``utd`` x that. Each path first runs ``warmup`` untimed updates (compilation, first
    Reverb streams), then ``rounds`` rounds of ``updates`` timed updates each, alternating paths. ``items``
    random transitions fill each table (sampled uniformly with replacement, so the count barely matters).
    ``fuse`` > 1 runs that many env steps' updates per call (``CSILAgent.update_many``); rates stay per env step.
    """
    spec, cfg = obs_spec(obs_mode), bench_agent_config(size, algo, batch_size, utd, unroll_utd)
    agent = CSILAgent(cfg, spec)
    rng = np.random.default_rng(seed)
    key, init_key = jax.random.split(jax.random.PRNGKey(seed))
    state = agent.init_state(init_key, agent.init_policy(init_key))
    # Keys are split up front so that neither timed loop pays for it.
    keys = list(jax.random.split(key, max(updates, warmup)))
    n = cfg.utd * cfg.batch_size
    if items < n:
        raise ValueError(f"items={items} is less than one update's utd x batch_size = {n} samples per table")
    stack = lambda batches: jax.tree_util.tree_map(lambda *xs: np.stack(xs), *batches)  # noqa: E731
    synthetic = jax.device_put(tuple(stack([_batch(random_transitions(spec, n, rng), cfg.utd, cfg.batch_size)
                                            for _ in range(fuse)]) for _ in range(2)))
    fused_keys = [jax.random.split(k, fuse) for k in keys]

    def update(online_batch: Batch, demo_batch: Batch, i: int) -> dict:
        """One call: ``fuse`` env steps' worth (stacked batches) or one update."""
        nonlocal state
        if fuse == 1:
            state, metrics = agent.update(state, jax.tree_util.tree_map(lambda x: x[0], online_batch),
                                          jax.tree_util.tree_map(lambda x: x[0], demo_batch), keys[i])
        else:
            state, metrics = agent.update_many(state, online_batch, demo_batch, fused_keys[i])
        return metrics

    # spi 1 with an error buffer of 1e9 samples: inserts and samples never wait on each other.
    replay_cfg = ReplayConfig(online_size=items, samples_per_insert=1.0, min_size=1, error_buffer_fraction=1e9)
    bar = tqdm(total=2 * warmup + rounds * 3 * updates, desc=f"learner bench ({obs_mode}, {size})", unit="update",
               file=sys.stderr, disable=not progress, mininterval=1.0)
    with ReplayServer(replay_cfg, spec, num_demo_transitions=items) as server:
        bar.set_postfix_str("filling replay")
        for table in (ONLINE_TABLE, DEMO_TABLE):
            with TransitionWriter(server.address, table) as writer:
                writer.write_batch(random_transitions(spec, items, rng))
        online = BatchIterator(server.address, ONLINE_TABLE, cfg.batch_size, cfg.utd, spec)
        demos = BatchIterator(server.address, DEMO_TABLE, cfg.batch_size, cfg.utd, spec)

        def timed(count: int, step: Callable[[int], object]) -> float:
            """Updates (or batches) per second of ``count`` calls of ``step``, waiting for the device at both ends."""
            jax.block_until_ready(state)
            start = time.perf_counter()
            out = None
            for i in range(count):
                out = step(i)
                bar.update(1)
            jax.block_until_ready(out)
            return count / (time.perf_counter() - start)

        def synthetic_step(i: int) -> dict:
            return update(*synthetic, i)

        def sampled() -> tuple[Batch, Batch]:
            return tuple(stack([Batch.from_sample(next(it)) for _ in range(fuse)]) for it in (online, demos))

        def reverb_step(i: int) -> dict:
            return update(*sampled(), i)

        def input_step(i: int) -> tuple:
            return jax.device_put(sampled())

        bar.set_postfix_str("compiling")
        timed(warmup, synthetic_step)
        timed(warmup, reverb_step)
        rates: dict[str, list[float]] = {"synthetic": [], "reverb": [], "input_only": []}
        for r in range(rounds):
            bar.set_postfix_str(f"round {r + 1}/{rounds}")
            rates["synthetic"].append(timed(updates, synthetic_step))
            rates["reverb"].append(timed(updates, reverb_step))
            rates["input_only"].append(timed(updates, input_step))
        online.close()
        demos.close()
    bar.close()

    med = {name: fuse * statistics.median(values) for name, values in rates.items()}  # per env step

    def throughput(rate: float) -> dict:
        return {"env_steps_per_s": round(rate, 3), "critic_updates_per_s": round(cfg.utd * rate, 3),
                "ms_per_update": round(1000 / rate, 2)}

    return {"bench": "learner", "obs": obs_mode, "size": size, "algo": algo, "batch_size": cfg.batch_size,
            "utd": cfg.utd, "fuse": fuse, "updates": updates, "rounds": rounds, "items": items,
            "synthetic": throughput(med["synthetic"]), "reverb": throughput(med["reverb"]),
            "input_only": {"batches_per_s": round(med["input_only"], 3)},
            "ratio": round(med["reverb"] / med["synthetic"], 4), "device": jax.devices()[0].platform}


def bare_update_rate(cfg: AgentConfig, spec: ObsSpec, updates: int = 50, warmup: int = 3, seed: int = 0,
                     max_s: float = 60.0) -> float:
    """Fused updates per second on one device-resident random batch: the learner with nothing else to do.
    ``updates`` timed updates, or as many (at least 2) as fit in ``max_s`` seconds (image updates on a CPU take
    seconds each). Compiled through the persistent cache, so a learner started next with the same config loads
    it instead of compiling again (an image update takes minutes to compile on a CPU)."""
    compile_cache.enable()
    agent = CSILAgent(cfg, spec)
    rng = np.random.default_rng(seed)
    key = jax.random.PRNGKey(seed)
    state = agent.init_state(key, agent.init_policy(key))
    batches = jax.device_put(tuple(_batch(random_transitions(spec, cfg.utd * cfg.batch_size, rng), cfg.utd,
                                          cfg.batch_size) for _ in range(2)))
    for _ in range(warmup):
        state, _ = agent.update(state, *batches, key)
    jax.block_until_ready(state)
    start, done = time.perf_counter(), 0
    while done < updates and (done < 2 or time.perf_counter() - start < max_s):
        state, _ = agent.update(state, *batches, key)
        jax.block_until_ready(state)
        done += 1
    return done / (time.perf_counter() - start)
