"""``csil-bench env``: our wrapped env against the raw robosuite ``env.step`` loop, same kwargs and actions."""

from __future__ import annotations

import time

import numpy as np
import robosuite

from csil.envs import CsilEnv


def bench_env(task_name: str, steps: int, rounds: int, obs_mode: str, seed: int,
              render_quality: str = "default") -> dict:
    """Raw robosuite ``env.step`` loop vs our ``CsilEnv.step``, same kwargs and actions, rounds interleaved. With
    ``render_quality="fast"`` our env renders without reflections (``CsilEnv``) while the raw loop keeps robosuite's
    look: the ratio is then what the fast look buys."""
    ours = CsilEnv(task_name, obs_mode, seed=seed, render_quality=render_quality)
    raw = robosuite.make(ours.task.env_name, **ours.make_kwargs)
    actions = np.random.default_rng(seed).uniform(-1, 1, (steps, 7))

    def run_raw() -> float:
        raw.reset()
        start = time.perf_counter()
        for t, a in enumerate(actions):
            raw.step(a)
            if (t + 1) % ours.horizon == 0:
                raw.reset()
        return steps / (time.perf_counter() - start)

    def run_ours() -> float:
        ours.reset()
        start = time.perf_counter()
        for a in actions:
            _, _, success, truncated, _ = ours.step(a)
            if success or truncated:
                ours.reset()
        return steps / (time.perf_counter() - start)

    run_raw(), run_ours()  # warm-up: first-touch allocations, caches
    raw_rates, our_rates = [], []
    for _ in range(rounds):
        raw_rates.append(run_raw())
        our_rates.append(run_ours())
    raw_sps, our_sps = float(np.median(raw_rates)), float(np.median(our_rates))
    return {"bench": "env", "task": ours.task.name, "obs": obs_mode, "render_quality": render_quality,
            "steps": steps, "rounds": rounds,
            "raw_steps_per_s": round(raw_sps, 1), "wrapped_steps_per_s": round(our_sps, 1),
            "ratio": round(our_sps / raw_sps, 4), "overhead_pct": round(100 * (1 - our_sps / raw_sps), 2)}
