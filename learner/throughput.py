"""The bare fused update's throughput on device-resident random batches: what a learner can absorb.

Needs only jax, flax, optax and numpy (no Reverb, Ray or robosuite), so it runs unchanged on a GPU node whose
Python has nothing else: ``python -m learner.throughput --preset gpu`` measures every variant issue 16 asks about
in one run (one JSON line each, then a summary with ratios against the first, today's one-call-per-env-step
update). ``csil-bench learner`` (``orchestration.bench.learner``) compares the same update fed by Reverb.

Per variant it reports env steps/s (one env step = ``utd`` critic steps + 1 actor step), compile time, XLA's
FLOP count of one env step and the number of kernels in the compiled program (fusions, library calls and other
non-trivial instructions of the optimised HLO, loop bodies counted once): on a GPU, where the state update is
bound by per-kernel launch costs rather than arithmetic (``../shared/bench``), that count is the profile.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import time

import jax
import numpy as np

from csil import compile_cache
from csil.config import AgentConfig, agent_config
from csil.specs import CAMERAS, PROPRIO_KEYS, STATE_KEYS, ObsSpec, Transition
from learner.agent import CSILAgent
from learner.batch import Batch, DemoPool, sample_demos

# Lift's state layout (eef pos, eef quat, gripper qpos, 10-d object state: 19-d); image mode keeps the proprio part.
WIDTHS = {"robot0_eef_pos": 3, "robot0_eef_quat": 4, "robot0_gripper_qpos": 2, "object": 10}


def obs_spec(obs_mode: str) -> ObsSpec:
    """State: Lift's 19-d low-dim vector. Image: proprio state plus both cameras at 84x84."""
    if obs_mode == "state":
        return ObsSpec("state", tuple((k, WIDTHS[k]) for k in STATE_KEYS))
    if obs_mode == "image":
        return ObsSpec("image", tuple((k, WIDTHS[k]) for k in PROPRIO_KEYS), cameras=CAMERAS)
    raise ValueError(f"unknown obs mode {obs_mode!r}; use 'state' or 'image'")


def bench_agent_config(size: str, algo: str = "csil++", batch_size: int | None = None, utd: int | None = None,
                       unroll_utd: bool | None = None, compute_dtype: str | None = None) -> AgentConfig:
    """``csil.config.agent_config`` (sizes paper, cpu or tiny); the other arguments override the preset's (so
    ``utd`` also applies to vanilla CSIL's UTD 1; ``compute_dtype`` is the image encoders')."""
    cfg = agent_config(algo, size)
    overrides = {"batch_size": batch_size, "utd": utd, "unroll_utd": unroll_utd}
    cfg = dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    if compute_dtype is not None:
        cfg = dataclasses.replace(cfg, encoder=dataclasses.replace(cfg.encoder, compute_dtype=compute_dtype))
    return cfg


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


def random_batch(transitions: Transition, utd: int, batch_size: int) -> Batch:
    """The first utd x batch_size transitions as a Batch with leading (utd, batch_size) dims."""
    def shape(x: np.ndarray) -> np.ndarray:
        return x[:utd * batch_size].reshape(utd, batch_size, *x.shape[1:])

    return Batch.from_sample(jax.tree_util.tree_map(shape, transitions))


def random_update_inputs(spec: ObsSpec, cfg: AgentConfig, rng: np.random.Generator, fuse: int = 1
                         ) -> tuple[Batch, Batch]:
    """(online, demos) for one ``update`` call, or with ``fuse`` > 1 for one ``update_many`` call (stacked)."""
    def one() -> Batch:
        return random_batch(random_transitions(spec, cfg.utd * cfg.batch_size, rng), cfg.utd, cfg.batch_size)

    if fuse == 1:
        return one(), one()
    return Batch.stack([one() for _ in range(fuse)]), Batch.stack([one() for _ in range(fuse)])


