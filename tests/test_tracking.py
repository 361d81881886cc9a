"""RunTracker: TensorBoard event files (read back with TensorBoard's reader) and W&B in offline mode (read back from
the run file W&B would sync), fed with a real encoded video. The runs that use it: tests/test_trainer.py and
tests/test_launch.py."""

import glob
import json
import time

import numpy as np
import pytest

from csil.video import FRAME_SIZE, encode, read_frames
from orchestration.tracking import RunTracker


def _video(stride: int = 2) -> dict:
    x = np.linspace(0, 255, 2 * FRAME_SIZE, dtype=np.uint8)
    frames = [np.broadcast_to(np.roll(x, 8 * t)[None, :, None], (FRAME_SIZE, 2 * FRAME_SIZE, 3)) for t in range(6)]
    return {"scene": 7, "success": True, "length": 11, **encode(frames, stride)}


def _evaluate(tracker: RunTracker) -> None:
    tracker.scalars(10, {"system/env_steps_per_s": 50.0, "actors/train_success": None})
    tracker.evaluation({"env_steps": 20, "updates": 3, "success_rate": 0.5, "mean_length": 11.0, "mean_return": 1.0,
                        "mean_max_reward": 0.75}, [_video()])
    tracker.close()


def test_scalars_and_videos_go_to_tensorboard_and_the_run_directory(tmp_path, tensorboard_scalars):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _evaluate(RunTracker(tmp_path, {"task": "Lift"}))
    assert tensorboard_scalars(tmp_path) == {"system/env_steps_per_s": [(10, 50.0)], "eval/success_rate": [(20, 0.5)],
                                             "eval/mean_length": [(20, 11.0)], "eval/mean_return": [(20, 1.0)],
                                             "eval/mean_max_reward": [(20, 0.75)]}
    (video,) = tmp_path.glob("videos/*.mp4")
    assert video.name == "eval-000000020-scene7-success.mp4" and len(read_frames(video)) == 6
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    (gif,) = events.Tensors("eval/video/scene7")
    width, height, data = gif.tensor_proto.string_val
    assert (int(width), int(height)) == (FRAME_SIZE, FRAME_SIZE // 2) and data.startswith(b"GIF89a")


def test_wandb_offline_gets_the_same_scalars_and_the_mp4(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from wandb.proto import wandb_internal_pb2
    from wandb.sdk.internal import datastore

    monkeypatch.setenv("WANDB_MODE", "offline")  # no network: the run is written for a later `wandb sync`
    _evaluate(RunTracker(tmp_path, {"task": "Lift"}, wandb_project="csil-test"))
    (run_file,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))

    def records() -> list:
        store = datastore.DataStore()
        store.open_for_scan(run_file)
        found = []
        while (data := store.scan_data()) is not None:
            found.append(wandb_internal_pb2.Record())
            found[-1].ParseFromString(data)
        return found

    deadline = time.time() + 30  # W&B's service writes the file after finish() returns
    while not any(r.WhichOneof("record_type") == "exit" for r in records()):
        assert time.time() < deadline, "W&B wrote no complete run file in 30 s"
        time.sleep(0.2)
    history = [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
               for r in records() if r.WhichOneof("record_type") == "history"]
    assert history[0]["env_steps"] == 10 and history[0]["system/env_steps_per_s"] == 50.0
    assert history[1]["env_steps"] == 20 and history[1]["eval/success_rate"] == 0.5
    assert history[2]["env_steps"] == 20 and history[2]["eval/video/scene7/_type"] == "video-file"
    assert history[2]["eval/video/scene7/caption"] == "success, 11 steps"
    assert glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "files" / "media" / "videos" / "**" / "*.mp4"),
                     recursive=True)
    assert (tmp_path / "wandb_run_id").read_text() in run_file  # a resumed launch run continues this W&B run
