"""Observation and action specs: the one description networks, replay and the wire format are built from.

An observation is always a flat dict of arrays: ``"state"`` (float32, the low-dim keys concatenated in a
recorded order) plus, in image mode, one uint8 HxWx3 array per camera under robosuite's key name. The spec
records which robosuite key fills which slice of ``state`` so that data written today can be read back and
checked against the environment that produced it.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Literal, NamedTuple

import numpy as np

ObsMode = Literal["state", "image"]
OBS_MODES: tuple[str, ...] = ("state", "image")

# robomimic's benchmark observation keys (robomimic/scripts/generate_paper_configs.py).
STATE_KEYS = ("robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos", "object")
PROPRIO_KEYS = ("robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos")
CAMERAS = ("agentview", "robot0_eye_in_hand")

ACTION_DIM = 7  # OSC_POSE delta (dx, dy, dz, axis-angle) + gripper, all in [-1, 1]
CHUNK_LENGTH = 10  # actions per base-policy query (pi0.5 LIBERO action_horizon)


@dataclasses.dataclass(frozen=True)
class ArraySpec:
    shape: tuple[int, ...]
    dtype: str

    def zeros(self, batch: tuple[int, ...] = ()) -> np.ndarray:
        return np.zeros(batch + self.shape, self.dtype)


@dataclasses.dataclass(frozen=True)
class ObsSpec:
    """Which robosuite keys make up an observation, and their sizes."""

    mode: ObsMode
    state_keys: tuple[tuple[str, int], ...]  # (robosuite key, width) in concatenation order
    cameras: tuple[str, ...] = ()
    image_size: int = 84

    @property
    def state_dim(self) -> int:
        return sum(width for _, width in self.state_keys)

    @property
    def image_keys(self) -> tuple[str, ...]:
        return tuple(f"{cam}_image" for cam in self.cameras)

    def arrays(self) -> dict[str, ArraySpec]:
        """Shape and dtype of every array in an observation dict."""
        specs = {"state": ArraySpec((self.state_dim,), "float32")}
        for key in self.image_keys:
            specs[key] = ArraySpec((self.image_size, self.image_size, 3), "uint8")
        return specs

    def state_slices(self) -> dict[str, slice]:
        """Where each robosuite key lives inside the flat ``state`` vector."""
        out, start = {}, 0
        for key, width in self.state_keys:
            out[key] = slice(start, start + width)
            start += width
        return out

    def check(self, obs: dict[str, np.ndarray]) -> None:
        """Raise a ValueError naming the first key whose shape or dtype does not match."""
        for key, spec in self.arrays().items():
            if key not in obs:
                raise ValueError(f"observation lacks {key!r}; expected keys {sorted(self.arrays())}")
            arr = np.asarray(obs[key])
            if arr.shape[-len(spec.shape):] != spec.shape or arr.dtype != np.dtype(spec.dtype):
                raise ValueError(
                    f"observation {key!r} has shape {arr.shape} dtype {arr.dtype}; expected {spec.shape} {spec.dtype}"
                )

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "ObsSpec":
        raw = json.loads(text)
        return cls(
            mode=raw["mode"],
            state_keys=tuple((k, int(w)) for k, w in raw["state_keys"]),
            cameras=tuple(raw["cameras"]),
            image_size=int(raw["image_size"]),
        )


# The replay tables: online transitions (FIFO, rate-limited: the UTD control) and all demo transitions.
ONLINE_TABLE, DEMO_TABLE = "online", "demos"


class Transition(NamedTuple):
    """One replay item, the same in both tables (so demo and online batches stack alike).

    ``action`` is the small policy's own action a_pi (the env executes its combination with ``base_action``);
    ``discount`` is 0 at a terminal (success) step; ``next_action`` is the demonstrator's next action for demos
    (SARSA pretraining) and repeats ``action`` online; ``policy_version`` measures staleness; ``episode_id`` is
    -1 for demos. Fields are arrays, with a leading batch axis when several transitions travel together.
    """

    obs: dict
    action: np.ndarray
    base_action: np.ndarray
    reward: np.ndarray
    discount: np.ndarray
    next_obs: dict
    next_action: np.ndarray
    policy_version: np.ndarray
    episode_id: np.ndarray
