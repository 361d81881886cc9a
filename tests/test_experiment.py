"""csil-experiment's bookkeeping: finished runs are reused, never redone, and the table/plot/CSV are right.

Training itself is tested in test_trainer.py; here the runs are already "done" (their summary.json exists)."""

import csv
import json

from csil.config import ExperimentConfig
import pytest

from orchestration.experiment import run_budget, run_experiment

CURVES = {  # (method, seed) -> success at env steps 0, 1000, 2000
    ("csil++-ensemble", 0): [0.6, 0.6, 0.8], ("csil++-ensemble", 1): [0.5, 0.6, 0.7],
    ("xqc-od-ensemble", 0): [0.6, 0.2, 0.5], ("xqc-od-ensemble", 1): [0.5, 0.1, 0.4],
}
BASE = {0: 0.6, 1: 0.5}
REEVALUATED = {  # (method, seed) -> the best parameters' success in each re-evaluation round
    ("base", 0): [0.6, 0.5], ("base", 1): [0.5, 0.5],
    ("csil++-ensemble", 0): [0.8, 0.7], ("csil++-ensemble", 1): [0.6, 0.5],
    ("xqc-od-ensemble", 0): [0.6, 0.6], ("xqc-od-ensemble", 1): [0.4, 0.5],
}


def _done(root, method, seed, evals, budget, reevaluated=None):
    run = root / "Lift" / method / f"seed{seed}"
    run.mkdir(parents=True, exist_ok=True)
    record = {"task": "Lift", "method": method, "seed": seed, "summary": {}, "budget": budget, "evals": evals}
    if reevaluated is not None:
        record["best_reevaluated"] = reevaluated
    (run / "summary.json").write_text(json.dumps(record))


