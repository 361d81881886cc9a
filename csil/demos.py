"""Demonstration files in robomimic's HDF5 layout: read, write, and make their env settings usable here.

The layout (``data/demo_<i>`` with ``obs/``, ``next_obs/``, ``actions``, ``rewards``, ``dones``, ``states``,
attrs ``num_samples``/``model_file``/``ep_meta``; ``data.attrs["env_args"]`` as JSON; ``mask/<name>`` byte
arrays) is the one robomimic and MimicGen publish, so files written here train with robomimic unchanged and
their files load here. The reader follows robomimic's ``SequenceDataset`` on what is optional (rewards,
dones and next_obs may be missing; ``num_samples`` may not) and fails with an error that names the file, the
demo and the key, because a dataset bug found at training time costs hours.

Files from robosuite <= 1.4.1 (all MimicGen files) carry a controller config and env kwargs that robosuite
1.5.2 rejects or silently ignores; ``normalize_env_meta`` converts them.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import json
import os
import re
import warnings
from typing import Sequence

import h5py
import numpy as np

from csil.specs import ACTION_DIM, CAMERAS, PROPRIO_KEYS, STATE_KEYS, ObsSpec

_DEMO_NAME = re.compile(r"demo_\d+")


class DemoFileError(ValueError):
    """A demonstration file that does not have robomimic's layout; the message says where and what was expected."""


@dataclasses.dataclass
class Episode:
    """One demonstration; every array has the episode length N as its first dimension."""

    obs: dict[str, np.ndarray]
    actions: np.ndarray  # (N, 7) float32 in [-1, 1]
    rewards: np.ndarray  # (N,) float32, r(s') after each action
    dones: np.ndarray  # (N,) float32, robomimic done_mode 2: success state or last step
    next_obs: dict[str, np.ndarray] | None = None
    states: np.ndarray | None = None  # (N, D) flattened MuJoCo state before each action
    model_file: str | None = None  # MJCF xml, needed to reset a robosuite env to ``states``
    ep_meta: str | None = None  # JSON episode metadata (robosuite >= 1.5)
    seed: int | None = None  # the env seed it ran with, if known (what a resumed generator continues after)

    def __len__(self) -> int:
        return int(self.actions.shape[0])


@dataclasses.dataclass
class DemoDataset:
    """The demos read from one file, with the file's env settings and filter keys."""

    path: str
    env_meta: dict  # normalized: env_kwargs usable with the installed robosuite's suite.make
    episodes: list[Episode]
    masks: dict[str, list[str]]  # every filter key in the file, not only the one that was read
    names: list[str]  # demo name of each episode, in numeric order


# --- env metadata ----------------------------------------------------------------------------------------


def normalize_env_meta(env_meta: dict) -> dict:
    """Make a file's ``env_args`` buildable with the installed robosuite (1.5.2); returns a new dict.

    * robosuite <= 1.4.1 flat controller configs become 1.5's composite format (1.5.2 rejects the old form).
    * ``control_delta`` becomes ``input_type``: 1.5.2's OSC reads only ``input_type`` and would silently run
      an absolute-action dataset in delta mode.
    * kwargs the env class does not accept (``lite_physics`` written by 1.5 read on 1.4, removed options such
      as ``gripper_visualization``) are dropped with a warning naming them.
    * ``env_lang`` is removed, as robomimic does.
    """
    meta = copy.deepcopy(env_meta)
    kwargs = meta.setdefault("env_kwargs", {})
    kwargs.pop("env_lang", None)

    import robosuite  # imported here: reading arrays should not pay for robosuite's import
    from robosuite.controllers.composite.composite_controller_factory import refactor_composite_controller_config
    from robosuite.environments.base import REGISTERED_ENVS

    if "controller_configs" in kwargs:
        robots = kwargs.get("robots", "Panda")
        robot = robots if isinstance(robots, str) else robots[0]
        cfg = refactor_composite_controller_config(kwargs["controller_configs"], robot, ["right"])
        for part in cfg.get("body_parts", {}).values():
            if isinstance(part, dict) and "control_delta" in part:
                part["input_type"] = "delta" if part.pop("control_delta") else "absolute"
        kwargs["controller_configs"] = cfg

    env_cls = REGISTERED_ENVS.get(meta.get("env_name"))
    if env_cls is None:
        warnings.warn(
            f"environment {meta.get('env_name')!r} is not registered with robosuite {robosuite.__version__}; "
            "its env_kwargs were not checked (MimicGen environments need robosuite 1.4.1 and the MimicGen sources)",
            stacklevel=2,
        )
        return meta
    accepted = _accepted_kwargs(env_cls)
    if accepted is not None:
        dropped = sorted(k for k in kwargs if k not in accepted)
        if dropped:
            warnings.warn(
                f"dropping env_kwargs {dropped} that {env_cls.__name__} in robosuite {robosuite.__version__} "
                "does not accept",
                stacklevel=2,
            )
            for k in dropped:
                del kwargs[k]
    return meta