class BareUpdate:
    """One agent, one device-resident random input and the compiled call: ``update`` (one env step) or, with
    ``fuse`` = K > 1, ``update_many`` (K env steps in one call). With ``demo_pool`` > 0 the demo half is drawn
    each call from that many device-resident transitions (``sample_demos``), as the learner does."""

    def __init__(self, cfg: AgentConfig, spec: ObsSpec, fuse: int = 1, seed: int = 0, demo_pool: int = 0):
        compile_cache.enable()  # a learner started next with the same config loads the compiled update
        self.agent, self.fuse = CSILAgent(cfg, spec), fuse
        rng = np.random.default_rng(seed)
        key = jax.random.PRNGKey(seed)
        self.state = self.agent.init_state(key, self.agent.init_policy(key))
        self.inputs = jax.device_put(random_update_inputs(spec, cfg, rng, fuse))
        self.key = jax.random.split(key, fuse) if fuse > 1 else key
        self.call = self.agent.update_many if fuse > 1 else self.agent.update
        self.pool = jax.device_put(DemoPool.of(Batch.from_sample(random_transitions(spec, demo_pool, rng)))
                                   ) if demo_pool else None
        self.demo_shape = (cfg.utd, cfg.batch_size)
        start = time.perf_counter()
        self.compiled = self.call.lower(self.state, *self.inputs, self.key).compile()
        self.compile_s = time.perf_counter() - start

    def step(self) -> dict:
        online, demos = self.inputs
        if self.pool is not None:
            demos = sample_demos(self.pool, self.key, self.demo_shape)
        self.state, metrics = self.compiled(self.state, online, demos, self.key)
        return metrics

    def rate(self, updates: int = 50, warmup: int = 3, max_s: float = 60.0) -> float:
        """Env steps per second over ``updates`` timed calls, or as many (at least 2) as fit in ``max_s``."""
        for _ in range(warmup):
            self.step()
        jax.block_until_ready(self.state)
        start, done = time.perf_counter(), 0
        while done < updates and (done < 2 or time.perf_counter() - start < max_s):
            self.step()
            jax.block_until_ready(self.state)
            done += 1
        return self.fuse * done / (time.perf_counter() - start)

    def profile(self) -> dict:
        """XLA's FLOPs per env step and the compiled program's kernel count (see the module docstring). XLA counts
        a loop body once, so the FLOPs come from one env step's program with its UTD loop unrolled, before
        optimisation (lowered, not compiled)."""
        unrolled = CSILAgent(dataclasses.replace(self.agent.cfg, unroll_utd=True), self.agent.spec)
        one = jax.tree_util.tree_map(lambda x: x[0], self.inputs) if self.fuse > 1 else self.inputs
        cost = unrolled.update.lower(self.state, *one, jax.random.PRNGKey(0)).cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        return {"gflop_per_env_step": float(f"{float(cost.get('flops', 0.0)) / 1e9:.4g}"),
                "kernels": count_kernels(self.compiled.as_text())}


