"""Evaluation: deterministic episodes of base + small policy, and the bookkeeping around them.

``evaluate_policy`` runs seeded episodes on Ray rollout workers that act through ``csil.acting`` in evaluation
mode (the small policy's mode) and get their base chunks from ``base``: the inference server for csil-launch
(the same client as the env actors, so evaluation measures what actors run), or the local base policy's
directory in-process for the single-process trainer. Scenes come from ``csil.seeds``: every periodic
evaluation of a run sees the same scenes as the base policy's evaluation for that seed (paired comparison).

``Evaluator`` keeps a run's evaluation history and its best parameters (saved whenever an evaluation beats
them, reloaded on ``--resume``), runs evaluations in order on a background thread (``submit``) or inline
(``evaluate``), and re-evaluates the best parameters on fresh scenes at the end (the paper's protocol). Its
state is read and written under one lock: the launcher's progress loop reads it while the evaluation thread
updates it.
"""

from __future__ import annotations

import concurrent.futures
import csv
import json
import logging
import threading
from pathlib import Path
from typing import Callable

import numpy as np

from actors.rollout import RolloutsCancelled, run_episodes
from csil import seeds
from learner.checkpoint import restore_checkpoint, save_checkpoint
from orchestration.plotting import plt
from orchestration.tracking import RunTracker

# Envs per rollout worker in an evaluation: a worker holds ~1.6 GB plus ~0.11 GB per Lift env, and the episodes
# of a call run in lockstep until the longest ends, so more envs per call buy nothing on a CPU. 50 base-alone Lift
# episodes on one worker: 143 s and 2.7 GB with 10 envs, 148 s and 4.4 GB with 25 (the former episodes // 2).
EVAL_ENVS_PER_WORKER = 10

log = logging.getLogger(__name__)

# (params or None for the base alone, first scene, episodes, videos, stop) -> {"success_rate", "mean_length",
# "mean_return", "mean_max_reward", "videos": [{"scene", "success", "length", "mp4", "gif"}] of the first
# ``videos`` scenes};
# raises ``RolloutsCancelled`` once ``stop`` (a threading.Event) is set
EvaluateFn = Callable[[object, int, int, int, threading.Event], dict]


def crossed(value: int, previous: int, every: int) -> bool:
    """Whether going from ``previous`` to ``value`` passed a multiple of ``every`` (evaluation/logging cadence)."""
    return value // every != previous // every


