"""Typed configuration, in one place. Every CLI flag maps onto a field here."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path


def cache_dir() -> Path:
    """Where generated demos and trained base policies are cached ($CSIL_CACHE, default ~/.cache/csil)."""
    return Path(os.environ.get("CSIL_CACHE", Path.home() / ".cache" / "csil"))


@dataclasses.dataclass(frozen=True)
class BaseTrainConfig:
    """The local base policy (CPU stand-in for pi0.5): an MLP that maps an observation to 10 actions.

    It is deliberately trained to be good but imperfect, like pi0.5 on robomimic tasks (Square 84% in the
    paper): ``num_demos`` and ``steps`` are the knobs; per-task settings live in ``BASE_POLICY_DEFAULTS``.
    """

    num_demos: int | None = None  # None: every demo in the file
    steps: int = 20_000
    batch_size: int = 256
    learning_rate: float = 1e-3  # cosine-decayed to 0 over ``steps``
    weight_decay: float = 1e-4
    hidden: tuple[int, ...] = (512, 512, 512)
    chunk_length: int = 10
    loss: str = "l1"  # "l1" (ACT's choice: sharper than MSE on multi-modal demos) or "mse"
    image_channels: tuple[int, ...] = (32, 64, 64)  # conv encoder per camera, image observations only
    image_shift: int = 4  # random-shift augmentation (pixels), image observations only
    seed: int = 0


# Settings that put the base policy's success between 30% and 85% (state observations, open-loop chunks
# of 10), measured with `csil-eval --episodes 50`; see README "Base policy" for the numbers.
BASE_POLICY_DEFAULTS: dict[str, BaseTrainConfig] = {
    "Lift": BaseTrainConfig(num_demos=25, steps=5_000),
    "Can": BaseTrainConfig(num_demos=50, steps=10_000),
    "Square": BaseTrainConfig(num_demos=100, steps=15_000),
}


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """Scripted-expert demonstrations (``csil-demos generate``)."""

    task: str = "Lift"
    num: int = 200
    obs_mode: str = "state"
    seed: int = 0
    noise: float | None = None  # None: the expert's default noise level
    workers: int = 0  # 0: one per CPU core


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Policy evaluation (``csil-eval``): episodes are seeded seed, seed+1, ... whatever the parallelism."""

    task: str = "Lift"
    policy: str = "base"
    episodes: int = 50
    seed: int = 1_000_000  # far from demo seeds (0, 1, ...), so evaluation scenes are not training scenes
    obs_mode: str = "state"
    workers: int = 0  # 0: one per CPU core
    envs_per_worker: int = 5
