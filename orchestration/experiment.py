"""``csil-experiment``: the paper's Table I and Fig. 5 at CPU scale, from single-process runs.

Every (task, method, seed) is one ``csil-train`` run (the same agent, replay and acting code as csil-launch, in
one process: on a 2-core machine the distributed system would only add Ray overhead) or, for ``base``, an
evaluation of the base policy alone. Training seed ``k`` is evaluated on scenes ``csil.seeds.eval_scene(k)``
and so is the base policy for seed ``k``: the comparison with the base is paired, scene for scene.

A run is done when its ``summary.json`` exists; done runs are never redone, and a run stopped part-way (Ctrl-C,
SIGTERM, a killed process) continues from its newest checkpoint, so the experiment can be spread over several
sessions. Ctrl-C stops the grid after checkpointing the run in progress.
Each run directory is one TensorBoard run (``tensorboard --logdir <runs_dir>`` compares the grid) and, with
``--wandb``, one W&B run grouped by the experiment's name. Outputs in ``<out_dir>/<name>/``: ``table.md`` (the
exact command on top, the budget vs the paper's 500k steps, median [25th, 75th] over seeds of the best parameters
re-evaluated on fresh scenes (the paper's protocol) and of the final success, the gain over the paired base, and
the no-initial-drop check), ``curves.png`` (median success vs env steps per method, base level dashed) and
``runs.csv`` (every evaluation of every run).
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np

from csil import seeds
from csil.config import METHODS, ExperimentConfig, TrainConfig, agent_config, cache_dir
from csil.tasks import get_task
from orchestration.evaluator import evaluate_policy
from orchestration.plotting import plt
from orchestration.pipeline import ensure_base_policy
from orchestration.tracking import RunTracker
from orchestration.trainer import Trainer, resumable

DROP_TOLERANCE = 0.05  # "no initial drop": every evaluation >= base - 5 pp
# What a run finished before a budget field existed was run with (results/table1: β = 0.3 per nat, no warmup).
PRE_OPTION_BUDGET = {"actor_warmup": 0, "beta": 0.3, "beta_units": "nats", "final_eval_rounds": 0, "obs_mode": "state",
                     "frame_codec": "none"}
IMPROVEMENT = 0.10  # "improves the base": best parameters re-evaluated >= paired base + 10 pp
FAILED = "failed.json"  # in a run directory: that run's learner diverged (the error); removed once it finishes

log = logging.getLogger(__name__)


def runs_root(cfg: ExperimentConfig) -> Path:
    return Path(cfg.runs_dir) if cfg.runs_dir else cache_dir() / "experiments" / cfg.name


def run_budget(cfg: ExperimentConfig) -> dict:
    """The settings a finished run must share with the experiment that reuses it."""
    fields = ("env_steps", "eval_every", "eval_episodes", "warmup", "size", "num_demos", "bc_steps", "critic_steps",
              "actor_warmup", "beta", "beta_units", "final_eval_rounds", "obs_mode", "frame_codec")
    return {f: getattr(cfg, f) for f in fields}


def finished(cfg: ExperimentConfig, task: str, method: str, seed: int) -> dict | None:
    """The result of a finished run with this experiment's budget, None if it has not finished."""
    done = runs_root(cfg) / task / method / f"seed{seed}" / "summary.json"
    if not done.exists():
        return None
    result = json.loads(done.read_text())
    # runs from before an option existed ran with its old value
    result["budget"] = {**PRE_OPTION_BUDGET, **result.get("budget", {})}
    if result["budget"] != run_budget(cfg):
        ours = run_budget(cfg)
        diff = {k: (result["budget"].get(k), ours.get(k)) for k in {**ours, **result["budget"]}
                if result["budget"].get(k) != ours.get(k)}
        raise ValueError(f"{done.parent} was run with {result['budget']}, not this experiment's {ours} (differing, "
                         f"run vs this: {diff}): pick another --name (or --runs-dir) for a different budget, or pass "
                         "the run's settings (runs from before --beta/--beta-units used --beta-units nats --beta 0.3)")
    return result