def test_finished_runs_are_reused_and_summarised(tmp_path):
    runs = tmp_path / "runs"
    cfg = ExperimentConfig(name="t", tasks=("Lift",), methods=("base", "csil++-ensemble", "xqc-od-ensemble"),
                           seeds=2, env_steps=2000, eval_every=1000, final_eval_rounds=2, runs_dir=str(runs),
                           out_dir=str(tmp_path / "out"))
    for seed, success in BASE.items():
        _done(runs, "base", seed, [{"env_steps": 0, "success_rate": success}], run_budget(cfg),
              REEVALUATED["base", seed])
    for (method, seed), curve in CURVES.items():
        _done(runs, method, seed, [{"env_steps": 1000 * i, "success_rate": s} for i, s in enumerate(curve)],
              run_budget(cfg), REEVALUATED[method, seed])
    summary = run_experiment(cfg, "csil-experiment --name t", progress=False)  # would train if a run were missing

    stats = summary["results"]["Lift"]
    # the paper's number: per seed the mean over re-evaluation rounds (csil++ 0.75 and 0.55, base 0.55 and 0.5)
    assert stats["csil++-ensemble"]["reevaluated"] == pytest.approx([0.65, 0.6, 0.7])
    assert stats["csil++-ensemble"]["gain"] == pytest.approx([0.125, 0.0875, 0.1625])
    assert stats["csil++-ensemble"]["improved_seeds"] == 1 and stats["xqc-od-ensemble"]["improved_seeds"] == 0
    assert stats["csil++-ensemble"]["no_drop_seeds"] == 2 and stats["csil++-ensemble"]["beats_base_seeds"] == 2
    assert stats["xqc-od-ensemble"]["no_drop_seeds"] == 0 and stats["xqc-od-ensemble"]["beats_base_seeds"] == 0
    assert stats["csil++-ensemble"]["final"][0] == 0.75 and stats["base"]["final"] == [0.55, 0.525, 0.575]
    table = (tmp_path / "out" / "t" / "table.md").read_text()
    assert "`csil-experiment --name t`" in table and "500,000" in table and "2,000 env steps" in table
    assert "| csil++-ensemble | 75% [72%, 78%] |" in table  # final
    assert "re-evaluated 2 × 20 episodes" in table and "| csil++-ensemble | 65% [60%, 70%] |" in table
    assert "| Lift | csil++-ensemble | 52% [51%, 54%] | 65% [60%, 70%] | +12 pp [+9, +16] | 1/2 |" in table
    assert "| Lift | base | " not in table.split("Gain over the paired base")[1].split("## Final")[0]
    json.dumps(summary)  # what csil-experiment prints
    assert "| Lift | xqc-od-ensemble | 55% [52%, 57%] | 15% [12%, 18%] | 0/2 | 0/2 |" in table
    rows = table.splitlines()  # from the method's own step-0 evaluation
    assert "| Lift | csil++-ensemble | 55% [52%, 57%] | 60% [60%, 60%] | 2/2 |" in rows
    assert "| Lift | xqc-od-ensemble | 55% [52%, 57%] | 15% [12%, 18%] | 0/2 |" in rows
    with (tmp_path / "out" / "t" / "runs.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 + 4 * 3
    assert (tmp_path / "out" / "t" / "curves.png").stat().st_size > 10_000


def test_a_run_with_another_budget_is_not_reused(tmp_path):
    cfg = ExperimentConfig(name="t", tasks=("Lift",), methods=("base",), seeds=1, runs_dir=str(tmp_path))
    _done(tmp_path, "base", 0, [{"env_steps": 0, "success_rate": 0.5}], {**run_budget(cfg), "env_steps": 1})
    with pytest.raises(ValueError, match="pick another --name"):
        run_experiment(cfg, "csil-experiment", progress=False)


def test_runs_from_before_the_beta_option_count_as_beta_0_3_per_nat(tmp_path):
    """results/table1's runs have no beta in their budget: they ran with β = 0.3 per nat and are reused only by an
    experiment with that setting; one with the KL in the reward's units must not mix them in."""
    old = ExperimentConfig(name="t", tasks=("Lift",), methods=("base",), seeds=1, runs_dir=str(tmp_path),
                           out_dir=str(tmp_path / "out"), beta=0.3, beta_units="nats", actor_warmup=0,
                           final_eval_rounds=0)
    budget = {k: v for k, v in run_budget(old).items()
              if k not in ("beta", "beta_units", "actor_warmup", "final_eval_rounds")}
    _done(tmp_path, "base", 0, [{"env_steps": 0, "success_rate": 0.5}], budget)
    assert run_experiment(old, "csil-experiment", progress=False)["runs"] == 1
    new = ExperimentConfig(name="t", tasks=("Lift",), methods=("base",), seeds=1, runs_dir=str(tmp_path),
                           out_dir=str(tmp_path / "out"), beta=1.0, beta_units="reward")
    with pytest.raises(ValueError, match="pick another --name"):
        run_experiment(new, "csil-experiment", progress=False)


def test_report_summarises_the_finished_runs_without_training(tmp_path):
    runs = tmp_path / "runs"
    cfg = ExperimentConfig(name="t", tasks=("Lift", "Square"), methods=("base", "csil++-ensemble"), seeds=2,
                           env_steps=2000, eval_every=1000, runs_dir=str(runs), out_dir=str(tmp_path / "out"))
    for seed, success in BASE.items():
        _done(runs, "base", seed, [{"env_steps": 0, "success_rate": success}], run_budget(cfg))
    curve = CURVES["csil++-ensemble", 0]
    _done(runs, "csil++-ensemble", 0, [{"env_steps": 1000 * i, "success_rate": s} for i, s in enumerate(curve)],
          run_budget(cfg))
    summary = run_experiment(cfg, "csil-experiment --name t", progress=False, report_only=True)

    assert summary["runs"] == 3 and summary["missing"] == 5  # Lift csil++ seed 1 and all of Square
    assert summary["results"]["Lift"]["csil++-ensemble"]["paired_seeds"] == 1
    table = (tmp_path / "out" / "t" / "table.md").read_text()
    assert "**Partial**: 5 runs" in table
    assert "| csil++-ensemble | 80% [80%, 80%] (1 of 2 seeds) | — |" in table
    assert "Best parameters re-evaluated" not in table  # these runs had no re-evaluations
    assert "| Lift | csil++-ensemble | 60% [60%, 60%] | 60% [60%, 60%] | 1/1 | 1/1 |" in table
    assert not (runs / "Square").exists()  # nothing was trained


def test_a_diverged_run_is_reported_and_retried_while_the_grid_goes_on(tmp_path, monkeypatch):
    """A learner that diverges (``LearnerCore``'s FloatingPointError) must not end a grid of hour-long runs: the
    other runs still run, the table names the diverged one, and the next invocation retries it."""
    from orchestration import experiment

    runs = tmp_path / "runs"
    CURVE = [{"env_steps": 0, "success_rate": 0.5}, {"env_steps": 1000, "success_rate": 0.6}]  # noqa: N806
    cfg = ExperimentConfig(name="t", tasks=("Lift",), methods=("base", "csil++-ensemble"), seeds=2, env_steps=2000,
                           eval_every=1000, runs_dir=str(runs), out_dir=str(tmp_path / "out"))
    for seed, success in BASE.items():
        _done(runs, "base", seed, [{"env_steps": 0, "success_rate": success}], run_budget(cfg))
    _done(runs, "csil++-ensemble", 1, CURVE, run_budget(cfg))
    tried = []

    def diverges(cfg, task, method, seed, progress=True):
        if experiment.finished(cfg, task, method, seed) is None:
            tried.append(seed)
            raise FloatingPointError("the learner diverged: 50 updates in a row")
        return experiment.finished(cfg, task, method, seed)

    monkeypatch.setattr(experiment, "run_one", diverges)
    summary = run_experiment(cfg, "csil-experiment --name t", progress=False)
    assert tried == [0] and summary["runs"] == 3 and summary["diverged"] == ["Lift/csil++-ensemble/seed0"]
    assert "**Diverged**" in (tmp_path / "out" / "t" / "table.md").read_text()
    assert "50 updates in a row" in (runs / "Lift" / "csil++-ensemble" / "seed0" / experiment.FAILED).read_text()
    run_experiment(cfg, "csil-experiment --name t", progress=False)
    assert tried == [0, 0]  # retried, not skipped
    _done(runs, "csil++-ensemble", 0, CURVE, run_budget(cfg))
    assert run_experiment(cfg, "csil-experiment --name t", progress=False)["diverged"] == []
    assert not (runs / "Lift" / "csil++-ensemble" / "seed0" / experiment.FAILED).exists()
