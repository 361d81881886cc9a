"""Smoke test of ``csil-bench replay``: both layouts filled from real expert episodes into servers in child
processes, then its JSON line. Tiny sizes: this checks the plumbing and the payload arithmetic, never the
timings or RSS (too noisy at this size)."""

from __future__ import annotations

import json

from cli.bench import main


def test_replay_bench_cli_reports_both_layouts(capsys):
    main(["replay", "--obs", "state", "--transitions", "120", "--episodes", "1", "--slots", "2",
          "--chunk-lengths", "8", "--batch-size", "8", "--batches", "1", "--rounds", "1"])
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["bench"] == "replay" and record["transitions"] == 120 and record["chunk_length"] == 8
    assert record["raw_bytes_per_transition"] > 0 and record["shared_samples_per_s"] > 0
    # obs stored once and 8-step chunks: well under the payload of obs + next_obs in single-step chunks
    assert 0 < record["chunk_ratio"] < 0.6