def run_one(cfg: ExperimentConfig, task: str, method: str, seed: int, progress: bool = True) -> dict:
    """One run (or the cached result of it): {"task", "method", "seed", "evals": [{"env_steps", "success_rate"}],
    "best_reevaluated": [success rate per re-evaluation round]}. For ``base`` the evaluations are of the base
    alone on the same scenes: round 0 (paired with the periodic evaluations) and rounds 1.. (paired with the
    re-evaluations of the best parameters)."""
    result = finished(cfg, task, method, seed)
    if result is not None:
        return result
    run_dir = runs_root(cfg) / task / method / f"seed{seed}"
    algo, action_mode = METHODS[method]
    wandb_name = f"{task}/{method}/seed{seed}"  # as TensorBoard names it (the run directory under runs_dir)
    if algo is None:
        rounds = [_evaluate_base(task, cfg.eval_episodes, seed, r, cfg.eval_videos if r == 0 else 0)
                  for r in range(cfg.final_eval_rounds + 1)]
        videos = rounds[0].pop("videos")
        evals = [{"env_steps": 0, **rounds[0]}]
        summary = {"best_reevaluated": [r["success_rate"] for r in rounds[1:]]}
        tracker = RunTracker(run_dir, {"task": task, "method": method, "seed": seed, **run_budget(cfg)}, cfg.wandb,
                             cfg.name, wandb_name)
        tracker.evaluation(evals[0], videos)
        tracker.close()
    else:
        agent = agent_config(algo, cfg.size, action_mode, bc_steps=cfg.bc_steps,
                             critic_pretrain_steps=cfg.critic_steps, actor_warmup_steps=cfg.actor_warmup,
                             beta=cfg.beta, beta_units=cfg.beta_units)
        trainer = Trainer(TrainConfig(task=task, algo=algo, size=cfg.size, action_mode=action_mode,
                                      obs_mode=cfg.obs_mode, frame_codec=cfg.frame_codec,
                                      env_steps=cfg.env_steps, warmup=cfg.warmup, eval_every=cfg.eval_every,
                                      eval_episodes=cfg.eval_episodes, final_eval_rounds=cfg.final_eval_rounds,
                                      num_demos=cfg.demos_of(task), seed=seed, eval_videos=cfg.eval_videos,
                                      wandb=cfg.wandb, logdir=str(run_dir), agent=agent,
                                      resume=resumable(run_dir)),
                          progress=progress, wandb_group=cfg.name, wandb_name=wandb_name)
        summary = trainer.train()
        if summary.get("interrupted"):
            raise KeyboardInterrupt(f"{run_dir} stopped at {summary['env_steps']:,} env steps"
                                    + (", checkpointed" if resumable(run_dir) else ""))
        evals = trainer.evals
    result = {"task": task, "method": method, "seed": seed, "budget": run_budget(cfg), "summary": summary,
              "evals": [{"env_steps": e["env_steps"], "success_rate": e["success_rate"]} for e in evals],
              "best_reevaluated": summary["best_reevaluated"]}
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "summary.json").write_text(json.dumps(result, indent=2))
    return result


def _evaluate_base(task_name: str, episodes: int, seed: int, round: int, videos: int = 0) -> dict:
    """The base policy alone on the scenes a trained run of ``seed`` is evaluated on in ``round``."""
    task = get_task(task_name)
    return evaluate_policy(task, "state", str(ensure_base_policy(task.name)), None, None, "ensemble", episodes,
                           seeds.eval_scene(seed, round), videos)


