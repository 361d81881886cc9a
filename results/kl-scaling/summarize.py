"""Summarise the kl-scaling runs: KL(π‖π_BC) and Q gaps from each run's metrics.jsonl, success per evaluation.

Usage: python results/kl-scaling/summarize.py RUN_DIR[=LABEL] ...   (RUN_DIR holds metrics.jsonl)
Prints markdown tables: the trained metrics over the online phase (median/max or mean of the logged updates:
update 4, then the last fused update of every 100, each on its own batch) and at a few update counts."""

import json
import sys
from pathlib import Path

import numpy as np

KEYS = ("kl_to_bc_online", "kl_to_bc_demo", "q_gap_online", "q_gap_demo", "q_online", "q_demo", "reward_online",
        "reward_demo", "actor_penalty")
AT = (4, 100, 500, 1000, 1500, 2000)


def load(run_dir: Path):
    train, evals = [], []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r.get("phase") == "train":
            train.append(r)
        elif r.get("phase") == "eval":
            evals.append(r)
    return train, evals


def main(args):
    runs = []
    for a in args:
        path, _, label = a.partition("=")
        runs.append((label or Path(path).name, *load(Path(path))))
    print("| run | success at 0 / 1k / 2k / 3k env steps | KL online, median [max] | KL demo, median [max] "
          "| Q gap online, mean | Q gap demo, mean | Q online − Q demo, mean |")
    print("|---|---|---|---|---|---|---|")
    for label, train, evals in runs:
        s = " / ".join(f"{e['success_rate']:.0%}" for e in evals)
        m = {k: np.mean([r[k] for r in train if k in r]) for k in KEYS}
        kl = {k: (np.median([r[k] for r in train]), max(r[k] for r in train)) for k in KEYS[:2]}
        kl = {k: f"{v[0]:.3g} [{v[1]:.3g}]" for k, v in kl.items()}
        print(f"| {label} | {s} | {kl['kl_to_bc_online']} | {kl['kl_to_bc_demo']} | {m['q_gap_online']:+.4f} "
              f"| {m['q_gap_demo']:+.4f} | {m['q_online'] - m['q_demo']:+.4f} |")
    for key in ("kl_to_bc_online", "q_gap_online", "q_gap_demo"):
        print(f"\n{key} at update:\n")
        print("| run | " + " | ".join(str(u) for u in AT) + " |")
        print("|---|" + "---|" * len(AT))
        for label, train, _ in runs:
            by = {r["updates"]: r for r in train}
            cells = [f"{by[u][key]:.3g}" if u in by and key in by[u] else "—" for u in AT]
            print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
