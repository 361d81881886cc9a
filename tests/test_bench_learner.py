"""Smoke test of ``csil-bench learner``: the CLI runs both input paths end to end and ends with its JSON line.

Tiny networks and batches, so this checks the plumbing (a real Reverb server, the BatchIterators, the jitted
update), never the timings.
"""

from __future__ import annotations

import json

import pytest

from cli.bench import main


@pytest.mark.parametrize("fuse,on_device", [(1, False), (3, False), (3, True)])
def test_learner_bench_cli_reports_both_paths(capsys, fuse, on_device):
    main(["learner", "--obs", "state", "--size", "tiny", "--updates", "2", "--batch-size", "8", "--utd", "2",
          "--rounds", "1", "--warmup", "1", "--items", "32", "--fuse", str(fuse)]
         + (["--replay-on-device"] if on_device else []))
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["bench"] == "learner" and record["obs"] == "state" and record["utd"] == 2
    assert record["fuse"] == fuse and record["replay_on_device"] == on_device
    for path in ("synthetic", "reverb"):
        assert record[path]["env_steps_per_s"] > 0
        assert record[path]["critic_updates_per_s"] == pytest.approx(2 * record[path]["env_steps_per_s"], abs=0.01)
    assert record["input_only"]["batches_per_s"] > 0
    assert record["ratio"] > 0


def test_bare_throughput_script_runs_every_variant_of_a_preset(capsys):
    """``python -m learner.throughput`` (what a GPU node runs: jax/flax/optax only) prints one line per variant
    with its rate, FLOPs and kernel count, then a summary with ratios against the first variant of each mode."""
    import sys

    from learner import throughput

    throughput.main(["--preset", "smoke", "--updates", "3", "--max-s", "5"])
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    header, variants, summary = lines[0], lines[1:-1], lines[-1]
    assert header["device"].startswith("cpu")
    assert [v["name"] for v in variants] == [v.name for v in throughput.PRESETS["smoke"]]
    for v in variants:
        assert "error" not in v, v
        assert v["env_steps_per_s"] > 0 and v["finite"] and v["kernels"] > 10 and v["gflop_per_env_step"] > 0
    assert variants[0]["ratio"] == 1.0 and variants[0]["gflop_per_env_step"] == variants[1]["gflop_per_env_step"]
    assert summary["bench"] == "learner_throughput" and set(summary["ratio"]) == {v["name"] for v in variants}
    for heavy in ("reverb", "ray", "robosuite", "tensorflow"):  # what a GPU node's Python does not have
        assert not any(m == heavy or m.startswith(heavy + ".") for m in _imports_of("learner.throughput")), heavy
    assert "learner.throughput" in sys.modules


def _imports_of(module: str) -> set[str]:
    """Modules that importing ``module`` pulls in, in a fresh interpreter."""
    import subprocess
    import sys

    code = f"import sys, {module}; print('\\n'.join(sys.modules))"
    return set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split())