def _accepted_kwargs(cls: type) -> set[str] | None:
    """Keyword names ``cls(...)`` accepts, following ``**kwargs`` up the MRO (robosuite subclasses forward
    them to ``super().__init__``); None if the chain ends in ``**kwargs`` and so accepts anything."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        params = inspect.signature(klass.__init__).parameters.values()
        names |= {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            return names - {"self"}
    return None


# --- reading ---------------------------------------------------------------------------------------------


def read_demos(
    path: str | os.PathLike,
    obs_keys: Sequence[str] | None = None,
    num_demos: int | None = None,
    filter_key: str | None = None,
    load_next_obs: bool = True,
) -> DemoDataset:
    """Load demos (all, or those of mask ``filter_key``; the first ``num_demos`` of them) into memory.

    ``obs_keys=None`` loads every observation key. When a demo has no ``next_obs`` group and
    ``load_next_obs`` is set, next_obs is derived by shifting obs one step (the last step repeats the last
    observation), which is what the stored group would hold except at the final step.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"demo file {path} does not exist")
    if not h5py.is_hdf5(path):
        raise DemoFileError(f"{path}: not an HDF5 file; expected a robomimic demo file (data/demo_<i> groups)")
    try:
        with h5py.File(path, "r") as f:
            if not isinstance(f.get("data"), h5py.Group):
                raise DemoFileError(
                    f"{path}: no 'data' group; expected robomimic's layout data/demo_<i>. Top-level keys: {sorted(f)}"
                )
            data = f["data"]
            env_meta = normalize_env_meta(_read_env_args(path, data))
            masks = {k: _decode_names(f["mask"][k][()]) for k in f["mask"]} if "mask" in f else {}

            for name, item in data.items():
                if not (_DEMO_NAME.fullmatch(name) and isinstance(item, h5py.Group)):
                    raise DemoFileError(f"{path}: data/{name}: expected only groups named demo_<int> under data/")
            names = sorted(data, key=lambda s: int(s[5:]))
            where = "the file"
            if filter_key is not None:
                if filter_key not in masks:
                    raise DemoFileError(
                        f"{path}: unknown filter key {filter_key!r}; masks in the file: {sorted(masks) or 'none'}"
                    )
                missing = [n for n in masks[filter_key] if n not in data]
                if missing:
                    raise DemoFileError(f"{path}: mask/{filter_key} lists demos that data/ lacks: {missing}")
                names = sorted(masks[filter_key], key=lambda s: int(s[5:]))
                where = f"mask {filter_key!r}"
            if num_demos is not None:
                if num_demos > len(names):
                    raise DemoFileError(f"{path}: asked for {num_demos} demos but {where} has only {len(names)}")
                names = names[:num_demos]

            episodes = [_read_episode(path, name, data[name], obs_keys, load_next_obs) for name in names]
    except OSError as exc:  # h5py's error for a truncated or damaged file
        raise DemoFileError(f"{path}: cannot be read as HDF5 ({exc}); the file is truncated or damaged: "
                            "regenerate or re-download it") from None
    return DemoDataset(path=path, env_meta=env_meta, episodes=episodes, masks=masks, names=names)


def _read_env_args(path: str, data: h5py.Group) -> dict:
    if "env_args" not in data.attrs:
        raise DemoFileError(f"{path}: data has no 'env_args' attribute; expected robomimic's env metadata JSON")
    raw = data.attrs["env_args"]
    try:
        meta = json.loads(raw.decode("utf-8") if isinstance(raw, bytes) else raw)
    except (TypeError, ValueError) as exc:
        raise DemoFileError(f"{path}: data.attrs['env_args'] is not JSON ({exc}); expected a JSON object") from None
    if not isinstance(meta, dict) or "env_name" not in meta or not isinstance(meta.get("env_kwargs"), dict):
        raise DemoFileError(f"{path}: data.attrs['env_args'] must be a JSON object with 'env_name' and 'env_kwargs'")
    return meta


