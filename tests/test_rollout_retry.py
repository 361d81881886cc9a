"""A rollout worker killed during an evaluation (Ray's OOM monitor does this) is restarted by Ray and its scenes
are run again: the evaluation completes with the same per-scene results as an undisturbed one. The noisy expert
seeds its noise from the scene, so a scene's result does not depend on which worker ran it, or how many. A stop
request abandons the episodes at once."""

import os
import signal
import threading
import time

import psutil
import pytest

from actors.rollout import RolloutsCancelled, run_episodes

SEEDS = range(1_000_000, 1_000_006)


def _rollout_workers() -> list[psutil.Process]:
    """This session's rollout workers: descendants of this process, which started the local Ray (another pytest-xdist
    worker's or another run's are not ours to wait for)."""
    workers = []
    for p in psutil.Process().children(recursive=True):
        try:
            if "ray::RolloutWorker" in " ".join(p.cmdline()):
                workers.append(p)
        except psutil.NoSuchProcess:
            continue
    return workers


def test_a_killed_rollout_worker_is_retried_on_the_same_scenes(ray_local):
    clean = {r.seed: (r.success, r.length) for r in run_episodes("Lift", "state", "expert", SEEDS, prompt="lift",
                                                                  workers=1, envs_per_worker=3)}
    stats: dict = {}
    results, killed = {}, None
    earlier = {p.pid for p in _rollout_workers()}  # the clean run's workers may still be exiting
    for result in run_episodes("Lift", "state", "expert", SEEDS, prompt="lift", workers=2, envs_per_worker=1,
                               stats=stats):
        results[result.seed] = (result.success, result.length)
        if killed is None:
            killed = next(p.pid for p in _rollout_workers() if p.pid not in earlier)
            os.kill(killed, signal.SIGKILL)
    assert killed is not None and results == clean
    assert stats["worker_restarts"] == 1


def test_a_stop_request_abandons_the_episodes_and_frees_the_workers(ray_local):
    stop = threading.Event()
    episodes = run_episodes("Lift", "state", "expert", range(1000), prompt="lift", workers=1, envs_per_worker=1,
                            stop=stop)
    next(episodes)  # the worker is up and acting
    stop.set()
    begin = time.monotonic()
    with pytest.raises(RolloutsCancelled):
        next(episodes)
    assert time.monotonic() - begin < 5
    deadline = time.monotonic() + 30  # killed: a cancelled evaluation must not keep a CPU of the cluster
    while _rollout_workers() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _rollout_workers()
