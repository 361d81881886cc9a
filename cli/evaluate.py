"""csil-eval: run seeded evaluation episodes of a policy, several envs in parallel, and report success."""

from __future__ import annotations

import argparse
import json
import time

from cli import emit_json
from csil.config import EvalConfig


def build_parser() -> argparse.ArgumentParser:
    d = EvalConfig()
    parser = argparse.ArgumentParser(prog="csil-eval", description=__doc__)
    parser.add_argument("--task", required=True, help="task name (Lift, Can, Square, NutAssembly, Stack)")
    parser.add_argument("--policy", default=d.policy,
                        help="base:DIR (a csil-base checkpoint), base (the task's cached default base policy, "
                             "built on first use) or expert (the scripted expert) (default %(default)s)")
    parser.add_argument("--episodes", type=int, default=d.episodes, help="episodes (default %(default)s)")
    parser.add_argument("--seed", type=int, default=d.seed,
                        help="episode i uses seed SEED+i, whatever the parallelism (default %(default)s)")
    parser.add_argument("--obs", choices=("state", "image"), default=d.obs_mode,
                        help="observation mode; must match what the policy was trained on")
    parser.add_argument("--workers", type=int, default=d.workers, help="Ray worker processes (default: one per core)")
    parser.add_argument("--envs-per-worker", type=int, default=d.envs_per_worker,
                        help="envs stepped in lockstep per worker; the policy is queried in batches across them")
    parser.add_argument("--out", help="also write per-episode results (JSON) to this file")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    from tqdm import tqdm

    from actors.rollout import run_episodes
    from csil.tasks import get_task

    task = get_task(args.task)
    policy = args.policy
    if policy == "base":
        from orchestration.pipeline import ensure_base_policy

        policy = f"base:{ensure_base_policy(task.name)}"
    start = time.time()
    results = []
    with tqdm(total=args.episodes, desc=f"eval {task.name}", unit="ep") as bar:
        for res in run_episodes(task.name, args.obs, policy, range(args.seed, args.seed + args.episodes),
                                prompt=task.prompt, workers=args.workers, envs_per_worker=args.envs_per_worker):
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
        "seed": args.seed, "seconds": round(time.time() - start, 1),
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"summary": summary, "episodes": [
                {"seed": r.seed, "success": r.success, "length": r.length} for r in results]}, f, indent=2)
    emit_json(summary)


if __name__ == "__main__":
    main()
