"""Smoke test of ``csil-bench replay``: both layouts filled from real expert episodes into servers in child
processes, one JSON line per chunk length. Tiny sizes: this checks the plumbing and the payload arithmetic,
never the timings or RSS (too noisy at this size)."""

from __future__ import annotations

import json

from cli.bench import main


def test_replay_bench_cli_reports_both_layouts(capsys):
    main(["replay", "--obs", "state", "--transitions", "120", "--episodes", "1", "--slots", "2",
          "--chunk-lengths", "1,8", "--batch-size", "8", "--batches", "1", "--rounds", "1"])
    records = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()[-2:]]
    assert [r["chunk_length"] for r in records] == [1, 8]
    for record in records:
        assert record["bench"] == "replay" and record["transitions"] == 120 and record["raw_bytes_per_transition"] > 0
        assert 0 < record["chunk_ratio"] < 1  # obs stored once: less payload than obs + next_obs
        assert record["shared_samples_per_s"] > 0 and record["naive_inserts_per_s"] > 0
    assert records[1]["shared_chunk_bytes_per_transition"] < records[0]["shared_chunk_bytes_per_transition"]
