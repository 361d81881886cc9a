"""csil-demos: generate scripted-expert demonstrations in robomimic's HDF5 layout, or inspect a demo file."""

from __future__ import annotations

import argparse

import numpy as np

from cli import emit_json
from cli.flags import at_least
from csil.config import DemoConfig, cache_dir
from csil.demos import read_demos
from orchestration.pipeline import generate_demos


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="csil-demos", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="run the scripted expert and keep successful episodes only",
                         description="Run the task's scripted expert on seeds S, S+1, ... and write the successful "
                                     "episodes (robomimic layout, train/valid masks) until --num are kept. The file "
                                     "is written as OUT.partial and renamed when complete; a stopped run (Ctrl-C, "
                                     "a killed process) resumes after the last demo in it when run again.")
    gen.add_argument("--task", required=True, help="task name: Lift, Can, Square, NutAssembly or Stack (the tasks with a scripted expert)")
    gen.add_argument("--num", type=at_least(1), default=DemoConfig.num, help="successful episodes to keep (default %(default)s)")
    gen.add_argument("--obs", choices=("state", "image"), default="state",
                     help="state: low-dim keys only; image: also render agentview + wrist 84x84 (slow on CPU)")
    gen.add_argument("--out", help="output .hdf5 file (default: under $CSIL_CACHE/demos)")
    gen.add_argument("--seed", type=at_least(0), default=DemoConfig.seed, help="first episode seed (default %(default)s)")
    gen.add_argument("--noise", type=at_least(0, float), default=None,
                     help="expert action noise std that widens state coverage (default: the expert's own)")
    gen.add_argument("--workers", type=at_least(0), default=0, help="parallel Ray workers (default: one per core)")
    info = sub.add_parser("info", help="summarise a robomimic HDF5 file (env, demos, lengths, keys, masks)")
    info.add_argument("file", help="path to a robomimic/MimicGen .hdf5 file")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command == "generate":
        cfg = DemoConfig(task=args.task, num=args.num, obs_mode=args.obs, seed=args.seed, noise=args.noise,
                         workers=args.workers)
        out = args.out or str(cache_dir() / "demos" / f"{args.task}_{args.obs}_{args.num}_seed{args.seed}.hdf5")
        summary = generate_demos(cfg, out)
        print(f"expert success rate: {summary['expert_success_rate']:.1%} "
              f"({summary['demos']}/{summary['attempted']} episodes), wrote {summary['out']}")
        emit_json(summary)
    else:
        data = read_demos(args.file, load_next_obs=False)
        lengths = np.array([len(ep) for ep in data.episodes])
        first = data.episodes[0]
        emit_json({
            "file": data.path, "env_name": data.env_meta["env_name"],
            "env_version": data.env_meta.get("env_version"), "demos": len(lengths),
            "steps": int(lengths.sum()), "length_mean": float(lengths.mean()), "length_max": int(lengths.max()),
            "obs": {k: list(v.shape[1:]) for k, v in first.obs.items()},
            "masks": {k: len(v) for k, v in data.masks.items()},
        })


if __name__ == "__main__":
    main()