# Instructions that are free at run time (views, tuples, loop plumbing), not kernels.
_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "conditional", "call",
         "after-all", "partition-id", "replica-id", "iota", "opt-barrier", "copy-start", "copy-done"}
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*[^=]*?\s([a-z][a-z0-9\-]*)\(")


def count_kernels(hlo_text: str) -> int:
    """Non-trivial instructions outside fused computations in an optimised HLO module's text (each one is a kernel
    launch or library call on a GPU; instructions inside a fusion are one kernel together)."""
    count, in_fusion = 0, False
    for line in hlo_text.splitlines():
        if line and not line[0].isspace():  # a computation's header (or the module's)
            in_fusion = "fused" in line.split("(")[0]  # XLA names fusion bodies %fused_computation...
            continue
        match = _INSTRUCTION.match(line)
        if match and not in_fusion and match.group(1) not in _FREE:
            count += 1
    return count


def bare_update_rate(cfg: AgentConfig, spec: ObsSpec, updates: int = 50, warmup: int = 3, seed: int = 0,
                     max_s: float = 60.0) -> float:
    """Fused updates (env steps) per second on one device-resident random batch: the learner with nothing else
    to do. Compiled through the persistent cache (an image update takes minutes to compile on a CPU)."""
    return BareUpdate(cfg, spec, seed=seed).rate(updates, warmup, max_s)


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    obs: str = "state"
    size: str = "paper"
    batch_size: int = 128
    utd: int = 4
    fuse: int = 1
    unroll_utd: bool | None = None
    compute_dtype: str = "float32"
    nonfinite_guard: str = "cond"
    demo_pool: int = 0  # > 0: the demo half drawn on the device from this many transitions, as the learner does


# Issue 16's questions at paper size, batch 128, UTD 4: the first variant of each observation mode is the
# reference its ratio is taken against (today's one call per env step).
PRESETS: dict[str, tuple[Variant, ...]] = {
    "gpu": (
        Variant("state, one call per env step"),
        Variant("state, K=10 per call", fuse=10),
        Variant("state, K=10, UTD loop unrolled", fuse=10, unroll_utd=True),
        Variant("state, K=50 per call", fuse=50),
        Variant("state, K=10, non-finite guard as selects", fuse=10, nonfinite_guard="select"),
        Variant("state, K=10, demo half drawn on the device", fuse=10, demo_pool=30_000),
        Variant("image fp32, one call per env step", obs="image"),
        Variant("image bf16 convolutions", obs="image", compute_dtype="bfloat16"),
        Variant("image bf16, UTD loop in lax.scan", obs="image", compute_dtype="bfloat16", unroll_utd=False),
    ),
    # What a 2-core CPU can answer in minutes: K for the state update, bf16 for a small image update.
    "cpu": (
        Variant("state, one call per env step"),
        Variant("state, K=10 per call", fuse=10),
        Variant("state, K=10, demo half drawn on the device", fuse=10, demo_pool=30_000),
        Variant("image fp32, cpu size, batch 16, UTD 1", obs="image", size="cpu", batch_size=16, utd=1),
        Variant("image bf16, cpu size, batch 16, UTD 1", obs="image", size="cpu", batch_size=16, utd=1,
                compute_dtype="bfloat16"),
    ),
    # Seconds, to check a machine (or this module) before spending device time on the presets above.
    "smoke": (
        Variant("state, tiny, one call per env step", size="tiny", batch_size=8, utd=2),
        Variant("state, tiny, K=3 per call", size="tiny", batch_size=8, utd=2, fuse=3),
        Variant("state, tiny, K=3, demo half drawn on the device", size="tiny", batch_size=8, utd=2, fuse=3,
                demo_pool=1000),
    ),
}


def measure(variant: Variant, updates: int, max_s: float) -> dict:
    cfg = bench_agent_config(variant.size, "csil++", variant.batch_size, variant.utd, variant.unroll_utd,
                             variant.compute_dtype)
    cfg = dataclasses.replace(cfg, nonfinite_guard=variant.nonfinite_guard)
    bare = BareUpdate(cfg, obs_spec(variant.obs), fuse=variant.fuse, demo_pool=variant.demo_pool)
    rate = bare.rate(max(1, updates // variant.fuse), max_s=max_s)
    finite = all(bool(np.isfinite(np.asarray(v)).all()) for v in jax.tree_util.tree_leaves(bare.step()))
    return {**dataclasses.asdict(variant), "env_steps_per_s": round(rate, 2), "ms_per_env_step": round(1000 / rate, 3),
            "compile_s": round(bare.compile_s, 1), **bare.profile(), "finite": finite}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m learner.throughput", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu", help="which variants (default %(default)s)")
    parser.add_argument("--only", default="", help="comma-separated substrings: run only variants whose name has one")
    parser.add_argument("--updates", type=int, default=200, help="timed env steps per variant (default %(default)s)")
    parser.add_argument("--max-s", type=float, default=30.0, help="timing budget per variant, s (default %(default)s)")
    args = parser.parse_args(argv)
    variants = [v for v in PRESETS[args.preset]
                if not args.only or any(s.strip() in v.name for s in args.only.split(","))]
    device = jax.devices()[0]
    print(json.dumps({"jax": jax.__version__, "device": f"{device.platform}:{device.device_kind}"}), flush=True)
    results, reference = [], {}
    for variant in variants:
        try:
            out = measure(variant, args.updates, args.max_s)
        except Exception as e:  # one variant failing (e.g. out of memory) must not lose the others' numbers
            out = {**dataclasses.asdict(variant), "error": f"{type(e).__name__}: {e}"[:300]}
        if "env_steps_per_s" in out:
            base = reference.setdefault(variant.obs, out["env_steps_per_s"])
            out["ratio"] = round(out["env_steps_per_s"] / base, 3)
        print(json.dumps(out), flush=True)
        results.append(out)
    print(json.dumps({"bench": "learner_throughput", "preset": args.preset, "device": device.platform,
                      "env_steps_per_s": {r["name"]: r.get("env_steps_per_s") for r in results},
                      "ratio": {r["name"]: r.get("ratio") for r in results}}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
