"""The robosuite environment as every service sees it: robomimic settings, flat observations, explicit specs.

Why a wrapper at all: robosuite returns ~20 observation keys in an OrderedDict, never ends an episode on
success, flips images upside down (OpenGL convention) and, for NutAssembly, returns zeros for part of the
object state right after ``reset``. The wrapper fixes those once and stays thin: ``csil-bench env`` measures
its cost against the raw ``env.step`` loop. The same wrapper runs on robosuite 1.4 (the actor environment for
MimicGen's tasks, deploy/actor-env-rs14.sh), chosen by the installed version: ``legacy_robosuite``.
"""

from __future__ import annotations

import functools
import importlib.metadata
import logging
import os
from typing import Any

import numpy as np

from csil.specs import ACTION_DIM, CAMERAS, PROPRIO_KEYS, STATE_KEYS, BaseObsSpec, ObsMode, ObsSpec, OBS_MODES
from csil.tasks import TaskSpec, check_available, get_task, is_success

# robosuite picks EGL on Linux unless told otherwise; EGL works on CPU through Mesa's llvmpipe.
os.environ.setdefault("MUJOCO_GL", "egl")

RENDER_QUALITIES = ("default", "fast")
AXISANGLE_KEY = "robot0_eef_axisangle"  # derived: the eef quaternion as an axis-angle (LIBERO's state layout)


_ROBOSUITE_NOISE = ("macro file", "setup_macros.py", "robosuite_models", "mink-based", "Loading controller configuration")


def _drop_robosuite_noise(record) -> bool:
    """robosuite warns about optional robots and private macros on every import: noise for our tasks."""
    return not any(text in record.getMessage() for text in _ROBOSUITE_NOISE)


# Installed before robosuite is imported anywhere in this process (it logs at import time).
logging.getLogger("robosuite_logs").addFilter(_drop_robosuite_noise)


@functools.cache
def legacy_robosuite() -> bool:
    """Whether the installed robosuite is 1.4 (the actor environment for MimicGen's tasks) rather than 1.5:
    read from the package metadata, so asking does not import robosuite."""
    return importlib.metadata.version("robosuite").startswith("1.4")


def simulator_versions() -> str:
    """What this process steps, as imported: "robosuite X, mujoco Y" (csil-launch's summary has it per actor)."""
    import mujoco
    import robosuite

    return f"robosuite {robosuite.__version__}, mujoco {mujoco.__version__}"


def controller_config() -> dict:
    """Panda OSC_POSE delta control (robomimic's setting): robosuite 1.5's composite format, or 1.4's flat one."""
    if legacy_robosuite():
        from robosuite.controllers import load_controller_config

        return load_controller_config(default_controller="OSC_POSE")
    from robosuite.controllers import load_composite_controller_config

    return load_composite_controller_config(robot="Panda")


def robosuite_kwargs(task: TaskSpec, obs_mode: ObsMode, image_size: int = 84, seed: int | None = None,
                     offscreen: bool = False) -> dict:
    """The exact ``robosuite.make`` kwargs for a task; also written into demo files as ``env_args``.
    ``offscreen``: a renderer without camera observations (images rendered on demand for the base policy)."""
    image = obs_mode == "image"
    kwargs: dict[str, Any] = dict(
        robots=["Panda"],
        controller_configs=controller_config(),
        control_freq=20,
        horizon=task.horizon,
        ignore_done=True,  # we end episodes ourselves: on success or at the horizon
        reward_shaping=False,
        use_object_obs=True,
        use_camera_obs=image,
        has_renderer=False,
        has_offscreen_renderer=image or offscreen,
        camera_names=list(CAMERAS),
        camera_heights=image_size,
        camera_widths=image_size,
        camera_depths=False,
        hard_reset=False,  # ~2 ms instead of ~120 ms (1.5 s with cameras) per reset
    )
    if not legacy_robosuite():  # robosuite 1.4 has neither (CsilEnv seeds numpy's global generator there)
        kwargs.update(lite_physics=True, seed=seed)
    kwargs.update(dict(task.env_kwargs))
    return kwargs


def robomimic_env_args(task: TaskSpec, make_kwargs: dict) -> dict:
    """robomimic's ``env_args`` attribute (EnvRobosuite.serialize) for files written from such an env.

    Needs no simulator: writers get it without building an environment.
    """
    import robosuite

    kwargs = {k: v for k, v in make_kwargs.items() if k != "seed"}
    return {"env_name": task.env_name, "env_version": robosuite.__version__, "type": 1, "env_kwargs": kwargs}