def run_experiment(cfg: ExperimentConfig, command: str, progress: bool = True, report_only: bool = False) -> dict:
    """All runs (missing ones only), then table.md, curves.png and runs.csv; returns the summary numbers.

    ``report_only`` trains nothing: the outputs summarise the runs finished so far (cells say how many seeds)."""
    unknown = [m for m in cfg.methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    # seed-major: an experiment spread over several sittings has every method's seed 0 before any seed 1
    grid = [(task, method, seed) for task in cfg.tasks for seed in range(cfg.seeds) for method in cfg.methods]
    results = []
    for task, method, seed in grid:
        run_dir = runs_root(cfg) / task / method / f"seed{seed}"
        try:
            result = finished(cfg, task, method, seed) if report_only else run_one(cfg, task, method, seed, progress)
        except FloatingPointError as e:  # a diverged learner: the rest of the grid still runs, a rerun retries it
            log.warning("%s/%s/seed%d diverged, going on with the grid: %s", task, method, seed, e)
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / FAILED).write_text(json.dumps({"error": str(e)}, indent=2))
            continue
        if result is not None:
            (run_dir / FAILED).unlink(missing_ok=True)
            results.append(result)
    diverged = [f"{t}/{m}/seed{s}" for t, m, s in grid if (runs_root(cfg) / t / m / f"seed{s}" / FAILED).exists()]
    out = Path(cfg.out_dir) / cfg.name
    out.mkdir(parents=True, exist_ok=True)
    _write_csv(out / "runs.csv", results)
    stats = _statistics(cfg, results)
    (out / "table.md").write_text(_table(cfg, stats, command, missing=len(grid) - len(results), diverged=diverged))
    _plot(out / "curves.png", cfg, results)
    return {"experiment": cfg.name, "runs": len(results), "missing": len(grid) - len(results), "diverged": diverged,
            "out": str(out), "results": stats}


def _write_csv(path: Path, results: list[dict]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["task", "method", "seed", "env_steps", "success_rate"])
        for r in results:
            for e in r["evals"]:
                writer.writerow([r["task"], r["method"], r["seed"], e["env_steps"], e["success_rate"]])


def _quartiles(values: list[float]) -> list[float]:
    return [float(np.percentile(values, q)) for q in (50, 25, 75)]


def _statistics(cfg: ExperimentConfig, results: list[dict]) -> dict:
    """Per task and method: final success (median, 25th, 75th over seeds) and, against the paired base, the
    worst evaluation and whether it stayed within DROP_TOLERANCE of the base (per seed)."""
    by = {(r["task"], r["method"], r["seed"]): r for r in results}
    stats: dict = {}
    for task in cfg.tasks:
        for method in cfg.methods:
            runs = [by[task, method, s] for s in range(cfg.seeds) if (task, method, s) in by]
            if not runs:
                continue
            final = [r["evals"][-1]["success_rate"] for r in runs]
            entry = {"final": _quartiles(final), "seeds": len(runs)}
            if method != "base":  # the method's own start (base + BC-initialised small policy, before any update)
                start = [r["evals"][0]["success_rate"] for r in runs]
                later = [min(e["success_rate"] for e in r["evals"][1:]) for r in runs]
                entry.update(start=_quartiles(start), worst_after_start=_quartiles(later),
                             no_drop_from_start_seeds=sum(w >= s - DROP_TOLERANCE for w, s in zip(later, start)))
            paired = [(r, by[task, "base", r["seed"]]) for r in runs if (task, "base", r["seed"]) in by]
            if method != "base" and paired:
                base = [b["evals"][0]["success_rate"] for _, b in paired]
                worst = [min(e["success_rate"] for e in r["evals"]) for r, _ in paired]
                paired_final = [r["evals"][-1]["success_rate"] for r, _ in paired]
                entry.update(min_eval=_quartiles(worst), base=_quartiles(base), paired_seeds=len(paired),
                             no_drop_seeds=sum(w >= b - DROP_TOLERANCE for w, b in zip(worst, base)),
                             beats_base_seeds=sum(f > b for f, b in zip(paired_final, base)))
            _add_reevaluations(entry, runs, paired if method != "base" else [])
            stats.setdefault(task, {})[method] = entry
    return stats


