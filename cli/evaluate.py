"""csil-eval: run seeded evaluation episodes of a policy, several envs in parallel, and report success.

Besides the success rate it reports ``mean_max_reward``, the mean of each episode's best sparse reward: the same
number on single-stage tasks, partial progress where robosuite gives some (NutAssembly: 0.5 per nut on its peg).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from tqdm import tqdm

from actors.rollout import run_episodes
from cli import emit_json
from cli.flags import at_least, field, values
from csil.config import EvalConfig
from csil.tasks import check_available, get_task
from orchestration.pipeline import ensure_base_policy


def build_parser() -> argparse.ArgumentParser:
    E = EvalConfig
    parser = argparse.ArgumentParser(prog="csil-eval", description=__doc__)
    field(parser, E, "task", required=True, help="task name (Lift, Can, Square, NutAssembly, Stack)")
    field(parser, E, "policy", help="base:DIR (a csil-base checkpoint), base (the task's cached default base policy "
                                    "for --obs, built on first use), base:ws://HOST:PORT or base:grpc://HOST:PORT (a served "
                                    "base policy) or expert (the scripted expert)")
    field(parser, E, "episodes", type=at_least(1), help="episodes")
    field(parser, E, "seed", help="episode i uses seed SEED+i, whatever the parallelism")
    field(parser, E, "obs_mode", "--obs", choices=("state", "image"),
          help="observation mode; must match what the policy was trained on")
    field(parser, E, "workers", type=at_least(0), help="Ray worker processes (0: one per core)")
    field(parser, E, "envs_per_worker", type=at_least(1),
          help="envs stepped in lockstep per worker; the policy is queried in batches across them")
    parser.add_argument("--out", help="also write per-episode results (JSON) to this file")
    return parser


def resolve_policy(policy: str, task, obs_mode: str = "state") -> str:
    """``base`` -> the cached default base policy for ``obs_mode`` (built if absent); checkpoint dirs are checked
    here, before any worker starts."""
    if policy == "base":
        return f"base:{ensure_base_policy(task.name, obs_mode=obs_mode)}"
    kind, _, target = policy.partition(":")
    if kind == "base" and target and "://" not in target and not (Path(target) / "base_policy.json").exists():
        raise SystemExit(f"csil-eval: --policy {policy}: {target} is not a csil-base checkpoint (no "
                         "base_policy.json there)")
    if kind not in ("base", "expert") or (kind == "base" and not target):
        raise SystemExit(f"csil-eval: --policy {policy!r}: use base, base:DIR, base:ws://HOST:PORT or expert")
    return policy


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    cfg = values(args, EvalConfig)
    task = get_task(cfg["task"])
    check_available(task)  # e.g. a MimicGen task: say what it needs before building anything
    policy = resolve_policy(cfg["policy"], task, cfg["obs_mode"])
    start = time.time()
    results = []
    with tqdm(total=cfg["episodes"], desc=f"eval {task.name}", unit="ep") as bar:
        for res in run_episodes(task.name, cfg["obs_mode"], policy, range(cfg["seed"], cfg["seed"] + cfg["episodes"]),
                                prompt=task.prompt, workers=cfg["workers"], envs_per_worker=cfg["envs_per_worker"]):
            results.append(res)
            bar.update(1)
            bar.set_postfix(success=f"{sum(r.success for r in results) / len(results):.0%}")
    results.sort(key=lambda r: r.seed)
    successes = [r for r in results if r.success]
    summary = {
        "task": task.name, "policy": policy, "episodes": len(results),
        "success_rate": len(successes) / len(results),
        "mean_episode_length": sum(r.length for r in results) / len(results),
        "mean_success_length": sum(r.length for r in successes) / len(successes) if successes else None,
        "mean_max_reward": sum(r.max_reward for r in results) / len(results),  # NutAssembly: 0.5 = one nut placed
        "seed": cfg["seed"], "seconds": round(time.time() - start, 1),
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"summary": summary, "episodes": [
                {"seed": r.seed, "success": r.success, "length": r.length, "max_reward": r.max_reward}
                for r in results]}, f, indent=2)
    emit_json(summary)


if __name__ == "__main__":
    main()