def _decode_names(arr: np.ndarray) -> list[str]:
    return [e.decode("utf-8") if isinstance(e, bytes) else str(e) for e in np.asarray(arr).reshape(-1)]


def _read_episode(
    path: str, name: str, group: h5py.Group, obs_keys: Sequence[str] | None, load_next_obs: bool
) -> Episode:
    where = f"{path}: data/{name}"
    if "num_samples" not in group.attrs:
        raise DemoFileError(f"{where}: missing attribute 'num_samples' (the episode length robomimic reads)")
    n = int(group.attrs["num_samples"])
    if "actions" not in group:
        raise DemoFileError(f"{where}: missing dataset 'actions'; expected ({n}, {ACTION_DIM}) float actions")
    actions = group["actions"][()]
    if actions.ndim != 2 or actions.shape[1] != ACTION_DIM or not np.issubdtype(actions.dtype, np.number):
        raise DemoFileError(
            f"{where}/actions: shape {actions.shape} dtype {actions.dtype}; expected (N, {ACTION_DIM}) float"
        )
    if actions.shape[0] != n:
        raise DemoFileError(f"{where}: attribute num_samples is {n} but actions has {actions.shape[0]} rows")
    if not np.all(np.isfinite(actions)):
        raise DemoFileError(f"{where}/actions: contains NaN or inf")

    def per_step(key: str) -> np.ndarray:
        """rewards/dones: zeros when absent, as robomimic's reader does."""
        if key not in group:
            return np.zeros(n, np.float32)
        arr = group[key][()]
        if arr.ndim == 0 or arr.shape[0] != n or arr.size != n:
            raise DemoFileError(f"{where}/{key}: shape {arr.shape}; expected ({n},)")
        return arr.reshape(n).astype(np.float32)

    obs = _read_obs(where, group, "obs", obs_keys, n)
    if not load_next_obs:
        next_obs = None
    elif "next_obs" in group:
        next_obs = _read_obs(where, group, "next_obs", list(obs), n)
    else:
        next_obs = {k: np.concatenate([v[1:], v[-1:]]) for k, v in obs.items()}

    states = None
    if "states" in group:
        states = group["states"][()]
        if states.ndim != 2 or states.shape[0] != n:
            raise DemoFileError(f"{where}/states: shape {states.shape}; expected ({n}, D)")

    return Episode(
        obs=obs,
        actions=actions.astype(np.float32),
        rewards=per_step("rewards"),
        dones=per_step("dones"),
        next_obs=next_obs,
        states=states,
        model_file=_str_attr(group, "model_file"),
        ep_meta=_str_attr(group, "ep_meta"),
    )


def _read_obs(where: str, group: h5py.Group, sub: str, keys: Sequence[str] | None, n: int) -> dict[str, np.ndarray]:
    stored = group[sub] if sub in group else {}
    if keys is None:
        keys = list(stored)
    out = {}
    for key in keys:
        if key not in stored:
            raise DemoFileError(f"{where}: no {sub}/{key!r}; keys present in {sub}/: {sorted(stored)}")
        arr = stored[key][()]
        if arr.ndim == 0 or arr.shape[0] != n:
            raise DemoFileError(f"{where}/{sub}/{key}: shape {arr.shape}; expected {n} steps (num_samples)")
        out[key] = arr
    return out


def _str_attr(group: h5py.Group, key: str) -> str | None:
    value = group.attrs.get(key)
    return value.decode("utf-8") if isinstance(value, bytes) else value


