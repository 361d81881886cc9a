"""Tests for csil.demos: round trips, robomimic/MimicGen files from robosuite 1.4.1, malformed files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from csil.demos import DemoFileError, DemoWriter, Episode, flatten_obs, normalize_env_meta, read_demos
from csil.envs import robosuite_kwargs
from csil.specs import ObsSpec
from csil.tasks import get_task

STATE_WIDTHS = {"robot0_eef_pos": 3, "robot0_eef_quat": 4, "robot0_gripper_qpos": 2, "object": 10}
IMAGE = 8  # small images keep the files tiny

# A robosuite 1.4.1 controller config, as in every MimicGen file.
OLD_OSC_POSE = {
    "type": "OSC_POSE", "input_max": 1, "input_min": -1,
    "output_max": [0.05, 0.05, 0.05, 0.5, 0.5, 0.5], "output_min": [-0.05, -0.05, -0.05, -0.5, -0.5, -0.5],
    "kp": 150, "damping": 1, "impedance_mode": "fixed", "kp_limits": [0, 300], "damping_limits": [0, 10],
    "position_limits": None, "orientation_limits": None, "uncouple_pos_ori": True, "control_delta": True,
    "interpolation": None, "ramp_ratio": 0.2,
}


def make_episode(n: int, rng: np.random.Generator, next_obs: bool = True) -> Episode:
    obs = {k: rng.normal(size=(n, w)) for k, w in STATE_WIDTHS.items()}
    obs["agentview_image"] = rng.integers(0, 256, (n, IMAGE, IMAGE, 3), dtype=np.uint8)
    dones = np.zeros(n, np.float32)
    dones[-1] = 1.0
    return Episode(
        obs=obs,
        actions=rng.uniform(-1, 1, (n, 7)).astype(np.float32),
        rewards=dones.copy(),
        dones=dones,
        next_obs={k: v + 1 for k, v in obs.items()} if next_obs else None,
        states=rng.normal(size=(n, 32)),
        model_file=f"<mujoco model='{n}'/>",
        ep_meta=json.dumps({"length": n}),
    )


def lift_env_args() -> dict:
    return {"env_name": "Lift", "env_version": "1.5.2", "type": 1,
            "env_kwargs": robosuite_kwargs(get_task("Lift"), "state")}


# --- round trip ------------------------------------------------------------------------------------------


def test_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "demo.hdf5"
    episodes = [make_episode(3 + i % 4, rng) for i in range(12)]
    env_args = lift_env_args()
    with DemoWriter(path, env_args) as writer:
        assert [writer.add(ep) for ep in episodes] == [f"demo_{i}" for i in range(12)]

    with h5py.File(path, "r") as f:
        assert f["data"].attrs["total"] == sum(len(ep) for ep in episodes)
        assert json.loads(f["data"].attrs["env_args"]) == json.loads(json.dumps(env_args))
        assert f["data/demo_0/obs/agentview_image"].compression == "gzip"
        assert f["data/demo_0/obs/object"].compression is None
        assert f["mask/train"].dtype.kind == "S"

    ds = read_demos(path)
    assert ds.names == [f"demo_{i}" for i in range(12)]  # numeric, not lexicographic, order
    assert ds.env_meta == json.loads(json.dumps(env_args))  # our own files need no normalizing
    assert len(ds.masks["valid"]) == 1 and len(ds.masks["train"]) == 11
    assert sorted(ds.masks["train"] + ds.masks["valid"], key=lambda s: int(s[5:])) == ds.names
    for want, got in zip(episodes, ds.episodes):
        assert len(got) == len(want)
        assert got.actions.dtype == np.float32 and got.rewards.dtype == np.float32 and got.dones.dtype == np.float32
        np.testing.assert_array_equal(got.actions, want.actions)
        np.testing.assert_array_equal(got.dones, want.dones)
        np.testing.assert_array_equal(got.states, want.states)
        for key in want.obs:
            np.testing.assert_array_equal(got.obs[key], want.obs[key])
            np.testing.assert_array_equal(got.next_obs[key], want.next_obs[key])
        assert got.obs["agentview_image"].dtype == np.uint8
        assert (got.model_file, got.ep_meta) == (want.model_file, want.ep_meta)

    valid = read_demos(path, filter_key="valid", obs_keys=["object"], load_next_obs=False)
    assert valid.names == ds.masks["valid"]
    assert list(valid.episodes[0].obs) == ["object"] and valid.episodes[0].next_obs is None
    assert read_demos(path, num_demos=2, filter_key="train").names == ds.masks["train"][:2]

    spec = ObsSpec("image", tuple(STATE_WIDTHS.items()), cameras=("agentview",), image_size=IMAGE)
    flat = flatten_obs(ds.episodes[0].obs, spec)
    assert set(flat) == {"state", "agentview_image"}
    assert flat["state"].shape == (len(episodes[0]), spec.state_dim) and flat["state"].dtype == np.float32
    np.testing.assert_allclose(flat["state"][:, spec.state_slices()["object"]], episodes[0].obs["object"], rtol=1e-6)


def test_writer_explicit_masks_and_missing_next_obs(tmp_path):
    rng = np.random.default_rng(1)
    path = tmp_path / "demo.hdf5"
    writer = DemoWriter(path, lift_env_args(), compress_images=False)
    bad = make_episode(4, rng)
    bad.obs["object"] = bad.obs["object"][:3]
    with pytest.raises(DemoFileError, match=r"demo_0: obs/object has shape \(3, 10\); expected 4 steps"):
        writer.add(bad)
    ep = make_episode(4, rng, next_obs=False)
    assert writer.add(ep) == "demo_0"  # the rejected episode left nothing behind
    writer.add(make_episode(2, rng, next_obs=False))
    with pytest.raises(DemoFileError, match="demo_7"):
        writer.close(masks={"good": ["demo_7"]})
    writer.close()  # closed by the failed call; a second close is a no-op

    path2 = tmp_path / "demo2.hdf5"
    with DemoWriter(path2, lift_env_args(), compress_images=False) as writer:
        writer.add(ep)
        writer.add(make_episode(2, rng, next_obs=False))
        writer.close(masks={"good": ["demo_1"]})
    ds = read_demos(path2)
    assert ds.masks == {"good": ["demo_1"]}
    with h5py.File(path2, "r") as f:
        assert "next_obs" not in f["data/demo_0"]
        assert f["data/demo_0/obs/agentview_image"].compression is None
    # next_obs derived by shifting obs one step; the last step repeats the last observation
    derived = ds.episodes[0].next_obs["robot0_eef_pos"]
    np.testing.assert_array_equal(derived[:-1], ep.obs["robot0_eef_pos"][1:])
    np.testing.assert_array_equal(derived[-1], ep.obs["robot0_eef_pos"][-1])


def test_crashed_writer_leaves_a_readable_file_that_resumes(tmp_path):
    """Each add is flushed: a process killed mid-run keeps every finished episode and a correct total, and a
    writer resumed on that file continues after them (a demo cut off mid-write is dropped)."""
    path = tmp_path / "crash.hdf5"
    script = f"""
