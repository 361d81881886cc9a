"""Tests for replay/: signature, writer checks, batches, the UTD rate limiter, FIFO, checkpoint/restore, bad addresses.

Every test runs a real Reverb server on loopback.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time

import numpy as np
import portpicker
import pytest
import tensorflow as tf
import tree

from reverb.cc import schema_pb2

from csil.specs import CAMERAS, ObsSpec
from replay.server import (BatchIterator, ReplayConfig, ReplayServer, TransitionWriter, checkpoint_chunks,
                           checkpoint_sizes)
from replay.signature import transition_signature

STATE = ObsSpec("state", (("robot0_eef_pos", 3), ("robot0_eef_quat", 4), ("robot0_gripper_qpos", 2), ("object", 14)))
IMAGES = ObsSpec("image", STATE.state_keys, cameras=("agentview", "robot0_eye_in_hand"))
SMALL_IMAGES = ObsSpec("image", STATE.state_keys, cameras=CAMERAS, image_size=16)
# Generous slack: these tables take many inserts without a sampler (10 x min_size x spi samples of slack).
LOOSE = ReplayConfig(online_size=1000, samples_per_insert=1.0, min_size=10, error_buffer_fraction=10.0)
UNLIMITED = ReplayConfig(online_size=1000, samples_per_insert=1.0, min_size=10, error_buffer_fraction=1e4)


def transitions(spec: ObsSpec, ids: np.ndarray) -> dict:
    """N transitions whose every field is a function of episode_id, so a sample can be checked against it."""
    n, f = len(ids), ids.astype(np.float32)

    def obs(offset: float) -> dict:
        out = {"state": np.repeat(f[:, None] + offset, spec.state_dim, axis=1)}
        for key in spec.image_keys:
            out[key] = np.broadcast_to((ids % 256).astype(np.uint8)[:, None, None, None], (n, 84, 84, 3)).copy()
        return out

    return {"obs": obs(0.0), "action": np.repeat(f[:, None], 7, axis=1), "base_action": np.zeros((n, 7), np.float32),
            "reward": f, "discount": np.ones(n, np.float32), "next_obs": obs(0.5),
            "next_action": np.repeat(-f[:, None], 7, axis=1), "policy_version": ids * 10, "episode_id": ids}


def one(batch: dict, i: int) -> dict:
    return {k: one(v, i) if isinstance(v, dict) else v[i] for k, v in batch.items()}


def check_consistent(batch: dict, spec: ObsSpec) -> None:
    """Every sampled transition equals the one written for its episode_id."""
    flat = {k: v.reshape(-1, *v.shape[2:]) if not isinstance(v, dict) else
            {kk: vv.reshape(-1, *vv.shape[2:]) for kk, vv in v.items()} for k, v in batch.items()}
    expected = transitions(spec, flat["episode_id"])
    for key in expected:
        if isinstance(expected[key], dict):
            for sub in expected[key]:
                np.testing.assert_array_equal(flat[key][sub], expected[key][sub], err_msg=f"{key}/{sub}")
        else:
            np.testing.assert_array_equal(flat[key], expected[key], err_msg=key)


def test_signature_from_obs_spec():
    sig = transition_signature(STATE)
    assert sig["obs"] == {"state": tf.TensorSpec((23,), tf.float32)} == sig["next_obs"]
    for key in ("action", "base_action", "next_action"):
        assert sig[key] == tf.TensorSpec((7,), tf.float32)
    assert sig["reward"] == sig["discount"] == tf.TensorSpec((), tf.float32)
    assert sig["policy_version"] == sig["episode_id"] == tf.TensorSpec((), tf.int64)

    sig = transition_signature(IMAGES)
    assert set(sig["obs"]) == set(sig["next_obs"]) == {"state", "agentview_image", "robot0_eye_in_hand_image"}
    assert sig["next_obs"]["agentview_image"] == tf.TensorSpec((84, 84, 3), tf.uint8)


def test_writer_rejects_mismatches_naming_the_key():
    with ReplayServer(LOOSE, STATE) as server, TransitionWriter(server.address) as writer:
        good = one(transitions(STATE, np.arange(3)), 0)
        with pytest.raises(ValueError, match=r"obs/state.*\(23,\).*got shape \(22,\)"):
            writer.write({**good, "obs": {"state": np.zeros(22, np.float32)}})
        with pytest.raises(ValueError, match=r"'reward'.*float32.*float64"):
            writer.write({**good, "reward": 0.0})
        with pytest.raises(ValueError, match="expected keys"):
            writer.write({k: v for k, v in good.items() if k != "next_action"})
        batch = transitions(STATE, np.arange(3))
        with pytest.raises(ValueError, match=r"'discount'.*N = 3"):
            writer.write_batch({**batch, "discount": np.ones(2, np.float32)})
        writer.write(good)
        writer.flush()
        assert server.sizes()["online"] == 1


def test_batches_shapes_dtypes_and_ready_batches():
    cfg = ReplayConfig(online_size=1000, samples_per_insert=8.0, min_size=50, error_buffer_fraction=10.0)
    with ReplayServer(cfg, STATE) as server:
        with TransitionWriter(server.address) as writer:
            for i in range(300):
                writer.write(one(transitions(STATE, np.array([i])), 0))
        assert server.sizes() == {"online": 300}

        online = BatchIterator(server.address, "online", batch_size=16, utd=2, signature_obs_spec=STATE)
        for _ in range(3):
            batch = next(online)
            assert batch["obs"]["state"].shape == (2, 16, 23) and batch["obs"]["state"].dtype == np.float32
            assert batch["action"].shape == (2, 16, 7) and batch["reward"].shape == (2, 16)
            assert batch["episode_id"].dtype == np.int64 and batch["policy_version"].dtype == np.int64
            check_consistent(batch, STATE)
        online.close()
        # the learner's fused calls take what the rate limiter already admitted: up to ready_batches held sampled
        ahead = BatchIterator(server.address, "online", batch_size=16, utd=2, signature_obs_spec=STATE,
                              ready_batches=3)
        assert not ahead.ready()  # no stream before the first next()
        next(ahead)
        deadline = time.time() + 20
        while ahead._pump.batches.qsize() < 3 and time.time() < deadline:
            time.sleep(0.05)
        assert ahead.ready() and ahead._pump.batches.qsize() == 3
        ahead.close()


def test_image_transitions_round_trip():
    with ReplayServer(LOOSE, IMAGES) as server:
        with TransitionWriter(server.address) as writer:
            writer.write_batch(transitions(IMAGES, np.arange(12)))
        batches = BatchIterator(server.address, "online", batch_size=4, utd=2, signature_obs_spec=IMAGES)
        batch = next(batches)
        batches.close()
        assert batch["next_obs"]["robot0_eye_in_hand_image"].shape == (2, 4, 84, 84, 3)
        assert batch["obs"]["agentview_image"].dtype == np.uint8
        check_consistent(batch, IMAGES)
        with pytest.raises(ValueError, match="not the transitions of"):
            BatchIterator(server.address, "online", batch_size=4, utd=2, signature_obs_spec=STATE)


def test_sampling_before_warmup_times_out_clearly():
    cfg = ReplayConfig(online_size=1000, samples_per_insert=32.0, min_size=100)
    with ReplayServer(cfg, STATE) as server:
        writer = TransitionWriter(server.address)
        writer.write_batch(transitions(STATE, np.arange(60)))
        writer.flush()
        batches = BatchIterator(server.address, "online", batch_size=8, utd=4, signature_obs_spec=STATE,
                                timeout_ms=500)
        start = time.monotonic()
        with pytest.raises(TimeoutError, match=r"'online'.*500 ms.*holds 60 items.*warmup not reached"):
            next(batches)
        assert time.monotonic() - start < 5
        writer.write_batch(transitions(STATE, np.arange(60, 100)))
        writer.flush()
        assert next(batches)["obs"]["state"].shape == (4, 8, 23)  # a fresh stream after the timeout
        batches.close()
        writer.close()


def test_rate_limiter_keeps_samples_per_insert():
    """A writer thread and the learner's iterator run concurrently; the server holds the documented bound."""
    cfg = ReplayConfig(online_size=10_000, samples_per_insert=32.0, min_size=100, error_buffer_fraction=0.1)
    total = 600
    with ReplayServer(cfg, STATE) as server:
        writer = TransitionWriter(server.address, timeout_ms=20_000)

        def write() -> None:
            for i in range(total):
                writer.write(one(transitions(STATE, np.array([i])), 0))
            writer.flush()

        thread = threading.Thread(target=write)
        thread.start()
        batches = BatchIterator(server.address, "online", batch_size=8, utd=4, signature_obs_spec=STATE,
                                timeout_ms=2_000)
        snapshots, consumed = [], 0
        while True:
            try:
                batch = next(batches)
            except TimeoutError:  # the writer is done and the limiter allows no more samples
                assert not thread.is_alive()
                break
            consumed += 1
            if consumed % 25 == 0:
                info = server.rate_limiter_info()
                snapshots.append((info["online/rate_limiter_info/insert_stats/completed"],
                                  info["online/rate_limiter_info/sample_stats/completed"]))
        thread.join()
        batches.close()
        info = server.rate_limiter_info()
        inserts = info["online/rate_limiter_info/insert_stats/completed"]
        samples = info["online/rate_limiter_info/sample_stats/completed"]
        writer.close()

    assert inserts == total and consumed * 32 <= samples
    for i, s in snapshots + [(inserts, samples)]:
        assert abs(s - (i - cfg.min_size) * cfg.samples_per_insert) <= cfg.error_buffer, (i, s)
    assert info["online/table_worker_time/waiting_for_sampling_ms"] > 0  # inserts were held back for the learner
    (i0, s0), (i1, s1) = snapshots[0], (inserts, samples)
    assert abs((s1 - s0) / (i1 - i0) - 32) <= 2 * cfg.error_buffer / (i1 - i0)
    check_consistent(batch, STATE)


