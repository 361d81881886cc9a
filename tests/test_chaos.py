"""A chaos run: one csil-launch run in which an env actor, the learner, the replay server and the inference replica
are each SIGKILLed once, at seeded random points. The run must reach its env-step budget on its own, count every
restart, keep the UTD control after recovery, and the restarted replay must hold every transition of its last
checkpoint."""

import json
import os
import random
import signal
import threading
import time

import psutil
import pytest
import ray

from csil.config import LaunchConfig
from orchestration.launcher import System
from replay.server import checkpoint_item_counts

COMPONENTS = ("actor", "learner", "replay", "inference")


def _pid(system: System, component: str) -> int:
    if component == "inference":
        return system.inference.handle.replica_info.remote().result(timeout_s=60)["pid"]
    if component == "actor":  # busy in its run() loop, so it cannot answer a call: find its process among this
        # test's descendants (another xdist worker's run has env actors too, and killing one of those fails both)
        return next(p.pid for p in psutil.Process().children(recursive=True)
                    if "ray::EnvActor" in " ".join(p.cmdline()))
    handle = system.learner if component == "learner" else system.replay
    return ray.get(handle.__ray_call__.remote(lambda self: os.getpid()), timeout=60)


def _chaos(system: System, schedule: list[tuple[int, str]], seen: dict) -> None:
    """Kill each component once its env-step point is passed and the previous kill has been recovered from."""
    deadline = time.time() + 1200
    for at, component in schedule:
        while time.time() < deadline:
            time.sleep(0.5)
            coordinator = getattr(system, "coordinator", None)
            if coordinator is None or not system.runs:
                continue
            stats = ray.get(coordinator.stats.remote())
            recovered = sum(stats["component_restarts"].values()) >= len(seen.get("killed", []))
            if stats["env_steps"] >= at and recovered:
                break
        if component == "replay":  # the newest checkpoint is this one: its items must all come back
            seen["replay_checkpoint"] = checkpoint_item_counts(ray.get(system.replay.checkpoint.remote()))
        os.kill(_pid(system, component), signal.SIGKILL)
        seen.setdefault("killed", []).append((component, ray.get(system.coordinator.stats.remote())["env_steps"]))


@pytest.mark.timeout(1500)
def test_the_run_survives_every_component_killed_once(lift_setup, tiny_agent, free_port, tmp_path):
    _, demos, base = lift_setup
    rng = random.Random(7)
    order = rng.sample(COMPONENTS, len(COMPONENTS))
    schedule = list(zip(sorted(rng.sample(range(120, 500, 20), len(order))), order))  # the last kill at 460
    budget = 1000  # room for the UTD check below: ≥ 100 env steps from 200 past the last kill
    cfg = LaunchConfig(task="Lift", actors=2, envs_per_actor=2, env_steps=budget, warmup=40, eval_episodes=0,
                       publish_every=2, checkpoint_every_s=10**6, num_demos=3, demos=str(demos),
                       base_checkpoint=str(base), serve_port=free_port(), logdir=str(tmp_path / "run"),
                       agent=tiny_agent)
    system = System(cfg, progress=False)
    seen: dict = {}
    chaos = threading.Thread(target=_chaos, args=(system, schedule, seen), daemon=True)
    chaos.start()
    summary = system.run()
    chaos.join(timeout=5)

    assert [c for c, _ in seen["killed"]] == order, seen
    assert summary["env_steps"] >= budget and not summary["interrupted"] and "failed" not in summary, summary
    restarts = summary["restarts"]
    assert all(restarts[c] >= 1 for c in COMPONENTS), restarts
    assert restarts["learner"] == restarts["replay"] == 1
    events = {e["component"]: e for e in summary["faults"]}
    assert {"learner", "replay", "inference"} <= set(events), summary["faults"]
    restored = events["replay"]["restored"]
    assert restored == seen["replay_checkpoint"]  # every transition of its last checkpoint, both tables
    assert restored["online"] > 0
    assert summary["replay_sizes"]["online"] >= restored["online"] and summary["learner_updates"] > 0

    # after the last fault the rate limiter holds the learner at UTD 4: one fused update per env step
    last_kill = seen["killed"][-1][1]
    progress = [json.loads(line) for line in (tmp_path / "run" / "progress.jsonl").read_text().splitlines()]
    after = [p for p in progress if p["env_steps"] >= last_kill + 200]
    steps, updates = after[-1]["env_steps"] - after[0]["env_steps"], after[-1]["updates"] - after[0]["updates"]
    assert steps >= 100 and abs(updates / steps - 1) < 0.25, (steps, updates)
