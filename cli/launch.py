"""csil-launch: the distributed CSIL++ system (Ray env actors, Reverb replay, learner service, evaluator).

With no flags it needs nothing but the install: it generates the task's demos and trains the local base policy
if they are not cached, starts Ray locally, the inference server (Ray Serve), the Reverb replay, the learner and
the env actors, and runs everything on this machine. ``--address auto`` runs the same on an existing Ray cluster,
e.g. as a Ray job (``ray job submit --working-dir . -- csil-launch --address auto ...``, see deploy/README.md):
``ray job stop`` sends SIGTERM, which stops the run with checkpoints like Ctrl-C. Ends with one JSON summary line;
the run directory holds config, metrics, evals, checkpoints, the learning curve, TensorBoard event files and
evaluation videos.
"""

from __future__ import annotations

import argparse
import logging
import os

from cli import emit_json
from cli.flags import at_least, base_policy_target, field
from cli.run_flags import add_agent_flags, add_run_flags, run_config
from csil.config import LaunchConfig
from csil.ray_utils import python_env
from orchestration.launcher import System


def _actor_env(text: str) -> str:
    """A usable actor environment, or argparse's clear error before anything starts."""
    try:
        python_env(text)
    except (FileNotFoundError, RuntimeError) as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def build_parser() -> argparse.ArgumentParser:
    L = LaunchConfig
    p = argparse.ArgumentParser(prog="csil-launch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_flags(p, L)
    field(p, L, "actors", type=at_least(1), help="env actors (Ray actors)")
    field(p, L, "envs_per_actor", type=at_least(1), help="envs each actor steps in lockstep")
    field(p, L, "warmup", type=at_least(1),
          help="online transitions before the learner samples (the rate limiter's min size)")
    field(p, L, "publish_every", type=at_least(1), help="learner updates between weight publications")
    field(p, L, "fuse_updates", type=at_least(1),
          help="learner updates per jit call: K env steps' worth of batches in one dispatch when the rate limiter "
               "has admitted that many, else one by one as they come (same updates; GPU learners want 8-16)")
    field(p, L, "replay_on_device",
          help="keep the online replay on the learner's device: Reverb hands it each transition once and the "
               "learner draws its batches there (the host's input cost stops bounding a GPU learner); a dying "
               "learner loses what it drained since its last checkpoint")
    field(p, L, "checkpoint_every_s", "--checkpoint-every",
          help="seconds between learner + replay checkpoints (also on SIGTERM and at the end)")
    field(p, L, "base_policy", type=base_policy_target, help="local: start the batched inference server (Ray Serve) with the local base "
                                    "policy; or an existing server: ws://host:port (ours or any openpi server), "
                                    "grpc://host:port. Actors and the evaluator both use it")
    field(p, L, "serve_port", help="with --base-policy local: the started server's websocket port, for outside "
                                   "clients")
    field(p, L, "base_policy_timeout_s", "--base-policy-timeout",
          help="seconds an actor tries to reach the base-policy server before logging and trying again (actors "
               "never give up while the run lasts)")
    field(p, L, "duration_s", "--seconds", help="also stop after this many seconds of acting (default: only "
                                                "--env-steps)")
    field(p, L, "base_checkpoint", help="local base policy dir (default: the cached one, see --base-obs)")
    add_agent_flags(p)
    field(p, L, "address", help="Ray cluster address, e.g. auto (default: start Ray locally)")
    field(p, L, "actor_env", type=_actor_env, help="run env actors and the evaluator in this Python environment (a venv dir or its "
                                  "python; same Python and Ray versions), e.g. the robosuite-1.4 one that "
                                  "deploy/actor-env-rs14.sh builds for MimicGen's tasks (default: this one)")
    field(p, L, "logdir", default=None, help="run directory (default runs/<task>-<time>)")
    field(p, L, "resume", action="store_true",
          help="continue the run in --logdir from its checkpoints, with its saved config.json (only --env-steps and "
               "--seconds may change)")
    field(p, L, "seed", help="seed")
    return p


def config_from_args(args: argparse.Namespace) -> LaunchConfig:
    return run_config(LaunchConfig, args, "csil-launch", "env_steps", "duration_s")


# `ray job stop` sends SIGTERM, then SIGKILL after this many seconds (Ray's default 3): too soon for the
# checkpoints a stop writes (the actors finish their steps, then learner and replay save).
JOB_STOP_WAIT_S = 120


def warn_about_ray_job_stop() -> None:
    """Under Ray Jobs, say how to give ``ray job stop`` time to leave a checkpoint if the job was not given it."""
    if "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ and int(os.environ.get("RAY_JOB_STOP_WAIT_TIME_S", 3)) < 30:
        logging.getLogger("csil-launch").warning(
            "running as a Ray job whose stop grace period is %s s: `ray job stop` would kill this driver before it "
            "checkpoints. Submit with --runtime-env-json '{\"env_vars\": {\"RAY_JOB_STOP_WAIT_TIME_S\": \"%d\"}}'",
            os.environ.get("RAY_JOB_STOP_WAIT_TIME_S", 3), JOB_STOP_WAIT_S)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    warn_about_ray_job_stop()
    summary = System(config_from_args(args)).run()
    emit_json(summary)
    if "failed" in summary:  # a component that cannot go on (crash loop, non-finite loss): say so by the exit code
        raise SystemExit(1)


if __name__ == "__main__":
    main()
