"""csil-experiment: the paper's Table I / Fig. 5 at CPU scale. Runs every (task, method, seed) that is not done yet
(single-process csil-train runs, the local base policy), then writes
results/<name>/table.md (the command on top), curves.png and runs.csv. Finished runs are reused, so the same
command can be run again after an interruption, or with more seeds, tasks or methods."""

from __future__ import annotations

import argparse
import shlex
import sys

from cli import emit_json
from cli.flags import at_least, build, field
from cli.run_flags import BETA_UNITS_HELP, EVAL_VIDEOS_HELP, FRAME_CODEC_HELP, OBS_HELP, WANDB_HELP
from csil.config import BETA_UNITS, FRAME_CODECS, METHODS, SIZES, ExperimentConfig
from csil.specs import OBS_MODES
from csil.tasks import UnknownTaskError, get_task
from orchestration.experiment import run_experiment


def _tasks(text: str) -> tuple[str, ...]:
    try:
        return tuple(get_task(name).name for name in text.split(","))
    except UnknownTaskError as e:  # argparse would print only "invalid value"
        raise argparse.ArgumentTypeError(str(e)) from None


def _methods(text: str) -> tuple[str, ...]:
    names = tuple(text.split(","))
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    return names


def build_parser() -> argparse.ArgumentParser:
    E, d = ExperimentConfig, ExperimentConfig()
    p = argparse.ArgumentParser(prog="csil-experiment", description=__doc__)
    field(p, E, "name", help="experiment name: results/<name>/ and its runs dir")
    field(p, E, "tasks", default=",".join(d.tasks), type=_tasks, help="comma-separated tasks")
    field(p, E, "methods", default=",".join(d.methods), type=_methods,
          help=f"comma-separated, from {', '.join(METHODS)}")
    field(p, E, "seeds", type=at_least(1), help="seeds per task and method")
    field(p, E, "env_steps", type=at_least(1), help="env steps per run")
    field(p, E, "eval_every", type=at_least(1), help="env steps between evaluations")
    field(p, E, "eval_episodes", type=at_least(1), help="episodes per evaluation")
    field(p, E, "final_eval_rounds", type=at_least(0),
          help="each run's best parameters (and the base) re-evaluated this many times x --eval-episodes on fresh "
               "scenes at the end: the paper's protocol, the table's main number")
    field(p, E, "obs_mode", "--obs", choices=OBS_MODES, help=OBS_HELP)
    field(p, E, "frame_codec", choices=FRAME_CODECS, help=FRAME_CODEC_HELP)
    field(p, E, "eval_videos", type=at_least(0), help=EVAL_VIDEOS_HELP)
    field(p, E, "wandb", metavar="PROJECT",
          help=WANDB_HELP + " (one W&B run per task, method and seed, grouped by --name)")
    field(p, E, "warmup", type=at_least(1), help="online transitions before updates start")
    field(p, E, "size", choices=SIZES, help="network sizes")
    field(p, E, "num_demos", type=at_least(1),
          help="demos per task for BC, the reward and critic pretraining (default: the ones the task's base policy "
               "was trained on, as in the paper)")
    field(p, E, "bc_steps", type=at_least(0), help="BC pretraining steps")
    field(p, E, "critic_steps", type=at_least(0), help="critic pretraining steps (XQC+OD never pretrains its critic)")
    field(p, E, "actor_warmup", type=at_least(0), help="linear actor learning-rate warmup, in updates, for every trained method (100 "
                                     "keeps the first actor updates near BC, see AgentConfig.actor_warmup_steps)")
    field(p, E, "beta", help="KL(pi||pi_BC) coefficient of the KL-regularised methods, in --beta-units")
    field(p, E, "beta_units", choices=BETA_UNITS, help=BETA_UNITS_HELP)
    field(p, E, "runs_dir", help="where runs live (default <cache>/experiments/<name>)")
    field(p, E, "out_dir", "--out", help="results root")
    p.add_argument("--report", action="store_true",
                   help="train nothing: write table.md, curves.png and runs.csv from the runs finished so far "
                        "(cells say when they hold fewer seeds; the table's command is this one without --report)")
    return p


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    command = "csil-experiment " + shlex.join(a for a in argv if a != "--report")
    try:
        emit_json(run_experiment(build(ExperimentConfig, args), command, report_only=args.report))
    except KeyboardInterrupt as e:
        raise SystemExit(f"csil-experiment: stopped{f' ({e})' if str(e) else ''}; the same command goes on from "
                         "there (finished runs are kept, a checkpointed run resumes)") from None


if __name__ == "__main__":
    main()
