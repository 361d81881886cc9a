"""Checkpoints keyed by names: a state that gained a field still restores, torn checkpoints are never read."""

from typing import NamedTuple

import jax
import numpy as np
import pytest

from csil.config import AgentConfig, CriticConfig, HetStatConfig
from csil.specs import ObsSpec
from learner.checkpoint import numbered_checkpoints, restore_checkpoint, save_checkpoint
from learner.core import LearnerCore


class Before(NamedTuple):
    policy: dict
    step: np.ndarray


class After(NamedTuple):  # the same state after a release added a field
    policy: dict
    step: np.ndarray
    temperature: np.ndarray = np.asarray(0.5, np.float32)


def test_a_checkpoint_written_before_a_field_was_added_still_restores(tmp_path):
    before = Before({"params": {"w": np.arange(6.0).reshape(2, 3)}}, np.asarray(7, np.int32))
    save_checkpoint(tmp_path / "ckpt", before, {"updates": 7})
    template = After({"params": {"w": np.zeros((2, 3))}}, np.asarray(0, np.int32))
    restored, record = restore_checkpoint(tmp_path / "ckpt", template)
    assert isinstance(restored, After) and record == {"updates": 7}
    np.testing.assert_array_equal(restored.policy["params"]["w"], before.policy["params"]["w"])
    assert int(restored.step) == 7 and float(restored.temperature) == 0.5  # the new field keeps its initial value


def test_a_checkpoint_of_another_network_size_is_refused_by_name(tmp_path):
    save_checkpoint(tmp_path / "ckpt", {"w": np.zeros((2, 3))}, {})
    with pytest.raises(ValueError, match=r"\['w'\] has shape \(2, 3\).*\(4, 3\)"):
        restore_checkpoint(tmp_path / "ckpt", {"w": np.zeros((4, 3))})


def test_a_torn_checkpoint_is_never_the_one_restored(tmp_path):
    save_checkpoint(tmp_path / "10", {"w": np.ones(3)}, {"updates": 10})
    (tmp_path / "20.partial" / "tree").mkdir(parents=True)  # a writer killed mid-save
    (tmp_path / "30").mkdir()  # a directory without its record
    assert numbered_checkpoints(tmp_path) == [tmp_path / "10"]
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        restore_checkpoint(tmp_path / "30", {"w": np.zeros(3)})


def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path):
    save_checkpoint(tmp_path / "best", {"w": np.ones(3)}, {"score": 1})
    (tmp_path / "best.partial").write_text("a file where the staging directory must go")
    with pytest.raises(OSError, match="previous checkpoint is kept"):
        save_checkpoint(tmp_path / "best", {"w": np.full(3, 2.0)}, {"score": 2})
    restored, record = restore_checkpoint(tmp_path / "best", {"w": np.zeros(3)})
    assert record == {"score": 1} and restored["w"].tolist() == [1.0, 1.0, 1.0]


def test_learner_core_saves_and_restores_its_whole_state(tmp_path):
    cfg = AgentConfig(policy=HetStatConfig(hidden=(16,), bottleneck=8, features=16),
                      critic=CriticConfig(hidden=(16,), num_atoms=11), batch_size=4)
    spec = ObsSpec("state", (("state", 5),))
    core = LearnerCore(cfg, spec, demos=None, seed=0)
    key = jax.random.PRNGKey(3)
    core.state = core.agent.init_state(key, core.agent.init_policy(key))
    core.updates = 12
    core.save(tmp_path, env_steps=48)
    core.updates = 13
    core.save(tmp_path, env_steps=52)
    core.updates = 14
    core.save(tmp_path, env_steps=56)
    assert [p.name for p in numbered_checkpoints(tmp_path)] == ["13", "14"]  # the newest two are kept

    fresh = LearnerCore(cfg, spec, demos=None, seed=1)
    assert fresh.restore(tmp_path) == {"updates": 14, "env_steps": 56} and fresh.updates == 14
    same = jax.tree_util.tree_map(lambda a, b: bool(np.array_equal(a, b)), fresh.state, core.state)
    assert all(jax.tree_util.tree_leaves(same))


@pytest.fixture
def small_disk(tmp_path):
    """A 512 KiB tmpfs (root only; skipped where mounting is not allowed)."""
    import subprocess

    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield disk
    subprocess.run(["umount", str(disk)], check=False)


def test_a_full_disk_is_a_clear_error_and_keeps_the_previous_checkpoint(small_disk):
    save_checkpoint(small_disk / "learner", {"w": np.ones(8, np.float32)}, {"updates": 1})
    with pytest.raises(OSError, match="previous checkpoint is kept"):
        noise = np.random.default_rng(0).random(1_000_000, np.float32)  # incompressible: 4 MB on a 512 KiB disk
        save_checkpoint(small_disk / "learner", {"w": noise}, {"updates": 2})
    restored, record = restore_checkpoint(small_disk / "learner", {"w": np.zeros(8, np.float32)})
    assert record == {"updates": 1} and restored["w"].sum() == 8
    assert not (small_disk / "learner.partial").exists()  # the torn attempt is cleaned up