def evaluate_policy(task, obs_mode: str, base: str, params, network, action_mode: str, episodes: int,
                    first_scene: int, videos: int = 0, video_stride: int = 1, runtime_env: dict | None = None,
                    stop: threading.Event | None = None) -> dict:
    """Success rate, mean length and return over ``episodes`` seeded episodes; ``params=None`` evaluates the base
    alone. ``worker_restarts``: rollout workers that died and were retried on the same scenes. ``videos``: MP4s of
    the first that many episodes (every ``video_stride``-th step), rendered only for those; ``runtime_env``: the
    workers' Python environment (the launcher's ``--actor-env``); ``stop``: abandons the episodes when set
    (``RolloutsCancelled``)."""
    if params is None:
        policy = f"base:{base}"
    else:
        policy = {"base": base, "params": params, "network": network, "action_mode": action_mode}
    stats: dict = {}
    envs_per_worker = max(1, min(EVAL_ENVS_PER_WORKER, episodes // 2))
    results = list(run_episodes(task.name, obs_mode, policy, range(first_scene, first_scene + episodes),
                                prompt=task.prompt, envs_per_worker=envs_per_worker, stats=stats,
                                film=range(first_scene, first_scene + videos), video_stride=video_stride,
                                runtime_env=runtime_env, stop=stop))
    return {"success_rate": float(np.mean([r.success for r in results])),
            "mean_length": float(np.mean([r.length for r in results])),
            "mean_return": float(np.mean([r.env_return for r in results])),
            "mean_max_reward": float(np.mean([r.max_reward for r in results])),
            "worker_restarts": stats["worker_restarts"],
            "videos": [{"scene": r.seed, "success": r.success, "length": r.length, **r.video}
                       for r in sorted(results, key=lambda r: r.seed) if r.video is not None]}


class Evaluator:
    """A run's evaluations. ``evaluate_fn`` does the episodes (``evaluate_policy`` bound to the run's task and
    base policy); ``logdir`` gets ``evals.jsonl`` and ``checkpoints/best`` (None: nothing is written). Each
    periodic evaluation films its first ``videos`` episodes; ``tracker`` (a ``RunTracker``) gets every
    evaluation's numbers and videos."""

    def __init__(self, evaluate_fn: EvaluateFn, episodes: int, seed: int, logdir: Path | None = None,
                 videos: int = 0, tracker: RunTracker | None = None):
        self.evaluate_fn, self.episodes, self.seed, self.logdir = evaluate_fn, episodes, seed, logdir
        self.videos, self.tracker = min(videos, episodes), tracker
        self._lock = threading.Lock()
        self._history: list[dict] = []
        self._best: tuple[dict, object] | None = None
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="evaluator")
        self._pending: list[concurrent.futures.Future] = []
        self._stop = threading.Event()

    # --- reading (any thread) -------------------------------------------------------------------------

    @property
    def history(self) -> list[dict]:
        with self._lock:
            return list(self._history)

    @property
    def best(self) -> tuple[dict, object] | None:
        with self._lock:
            return self._best

    def last_success(self) -> float | None:
        with self._lock:
            return self._history[-1]["success_rate"] if self._history else None

    # --- evaluating -----------------------------------------------------------------------------------

    def evaluate(self, env_steps: int, version: int, params) -> dict:
        """Evaluate one snapshot now (round-0 scenes); record it, and keep it if it is the best so far."""
        if self._stop.is_set():
            raise RolloutsCancelled
        result = self.evaluate_fn(params, seeds.eval_scene(self.seed), self.episodes, self.videos, self._stop)
        videos = result.pop("videos", [])
        record = {"env_steps": env_steps, "updates": version, **result}
        if self.tracker is not None:
            self.tracker.evaluation(record, videos)
        with self._lock:
            self._history.append(record)
            improved = self._best is None or result["success_rate"] > self._best[0]["success_rate"]
            if improved:
                self._best = (record, params)
        if self.logdir is not None:
            with (self.logdir / "evals.jsonl").open("a") as f:
                f.write(json.dumps(record) + "\n")
            if improved:
                save_checkpoint(self.logdir / "checkpoints" / "best", params, record)
        return record

    def submit(self, env_steps: int, version: int, params) -> None:
        """``evaluate`` on the background thread (evaluations run one at a time, in order)."""
        self._pending.append(self._executor.submit(self.evaluate, env_steps, version, params))

    def collect(self, wait: bool = False) -> None:
        """Re-raise a failed background evaluation; with ``wait``, finish all pending ones first (after
        ``cancel``, that is at once: they are dropped)."""
        for future in list(self._pending):
            if wait or future.done():
                try:
                    future.result()
                except RolloutsCancelled:
                    pass
                self._pending.remove(future)

    def cancel(self) -> None:
        """Abandon the evaluation in progress and every later one (a stop request: the user's Ctrl-C must not
        wait for episodes). Nothing of a cancelled evaluation is recorded; ``evaluate`` and ``reevaluate_best``
        raise ``RolloutsCancelled`` from then on. A resumed run evaluates at its start."""
        if not self._stop.is_set():
            log.warning("stopping: the evaluation in progress, if any, is abandoned")
        self._stop.set()

    def reevaluate_best(self, rounds: int) -> dict:
        """The paper's protocol: the best parameters re-evaluated ``rounds`` times on fresh scenes."""
        self.collect(wait=True)
        if self._stop.is_set():
            raise RolloutsCancelled
        record, params = self.best
        scores = [self.evaluate_fn(params, seeds.eval_scene(self.seed, r), self.episodes, 0,
                                   self._stop)["success_rate"] for r in range(1, rounds + 1)]
        if self.tracker is not None and scores:
            self.tracker.scalars(self.history[-1]["env_steps"], {"eval/best_reevaluated": float(np.mean(scores))})
        return {"final_eval": self.history[-1]["success_rate"], "best_eval": record["success_rate"],
                "best_env_steps": record["env_steps"], "best_reevaluated": scores}

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    # --- resume ---------------------------------------------------------------------------------------

    def load(self, params_template) -> None:
        """The history and best parameters a resumed run had written to ``logdir``."""
        evals = self.logdir / "evals.jsonl"
        history = [json.loads(line) for line in evals.read_text().splitlines()] if evals.exists() else []
        best_dir = self.logdir / "checkpoints" / "best"
        best = None
        if (best_dir / "record.json").exists():
            params, record = restore_checkpoint(best_dir, params_template)
            best = (record, params)
        with self._lock:
            self._history, self._best = history, best


def write_eval_results(logdir: Path, evals: list[dict], label: str, title: str) -> None:
    """evals.csv and learning_curve.png (success vs env steps, the level at the start marked)."""
    with (logdir / "evals.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(evals[0]))
        writer.writeheader()
        writer.writerows(evals)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([e["env_steps"] for e in evals], [e["success_rate"] for e in evals], marker="o", label=label)
    ax.axhline(evals[0]["success_rate"], ls="--", c="gray", label="at start (BC + base)")
    ax.set(xlabel="env steps", ylabel="success rate", ylim=(-0.02, 1.02), title=title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(logdir / "learning_curve.png", dpi=120)
    plt.close(fig)
