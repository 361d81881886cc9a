"""Bad input, tried as a user would: each is a clear error before anything starts, never a hang or a raw trace."""

import json
import socket

import numpy as np
import pytest

from csil.demos import DemoFileError, DemoWriter
from test_demos import lift_env_args, make_episode


def _refused(main, argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code != 0
    return str(exit_info.value.code) + capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--actors", "0"], "--actors: must be at least 1, got 0"),
    (["--envs-per-actor", "-2"], "--envs-per-actor: must be at least 1"),
    (["--eval-episodes", "-1"], "--eval-episodes: must be at least 0"),
    (["--base-policy", "http://x"], "'http://x' is not a base-policy server"),
    (["--base-policy", "ws://"], "is not a base-policy server"),
])
def test_launch_refuses_bad_flags_before_starting(argv, message, capsys):
    from cli.launch import main

    assert message in _refused(main, argv, capsys)


def test_eval_refuses_zero_episodes_a_missing_checkpoint_and_an_unavailable_task(tmp_path, capsys):
    from cli.evaluate import main
    from csil.tasks import TaskUnavailableError

    assert "--episodes: must be at least 1" in _refused(main, ["--task", "Lift", "--episodes", "0"], capsys)
    assert "is not a csil-base checkpoint" in _refused(
        main, ["--task", "Lift", "--policy", f"base:{tmp_path / 'nonexistent'}"], capsys)
    with pytest.raises(TaskUnavailableError, match="MimicGen task"):
        main(["--task", "Coffee", "--policy", "expert"])


def test_demos_info_on_a_truncated_file_says_so(tmp_path, capsys):
    from cli.demos import main

    path = tmp_path / "demos.hdf5"
    with DemoWriter(path, lift_env_args()) as writer:
        for seed in range(3):
            writer.add(make_episode(50, np.random.default_rng(seed)))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DemoFileError, match="truncated or damaged"):
        main(["info", str(path)])


def test_serve_refuses_a_port_in_use():
    from cli.serve import check_ports_free
    from csil.config import InferenceServerConfig

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SystemExit, match=f"--port {port} on 127.0.0.1 is in use"):
            check_ports_free(InferenceServerConfig(checkpoint="unused", port=port, grpc_port=None))


def test_base_train_on_an_explicit_file_uses_its_demos(lift_setup, tmp_path, capsys):
    """The task's preset (25 Lift demos) belongs to `csil-base prepare`; a file of 3 demos trains on its 3."""
    from cli.base import main

    _, demos, _ = lift_setup
    main(["train", "--demos", str(demos), "--out", str(tmp_path / "base"), "--steps", "5"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["num_demos"] == 3


@pytest.mark.parametrize("module, argv, message", [
    ("experiment", ["--tasks", "Lfit"], "unknown task 'Lfit'"),
    ("experiment", ["--methods", "csil++-ensemble,td3"], "unknown method(s) ['td3']"),
    ("experiment", ["--seeds", "0"], "--seeds: must be at least 1"),
    ("train", ["--num-envs", "0"], "--num-envs: must be at least 1"),
    ("train", ["--bc-holdout", "1"], "--bc-holdout: must be in [0, 1), got 1"),
    ("serve", ["--max-batch-size", "0"], "--max-batch-size: must be at least 1"),
    ("demos", ["generate", "--task", "Lift", "--num", "0"], "--num: must be at least 1"),
    ("bench", ["learner", "--utd", "0"], "--utd: must be at least 1"),
])
def test_every_cli_checks_ranges_and_names_up_front(module, argv, message, capsys):
    import importlib

    assert message in _refused(importlib.import_module(f"cli.{module}").main, argv, capsys)


def test_residual_mode_holds_out_bc_demos_unless_told_otherwise():
    """Residual mode's preset (``csil.config.MODE_PRESETS``): its BC keeps its lowest held-out-loss parameters;
    an explicit --bc-holdout wins; ensemble mode has no hold-out."""
    from cli.launch import build_parser as launch_parser, config_from_args as launch_config
    from cli.train import build_parser, config_from_args

    holdout = lambda *argv: config_from_args(build_parser().parse_args(list(argv))).agent.bc_holdout  # noqa: E731
    assert (holdout("--action-mode", "residual"), holdout(), holdout("--action-mode", "residual", "--bc-holdout", "0")
            ) == (0.1, 0.0, 0.0)
    assert launch_config(launch_parser().parse_args(["--action-mode", "residual"])).agent.bc_holdout == 0.1
