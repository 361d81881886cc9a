"""Evaluation videos: MP4 through imageio's ffmpeg plugin (the ffmpeg binary ships in the imageio-ffmpeg wheel).

Frames are rendered by ``csil.envs.CsilEnv.render_cameras`` on the rollout worker and encoded there, so only the
compressed file travels back to the driver. ``CONTROL_FREQ`` steps are one second of the episode: a video of
every ``stride``-th step plays at ``CONTROL_FREQ / stride`` frames per second, i.e. in real time.
"""

from __future__ import annotations

import math
from pathlib import Path

import imageio.v3 as iio
import numpy as np

CONTROL_FREQ = 20  # Hz, csil.envs.robosuite_kwargs
FRAME_SIZE = 128  # pixels per camera (the two cameras side by side: 128 x 256)


def expected_frames(length: int, stride: int) -> int:
    """Frames of a filmed episode of ``length`` steps: the reset, every ``stride``-th step and the last step."""
    return 1 + math.ceil(length / stride)


def encode(frames: list[np.ndarray], stride: int) -> dict:
    """{"mp4": H.264 MP4 of the (H, W, 3) uint8 frames, played in real time, "gif": ``to_gif`` of them}."""
    frames = np.stack(frames)
    return {"mp4": iio.imwrite("<bytes>", frames, extension=".mp4", fps=CONTROL_FREQ / stride),
            "gif": to_gif(frames, CONTROL_FREQ / stride)}


def read_frames(path: str | Path) -> np.ndarray:
    """All frames of a video file, (T, H, W, 3) uint8."""
    return iio.imread(path, plugin="FFMPEG")


def to_gif(frames: np.ndarray, fps: float, max_frames: int = 100) -> bytes:
    """An animated GIF of at most ``max_frames`` frames at half resolution, for TensorBoard's image tab (it plays
    GIFs; it has no video player)."""
    step = max(1, math.ceil(len(frames) / max_frames))
    return iio.imwrite("<bytes>", frames[::step, ::2, ::2], extension=".gif", duration=1000 * step / fps, loop=0)