class CsilEnv:
    """One robosuite task with robomimic settings, flat observations and success termination.

    ``seed`` fixes what robosuite randomises once at construction (Lift's cube size, say) and the episodes
    that follow; ``reset(seed)`` reseeds the environment's own generator, so with the same construction seed
    episode ``i`` of an evaluation is the same scene whichever worker runs it. ``step`` returns ``(obs, reward, terminated, truncated, info)`` where
    ``terminated`` means success and ``truncated`` means the robomimic horizon was reached.

    ``base_spec`` is what the base policy's requests carry (``base_request``), independent of ``obs_mode`` (what
    the small policy sees): a camera the small policy does not see, or sees at another size, is rendered on
    demand, only when a request is built (once per chunk, not every step).
    """

    def __init__(
        self,
        task: str | TaskSpec,
        obs_mode: ObsMode = "state",
        seed: int = 0,
        *,
        state_keys: tuple[str, ...] | None = None,
        image_size: int = 84,
        render_quality: str = "default",
        base_spec: BaseObsSpec | None = None,
    ):
        self.task = task if isinstance(task, TaskSpec) else get_task(task)
        check_available(self.task)
        if obs_mode not in OBS_MODES:
            raise ValueError(f"unknown observation mode {obs_mode!r}; choose one of {OBS_MODES}")
        if render_quality not in RENDER_QUALITIES:
            raise ValueError(f"unknown render quality {render_quality!r}; choose one of {RENDER_QUALITIES}")
        import robosuite

        self.base_spec = base_spec
        offscreen = base_spec is not None and bool(base_spec.images)
        self.make_kwargs = robosuite_kwargs(self.task, obs_mode, image_size, seed, offscreen=offscreen)
        if legacy_robosuite():
            np.random.seed(seed)  # robosuite 1.4 draws everything random from numpy's global generator
        self.env = robosuite.make(self.task.env_name, **self.make_kwargs)
        self.horizon = self.task.horizon
        self.render_quality = render_quality
        self._fast_render_applied = False

        raw = self._observe_raw()
        if state_keys is None:
            state_keys = STATE_KEYS if obs_mode == "state" else PROPRIO_KEYS
        unknown = [k for k in state_keys if k not in raw or np.asarray(raw[k]).ndim != 1]
        if unknown:
            low_dim = sorted([k for k, v in raw.items() if np.asarray(v).ndim == 1] + [AXISANGLE_KEY])
            raise ValueError(
                f"unknown observation key(s) {unknown} for task {self.task.name}; low-dim keys that exist: {low_dim}"
            )
        self.spec = ObsSpec(
            mode=obs_mode,
            state_keys=tuple((k, int(np.asarray(raw[k]).shape[0])) for k in state_keys),
            cameras=CAMERAS if obs_mode == "image" else (),
            image_size=image_size,
        )
        self._t = 0
        self._obs: dict[str, np.ndarray] = {}
        if base_spec is not None:
            self._check_base_spec(raw)

    def _check_base_spec(self, raw: dict) -> None:
        """The base policy's request must be producible here: name what it asks for and what this env has."""
        spec = self.base_spec
        low_dim = sorted([k for k, v in raw.items() if np.asarray(v).ndim == 1] + [AXISANGLE_KEY])
        missing = [k for k in spec.state_keys if k not in low_dim]
        if missing:
            raise ValueError(f"the base policy's state needs {list(spec.state_keys)}; task {self.task.name} has no "
                             f"{missing} (its low-dim keys: {low_dim})")
        cameras = list(self.env.sim.model.camera_names)
        for image in spec.images:
            if image.camera not in cameras:
                raise ValueError(f"the base policy asks for camera {image.camera!r} as {image.key!r}; task "
                                 f"{self.task.name} has cameras {cameras}")
            if image.flip not in ("rows", "both"):
                raise ValueError(f"unknown image orientation {image.flip!r} for {image.key!r}; 'rows' or 'both'")

    # --- robosuite access -------------------------------------------------------------------------------

    def _observe_raw(self, force: bool = True) -> dict[str, np.ndarray]:
        """robosuite's observation dict with robomimic's name for the object state."""
        raw = self.env._get_observations(force_update=force)
        return self._complete(raw)

    def _complete(self, raw: dict) -> dict[str, np.ndarray]:
        """robomimic's name for the object state."""
        raw["object"] = raw["object-state"]
        self.raw_obs = raw
        return raw

    def _low_dim(self, key: str) -> np.ndarray:
        """A robosuite low-dim observation, or LIBERO's axis-angle form of the end-effector rotation (computed
        only when a base policy's request needs it, not every step)."""
        if key == AXISANGLE_KEY:
            from robosuite.utils.transform_utils import quat2axisangle

            return quat2axisangle(np.asarray(self.raw_obs["robot0_eef_quat"], np.float64))
        return self.raw_obs[key]

    def base_request(self) -> dict[str, np.ndarray]:
        """The base policy's observation for the current state, by ``base_spec`` (without the prompt)."""
        spec = self.base_spec
        if spec is None:
            raise RuntimeError("CsilEnv.base_request without a base_spec")
        request = {"observation/state": np.concatenate([np.asarray(self._low_dim(k), np.float32).ravel()
                                                        for k in spec.state_keys])}
        for image in spec.images:
            ours = f"{image.camera}_image"
            if ours in self._obs and image.size == self.spec.image_size and image.flip == "rows":
                request[image.key] = self._obs[ours]  # the small policy's own frame: the same pixels
                continue
            frame = self.env.sim.render(width=image.size, height=image.size, camera_name=image.camera)
            request[image.key] = np.ascontiguousarray(frame[::-1] if image.flip == "rows" else frame[::-1, ::-1])
        return request

    def _flatten(self, raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        obs = {"state": np.concatenate([raw[k] for k, _ in self.spec.state_keys]).astype(np.float32)}
        for key in self.spec.image_keys:
            obs[key] = raw[key][::-1].copy()  # OpenGL rows bottom-up -> robomimic's top-down convention
        self._obs = obs
        return obs

    def _apply_fast_render(self) -> None:
        """Turn off shadows, reflections and skybox: 2-2.5x faster CPU steps at 84x84, different looks.
        Reflections (the table's mirror pass) are the whole of it: turning off shadows and skybox changed no pixel of
        Lift's cameras."""
        import mujoco

        ctx = self.env.sim._render_context_offscreen
        if ctx is None:
            return
        for flag in (mujoco.mjtRndFlag.mjRND_SHADOW, mujoco.mjtRndFlag.mjRND_REFLECTION, mujoco.mjtRndFlag.mjRND_SKYBOX):
            ctx.scn.flags[flag] = 0
        self._fast_render_applied = True

    # --- gym-like API --------------------------------------------------------------------------------

    def reset(self, seed: int | None = None) -> dict[str, np.ndarray]:
        if seed is not None and legacy_robosuite():
            np.random.seed(seed)
        elif seed is not None:
            self.env.rng.bit_generator.state = np.random.default_rng(seed).bit_generator.state
        self.env.reset()
        self._t = 0
        if self.spec.mode == "image" and self.render_quality == "fast" and not self._fast_render_applied:
            self._apply_fast_render()
        # A second forced update: robosuite computes some object-relative observables (NutAssembly's
        # nut-to-eef pose) from caches that are only filled during the first pass after a reset.
        return self._flatten(self._observe_raw(force=True))

    def step(self, action: np.ndarray) -> tuple[dict[str, np.ndarray], float, bool, bool, dict]:
        action = np.asarray(action, dtype=np.float64)
        if action.shape != (ACTION_DIM,):
            raise ValueError(f"action must have shape ({ACTION_DIM},), got {action.shape}")
        if not np.all(np.isfinite(action)):
            raise ValueError(f"action contains NaN or inf: {action}")
        raw, reward, _, _ = self.env.step(action)
        self._t += 1
        raw = self._complete(raw)  # robosuite's per-key dict, for recorders that store robomimic keys
        success = bool(is_success(reward))  # 1.0 on success; NutAssembly pays 0.5 for one nut of two
        return self._flatten(raw), float(reward), success, self._t >= self.horizon, {"success": success}

    @property
    def t(self) -> int:
        return self._t

    def env_args(self) -> dict:
        return robomimic_env_args(self.task, self.make_kwargs)

    def render_cameras(self, size: int) -> np.ndarray:
        """The cameras side by side, (size, len(CAMERAS) * size, 3) uint8, top row first (evaluation videos).

        A state-mode env has no offscreen renderer: the first call makes one, with robosuite's own settings (visual
        meshes only) and this env's ``render_quality``, so only the episodes that are filmed pay for rendering
        (~40 ms a step for both cameras on one CPU core with ``fast``, ~3x that with ``default``)."""
        sim = self.env.sim
        if sim._render_context_offscreen is None:
            from robosuite.utils.binding_utils import MjRenderContextOffscreen

            MjRenderContextOffscreen(sim, device_id=self.env.render_gpu_device_id)  # registers itself with sim
            sim._render_context_offscreen.vopt.geomgroup[0] = 1 if self.env.render_collision_mesh else 0
            sim._render_context_offscreen.vopt.geomgroup[1] = 1 if self.env.render_visual_mesh else 0
            if self.render_quality == "fast":
                self._apply_fast_render()
        return np.concatenate([sim.render(width=size, height=size, camera_name=c)[::-1] for c in CAMERAS], axis=1)

    def sim_state(self) -> np.ndarray:
        """Flattened MuJoCo state [time, qpos, qvel], robomimic's ``states`` row."""
        return np.asarray(self.env.sim.get_state().flatten())

    def close(self) -> None:
        self.env.close()
