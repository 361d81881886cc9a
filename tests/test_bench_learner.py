"""Smoke test of ``csil-bench learner``: the CLI runs both input paths end to end and ends with its JSON line.

Tiny networks and batches, so this checks the plumbing (a real Reverb server, the BatchIterators, the jitted
update), never the timings.
"""

from __future__ import annotations

import json

import pytest

from cli.bench import main


@pytest.mark.parametrize("fuse", [1, 3])
def test_learner_bench_cli_reports_both_paths(capsys, fuse):
    main(["learner", "--obs", "state", "--size", "tiny", "--updates", "2", "--batch-size", "8", "--utd", "2",
          "--rounds", "1", "--warmup", "1", "--items", "32", "--fuse", str(fuse)])
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["bench"] == "learner" and record["obs"] == "state" and record["utd"] == 2
    assert record["fuse"] == fuse
    for path in ("synthetic", "reverb"):
        assert record[path]["env_steps_per_s"] > 0
        assert record[path]["critic_updates_per_s"] == pytest.approx(2 * record[path]["env_steps_per_s"], abs=0.01)
    assert record["input_only"]["batches_per_s"] > 0
    assert record["ratio"] > 0
