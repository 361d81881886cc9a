"""The online replay on the learner's device (``csil-launch --replay-on-device``): the ring, the learner's updates
drawn from it, its checkpoint, Reverb's queue that feeds it (a real server), and csil-launch with it end to end
(stopped and resumed on a Ray cluster in tests/test_ray_jobs.py)."""

import dataclasses
import json

import jax
import numpy as np
import pytest

from csil.config import AgentConfig, CriticConfig, HetStatConfig, LaunchConfig, ReplayConfig
from csil.specs import ONLINE_TABLE, ObsSpec, Transition
from learner.batch import Batch
from learner.checkpoint import numbered_checkpoints, read_arrays
from learner.core import LearnerCore
from learner.device_replay import DeviceReplay
from orchestration.launcher import System
from replay.server import BatchIterator, ReplayServer, TransitionWriter
from replay.writer import CHUNK_LENGTH, MAX_IN_FLIGHT

SPEC = ObsSpec("state", (("state", 5),))
CFG = AgentConfig(policy=HetStatConfig(hidden=(16,), bottleneck=8, features=16),
                  critic=CriticConfig(hidden=(16,), num_atoms=11), batch_size=4, utd=2)


def transitions(first: int, n: int) -> Batch:
    """Transitions numbered first..first+n-1: every column carries the number (next_obs: number + 0.5)."""
    i = np.arange(first, first + n, dtype=np.float32)
    return Batch({"state": np.repeat(i[:, None], 5, 1)}, np.repeat(i[:, None], 7, 1) / 1e3,
                 np.ones(n, np.float32), {"state": np.repeat(i[:, None] + 0.5, 5, 1)}, np.zeros((n, 7), np.float32))


def numbers(batch: Batch) -> np.ndarray:
    return np.asarray(batch.obs["state"][..., 0])


def test_the_ring_holds_camera_frames_as_they_came():
    frames = np.random.default_rng(0).integers(0, 256, (6, 84, 84, 3), np.uint8)
    batch = Batch({"state": np.zeros((5, 9), np.float32), "agentview_image": frames[:5]}, np.zeros((5, 7), np.float32),
                  np.ones(5, np.float32), {"state": np.ones((5, 9), np.float32), "agentview_image": frames[1:]},
                  np.zeros((5, 7), np.float32))
    ring = DeviceReplay(100, jax.tree_util.tree_map(lambda x: x[0], batch))
    ring.append(batch)
    state = ring.state()
    assert state["obs/agentview_image"].dtype == np.uint8
    np.testing.assert_array_equal(state["obs/agentview_image"], frames[:5])
    np.testing.assert_array_equal(state["next_obs/agentview_image"], frames[1:])
    drawn = ring.sample(jax.random.PRNGKey(0), (16,))
    assert drawn.obs["agentview_image"].shape == (16, 84, 84, 3) and drawn.next_obs["state"].mean() == 1


def test_the_ring_keeps_the_newest_transitions_and_draws_only_from_them():
    ring = DeviceReplay(10, jax.tree_util.tree_map(lambda x: x[0], transitions(0, 1)))
    ring.append(transitions(0, 3))
    drawn = ring.sample(jax.random.split(jax.random.PRNGKey(0), 3), (4, 50))
    assert drawn.obs["state"].shape == (3, 4, 50, 5) and set(np.unique(numbers(drawn))) == {0, 1, 2}
    ring.append(transitions(3, 9))  # wraps: 0 and 1 are dropped, oldest first
    assert (len(ring), ring.added) == (10, 12)
    drawn = ring.sample(jax.random.PRNGKey(1), (2000,))
    assert set(np.unique(numbers(drawn))) == set(range(2, 12))  # uniform over what it holds
    np.testing.assert_array_equal(drawn.next_obs["state"][:, 0], numbers(drawn) + 0.5)  # the same transition
    np.testing.assert_allclose(drawn.action[:, 0], numbers(drawn) / 1e3)

    state = ring.state()
    np.testing.assert_array_equal(state["obs/state"][:, 0], np.arange(2, 12))  # oldest first
    larger = DeviceReplay(5000, jax.tree_util.tree_map(lambda x: x[0], transitions(0, 1)))
    larger.load(state)  # memory follows the contents: it allocates rows as they come, doubling
    assert (larger.rows, larger.added) == (1024, 12)
    larger.append(transitions(12, 1100))
    assert larger.rows == 2048 and len(larger) == 1110
    np.testing.assert_array_equal(larger.state()["next_obs/state"][:, 0], np.arange(2, 1112) + 0.5)
    smaller = DeviceReplay.from_state(4, state)
    np.testing.assert_array_equal(smaller.state()["obs/state"][:, 0], np.arange(8, 12))  # the newest that fit
    assert smaller.added == 12


def _core(**kwargs) -> LearnerCore:
    core = LearnerCore(CFG, SPEC, demos=DemoStub(), seed=0, **kwargs)
    key = jax.random.PRNGKey(3)
    core.state = core.agent.init_state(key, core.agent.init_policy(key))
    return core


class DemoStub:
    """Demos for the demo half: the numbered transitions 100..139 on the device."""

    def on_device(self):
        from learner.batch import DemoPool

        return jax.device_put(DemoPool.of(transitions(100, 40)))