def flatten_obs(obs: dict[str, np.ndarray], spec: ObsSpec) -> dict[str, np.ndarray]:
    """robosuite-keyed observations -> the flat form the rest of the code uses (see ``csil.specs``):
    ``"state"`` (N, spec.state_dim) float32 in ``spec.state_keys`` order, plus ``spec.image_keys`` as uint8."""
    needed = [k for k, _ in spec.state_keys] + list(spec.image_keys)
    missing = [k for k in needed if k not in obs]
    if missing:
        raise ValueError(f"observations lack key(s) {missing} that the spec needs; present keys: {sorted(obs)}")
    lengths = {k: np.shape(obs[k])[0] for k in needed}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"observation keys have different numbers of steps: {lengths}")
    for key, width in spec.state_keys:
        shape = np.shape(obs[key])
        if len(shape) != 2 or shape[1] != width:
            raise ValueError(f"observation {key!r} has shape {shape}; the spec expects width {width}, i.e. (N, {width})")
    out = {"state": np.concatenate([obs[k] for k, _ in spec.state_keys], axis=1).astype(np.float32)}
    for key in spec.image_keys:
        out[key] = np.asarray(obs[key])
    spec.env.check(out)
    return out


# --- writing ---------------------------------------------------------------------------------------------


class DemoWriter:
    """Writes a robomimic demo file one episode at a time.

    Each ``add`` writes and flushes a complete ``demo_<i>`` group and updates ``data.attrs["total"]``, so a
    crashed generator leaves a readable file that lacks at most the episode in progress; ``resume`` continues such
    a file. ``close`` adds the filter keys (robomimic's train/valid split unless ``masks`` is given). ``source``
    (JSON-able) records what produced the demos, so that only the same generator resumes a file.
    """

    def __init__(self, path: str | os.PathLike, env_args: dict, compress_images: bool = True,
                 source: dict | None = None, resume: bool = False):
        self.path = os.fspath(path)
        self.compress_images = compress_images
        self.names: list[str] = []
        self.seeds: list[int | None] = []  # of the demos written, in order
        self.total = 0
        env_args_json = json.dumps(env_args, indent=4)  # fails before the file is created
        source_json = json.dumps(source or {}, sort_keys=True)
        if resume:
            self._file: h5py.File | None = h5py.File(self.path, "a")
            try:
                self._data = self._file["data"]
                self._reopen(env_args_json, source_json)
            except BaseException:
                self._file.close()  # the caller may start the file afresh
                self._file = None
                raise
            return
        self._file = h5py.File(self.path, "w")
        self._data = self._file.create_group("data")
        self._data.attrs["env_args"] = env_args_json
        self._data.attrs["source"] = source_json
        self._data.attrs["total"] = 0

    @classmethod
    def resume(cls, path: str | os.PathLike, env_args: dict, compress_images: bool = True,
               source: dict | None = None) -> "DemoWriter":
        """Continue a file a stopped writer left (``add`` appends after its demos; a demo it was killed inside is
        dropped, and filter keys are rewritten at ``close``). ``DemoFileError`` if the file cannot be read or was
        written for other env settings or by another ``source``."""
        try:
            return cls(path, env_args, compress_images, source, resume=True)
        except (OSError, KeyError) as err:
            raise DemoFileError(f"{path}: cannot resume this demo file ({err})") from err

    def _reopen(self, env_args_json: str, source_json: str) -> None:
        for attr, want in (("env_args", env_args_json), ("source", source_json)):
            if self._data.attrs.get(attr) != want:
                raise DemoFileError(f"{self.path}: written with other {attr}; it cannot be resumed")
        if "mask" in self._file:
            del self._file["mask"]
        names = sorted((n for n in self._data if n.startswith("demo_")), key=lambda n: int(n.split("_")[1]))
        for i, name in enumerate(names):
            if name != f"demo_{i}" or "num_samples" not in self._data[name].attrs:  # num_samples is written last
                for late in names[i:]:
                    del self._data[late]
                break
            self.names.append(name)
            self.seeds.append(int(self._data[name].attrs["seed"]) if "seed" in self._data[name].attrs else None)
            self.total += int(self._data[name].attrs["num_samples"])
        self._data.attrs["total"] = self.total

    def add(self, episode: Episode) -> str:
        """Write one episode as the next ``demo_<i>``; returns that name."""
        if self._file is None:
            raise RuntimeError(f"DemoWriter for {self.path} is closed")
        name = f"demo_{len(self.names)}"
        self._check(episode, f"{self.path}: {name}")
        group = self._data.create_group(name)
        try:
            if episode.model_file is not None:
                group.attrs["model_file"] = episode.model_file
            if episode.ep_meta is not None:
                group.attrs["ep_meta"] = episode.ep_meta
            if episode.seed is not None:
                group.attrs["seed"] = episode.seed
            group.create_dataset("actions", data=np.asarray(episode.actions, np.float32))
            group.create_dataset("rewards", data=np.asarray(episode.rewards, np.float32))
            group.create_dataset("dones", data=np.asarray(episode.dones).astype(np.int64))  # robomimic stores ints
            if episode.states is not None:
                group.create_dataset("states", data=np.asarray(episode.states))
            self._write_obs(group.create_group("obs"), episode.obs)
            if episode.next_obs is not None:
                self._write_obs(group.create_group("next_obs"), episode.next_obs)
            group.attrs["num_samples"] = len(episode)  # last: a demo without it was cut off (see resume)
        except BaseException:
            del self._data[name]  # never leave a half-written demo behind
            raise
        self.names.append(name)
        self.seeds.append(episode.seed)
        self.total += len(episode)
        self._data.attrs["total"] = self.total
        self._file.flush()
        return name

    def _write_obs(self, group: h5py.Group, obs: dict[str, np.ndarray]) -> None:
        for key, value in obs.items():
            arr = np.asarray(value)
            image = arr.dtype == np.uint8 and arr.ndim == 4
            group.create_dataset(key, data=arr, compression="gzip" if image and self.compress_images else None)

    @staticmethod
    def _check(episode: Episode, where: str) -> None:
        """Reject an inconsistent episode before anything of it is written."""
        actions = np.asarray(episode.actions)
        if actions.ndim != 2 or actions.shape[1] != ACTION_DIM or not np.all(np.isfinite(actions)):
            raise DemoFileError(f"{where}: actions have shape {actions.shape}; expected finite (N, {ACTION_DIM})")
        n = actions.shape[0]
        arrays = {"rewards": episode.rewards, "dones": episode.dones}
        arrays.update({f"obs/{k}": v for k, v in episode.obs.items()})
        arrays.update({f"next_obs/{k}": v for k, v in (episode.next_obs or {}).items()})
        if episode.states is not None:
            arrays["states"] = episode.states
        for key, value in arrays.items():
            shape = np.shape(value)
            if not shape or shape[0] != n:
                raise DemoFileError(f"{where}: {key} has shape {shape}; expected {n} steps (the number of actions)")

    def close(self, masks: dict[str, list[str]] | None = None, valid_fraction: float = 0.1, seed: int = 0) -> None:
        """Write the filter keys and close the file; closing twice is a no-op.

        Without ``masks``, writes robomimic's ``split_train_val`` split: ``int(valid_fraction * n)`` demos
        drawn at random (seeded) go to ``mask/valid``, the rest to ``mask/train``.
        """
        if self._file is None:
            return
        try:
            if masks is None:
                masks = self._train_valid_split(valid_fraction, seed)
            unknown = sorted({n for names in masks.values() for n in names} - set(self.names))
            if unknown:
                raise DemoFileError(f"{self.path}: masks name demos that were not written: {unknown}")
            group = self._file.create_group("mask")
            for key, names in masks.items():
                group.create_dataset(key, data=np.array(names, dtype="S"))
        finally:
            self._file.close()
            self._file = None

    def _train_valid_split(self, valid_fraction: float, seed: int) -> dict[str, list[str]]:
        is_valid = np.zeros(len(self.names), bool)
        is_valid[: int(valid_fraction * len(self.names))] = True
        np.random.default_rng(seed).shuffle(is_valid)
        return {
            "train": [n for n, v in zip(self.names, is_valid) if not v],
            "valid": [n for n, v in zip(self.names, is_valid) if v],
        }

    def __enter__(self) -> "DemoWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def spec_from_demos(path, obs: dict, obs_mode: str) -> ObsSpec:
    """The observation spec a policy trained on these demos will expect; missing keys are named."""
    keys = STATE_KEYS if obs_mode == "state" else PROPRIO_KEYS
    cameras = CAMERAS if obs_mode == "image" else ()
    missing = [k for k in list(keys) + [f"{c}_image" for c in cameras] if k not in obs]
    if missing:
        raise ValueError(f"{path}: the demos lack observation key(s) {missing} needed for {obs_mode!r} "
                         f"observations; present: {sorted(obs)}")
    size = int(obs[f"{cameras[0]}_image"].shape[1]) if cameras else 84
    return ObsSpec(obs_mode, tuple((k, int(obs[k].shape[-1])) for k in keys), cameras, size)