def _add_reevaluations(entry: dict, runs: list[dict], paired: list[tuple[dict, dict]]) -> None:
    """The paper's number: each seed's best parameters, mean success over the re-evaluation rounds (quartiles
    over seeds), and its gain over the paired base on the same scenes (runs from before re-evaluation have none)."""
    reevaluated = [np.mean(r["best_reevaluated"]) for r in runs if r.get("best_reevaluated")]
    if reevaluated:
        entry.update(reevaluated=_quartiles([float(x) for x in reevaluated]), reevaluated_seeds=len(reevaluated))
    pairs = [(np.mean(r["best_reevaluated"]), np.mean(b["best_reevaluated"])) for r, b in paired
             if r.get("best_reevaluated") and b.get("best_reevaluated")]
    if pairs:
        entry.update(base_reevaluated=_quartiles([float(b) for _, b in pairs]),
                     gain=_quartiles([float(m - b) for m, b in pairs]),
                     improved_seeds=int(sum(m >= b + IMPROVEMENT - 1e-9 for m, b in pairs)), reevaluated_pairs=len(pairs))


def _beta_units_text(units: str) -> str:
    return {"nats": "per nat", "reward": "× the reward's (1−γ)/d_a per nat"}.get(units, units)


def _cell(q: list[float]) -> str:
    return f"{q[0]:.0%} [{q[1]:.0%}, {q[2]:.0%}]"


def _demos_text(cfg: ExperimentConfig) -> str:
    if cfg.num_demos is not None:
        return f"{cfg.num_demos} demos"
    return "the base policy's demos (" + ", ".join(f"{t} {cfg.demos_of(t)}" for t in cfg.tasks) + ")"


def _gain_cell(q: list[float]) -> str:
    return f"{q[0] * 100:+.0f} pp [{q[1] * 100:+.0f}, {q[2] * 100:+.0f}]"


def _seeds_cell(cfg: ExperimentConfig, entry: dict | None, key: str, count: str = "seeds") -> str:
    if entry is None or key not in entry:
        return "—"
    seeds = f" ({entry[count]} of {cfg.seeds} seeds)" if entry[count] < cfg.seeds else ""
    return _cell(entry[key]) + seeds


