"""``csil-bench learner``: fused-update throughput on device-resident batches vs. the same update fed by Reverb.

The question is whether the learner's input path (Reverb sampling → tf.data batching → prefetch thread → numpy →
host-to-device copy) keeps up with the jitted update, i.e. whether training is compute-bound as it should be.
Both paths run the same ``agent.update`` on the same agent state in one process, in interleaved rounds (the
machines here are noisy, so only same-run ratios mean anything), and the medians are reported:

- ``synthetic``: one random batch put on the device once and reused; nothing but the update runs.
- ``reverb``: the learner's own input: online batches from a real in-process ``ReplayServer`` filled with random
  transitions, read through a ``BatchIterator`` exactly as ``orchestration.trainer`` reads them, and demo batches
  drawn on the device from a pool of random transitions there (``learner.batch.sample_demos``).
- ``input_only``: the host's part of the reverb path without the update (next() on the iterator + device_put),
  i.e. how many env steps' worth of batches per second the input path delivers when it has the machine to itself.

``--replay-on-device`` measures the learner's other input path (``learner.device_replay``): per env step one new
transition drained from Reverb's queue into the device replay, and the online batch drawn there. The ``reverb``
path is then the update fed that way, and ``input_only`` that drain, append and draw without the update.

The online table's rate limiter is configured so that it never blocks: this measures the input path, not the
UTD control (in training the limiter deliberately holds the learner back to the actors' pace).
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable

import jax
import numpy as np
from tqdm import tqdm

from csil.config import SIZES as PRESET_SIZES
from csil.config import ReplayConfig
from csil.specs import ONLINE_TABLE
from learner.agent import CSILAgent
from learner.batch import Batch, DemoPool, sample_demos
from learner.device_replay import DeviceReplay, single_samples
from learner.throughput import bench_agent_config, obs_spec, random_transitions, random_update_inputs
from replay.server import BatchIterator, ReplayServer, TransitionWriter

SIZES = (*PRESET_SIZES, "tiny")  # tiny: smoke tests only


def bench_learner(obs_mode: str, updates: int, size: str, algo: str = "csil++", batch_size: int | None = None,
                  utd: int | None = None, rounds: int = 3, warmup: int = 3, items: int = 2048, seed: int = 0,
                  unroll_utd: bool | None = None, progress: bool = True, fuse: int = 1,
                  replay_on_device: bool = False) -> dict:
    """Env steps/s and critic updates/s of the fused update, synthetic vs. Reverb-fed; see the module docstring.

    One fused update is one env step (``utd`` critic updates and one actor update), so env steps/s = updates/s
    and critic updates/s = ``utd`` x that. Each path first runs ``warmup`` untimed updates (compilation, first
    Reverb streams), then ``rounds`` rounds of ``updates`` timed updates each, alternating paths. ``items``
    random transitions fill the online table and the demo pool (sampled uniformly with replacement, so the count
    barely matters).
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
        raise ValueError(f"items={items} is less than one update's utd x batch_size = {n} samples")
    synthetic = jax.device_put(random_update_inputs(spec, cfg, rng, fuse))
    fused_keys = [jax.random.split(k, fuse) for k in keys]

    def update(online_batch: Batch, demo_batch: Batch, i: int) -> dict:
        """One call: ``fuse`` env steps' worth (stacked batches) or one update."""
        nonlocal state
        if fuse == 1:
            state, metrics = agent.update(state, online_batch, demo_batch, keys[i])
        else:
            state, metrics = agent.update_many(state, online_batch, demo_batch, fused_keys[i])
        return metrics

    # spi 1 with an error buffer of 1e9 samples: inserts and samples never wait on each other (nor on the queue).
    replay_cfg = ReplayConfig(online_size=items, samples_per_insert=1.0, min_size=1, error_buffer_fraction=1e9,
                              on_device=replay_on_device)
    bar = tqdm(total=2 * warmup + rounds * 3 * updates, desc=f"learner bench ({obs_mode}, {size})", unit="update",
               file=sys.stderr, disable=not progress, mininterval=1.0)
    demo_pool = jax.device_put(DemoPool.of(Batch.from_sample(random_transitions(spec, items, rng))))
    demo_keys = [jax.random.split(k, fuse) if fuse > 1 else k
                 for k in jax.random.split(jax.random.fold_in(key, 1), max(updates, warmup))]
    with ReplayServer(replay_cfg, spec) as server:
        bar.set_postfix_str("filling replay")
        if replay_on_device:  # the ring starts full; every env step drains one new transition from the queue
            ring = DeviceReplay(items, jax.tree_util.tree_map(lambda x: x[0], Batch.from_sample(
                random_transitions(spec, 1, rng))))
            ring.append(Batch.from_sample(random_transitions(spec, items, rng)))
            new_transitions = fuse * (warmup + 2 * rounds * updates)
            online_keys = jax.random.split(jax.random.fold_in(key, 2), max(updates, warmup) * fuse).reshape(
                max(updates, warmup), *((fuse,) if fuse > 1 else ()), -1)
        with TransitionWriter(server.address, ONLINE_TABLE) as writer:
            writer.write_batch(random_transitions(spec, new_transitions if replay_on_device else items, rng))
        if replay_on_device:
            online = BatchIterator(server.address, ONLINE_TABLE, 1, 1, spec, ready_batches=fuse)
        else:
            online = BatchIterator(server.address, ONLINE_TABLE, cfg.batch_size, cfg.utd, spec)

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

        def sampled(i: int) -> Batch:
            if replay_on_device:  # fuse new transitions in, the online half of fuse updates out
                ring.append(single_samples([next(online) for _ in range(fuse)]))
                return ring.sample(online_keys[i], (cfg.utd, cfg.batch_size))
            if fuse == 1:
                return Batch.from_sample(next(online))
            return Batch.stack([Batch.from_sample(next(online)) for _ in range(fuse)])

        def reverb_step(i: int) -> dict:
            return update(sampled(i), sample_demos(demo_pool, demo_keys[i], (cfg.utd, cfg.batch_size)), i)

        def input_step(i: int) -> tuple:
            return jax.device_put(sampled(i))

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
    bar.close()

    med = {name: fuse * statistics.median(values) for name, values in rates.items()}  # per env step

    def throughput(rate: float) -> dict:
        return {"env_steps_per_s": round(rate, 3), "critic_updates_per_s": round(cfg.utd * rate, 3),
                "ms_per_update": round(1000 / rate, 2)}

    return {"bench": "learner", "obs": obs_mode, "size": size, "algo": algo, "batch_size": cfg.batch_size,
            "utd": cfg.utd, "fuse": fuse, "replay_on_device": replay_on_device, "updates": updates, "rounds": rounds,
            "items": items,
            "synthetic": throughput(med["synthetic"]), "reverb": throughput(med["reverb"]),
            "input_only": {"batches_per_s": round(med["input_only"], 3)},
            "ratio": round(med["reverb"] / med["synthetic"], 4), "device": jax.devices()[0].platform}
