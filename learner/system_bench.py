"""``csil-bench system``: the distributed system's throughput against its parts measured alone, in one run.

A fixed-duration ``csil-launch`` run (no evaluation, short pretraining: its quality does not change throughput)
is compared with baselines measured first on the same machine:

- actors: env steps/s per actor while acting, *excluding* the seconds their inserts were held back by the rate
  limiter (reported separately), vs. the raw robosuite ``env.step`` loop of the task;
- learner: fused updates/s while updating (excluding the time spent waiting for samples) vs. the bare fused
  update on a device-resident batch;
- measured UTD: critic updates per env step over the second half of the run (``utd`` × Δupdates / Δenv steps
  from ``progress.jsonl``), which the rate limiter holds at ``utd``; over a whole short run the limiter's slack
  (actors may run ``error_buffer / samples_per_insert`` inserts ahead) would bias it low. Mean weight staleness:
  learner updates between the weights an actor acted with and the newest.

``measure_system`` is also what ``csil-scale`` runs per actor count.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path

from csil.config import LaunchConfig


def measure_system(cfg: LaunchConfig) -> dict:
    """Run ``cfg`` (a fixed-duration launch) and reduce its summary to throughput numbers."""
    from learner.launcher import System

    summary = System(cfg, progress=False).run()
    progress = [json.loads(line) for line in (Path(cfg.logdir) / "progress.jsonl").read_text().splitlines()]
    half = [p for p in progress if p["time"] >= (progress[0]["time"] + progress[-1]["time"]) / 2]
    steps, updates = half[-1]["env_steps"] - half[0]["env_steps"], half[-1]["updates"] - half[0]["updates"]
    actors = summary["actors"].values()
    rates = [a["env_steps"] / (a["active_s"] - a["blocked_s"]) for a in actors if a["active_s"] > a["blocked_s"]]
    learner = summary["learner"]
    busy_s = learner["run_s"] - learner["wait_s"]
    return {
        "actors": cfg.actors, "envs_per_actor": cfg.envs_per_actor, "acting_s": summary["acting_s"],
        "env_steps": summary["env_steps"], "env_steps_per_s": round(summary["env_steps"] / summary["acting_s"], 2),
        "env_steps_per_s_per_actor": round(sum(rates) / len(rates), 2) if rates else None,
        "blocked_fraction": round(sum(a["blocked_s"] for a in actors) / max(sum(a["active_s"] for a in actors), 1e-9),
                                  4),
        "learner_updates": learner["updates"],
        "learner_updates_per_s": round(learner["updates"] / busy_s, 2) if busy_s > 0 else None,
        "learner_wait_fraction": round(learner["wait_s"] / learner["run_s"], 4) if learner["run_s"] else None,
        "utd_measured": round(cfg.agent.utd * updates / steps, 3) if steps > 0 else None,
        "utd_target": cfg.agent.utd, "mean_staleness": summary["mean_staleness"],
    }


def bench_system(cfg: LaunchConfig, env_steps: int = 500) -> dict:
    """Baselines first (raw env loop, bare update), then the system; one JSON-ready record."""
    from csil.cli.bench import bench_env
    from csil.demos import read_demos
    from csil.pipeline import ensure_demos, spec_from_demos
    from learner.bench import bare_update_rate

    demos = cfg.demos or str(ensure_demos(cfg.task))
    spec = spec_from_demos(demos, read_demos(demos, num_demos=1).episodes[0].obs, "state")
    raw = bench_env(cfg.task, env_steps, 1, "state", cfg.seed)["raw_steps_per_s"]
    bare = bare_update_rate(cfg.agent, spec)
    with tempfile.TemporaryDirectory(prefix="csil-bench-system-") as logdir:
        system = measure_system(dataclasses.replace(cfg, logdir=logdir, demos=demos))
    per_actor, learner = system["env_steps_per_s_per_actor"], system["learner_updates_per_s"]
    return {"bench": "system", "task": cfg.task, "size": cfg.size, **system,
            "raw_env_steps_per_s": raw, "bare_updates_per_s": round(bare, 2),
            "ratio": {"actor_vs_raw_env": round(per_actor / raw, 4) if per_actor else None,
                      "learner_vs_bare_update": round(learner / bare, 4) if learner else None}}