def test_fifo_keeps_online_size():
    cfg = ReplayConfig(online_size=50, samples_per_insert=1.0, min_size=10, error_buffer_fraction=10.0)
    with ReplayServer(cfg, STATE) as server, TransitionWriter(server.address) as writer:
        writer.write_batch(transitions(STATE, np.arange(80)))
        writer.flush()
        assert server.sizes()["online"] == 50
        batches = BatchIterator(server.address, "online", batch_size=10, utd=1, signature_obs_spec=STATE)
        assert next(batches)["episode_id"].min() >= 30  # the oldest 30 went first
        batches.close()


def test_checkpoint_and_restore(tmp_path):
    ckpt = str(tmp_path / "replay")
    with ReplayServer(LOOSE, STATE, checkpoint_dir=ckpt) as server:
        assert checkpoint_sizes(server.checkpoint()) == {"online": 0}  # an empty table is still a table
        with TransitionWriter(server.address) as writer:
            writer.write_batch(transitions(STATE, np.arange(60)))
        path = server.checkpoint()
        assert os.path.isdir(path) and path.startswith(ckpt)
        assert checkpoint_sizes(path) == {"online": 60}  # what the restored server holds (below)

    with pytest.raises(FileExistsError, match="restore=True"):
        ReplayServer(LOOSE, STATE, checkpoint_dir=ckpt)
    with ReplayServer(LOOSE, STATE, checkpoint_dir=ckpt, restore=True) as server:
        assert server.sizes() == {"online": 60}
        assert server.rate_limiter_info()["online/rate_limiter_info/insert_stats/completed"] == 60
        batches = BatchIterator(server.address, "online", batch_size=16, utd=2, signature_obs_spec=STATE)
        batch = next(batches)
        batches.close()
        check_consistent(batch, STATE)

    with pytest.raises(ValueError, match="not the transitions of this run"):
        ReplayServer(LOOSE, IMAGES, checkpoint_dir=ckpt, restore=True)
    with pytest.raises(FileNotFoundError, match="no complete Reverb checkpoint"):
        ReplayServer(LOOSE, STATE, checkpoint_dir=str(tmp_path / "empty"), restore=True)
    chunks = os.path.join(path, "chunks.tfrecord")
    with open(chunks, "r+b") as f:
        f.truncate(40)
    with pytest.raises(RuntimeError, match="corrupt"):
        ReplayServer(LOOSE, STATE, checkpoint_dir=ckpt, restore=True)


