"""The embedded default: cached demos and a cached base policy per task, built on first use.

Later commands (evaluation, and the trainer and launcher that build on this) ask for "the base policy of
Lift" and get the documented configuration from ``BASE_POLICY_DEFAULTS`` (``IMAGE_BASE_POLICY_DEFAULTS`` for a base on images), built once under the cache dir.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shutil
import sys
import time
from itertools import count
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from actors.rollout import run_episodes
from csil.base_policy import BCProgress, ChunkDataset, save_base_policy, train_base_policy
from csil.config import IMAGE_BASE_POLICY_DEFAULTS, BaseTrainConfig, DemoConfig, base_policy_defaults, cache_dir
from csil.demos import DemoFileError, DemoWriter, Episode, read_demos, spec_from_demos
from csil.envs import robomimic_env_args, robosuite_kwargs
from csil.experts import EXPERT_TASKS
from csil.tasks import get_task
from learner.checkpoint import restore_checkpoint, save_checkpoint


def generate_demos(cfg: DemoConfig, out: str | Path, progress: bool = True) -> dict:
    """Run the scripted expert on seeds cfg.seed, cfg.seed+1, ... and keep successful episodes only.

    Results are accepted in seed order (a contiguous prefix of seeds), so the file does not depend on how
    many workers ran or in which order they finished. The file is written as ``out``.partial and renamed when
    complete; a stopped run's partial file is resumed after its last demo's seed (rendered demos cost ~20 s each),
    so the result is the same file an uninterrupted run writes. Returns a summary with the expert's success rate.
    """
    task = get_task(cfg.task)
    if task.name not in EXPERT_TASKS:
        raise ValueError(f"no scripted expert for {task.name}; experts exist for {', '.join(EXPERT_TASKS)}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".partial")
    env_args = robomimic_env_args(task, robosuite_kwargs(task, cfg.obs_mode))
    start = time.time()
    writer = _resumed_writer(tmp, env_args, cfg)
    waiting: dict[int, object] = {}
    kept = len(writer.names)
    next_seed = writer.seeds[-1] + 1 if kept else cfg.seed
    attempted = next_seed - cfg.seed
    bar = tqdm(total=cfg.num, initial=min(kept, cfg.num), desc=f"{task.name} demos", unit="demo",
               disable=not progress)
    with writer:
        if kept < cfg.num:
            results = run_episodes(task.name, cfg.obs_mode, "expert", count(next_seed), prompt=task.prompt,
                                   workers=cfg.workers, record=True, noise=cfg.noise)
            for result in results:
                waiting[result.seed] = result
                while next_seed in waiting and kept < cfg.num:
                    res = waiting.pop(next_seed)
                    next_seed += 1
                    attempted += 1
                    if res.success:
                        writer.add(Episode(**res.trajectory, seed=res.seed))
                        kept += 1
                        bar.update(1)
                    bar.set_postfix(success=f"{kept / attempted:.0%}")
                if kept >= cfg.num:
                    break
            results.close()
    bar.close()
    tmp.replace(out)
    return {"task": task.name, "out": str(out), "demos": kept, "attempted": attempted,
            "expert_success_rate": kept / max(attempted, 1), "seconds": round(time.time() - start, 1)}


def _resumed_writer(tmp: Path, env_args: dict, cfg: DemoConfig) -> DemoWriter:
    """A writer that continues ``tmp`` if a stopped run with the same settings left it, else a fresh one."""
    source = {"expert": cfg.task, "obs_mode": cfg.obs_mode, "first_seed": cfg.seed, "noise": cfg.noise, "num": cfg.num}
    if tmp.exists():
        try:
            writer = DemoWriter.resume(tmp, env_args, source=source)
        except DemoFileError as err:
            print(f"starting {tmp} afresh: {err}")
        else:
            if None not in writer.seeds:
                if writer.names:
                    print(f"resuming {tmp}: {len(writer.names)} demos kept, continuing after seed {writer.seeds[-1]}")
                return writer
            writer.close()
            print(f"starting {tmp} afresh: its demos do not record their seeds")
    return DemoWriter(tmp, env_args, source=source)


def _key(obj) -> str:
    return hashlib.sha1(json.dumps(dataclasses.asdict(obj), sort_keys=True).encode()).hexdigest()[:8]


def _demo_path(task: str, obs_mode: str, num: int) -> Path:
    cfg = DemoConfig(task=task, num=num, obs_mode=obs_mode)
    return cache_dir() / "demos" / f"{task}_{obs_mode}_{num}_{_key(cfg)}.hdf5"


def ensure_demos(task: str, obs_mode: str = "state", num: int = DemoConfig.num) -> Path:
    """Path of a cached demo file of a task with at least ``num`` demos (its first ``num`` are the ones a
    ``num``-demo file would hold: seeds are kept in order), generating one with progress if there is none.
    State demos are cheap and made ``DemoConfig.num`` at a time; image demos are rendered (~5 s each on a core)
    only as many as asked for."""
    name = get_task(task).name
    sizes = sorted(int(m.group(1)) for f in (cache_dir() / "demos").glob(f"{name}_{obs_mode}_*.hdf5")
                   if (m := re.fullmatch(rf"{name}_{obs_mode}_(\d+)_[0-9a-f]{{8}}\.hdf5", f.name)))
    for n in sizes:
        if n >= num and (path := _demo_path(name, obs_mode, n)).exists():  # the key matches the other settings
            return path
    num = max(num, DemoConfig.num) if obs_mode == "state" else num
    path = _demo_path(name, obs_mode, num)
    print(f"generating {num} {name} demos into {path} (cached for later runs)")
    generate_demos(DemoConfig(task=name, num=num, obs_mode=obs_mode), path)
    return path


def ensure_base_policy(task: str, cfg: BaseTrainConfig | None = None, obs_mode: str = "state") -> Path:
    """Directory of the cached default base policy for a task on state or image observations, training it (with
    progress) if absent; image demos are rendered on first use, only as many as the base is trained on."""
    name = get_task(task).name
    unmeasured = cfg is None and obs_mode == "image" and name not in IMAGE_BASE_POLICY_DEFAULTS
    cfg = cfg or base_policy_defaults(name, obs_mode)
    out = cache_dir() / "base_policy" / f"{name}_{obs_mode}_{_key(cfg)}"
    if not (out / "base_policy.json").exists():
        if unmeasured:
            print(f"note: {name} has no measured image base-policy setting; this trains with its state setting "
                  f"({cfg.num_demos or DemoConfig.num} rendered demos, {cfg.steps:,} steps x batch {cfg.batch_size}) "
                  "and spatial-softmax pooling, whose success is unknown: hours of a CPU, see "
                  "results/base_policy.md", file=sys.stderr)
        demos = ensure_demos(name, obs_mode, cfg.num_demos or DemoConfig.num)
        print(f"training the {name} {obs_mode} base policy into {out} (cached for later runs)")
        train_base_from_file(demos, out, cfg, obs_mode=obs_mode)
    return out


class BCCheckpoints:
    """A base-policy training's progress in ``<out>/progress`` (``learner.checkpoint``: atomic), removed once the
    policy is saved, so that the same command continues a stopped run (Ctrl-C, SIGTERM, a killed process)."""

    def __init__(self, out: Path, run: dict):
        self.path, self.run = out / "progress", run  # ``run``: what must match for the progress to be continued

    def restore(self, fresh: BCProgress) -> BCProgress | None:
        if not (self.path / "record.json").exists():
            return None
        tree, record = restore_checkpoint(self.path, _bc_tree(fresh))
        if record["run"] != self.run:
            changed = {k: (record["run"].get(k), v) for k, v in self.run.items() if record["run"].get(k) != v}
            raise ValueError(f"{self.path} holds a stopped base-policy training with other settings (saved, asked): "
                             f"{changed}; delete it to start over, or choose another output directory")
        print(f"continuing base-policy training from step {record['step']:,} ({self.path})")
        return BCProgress(tree["params"], tree["opt_state"], tree["key"], record["step"], record["losses"])

    def save(self, progress: BCProgress) -> None:
        save_checkpoint(self.path, _bc_tree(progress), {"run": self.run, "step": progress.step,
                                                        "losses": progress.losses})


def _bc_tree(progress: BCProgress) -> dict:
    return {"params": progress.params, "opt_state": progress.opt_state, "key": progress.key}


def train_base_from_file(demos: str | Path, out: str | Path, cfg: BaseTrainConfig, obs_mode: str = "state",
                         progress: bool = True, should_stop: Callable[[], bool] = lambda: False) -> dict:
    """Read demos, train the chunking model, save an orbax checkpoint; returns a summary. A stopped training
    (``KeyboardInterrupt``) keeps its progress in ``out`` and the same call continues it (``BCCheckpoints``)."""
    start = time.time()
    data = read_demos(demos, num_demos=cfg.num_demos, load_next_obs=False)
    spec = spec_from_demos(demos, data.episodes[0].obs, obs_mode)
    dataset = ChunkDataset.from_episodes(data.episodes, spec, cfg.chunk_length)
    task, num_demos = get_task(data.env_meta["env_name"]).name, len(data.episodes)
    del data  # the episodes' frames: a copy of every image the dataset now holds
    out = Path(out)
    run = {"demos": str(Path(demos).absolute()), "obs": obs_mode, "frames": len(dataset.chunks),
           **dataclasses.asdict(cfg)}
    checkpoints = BCCheckpoints(out, json.loads(json.dumps(run)))  # as JSON gives it back (tuples -> lists)
    params, stats, losses = train_base_policy(dataset, spec, cfg, progress=progress, checkpointer=checkpoints,
                                              should_stop=should_stop)
    save_base_policy(out, params, stats, spec, cfg,
                     {"task": task, "demos": str(Path(demos).absolute()), "num_demos": num_demos,
                      "loss_curve": losses})
    shutil.rmtree(checkpoints.path, ignore_errors=True)
    return {"out": str(out), "task": task, "num_demos": num_demos, "steps": cfg.steps,
            "final_loss": losses[-1], "seconds": round(time.time() - start, 1)}
