"""The evaluator's bookkeeping without a cluster: scenes, best parameters, order, thread safety, resume.

``evaluate_fn`` is where the episodes would run (Ray rollout workers in a run); here it is a deterministic score
of the parameters, which is all the bookkeeping depends on.
"""

import threading
import time

import numpy as np
import pytest

from actors.rollout import RolloutsCancelled
from csil import seeds
from orchestration.evaluator import Evaluator

SCORES = {0: 0.5, 1: 0.8, 2: 0.6, 3: 0.8}  # params version -> success rate


def scored(calls: list, delay_s: float = 0.0):
    def evaluate(params, first_scene: int, episodes: int, videos: int, stop: threading.Event) -> dict:
        time.sleep(delay_s)
        calls.append((int(params["v"]), first_scene, episodes))
        return {"success_rate": SCORES[int(params["v"])], "mean_length": 100.0}

    return evaluate


def params(version: int) -> dict:
    return {"v": np.asarray(version), "w": np.full(3, float(version))}


def test_periodic_evaluations_share_scenes_and_the_best_is_kept(tmp_path):
    calls = []
    ev = Evaluator(scored(calls), episodes=20, seed=2, logdir=tmp_path)
    for version, steps in enumerate((0, 100, 200, 300)):
        ev.evaluate(steps, version, params(version))
    assert {scene for _, scene, _ in calls} == {seeds.eval_scene(2)}  # paired with the base's scenes for seed 2
    record, best = ev.best
    assert record["env_steps"] == 100 and int(best["v"]) == 1  # a tie (0.8 at 300) does not replace the best
    assert [e["success_rate"] for e in ev.history] == [0.5, 0.8, 0.6, 0.8]
    assert (tmp_path / "evals.jsonl").read_text().count("\n") == 4

    result = ev.reevaluate_best(rounds=3)
    rounds = calls[4:]
    assert [v for v, _, _ in rounds] == [1, 1, 1]
    assert [s for _, s, _ in rounds] == [seeds.eval_scene(2, r) for r in (1, 2, 3)]  # fresh scenes each round
    assert len({s for _, s, _ in calls}) == 4
    assert result == {"final_eval": 0.8, "best_eval": 0.8, "best_env_steps": 100, "best_reevaluated": [0.8] * 3}


def test_a_resumed_run_gets_its_history_and_best_parameters_back(tmp_path):
    ev = Evaluator(scored([]), episodes=5, seed=0, logdir=tmp_path)
    for version in (0, 1, 2):
        ev.evaluate(version * 10, version, params(version))
    resumed = Evaluator(scored([]), episodes=5, seed=0, logdir=tmp_path)
    resumed.load(params(0))
    assert resumed.history == ev.history
    record, best = resumed.best
    assert record["updates"] == 1 and best["w"].tolist() == [1.0, 1.0, 1.0]


def test_background_evaluations_run_in_order_while_readers_poll():
    calls = []
    ev = Evaluator(scored(calls, delay_s=0.05), episodes=1, seed=0)
    seen: list = []
    stop = threading.Event()

    def reader():  # the launcher's progress loop
        while not stop.is_set():
            seen.append((ev.last_success(), len(ev.history)))

    thread = threading.Thread(target=reader)
    thread.start()
    for version in (0, 1, 2, 3):
        ev.submit(version * 10, version, params(version))
    ev.collect(wait=True)
    stop.set()
    thread.join()
    assert [v for v, _, _ in calls] == [0, 1, 2, 3]
    assert [e["env_steps"] for e in ev.history] == [0, 10, 20, 30]
    assert all(last is None or last in SCORES.values() for last, _ in seen)
    assert [n for _, n in seen] == sorted(n for _, n in seen)  # history only grows


def test_a_failed_background_evaluation_is_raised_by_collect():
    def broken(params, first_scene, episodes, videos, stop):
        raise RuntimeError("rollout worker died")

    ev = Evaluator(broken, episodes=1, seed=0)
    ev.submit(0, 0, params(0))
    with pytest.raises(RuntimeError, match="rollout worker died"):
        ev.collect(wait=True)


def test_a_stop_request_abandons_the_evaluation_in_progress_and_records_nothing(tmp_path):
    """A user's Ctrl-C must not wait for episodes: ``cancel`` reaches the running evaluation through its stop
    event, the queued one never starts, nothing is recorded, and the final re-evaluation refuses to run."""
    started, calls = threading.Event(), []

    def slow(params, first_scene, episodes, videos, stop):
        calls.append(int(params["v"]))
        started.set()
        if stop.wait(60):
            raise RolloutsCancelled
        return {"success_rate": 1.0, "mean_length": 1.0}

    ev = Evaluator(slow, episodes=1, seed=0, logdir=tmp_path)
    ev.submit(0, 0, params(0))
    ev.submit(10, 1, params(1))
    assert started.wait(10)
    begin = time.monotonic()
    ev.cancel()
    ev.collect(wait=True)
    assert time.monotonic() - begin < 5
    assert calls == [0] and ev.history == [] and ev.best is None and not (tmp_path / "evals.jsonl").exists()
    with pytest.raises(RolloutsCancelled):
        ev.reevaluate_best(rounds=1)


def test_the_restart_budget_ends_a_crash_loop():
    from orchestration.faults import ComponentFailed, RestartBudget

    budget = RestartBudget(limit=3, window_s=600)
    for t in (0, 100, 200):
        budget.spend("learner", now=t)
    budget.spend("replay", now=250)  # components are counted apart
    with pytest.raises(ComponentFailed, match="learner died 4 times within 10 min") as failed:
        budget.spend("learner", now=300)
    assert failed.value.component == "learner"
    budget.spend("learner", now=1000)  # the window has moved on


def test_non_finite_metrics_are_named_with_their_update():
    from learner.core import finite_metrics

    assert finite_metrics({"critic_loss": np.float32(1.5)}, 7) == {"critic_loss": 1.5}
    with pytest.raises(FloatingPointError, match=r"\['actor_loss'\] at update 300"):
        finite_metrics({"critic_loss": np.float32(1.5), "actor_loss": np.float32(np.nan)}, 300)