def test_a_checkpoint_with_the_old_demo_table_restores(tmp_path):
    """Runs checkpointed before the demos moved to the learner's device also hold a "demos" table; Reverb refuses
    a checkpoint table the server lacks, so the server loads it (unread) and the online table comes back whole."""
    import reverb

    ckpt = str(tmp_path / "replay")
    signature = transition_signature(STATE)
    old = reverb.Server([reverb.Table(name=name, sampler=reverb.selectors.Uniform(), remover=reverb.selectors.Fifo(),
                                      max_size=size, rate_limiter=reverb.rate_limiters.MinSize(1),
                                      signature=signature) for name, size in (("online", 1000), ("demos", 20))],
                        checkpointer=reverb.checkpointers.DefaultCheckpointer(path=ckpt))
    for table, ids in (("online", np.arange(30)), ("demos", -1 - np.arange(20))):
        with TransitionWriter(f"localhost:{old.port}", table) as writer:
            writer.write_batch(transitions(STATE, ids))
    reverb.Client(f"localhost:{old.port}").checkpoint()
    old.stop()
    with ReplayServer(LOOSE, STATE, checkpoint_dir=ckpt, restore=True) as server:
        assert server.sizes() == {"online": 30, "demos": 20}
        batches = BatchIterator(server.address, "online", batch_size=8, utd=2, signature_obs_spec=STATE)
        batch = next(batches)
        batches.close()
        check_consistent(batch, STATE)
        assert (batch["episode_id"] >= 0).all()


