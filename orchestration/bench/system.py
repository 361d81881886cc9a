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

import csv
import dataclasses
import json
import tempfile
from pathlib import Path

from csil.config import LaunchConfig
from csil.demos import read_demos, spec_from_demos
from orchestration.bench.env import bench_env
from learner.throughput import bare_update_rate
from orchestration.launcher import System
from orchestration.pipeline import ensure_demos
from orchestration.plotting import plt


def measure_system(cfg: LaunchConfig) -> dict:
    """Run ``cfg`` (a fixed-duration launch) and reduce its summary to throughput numbers."""
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
        "env_steps": summary["env_steps"],
        # steady state: the second half of the run (the first includes the warmup fill, which the limiter does
        # not pace)
        "env_steps_per_s": round(steps / (half[-1]["time"] - half[0]["time"]), 2) if len(half) > 1 else None,
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
    demos = cfg.demos or str(ensure_demos(cfg.task, cfg.obs_mode, cfg.num_demos))
    spec = spec_from_demos(demos, read_demos(demos, num_demos=1).episodes[0].obs, cfg.obs_mode)
    raw = bench_env(cfg.task, env_steps, 1, cfg.obs_mode, cfg.seed)["raw_steps_per_s"]  # renders as the actors do
    bare = bare_update_rate(cfg.agent, spec)
    with tempfile.TemporaryDirectory(prefix="csil-bench-system-") as logdir:
        system = measure_system(dataclasses.replace(cfg, logdir=logdir, demos=demos))
    per_actor, learner = system["env_steps_per_s_per_actor"], system["learner_updates_per_s"]
    return {"bench": "system", "task": cfg.task, "obs": cfg.obs_mode, "size": cfg.size,
            "replay_on_device": cfg.replay_on_device, "fuse_updates": cfg.fuse_updates, **system,
            "raw_env_steps_per_s": raw, "bare_updates_per_s": round(bare, 2),
            "ratio": {"actor_vs_raw_env": round(per_actor / raw, 4) if per_actor else None,
                      "learner_vs_bare_update": round(learner / bare, 4) if learner else None}}


def scale_out(cfg: LaunchConfig, actor_counts: list[int], out_dir: str, command: str,
              raw_env_steps: int = 500) -> list[dict]:
    """``csil-scale``: ``bench_system`` per actor count; scale.csv, table.md (command on top) and scale.png."""
    records = [bench_system(dataclasses.replace(cfg, actors=n), raw_env_steps) for n in actor_counts]
    write_scale(records, cfg, out_dir, command)
    return records


def write_scale(records: list[dict], cfg: LaunchConfig, out_dir: str, command: str) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    columns = ["actors", "env_steps_per_s", "env_steps_per_s_per_actor", "raw_env_steps_per_s", "blocked_fraction",
               "learner_updates_per_s", "bare_updates_per_s", "learner_wait_fraction", "utd_measured",
               "mean_staleness"]
    with (out / "scale.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(records)
    replay = "on the learner's device" if cfg.replay_on_device else "sampled from Reverb"
    lines = [f"`{command}`", "", f"{cfg.task}, {cfg.obs_mode} observations, {cfg.size}-size networks, "
             f"{cfg.envs_per_actor} envs per actor, {cfg.duration_s:g} s of acting per point, online replay {replay}, "
             f"{cfg.fuse_updates} update(s) per learner call.", "", "| " + " | ".join(columns) + " |",
             "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r[c]) for c in columns) + " |" for r in records]
    (out / "table.md").write_text("\n".join(lines) + "\n")
    _plot_scale(out / "scale.png", records)


def _fmt(value) -> str:
    return "–" if value is None else f"{value:.3g}" if isinstance(value, float) else str(value)


def _plot_scale(path: Path, records: list[dict]) -> None:
    actors = [r["actors"] for r in records]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(actors, [r["env_steps_per_s"] for r in records], marker="o", label="env steps/s (system)")
    axes[0].plot(actors, [r["learner_updates_per_s"] for r in records], marker="s", label="learner updates/s (busy)")
    axes[0].axhline(records[0]["bare_updates_per_s"], ls="--", c="gray", label="bare update/s")
    axes[0].set(xlabel="actors", ylabel="per second", title="throughput")
    axes[1].plot(actors, [r["blocked_fraction"] for r in records], marker="o", label="actors blocked by limiter")
    axes[1].plot(actors, [r["learner_wait_fraction"] for r in records], marker="s", label="learner waiting")
    axes[1].set(xlabel="actors", ylabel="fraction of time", ylim=(0, 1), title="who waits")
    axes[2].plot(actors, [r["utd_measured"] for r in records], marker="o", label="measured UTD")
    axes[2].plot(actors, [r["mean_staleness"] for r in records], marker="s", label="mean staleness (updates)")
    axes[2].set(xlabel="actors", title="UTD and staleness")
    for ax in axes:
        ax.set_xticks(actors)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
