"""csil-scale: short fixed-duration csil-launch runs for several actor counts (each against its own baselines,
as csil-bench system), written to <out>/table.md, scale.csv and scale.png. On one machine it uses what the
machine has; results/scale.md models larger clusters from these per-component costs."""

from __future__ import annotations

import argparse
import shlex
import sys

from cli import emit_json
from cli.bench import add_system_args, system_config
from orchestration.bench.system import scale_out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="csil-scale", description=__doc__)
    p.add_argument("--actors", default="1,2,4,8", help="comma-separated actor counts (default %(default)s)")
    add_system_args(p)
    p.add_argument("--out", default="results/scale", help="output directory (default %(default)s)")
    return p


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    counts = [int(n) for n in args.actors.split(",")]
    for record in scale_out(system_config(args, counts[0]), counts, args.out, "csil-scale " + shlex.join(argv),
                            args.raw_env_steps):
        emit_json(record)


if __name__ == "__main__":
    main()