def test_unreachable_address_fails_fast():
    address = f"localhost:{portpicker.pick_unused_port()}"
    start = time.monotonic()
    with pytest.raises(ConnectionError, match=address):
        TransitionWriter(address)
    with pytest.raises(ConnectionError, match=address):
        BatchIterator(address, "online", batch_size=8, utd=1, signature_obs_spec=STATE)
    assert time.monotonic() - start < 15


def episodes(spec: ObsSpec, lengths: dict) -> dict:
    """Transitions of whole episodes, ``{(slot, episode): [transition, ...]}`` for ``lengths`` keyed alike.

    Every observation (the terminal one included) is distinct and ``next_obs`` of step t is ``obs`` of step
    t+1; transitions carry their episode's id."""
    out, code = {}, 0
    for (slot, episode), length in lengths.items():
        frames = []
        for _ in range(length + 1):
            code += 1
            obs = {"state": np.full(spec.state_dim, code, np.float32)}
            for i, key in enumerate(spec.image_keys):
                pattern = (np.arange(spec.image_size ** 2 * 3) % 7).reshape(spec.image_size, spec.image_size, 3)
                obs[key] = (pattern + 2 * code + i).astype(np.uint8)
            frames.append(obs)
        eid = np.int64(10 * slot + episode)
        out[(slot, episode)] = [
            {"obs": frames[t], "action": np.full(7, frames[t]["state"][0], np.float32),
             "base_action": np.zeros(7, np.float32), "reward": np.float32(t), "discount": np.float32(t < length - 1),
             "next_obs": frames[t + 1], "next_action": np.zeros(7, np.float32), "policy_version": np.int64(t),
             "episode_id": eid} for t in range(length)]
    return out


def check_items(address: str, written: list[dict], spec: ObsSpec) -> None:
    """Sampling many times yields every written transition and only those, field by field."""
    by_action = {float(t["action"][0]): t for t in written}
    batches = BatchIterator(address, "online", batch_size=len(written), utd=8, signature_obs_spec=spec)
    batch = next(batches)
    batches.close()
    seen = set()
    for i in range(8 * len(written)):
        got = tree.map_structure(lambda x: x.reshape(-1, *x.shape[2:])[i], batch)
        want = by_action[float(got["action"][0])]
        tree.map_structure(np.testing.assert_array_equal, got, want)
        seen.add(float(got["action"][0]))
    assert seen == set(by_action), "some transitions were never sampled"


def stored_frames(checkpoint: str, spec: ObsSpec) -> int:
    """Camera frames in a checkpoint's chunks (per camera): what the server stores."""
    frames = 0
    for record in checkpoint_chunks(checkpoint):
        shape = schema_pb2.ChunkData.FromString(record).data.tensors[0].tensor_shape
        if [d.size for d in shape.dim[1:]] == [spec.image_size, spec.image_size, 3]:
            frames += shape.dim[0].size
    return frames // len(spec.image_keys)