def _table(cfg: ExperimentConfig, stats: dict, command: str, missing: int = 0, diverged: list[str] = ()) -> str:
    lines = [f"# {cfg.name}", "", f"`{command}`", "",
             f"Budget: {cfg.env_steps:,} env steps per run (the paper: 500,000), evaluations every "
             f"{cfg.eval_every:,} steps on {cfg.eval_episodes} episodes, {cfg.seeds} seed{'s' * (cfg.seeds != 1)}, "
             f"{cfg.size}-size networks, {_demos_text(cfg)}, BC {cfg.bc_steps:,} / critic pretraining "
             f"{cfg.critic_steps:,} steps, actor-lr warmup {cfg.actor_warmup:,} updates, KL coefficient β = "
             f"{cfg.beta:g} ({_beta_units_text(cfg.beta_units)}), {cfg.obs_mode} "
             "observations, the local base policy (not π0.5). Cells: median [25th, 75th] over seeds.", ""]
    if missing:
        lines += [f"**Partial**: {missing} run{'s' * (missing != 1)} of this grid not finished yet; the command "
                  "above continues it (finished runs are reused).", ""]
    if diverged:
        lines += [f"**Diverged** (the learner's updates kept coming out non-finite; retried by the command above; "
                  f"`{FAILED}` and `diverged/` in the run directory say more): {', '.join(diverged)}.", ""]
    header = ["| method | " + " | ".join(cfg.tasks) + " |", "|---|" + "---|" * len(cfg.tasks)]
    if any("reevaluated" in e for t in stats.values() for e in t.values()):
        lines += ["## Best parameters re-evaluated (the paper's protocol)", "",
                  f"Each run's best-evaluated parameters, re-evaluated {cfg.final_eval_rounds} × {cfg.eval_episodes} "
                  "episodes on fresh scenes (mean over the rounds); base: the base alone on the same scenes.", "",
                  *header]
        for method in cfg.methods:
            cells = (_seeds_cell(cfg, stats.get(t, {}).get(method), "reevaluated", "reevaluated_seeds")
                     for t in cfg.tasks)
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines += ["", f"Gain over the paired base (same scenes; improved: ≥ +{IMPROVEMENT:.0%}):", "",
                  "| task | method | base | best re-evaluated | gain | seeds improved |", "|---|---|---|---|---|---|"]
        lines += _rows(cfg, stats, "gain", lambda e: f"{_cell(e['base_reevaluated'])} | {_cell(e['reevaluated'])} | "
                       f"{_gain_cell(e['gain'])} | {e['improved_seeds']}/{e['reevaluated_pairs']}")
        lines.append("")
    lines += ["## Final success (unselected: the last evaluation)", "", *header]
    for method in cfg.methods:
        cells = (_seeds_cell(cfg, stats.get(t, {}).get(method), "final") for t in cfg.tasks)
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    if "base" in cfg.methods:
        lines += ["", f"## No initial drop (worst evaluation ≥ paired base − {DROP_TOLERANCE:.0%})", "",
                  "| task | method | base | worst eval | seeds without drop | seeds above base at the end |",
                  "|---|---|---|---|---|---|"]
        lines += _rows(cfg, stats, "paired_seeds", lambda e: f"{_cell(e['base'])} | {_cell(e['min_eval'])} | "
                       f"{e['no_drop_seeds']}/{e['paired_seeds']} | {e['beats_base_seeds']}/{e['paired_seeds']}")
    lines += ["", f"## Drop from the method's own start (worst later evaluation ≥ step-0 evaluation − "
              f"{DROP_TOLERANCE:.0%})", "",
              "The step-0 evaluation is the BC-initialised small policy before any update, combined with the base "
              "(ensemble, residual: it differs from the base alone when the combination does) or alone (alone).",
              "",
              "| task | method | step 0 | worst later eval | seeds without drop |", "|---|---|---|---|---|"]
    lines += _rows(cfg, stats, "start", lambda e: f"{_cell(e['start'])} | {_cell(e['worst_after_start'])} | "
                   f"{e['no_drop_from_start_seeds']}/{e['seeds']}")
    return "\n".join(lines) + "\n"


def _rows(cfg: ExperimentConfig, stats: dict, needs: str, cells) -> list[str]:
    """``| task | method | cells(entry) |`` for every task and method whose entry has ``needs``."""
    return [f"| {task} | {method} | {cells(e)} |" for task in cfg.tasks for method in cfg.methods
            if (e := stats.get(task, {}).get(method)) and needs in e]


def _plot(path: Path, cfg: ExperimentConfig, results: list[dict]) -> None:
    fig, axes = plt.subplots(1, len(cfg.tasks), figsize=(5 * len(cfg.tasks), 3.8), squeeze=False)
    for ax, task in zip(axes[0], cfg.tasks):
        for method in cfg.methods:
            runs = [r for r in results if r["task"] == task and r["method"] == method]
            if not runs:
                continue
            if method == "base":
                ax.axhline(np.median([r["evals"][0]["success_rate"] for r in runs]), ls="--", c="gray", label="base")
                continue
            steps = [e["env_steps"] for e in runs[0]["evals"]]
            curves = np.array([[e["success_rate"] for e in r["evals"]][:len(steps)] for r in runs])
            median, low, high = (np.percentile(curves, q, axis=0) for q in (50, 25, 75))
            line, = ax.plot(steps, median, marker="o", label=method)
            ax.fill_between(steps, low, high, color=line.get_color(), alpha=0.2)
        ax.set(title=task, xlabel="env steps", ylabel="success rate", ylim=(-0.02, 1.02))
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
