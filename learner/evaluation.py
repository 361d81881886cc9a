"""Deterministic evaluation of base + small policy, and the run directory's eval table and learning curve.

Shared by the single-process trainer and csil-launch's evaluator so both measure the same thing: episodes
seeded ``EvalConfig.seed + offset + i`` (never training or demo scenes), the small policy's mode combined with
the base policy's chunks, success rate and mean length.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np


def crossed(value: int, previous: int, every: int) -> bool:
    """Whether going from ``previous`` to ``value`` passed a multiple of ``every`` (evaluation/logging cadence)."""
    return value // every != previous // every


def evaluate_policy(task, obs_mode: str, base_dir: str, params, network, action_mode: str, episodes: int,
                    seed_offset: int = 0) -> dict:
    """Success rate and mean length over ``episodes`` seeded episodes; ``params=None`` evaluates the base alone."""
    from csil.config import EvalConfig
    from csil.rollout import run_episodes

    if params is None:  # the base policy alone, on the same seeds
        policy = f"base:{base_dir}"
    else:
        policy = {"base": base_dir, "params": params, "network": network, "action_mode": action_mode}
    first = EvalConfig.seed + seed_offset
    results = list(run_episodes(task.name, obs_mode, policy, range(first, first + episodes), prompt=task.prompt,
                                envs_per_worker=max(1, episodes // 2)))
    return {"success_rate": float(np.mean([r.success for r in results])),
            "mean_length": float(np.mean([r.length for r in results]))}


def write_eval_results(logdir: Path, evals: list[dict], label: str, title: str) -> None:
    """evals.csv and learning_curve.png (success vs env steps, the level at the start marked)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with (logdir / "evals.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(evals[0]))
        writer.writeheader()
        writer.writerows(evals)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([e["env_steps"] for e in evals], [e["success_rate"] for e in evals], marker="o", label=label)
    ax.axhline(evals[0]["success_rate"], ls="--", c="gray", label="at start (BC + base)")
    ax.set(xlabel="env steps", ylabel="success rate", ylim=(-0.02, 1.02), title=title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(logdir / "learning_curve.png", dpi=120)
    plt.close(fig)