@pytest.mark.parametrize("batched", [False, True])
def test_frames_stored_once_across_slots_episodes_and_restore(tmp_path, batched):
    """Two env slots interleaved step by step, or episodes back to back in one ``write_batch``: one item per
    transition, each frame stored once (T + 1 frames for an episode of T transitions, not 2T), next_obs of a
    step is the obs of the next, the last transition's next_obs is the terminal obs, no item spans episodes;
    a checkpoint restores the same items."""
    lengths = {(0, 0): 5, (1, 0): 3, (1, 1): 4, (0, 1): 2} if not batched else {(0, 0): 5, (0, 1): 3, (0, 2): 4}
    eps = episodes(SMALL_IMAGES, lengths)
    written = [t for ep in eps.values() for t in ep]
    ckpt = str(tmp_path / "replay")
    with ReplayServer(UNLIMITED, SMALL_IMAGES, checkpoint_dir=ckpt) as server:
        with TransitionWriter(server.address) as writer:
            if batched:
                writer.write_batch(tree.map_structure(lambda *xs: np.stack(xs), *written))
            else:  # slot 0 and slot 1 alternate; each slot runs its two episodes in turn
                streams = [[t for (slot, _), ep in eps.items() if slot == s for t in ep] for s in (0, 1)]
                for i in range(max(map(len, streams))):
                    for slot, stream in enumerate(streams):
                        if i < len(stream):
                            writer.write(stream[i], slot=slot)
        assert server.sizes()["online"] == len(written)
        check_items(server.address, written, SMALL_IMAGES)
        path = server.checkpoint()
    assert stored_frames(path, SMALL_IMAGES) == len(written) + len(eps)  # naive: 2 * len(written)
    with ReplayServer(UNLIMITED, SMALL_IMAGES, checkpoint_dir=ckpt,
                      restore=True) as server:
        check_items(server.address, written, SMALL_IMAGES)


def smooth_episode(spec: ObsSpec, length: int) -> list[dict]:
    """One episode whose frames look like renders (smooth shading that moves a little each step)."""
    y, x = np.mgrid[:spec.image_size, :spec.image_size] / spec.image_size
    frames = []
    for t in range(length + 1):
        obs = {"state": np.full(spec.state_dim, t, np.float32)}
        for i, key in enumerate(spec.image_keys):
            shade = [np.sin(3 * x + 2 * y + 0.1 * t + c + i) for c in range(3)]
            obs[key] = (127.5 + 100 * np.stack(shade, axis=-1)).astype(np.uint8)
        frames.append(obs)
    return [{"obs": frames[t], "action": np.full(7, t, np.float32), "base_action": np.zeros(7, np.float32),
             "reward": np.float32(t), "discount": np.float32(1.0), "next_obs": frames[t + 1],
             "next_action": np.zeros(7, np.float32), "policy_version": np.int64(t), "episode_id": np.int64(0)}
            for t in range(length)]


def test_jpeg_frames_are_decoded_close_to_the_written_ones_smaller_and_restored(tmp_path):
    """``frame_codec="jpeg"``: the signature says how frames are stored, the writer takes raw frames and
    encodes them, sampled batches carry decoded uint8 frames of the spec's shape within JPEG's error and every
    other field exactly; the server holds no raw frame, and a fraction of the frames' raw bytes; a checkpoint
    restores only into a server with the same codec. (Bytes on real renders: ``csil-bench replay``.)"""
    written = smooth_episode(IMAGES, 12)
    jpeg = dataclasses.replace(UNLIMITED, frame_codec="jpeg")
    with ReplayServer(jpeg, IMAGES, checkpoint_dir=str(tmp_path / "jpeg")) as server:
        with TransitionWriter(server.address) as writer:
            for t in written:
                writer.write(t)
        path = server.checkpoint()
    raw_frame_bytes = (len(written) + 1) * sum(written[0]["obs"][key].nbytes for key in IMAGES.image_keys)
    assert stored_frames(path, IMAGES) == 0
    assert sum(map(len, checkpoint_chunks(path))) < raw_frame_bytes / 4

    with ReplayServer(jpeg, IMAGES, checkpoint_dir=str(tmp_path / "jpeg"),
                      restore=True) as server:
        assert server.sizes()["online"] == len(written)
        batches = BatchIterator(server.address, "online", batch_size=len(written), utd=4, signature_obs_spec=IMAGES)
        batch = next(batches)
        batches.close()
        for i in range(4 * len(written)):
            got = tree.map_structure(lambda x: x.reshape(-1, *x.shape[2:])[i], batch)
            want = written[int(got["policy_version"])]
            for field in ("obs", "next_obs"):
                for key in IMAGES.image_keys:
                    assert got[field][key].dtype == np.uint8 and got[field][key].shape == (84, 84, 3)
                    error = np.abs(got[field][key].astype(int) - want[field][key])
                    assert error.mean() < 2.0 and error.max() <= 40, (field, key, error.mean(), error.max())
                np.testing.assert_array_equal(got[field]["state"], want[field]["state"])
            for key in ("action", "reward", "episode_id"):
                np.testing.assert_array_equal(got[key], want[key])
    with pytest.raises(ValueError, match="not the transitions of this run"):
        ReplayServer(UNLIMITED, IMAGES, checkpoint_dir=str(tmp_path / "jpeg"), restore=True)
