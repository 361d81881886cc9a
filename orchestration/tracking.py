"""Curves and videos where researchers look: TensorBoard event files in the run directory, and Weights & Biases
when asked. The one logging path of csil-launch, csil-train and csil-experiment (one TensorBoard run per run
directory, so ``tensorboard --logdir`` on a parent directory compares runs, an experiment's seeds and methods).

TensorBoard through TF's own summary writer (TensorFlow is installed for Reverb anyway); its image tab plays
animated GIFs, so evaluation videos go there as GIFs (every few frames, half resolution) and as MP4 files
under ``<run>/videos/``, named with the env steps, the scene and success or failure. W&B (``pip install
'csil[wandb]'``, ``--wandb PROJECT``; ``WANDB_MODE=offline`` writes ``<run>/wandb/`` without network, for a later
``wandb sync``) gets the same scalars, keyed by ``env_steps``, and the MP4s.

Every series is plotted against env steps. Calls may come from any thread (the evaluator logs from its own).
"""

from __future__ import annotations

import threading
from pathlib import Path

import imageio.v3 as iio
import tensorflow as tf
from tensorboard.plugins.image import metadata as image_metadata

FLUSH_S = 10  # a live run shows up in TensorBoard within this many seconds


class RunTracker:
    """``scalars`` and ``evaluation`` go to TensorBoard in ``logdir`` and, with ``wandb_project``, to W&B
    (``wandb_group`` groups the runs of one experiment, ``wandb_name`` names this one: default the run directory's
    name); ``close`` flushes both."""

    def __init__(self, logdir: str | Path, config: dict, wandb_project: str | None = None,
                 wandb_group: str | None = None, wandb_name: str | None = None):
        self.logdir = Path(logdir)
        self.logdir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._writer = tf.summary.create_file_writer(str(self.logdir), flush_millis=FLUSH_S * 1000)
        self._wandb = _wandb_run(self.logdir, config, wandb_project, wandb_group,
                                 wandb_name or self.logdir.name) if wandb_project else None

    def scalars(self, env_steps: int, values: dict[str, float | None]) -> None:
        """``{"group/name": value}`` at ``env_steps`` (None values are skipped)."""
        values = {k: float(v) for k, v in values.items() if v is not None}
        with self._lock:
            with self._writer.as_default(step=env_steps):
                for name, value in values.items():
                    tf.summary.scalar(name, value)
            if self._wandb is not None:
                self._wandb.log({"env_steps": env_steps, **values})

    def evaluation(self, record: dict, videos: list[dict]) -> None:
        """One evaluation (``Evaluator`` record) and its filmed episodes (``evaluate_policy``'s ``videos``)."""
        steps = record["env_steps"]
        keys = ("success_rate", "mean_length", "mean_return", "mean_max_reward")
        self.scalars(steps, {f"eval/{k}": record.get(k) for k in keys})
        for video in videos:
            outcome = "success" if video["success"] else "failure"
            path = self.logdir / "videos" / f"eval-{steps:09d}-scene{video['scene']}-{outcome}.mp4"
            path.parent.mkdir(exist_ok=True)
            path.write_bytes(video["mp4"])
            self.video(f"eval/video/scene{video['scene']}", steps, path, video["gif"],
                       f"{outcome}, {video['length']} steps")

    def video(self, tag: str, env_steps: int, path: Path, gif: bytes, caption: str) -> None:
        """An MP4 file (W&B) and its GIF (TensorBoard's image tab)."""
        height, width = iio.improps(gif, extension=".gif").shape[1:3]
        tensor = tf.constant([str(width), str(height), gif])
        with self._lock:
            with self._writer.as_default(step=env_steps):
                tf.summary.write(tag, tensor, metadata=image_metadata.create_summary_metadata(tag, caption))
            if self._wandb is not None:
                import wandb

                self._wandb.log({"env_steps": env_steps, tag: wandb.Video(str(path), caption=caption, format="mp4")})

    def close(self) -> None:
        with self._lock:
            self._writer.close()
            if self._wandb is not None:
                self._wandb.finish()
                self._wandb = None


def _wandb_run(logdir: Path, config: dict, project: str, group: str | None, name: str):
    """A W&B run in ``logdir/wandb``; a resumed csil-launch run continues the same W&B run (its id is kept in
    ``logdir/wandb_run_id``)."""
    try:
        import wandb
    except ImportError:
        raise SystemExit("--wandb needs the wandb package: pip install -e '.[wandb]'") from None
    id_file = logdir / "wandb_run_id"
    run_id = id_file.read_text().strip() if id_file.exists() else wandb.util.generate_id()
    id_file.write_text(run_id)
    run = wandb.init(project=project, group=group, name=name, id=run_id,
                     resume="allow", dir=str(logdir), config=config)
    run.define_metric("*", step_metric="env_steps")
    return run