def test_updates_drawn_on_the_device_fuse_and_checkpoint_with_the_ring(tmp_path):
    """K updates from the device replay in one call are the K single ones; the checkpoint holds the ring, and a
    restored learner holds the same transitions and counts."""
    chained, fused = _core(device_replay=32), _core(device_replay=32)
    for core in (chained, fused):
        core.add_online(transitions(0, 20))
    for _ in range(3):
        chained.step_on_device(1)
    fused.step_on_device(3)
    assert chained.updates == fused.updates == 3
    close = jax.tree_util.tree_map(lambda a, b: bool(np.allclose(a, b, rtol=1e-4, atol=1e-5)), chained.state,
                                   fused.state)
    assert all(jax.tree_util.tree_leaves(close))
    assert not all(jax.tree_util.tree_leaves(jax.tree_util.tree_map(
        lambda a, b: bool(np.array_equal(a, b)), chained.state.critic, _core().state.critic)))  # it did learn

    fused.add_online(transitions(20, 30))  # wraps at 32
    fused.save(tmp_path, env_steps=50)
    restored = _core(device_replay=32)
    assert restored.restore(tmp_path) == {"updates": 3, "env_steps": 50}
    assert restored.online_added == 50 and len(restored.online) == 32
    for name, column in fused.online.state().items():
        np.testing.assert_array_equal(restored.online.state()[name], column)
    plain = _core()  # a learner fed by Reverb ignores what is not its own
    plain.restore(tmp_path)
    assert plain.online is None and plain.online_added == 0


def test_reverb_hands_each_transition_to_the_learner_once_and_holds_back_writers(tmp_path):
    cfg = ReplayConfig(samples_per_insert=8.0, min_size=40, on_device=True)
    assert cfg.queue_size == 8  # the limiter's slack: 8 inserts' worth
    checkpoints = str(tmp_path / "replay")

    def as_transition(batch: Batch) -> Transition:
        n = len(batch.action)
        return Transition(batch.obs, batch.action, batch.action, np.zeros(n, np.float32), batch.discount,
                          batch.next_obs, batch.next_action, np.zeros(n, np.int64), np.arange(n, dtype=np.int64))

    with ReplayServer(cfg, SPEC, checkpoint_dir=checkpoints) as server:
        writer = TransitionWriter(server.address, ONLINE_TABLE, timeout_ms=500)
        writer.write_batch(as_transition(transitions(0, 9)))
        with pytest.raises(TimeoutError):  # a full queue holds the writer back until the learner drains it
            writer.flush()
        stream = BatchIterator(server.address, ONLINE_TABLE, 1, 1, SPEC, timeout_ms=2000)
        got = [float(next(stream)["obs"]["state"][0, 0, 0]) for _ in range(9)]
        assert sorted(got) == list(range(9))  # each once, the held-back one included
        with pytest.raises(TimeoutError, match="queue is empty"):
            next(stream)
        stream.close()
        writer.write_batch(as_transition(transitions(9, 3)))
        writer.close()
        server.checkpoint()
    with ReplayServer(cfg, SPEC, checkpoint_dir=checkpoints, restore=True) as server:
        assert server.sizes() == {ONLINE_TABLE: 3}  # what the learner had not drained
    with pytest.raises(ValueError, match="replay-on-device"):
        ReplayServer(dataclasses.replace(cfg, on_device=False), SPEC, checkpoint_dir=checkpoints, restore=True)


@pytest.mark.timeout(900)
def test_launch_with_the_replay_on_the_learners_device_keeps_utd(lift_setup, tiny_agent, free_port, tmp_path):
    """--replay-on-device: Reverb's queue hands each transition to the learner once, the learner runs one fused
    update per transition after warmup (the UTD control) and checkpoints the transitions it holds with its state
    (--resume with them: tests/test_ray_jobs.py)."""
    _, demos, base = lift_setup
    cfg = LaunchConfig(task="Lift", actors=1, envs_per_actor=2, env_steps=100, warmup=40, eval_episodes=0,
                       publish_every=2, fuse_updates=2, replay_on_device=True, num_demos=3, demos=str(demos),
                       base_checkpoint=str(base), serve_port=free_port(), logdir=str(tmp_path / "run"),
                       agent=dataclasses.replace(tiny_agent, bc_steps=50, critic_pretrain_steps=20))
    # updates behind the transitions taken (what the learner holds ready, tf.data's prefetch), or ahead of them
    # (as Reverb's limiter allows: its slack, the queue's size)
    slack, lead = cfg.replay().queue_size + cfg.fuse_updates + 4, cfg.replay().queue_size
    # stepped and not yet taken: each env's writer stream (a chunk filling + the items in flight), the queue and
    # what tf.data and the learner hold
    ahead = cfg.actors * cfg.envs_per_actor * (CHUNK_LENGTH + MAX_IN_FLIGHT + 1) + slack + 8

    first = System(cfg, progress=False).run()
    path = numbered_checkpoints(tmp_path / "run" / "checkpoints" / "learner")[-1]
    ring, record = read_arrays(path), json.loads((path / "record.json").read_text())
    added = int(ring["added"])
    assert len(ring["action"]) == added and first["env_steps"] - ahead <= added <= first["env_steps"], (added, first)
    assert -lead <= added - cfg.warmup - record["updates"] <= slack, (added, record)  # the UTD control
    assert record["updates"] == first["learner_updates"] > 0