import os, sys, numpy as np
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_demos import make_episode
from csil.demos import DemoWriter
rng = np.random.default_rng(0)
writer = DemoWriter({str(path)!r}, {{"env_name": "Lift", "env_kwargs": {{"robots": ["Panda"]}}}})
writer.add(make_episode(3, rng))
writer.add(make_episode(4, rng))
writer._data.create_group("demo_2").create_dataset("actions", data=np.zeros((5, 7)))  # killed inside an add
writer._file.flush()
os._exit(1)
"""
    assert subprocess.run([sys.executable, "-c", script]).returncode == 1
    with h5py.File(path, "r") as f:
        assert f["data"].attrs["total"] == 7 and "mask" not in f
    assert read_demos(path, num_demos=2).names == ["demo_0", "demo_1"]
    env_args = {"env_name": "Lift", "env_kwargs": {"robots": ["Panda"]}}
    with pytest.raises(DemoFileError, match="other env_args"):
        DemoWriter.resume(path, {**env_args, "env_name": "Can"})
    with pytest.raises(DemoFileError, match="other source"):
        DemoWriter.resume(path, env_args, source={"expert": "Lift"})
    with DemoWriter.resume(path, env_args) as writer:  # the cut-off demo is dropped, the finished ones kept
        assert writer.names == ["demo_0", "demo_1"] and writer.total == 7
        assert writer.add(make_episode(2, np.random.default_rng(5))) == "demo_2"
    ds = read_demos(path)
    assert [len(ep) for ep in ds.episodes] == [3, 4, 2] and sorted(ds.masks) == ["train", "valid"]


# --- robomimic / MimicGen files from robosuite 1.4.1 ------------------------------------------------------


def write_raw(path, env_args, demos=("demo_1", "demo_0"), n=5, mask=("demo_0",)):
    """A file in robomimic/MimicGen layout, written without csil: no next_obs, no rewards."""
    rng = np.random.default_rng(2)
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        data.attrs["env_args"] = env_args if isinstance(env_args, str) else json.dumps(env_args)
        data.attrs["total"] = n * len(demos)
        for name in demos:
            g = data.create_group(name)
            g.attrs["num_samples"] = n
            g.attrs["model_file"] = "<mujoco/>"
            g.create_dataset("actions", data=rng.uniform(-1, 1, (n, 7)))
            g.create_dataset("states", data=rng.normal(size=(n, 32)))
            g.create_dataset("dones", data=np.arange(n) == n - 1)
            for key, width in STATE_WIDTHS.items():
                g.create_dataset(f"obs/{key}", data=rng.normal(size=(n, width)))
        f.create_dataset("mask/train", data=np.array(mask, dtype="S"))


def old_env_args(**extra) -> dict:
    kwargs = {
        "has_renderer": False, "has_offscreen_renderer": False, "ignore_done": True, "use_object_obs": True,
        "use_camera_obs": False, "control_freq": 20, "controller_configs": dict(OLD_OSC_POSE), "robots": ["Panda"],
        "camera_depths": False, "camera_heights": 84, "camera_widths": 84, "reward_shaping": False,
    }
    kwargs.update(extra)
    return {"env_name": "Lift", "env_version": "1.4.1", "type": 1, "env_kwargs": kwargs}


def test_old_format_file_builds_an_env(tmp_path):
    import robosuite

    path = tmp_path / "mimicgen.hdf5"
    write_raw(path, old_env_args(gripper_visualization=True, env_lang="lift the cube"))
    with pytest.warns(UserWarning, match="gripper_visualization"):
        ds = read_demos(path)
    assert ds.names == ["demo_0", "demo_1"] and ds.masks == {"train": ["demo_0"]}
    ep = ds.episodes[0]
    assert ep.rewards.shape == (5,) and not ep.rewards.any()  # absent rewards read as zeros
    np.testing.assert_array_equal(ep.dones, [0, 0, 0, 0, 1])
    np.testing.assert_array_equal(ep.next_obs["object"][:-1], ep.obs["object"][1:])
    assert ep.ep_meta is None and ep.model_file == "<mujoco/>"

    kwargs = ds.env_meta["env_kwargs"]
    assert "gripper_visualization" not in kwargs and "env_lang" not in kwargs
    right = kwargs["controller_configs"]["body_parts"]["right"]
    assert kwargs["controller_configs"]["type"] == "BASIC"
    assert right["type"] == "OSC_POSE" and right["input_type"] == "delta" and "control_delta" not in right
    env = robosuite.make(ds.env_meta["env_name"], **kwargs)
    try:
        env.reset()
        obs, reward, done, info = env.step(ep.actions[0])
        assert obs["robot0_eef_pos"].shape == (3,)
        assert env.robots[0].part_controllers["right"].input_type == "delta"
    finally:
        env.close()


def test_control_delta_false_becomes_absolute():
    meta = old_env_args()
    meta["env_kwargs"]["controller_configs"]["control_delta"] = False
    right = normalize_env_meta(meta)["env_kwargs"]["controller_configs"]["body_parts"]["right"]
    assert right["input_type"] == "absolute" and "control_delta" not in right
    assert meta["env_kwargs"]["controller_configs"]["control_delta"] is False  # input left untouched

    # robosuite 1.5 files (HF v1.5 datasets) carry control_delta inside the composite config
    composite = {"type": "BASIC", "body_parts": {"right": {"type": "OSC_POSE", "input_type": "delta",
                                                           "control_delta": False}}}
    meta = {"env_name": "Lift", "env_kwargs": {"robots": ["Panda"], "controller_configs": composite}}
    assert normalize_env_meta(meta)["env_kwargs"]["controller_configs"]["body_parts"]["right"]["input_type"] == "absolute"

    with pytest.warns(UserWarning, match="'Coffee_D0' is not registered"):
        normalize_env_meta({"env_name": "Coffee_D0", "env_kwargs": {"robots": ["Panda"]}})


def test_subclass_kwargs_are_followed_to_the_base_class():
    """NutAssemblySquare.__init__ takes only **kwargs; its real parameters live on NutAssembly."""
    meta = {"env_name": "NutAssemblySquare",
            "env_kwargs": {"robots": ["Panda"], "lite_physics": True, "horizon": 400, "bogus": 1}}
    with pytest.warns(UserWarning, match=r"\['bogus'\]"):
        kwargs = normalize_env_meta(meta)["env_kwargs"]
    assert kwargs == {"robots": ["Panda"], "lite_physics": True, "horizon": 400}


# --- malformed files -------------------------------------------------------------------------------------


def _edit(path, fn):
    with h5py.File(path, "a") as f:
        fn(f)


def _rename(f, old, new):
    f.move(old, new)


def _set_attr(obj, key, value):
    obj.attrs[key] = value


MALFORMED = {
    "env_args_not_json": (lambda f: _set_attr(f["data"], "env_args", "{not json"), {},
                          ["env_args", "not JSON"]),
    "env_args_missing": (lambda f: f["data"].attrs.__delitem__("env_args"), {}, ["no 'env_args' attribute"]),
    "actions_missing": (lambda f: f["data/demo_1"].__delitem__("actions"), {},
                        ["data/demo_1", "missing dataset 'actions'", "(5, 7)"]),
    "actions_nan": (lambda f: f["data/demo_0/actions"].__setitem__((0, 0), np.nan), {},
                    ["data/demo_0/actions", "NaN"]),
    "actions_1d": (lambda f: (f["data/demo_0"].__delitem__("actions"),
                              f["data/demo_0"].create_dataset("actions", data=np.zeros(5))), {},
                   ["data/demo_0/actions", "expected (N, 7)"]),
    "num_samples_mismatch": (lambda f: _set_attr(f["data/demo_0"], "num_samples", 9), {},
                             ["data/demo_0", "num_samples is 9 but actions has 5 rows"]),
    "num_samples_missing": (lambda f: f["data/demo_1"].attrs.__delitem__("num_samples"), {},
                            ["data/demo_1", "'num_samples'"]),
    "bad_demo_name": (lambda f: _rename(f, "data/demo_1", "data/episode_1"), {},
                      ["data/episode_1", "demo_<int>"]),
    "unknown_filter_key": (lambda f: None, {"filter_key": "bogus"}, ["'bogus'", "['train']"]),
    "mask_names_missing_demo": (lambda f: (f["mask"].__delitem__("train"),
                                           f.create_dataset("mask/train", data=np.array(["demo_7"], "S"))),
                                {"filter_key": "train"}, ["mask/train", "demo_7"]),
    "obs_key_missing": (lambda f: None, {"obs_keys": ["object", "robot0_joint_pos"]},
                        ["data/demo_0", "'robot0_joint_pos'", "robot0_eef_pos"]),
    "obs_wrong_length": (lambda f: (f["data/demo_1/obs"].__delitem__("object"),
                                    f["data/demo_1/obs"].create_dataset("object", data=np.zeros((4, 10)))), {},
                         ["data/demo_1/obs/object", "expected 5 steps"]),
    "num_demos_too_large": (lambda f: None, {"num_demos": 5}, ["asked for 5 demos", "only 2"]),
    "num_demos_too_large_in_mask": (lambda f: None, {"num_demos": 2, "filter_key": "train"},
                                    ["asked for 2 demos", "mask 'train' has only 1"]),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_file_errors_name_the_problem(tmp_path, case):
    edit, kwargs, expected = MALFORMED[case]
    path = tmp_path / "bad.hdf5"
    write_raw(path, {"env_name": "Lift", "env_kwargs": {"robots": ["Panda"]}})
    _edit(path, edit)
    with pytest.raises(DemoFileError) as err:
        read_demos(path, **kwargs)
    message = str(err.value)
    for part in [str(path), *expected]:
        assert part in message, f"{part!r} not in {message!r}"


def test_not_hdf5_missing_file_and_no_data_group(tmp_path):
    text = tmp_path / "notes.hdf5"
    text.write_text("not hdf5\n")
    with pytest.raises(DemoFileError, match=f"{text}: not an HDF5 file"):
        read_demos(text)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_demos(tmp_path / "absent.hdf5")
    empty = tmp_path / "empty.hdf5"
    with h5py.File(empty, "w") as f:
        f.create_group("something_else")
    with pytest.raises(DemoFileError, match=f"{empty}: no 'data' group.*something_else"):
        read_demos(empty)


def test_flatten_obs_errors():
    spec = ObsSpec("state", (("robot0_eef_pos", 3), ("object", 10)))
    obs = {"robot0_eef_pos": np.zeros((4, 3)), "object": np.zeros((4, 14))}
    with pytest.raises(ValueError, match=r"'object' has shape \(4, 14\); the spec expects width 10"):
        flatten_obs(obs, spec)
    with pytest.raises(ValueError, match=r"lack key\(s\) \['object'\].*present keys: \['robot0_eef_pos'\]"):
        flatten_obs({"robot0_eef_pos": np.zeros((4, 3))}, spec)
    image_spec = ObsSpec("image", (("robot0_eef_pos", 3),), cameras=("agentview",), image_size=IMAGE)
    with pytest.raises(ValueError, match="agentview_image"):
        flatten_obs({"robot0_eef_pos": np.zeros((4, 3)), "agentview_image": np.zeros((4, IMAGE, IMAGE, 3))},
                    image_spec)
    assert flatten_obs({"robot0_eef_pos": np.ones((4, 3)), "object": np.ones((4, 10))}, spec)["state"].shape == (4, 13)


def test_cached_demos_render_only_what_is_asked_and_reuse_larger_files(tmp_path, monkeypatch, lift_image_setup):
    """Image demos take ~5 s each to render: a first image run asking for 1 gets 1 (not the 200 state runs
    cache), and a cached file with more demos serves any smaller request."""
    from orchestration.pipeline import _demo_path, ensure_demos

    monkeypatch.setenv("CSIL_CACHE", str(tmp_path))
    one = ensure_demos("Lift", "image", 1)
    assert len(read_demos(one, load_next_obs=False).episodes) == 1
    assert "agentview_image" in read_demos(one, load_next_obs=False).episodes[0].obs
    two = _demo_path("Lift", "image", 2)
    two.write_bytes(lift_image_setup[1].read_bytes())  # 2 demos as csil-demos would render them
    assert ensure_demos("Lift", "image", 2) == two and ensure_demos("Lift", "image", 1) == one
    assert sorted(p.name for p in (tmp_path / "demos").iterdir()) == sorted([one.name, two.name])
