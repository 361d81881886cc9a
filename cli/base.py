"""csil-base: train the local base policy (action-chunking BC, the CPU stand-in for pi0.5) on demos.

Training saves its progress in the output directory every 5 minutes and on Ctrl-C/SIGTERM; the same command
continues a stopped run."""

from __future__ import annotations

import argparse
import dataclasses
import signal
import sys

from cli import emit_json
from cli.flags import at_least
from csil.demos import read_demos
from csil.tasks import get_task
from orchestration import pipeline
from csil.config import BaseTrainConfig, base_policy_defaults


def build_parser() -> argparse.ArgumentParser:
    d = BaseTrainConfig()
    parser = argparse.ArgumentParser(prog="csil-base", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train on a robomimic HDF5 file and save an orbax checkpoint",
                           description="Train the chunking model (obs -> 10 actions) and save it to --out.")
    train.add_argument("--demos", required=True, help="robomimic-layout .hdf5 file (e.g. from csil-demos generate)")
    train.add_argument("--out", required=True,
                       help="output directory (orbax checkpoint + base_policy.json; while training, its progress: "
                            "the same command continues a stopped run)")
    train.add_argument("--num-demos", type=at_least(1), default=None,
                       help="use only the first N demos: the knob that makes the base good but imperfect "
                            "(default: every demo in the file; `csil-base prepare` uses the task's documented "
                            "setting)")
    train.add_argument("--steps", type=at_least(1), default=None,
                       help="gradient steps (default: the task's documented setting, else %d)" % d.steps)
    train.add_argument("--batch-size", type=at_least(1), default=None,
                       help="batch size (default: the task's documented setting, else %d)" % d.batch_size)
    train.add_argument("--lr", type=float, default=d.learning_rate, help="peak learning rate, cosine decay")
    train.add_argument("--obs", choices=("state", "image"), default="state",
                       help="state: low-dim obs; image: agentview + wrist cameras + proprioception")
    train.add_argument("--image-pool", choices=("mean", "spatial_softmax"), default=None,
                       help="image mode: how each camera's conv feature maps become features; mean keeps what is "
                            "seen, spatial_softmax also where (default: the task's documented image setting, "
                            "spatial_softmax where none is measured)")
    train.add_argument("--seed", type=at_least(0), default=d.seed, help="training seed (default %(default)s)")
    prepare = sub.add_parser("prepare", help="build the cached default base policy of a task (demos + training)",
                             description="Generate demos and train with the task's documented settings, "
                                         "under $CSIL_CACHE; does nothing if they are cached already.")
    prepare.add_argument("--task", required=True, help="Lift, Can, Square or NutAssembly")
    prepare.add_argument("--obs", choices=("state", "image"), default="state",
                         help="the base policy's observations: state, or both cameras + proprioception "
                              "(IMAGE_BASE_POLICY_DEFAULTS; renders its demos) (default %(default)s)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM stops like Ctrl-C: progress is saved
    try:
        _run(args)
    except KeyboardInterrupt as e:
        sys.exit(f"stopped{f' ({e})' if str(e) else ''}; its progress is saved: the same command continues it")


def _run(args: argparse.Namespace) -> None:
    if args.command == "prepare":
        emit_json({"task": args.task, "obs": args.obs,
                   "base_policy": str(pipeline.ensure_base_policy(args.task, obs_mode=args.obs))})
        return
    task = get_task(read_demos(args.demos, num_demos=1, load_next_obs=False).env_meta["env_name"]).name
    default = base_policy_defaults(task, args.obs)
    cfg = dataclasses.replace(
        default,
        num_demos=args.num_demos,  # None: every demo of the file given (the task's preset is for `prepare`)
        steps=args.steps if args.steps is not None else default.steps,
        batch_size=args.batch_size if args.batch_size is not None else default.batch_size,
        image_pool=args.image_pool or default.image_pool,
        learning_rate=args.lr, seed=args.seed,
    )
    emit_json(pipeline.train_base_from_file(args.demos, args.out, cfg, obs_mode=args.obs))


if __name__ == "__main__":
    main()
