"""csil-experiment: the paper's Table I / Fig. 5 at CPU scale. Runs every (task, method, seed) that is not done yet
(single-process csil-train runs, state observations, the local base policy), then writes
results/<name>/table.md (the command on top), curves.png and runs.csv. Finished runs are reused, so the same
command can be run again after an interruption, or with more seeds, tasks or methods."""

from __future__ import annotations

import argparse
import shlex
import sys

from cli import emit_json


def build_parser() -> argparse.ArgumentParser:
    from csil.config import METHODS, SIZES, ExperimentConfig

    d = ExperimentConfig()
    p = argparse.ArgumentParser(prog="csil-experiment", description=__doc__)
    p.add_argument("--name", default=d.name, help="experiment name: results/<name>/ and its runs dir")
    p.add_argument("--tasks", default=",".join(d.tasks), help="comma-separated tasks (default %(default)s)")
    p.add_argument("--methods", default=",".join(d.methods),
                   help=f"comma-separated, from {', '.join(METHODS)} (default %(default)s)")
    p.add_argument("--seeds", type=int, default=d.seeds, help="seeds per task and method (default %(default)s)")
    p.add_argument("--env-steps", type=int, default=d.env_steps, help="env steps per run (default %(default)s)")
    p.add_argument("--eval-every", type=int, default=d.eval_every, help="env steps between evaluations")
    p.add_argument("--eval-episodes", type=int, default=d.eval_episodes, help="episodes per evaluation")
    p.add_argument("--warmup", type=int, default=d.warmup, help="online transitions before updates start")
    p.add_argument("--size", choices=SIZES, default=d.size, help="network sizes (default %(default)s)")
    p.add_argument("--num-demos", type=int, default=d.num_demos, help="demos per task (default %(default)s)")
    p.add_argument("--bc-steps", type=int, default=d.bc_steps, help="BC pretraining steps (default %(default)s)")
    p.add_argument("--critic-steps", type=int, default=d.critic_steps,
                   help="critic pretraining steps (default %(default)s; XQC+OD never pretrains its critic)")
    p.add_argument("--actor-warmup", type=int, default=d.actor_warmup,
                   help="linear actor learning-rate warmup, in updates, for every trained method (default "
                        "%(default)s; 100 keeps the first actor updates near BC, see AgentConfig.actor_warmup_steps)")
    p.add_argument("--runs-dir", default=None, help="where runs live (default <cache>/experiments/<name>)")
    p.add_argument("--out", default=d.out_dir, help="results root (default %(default)s)")
    p.add_argument("--report", action="store_true",
                   help="train nothing: write table.md, curves.png and runs.csv from the runs finished so far "
                        "(cells say when they hold fewer seeds; the table's command is this one without --report)")
    return p


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    from csil.config import ExperimentConfig
    from orchestration.experiment import run_experiment

    cfg = ExperimentConfig(
        name=args.name, tasks=tuple(args.tasks.split(",")), methods=tuple(args.methods.split(",")),
        seeds=args.seeds, env_steps=args.env_steps, eval_every=args.eval_every, eval_episodes=args.eval_episodes,
        warmup=args.warmup, size=args.size, num_demos=args.num_demos, bc_steps=args.bc_steps,
        critic_steps=args.critic_steps, actor_warmup=args.actor_warmup, runs_dir=args.runs_dir, out_dir=args.out)
    command = "csil-experiment " + shlex.join(a for a in argv if a != "--report")
    emit_json(run_experiment(cfg, command, report_only=args.report))


if __name__ == "__main__":
    main()
