"""csil-train: single-process CSIL++ or a baseline (pretraining, then online training with an in-process Reverb
server). The debugging path and test bed of the distributed system."""

from __future__ import annotations

import argparse

from cli import emit_json
from cli.flags import at_least, field
from cli.run_flags import add_agent_flags, add_run_flags, run_config
from csil.config import TrainConfig
from orchestration.trainer import Trainer


def build_parser() -> argparse.ArgumentParser:
    T = TrainConfig
    p = argparse.ArgumentParser(prog="csil-train", description=__doc__)
    add_run_flags(p, T)
    field(p, T, "warmup", type=at_least(1),
          help="online transitions collected by the BC-initialised policy before updates")
    field(p, T, "num_envs", type=at_least(1), help="envs stepped in lockstep")
    field(p, T, "base_checkpoint", "--base-checkpoint", "--base-policy",
          help="the local base policy: a csil-base checkpoint dir (default: the cached one, see --base-obs)")
    add_agent_flags(p)
    field(p, T, "logdir", default=None, help="run directory (default runs/<task>-<time>)")
    field(p, T, "checkpoint_every_s", type=at_least(1, float),
          help="seconds between learner + replay checkpoints (they are also written after pretraining, after each "
               "evaluation and on Ctrl-C/SIGTERM)")
    field(p, T, "resume", action="store_true",
          help="continue the run in --logdir from its checkpoints, with its saved config.json (only --env-steps may "
               "change); the first Ctrl-C stops a run after its current step with a checkpoint, a second at once")
    field(p, T, "seed", help="seed")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return run_config(TrainConfig, args, "csil-train", "env_steps")


def main(argv: list[str] | None = None) -> None:
    emit_json(Trainer(config_from_args(build_parser().parse_args(argv))).train())


if __name__ == "__main__":
    main()
