"""csil-scale's outputs from measured records (the measurement itself is csil-bench system's, run in test_launch)."""

import csv

from csil.config import LaunchConfig
from orchestration.bench.system import write_scale


def test_scale_table_csv_and_plot(tmp_path):
    records = [{"actors": n, "env_steps_per_s": 10.0 + n, "env_steps_per_s_per_actor": 30.0 / n,
                "raw_env_steps_per_s": 70.0, "blocked_fraction": 0.5 + 0.05 * n, "learner_updates_per_s": 6.0,
                "bare_updates_per_s": 8.0, "learner_wait_fraction": 0.3, "utd_measured": 4.0,
                "mean_staleness": None if n == 1 else 5.0, "ratio": {}} for n in (1, 2, 4)]
    write_scale(records, LaunchConfig(duration_s=60.0, replay_on_device=True), str(tmp_path),
                "csil-scale --actors 1,2,4 --replay-on-device")
    table = (tmp_path / "table.md").read_text()
    assert table.startswith("`csil-scale --actors 1,2,4 --replay-on-device`") and "| 4 | 14 | 7.5 | 70 | 0.7 |" in table
    assert "online replay on the learner's device" in table  # which input path the numbers are of
    assert "| 1 |" in table and "–" in table  # a missing staleness prints as a dash
    with (tmp_path / "scale.csv").open() as f:
        assert [row["actors"] for row in csv.DictReader(f)] == ["1", "2", "4"]
    assert (tmp_path / "scale.png").stat().st_size > 10_000
