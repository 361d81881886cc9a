"""Observation and action specs: the one description networks, replay and the wire format are built from.

An observation is always a flat dict of arrays: ``"state"`` (float32, the low-dim keys concatenated in a
recorded order) plus, in image mode, one uint8 HxWx3 array per camera under robosuite's key name, plus, for a
residual small policy, ``"base_plan"``: the base action played at this step and its place in its chunk. The spec
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

# Our flat observation keys -> the LIBERO-style keys an openpi π0.5 server expects.
OPENPI_KEYS = {"state": "observation/state", "agentview_image": "observation/image",
               "robot0_eye_in_hand_image": "observation/wrist_image"}

ACTION_DIM = 7  # OSC_POSE delta (dx, dy, dz, axis-angle) + gripper, all in [-1, 1]
CHUNK_LENGTH = 10  # actions per base-policy query (pi0.5 LIBERO action_horizon)
BASE_PLAN_DIM = ACTION_DIM + 1  # "base_plan": the base action a_base, then k/H (its index k in its chunk of H)


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
    base_plan: bool = False  # the small policy also sees "base_plan" (residual mode: ``csil.acting``)

    @property
    def env(self) -> "ObsSpec":
        """What an environment or a demo file provides: this spec without ``base_plan`` (the acting step adds it)."""
        return dataclasses.replace(self, base_plan=False)

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
        if self.base_plan:
            specs["base_plan"] = ArraySpec((BASE_PLAN_DIM,), "float32")
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
            base_plan=bool(raw.get("base_plan", False)),  # specs written before it existed have none
        )


@dataclasses.dataclass(frozen=True)
class CameraRequest:
    """One image a base policy's request carries: which camera, rendered at what size, in which orientation."""

    key: str  # the request's key, e.g. "observation/image"
    camera: str  # robosuite camera name
    size: int  # rendered height = width, sent as is
    # "rows": robomimic's top-down convention (our demos, our local base policy); "both": LIBERO's, robosuite's
    # raw frame rotated 180 degrees (openpi's LIBERO example does ``img[::-1, ::-1]``).
    flip: str = "rows"


@dataclasses.dataclass(frozen=True)
class BaseObsSpec:
    """What a base policy's requests must carry, read from its server's metadata (``observation_sources``).

    It is independent of what the small policy sees (``ObsSpec``): a state small policy on an image base policy
    is π0.5's case. ``state_keys`` are robosuite low-dim keys concatenated into ``"observation/state"``
    (``robot0_eef_axisangle`` is the end-effector quaternion as an axis-angle, LIBERO's state layout)."""

    state_keys: tuple[str, ...]
    images: tuple[CameraRequest, ...] = ()

    @classmethod
    def of_local(cls, spec: ObsSpec) -> "BaseObsSpec":
        """What our local base policy, trained on ``spec`` observations, needs (robomimic orientation)."""
        return cls(tuple(k for k, _ in spec.state_keys),
                   tuple(CameraRequest(OPENPI_KEYS[f"{cam}_image"], cam, spec.image_size) for cam in spec.cameras))

    def to_metadata(self) -> dict:
        return {"state_keys": list(self.state_keys), "images": [dataclasses.asdict(i) for i in self.images]}

    @classmethod
    def from_metadata(cls, metadata: dict) -> "BaseObsSpec":
        """From a server's metadata frame. openpi's own servers send none (``{}`` for pi05_libero): they get
        LIBERO's layout, which is what openpi's LIBERO checkpoints were trained on."""
        sources = metadata.get("observation_sources")
        if sources is None:
            if "server" not in metadata:  # not one of ours: a plain openpi server
                return PI05_LIBERO
            raise ValueError(f"the base-policy server's metadata has no 'observation_sources' (keys: "
                             f"{sorted(metadata)}): cannot tell which cameras and state to send")
        return cls(tuple(sources["state_keys"]), tuple(CameraRequest(**i) for i in sources["images"]))



# openpi's pi05_libero (and pi0_libero): 8-d state (eef position, axis-angle, gripper joints), both cameras.
# We render them at 224x224, the size openpi resizes to, so its resize is the identity.
PI05_LIBERO = BaseObsSpec(
    state_keys=("robot0_eef_pos", "robot0_eef_axisangle", "robot0_gripper_qpos"),
    images=(CameraRequest("observation/image", "agentview", 224, "both"),
            CameraRequest("observation/wrist_image", "robot0_eye_in_hand", 224, "both")),
)


# The replay table of online transitions (FIFO, rate-limited: the UTD control). The demos are on the learner's device.
ONLINE_TABLE = "online"


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
