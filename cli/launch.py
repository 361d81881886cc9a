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
import time

from cli import emit_json
from cli.flags import at_least, base_policy_target, build, field, resumed, values
from cli.train import (ALGO_HELP, EVAL_VIDEOS_HELP, FRAME_CODEC_HELP, MODE_HELP, OBS_HELP, SIZE_HELP,
                       VIDEO_STRIDE_HELP, WANDB_HELP, add_agent_flags)
from csil.acting import ACTION_MODES
from csil.config import ALGORITHMS, FRAME_CODECS, SIZES, AgentConfig, LaunchConfig, agent_config
from csil.ray_utils import python_env
from csil.specs import OBS_MODES
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
    field(p, L, "task", help="task name")
    field(p, L, "actors", type=at_least(1), help="env actors (Ray actors)")
    field(p, L, "envs_per_actor", type=at_least(1), help="envs each actor steps in lockstep")
    field(p, L, "algo", choices=ALGORITHMS, help=ALGO_HELP)
    field(p, L, "size", choices=SIZES, help=SIZE_HELP)
    field(p, L, "action_mode", choices=ACTION_MODES, help=MODE_HELP)
    field(p, L, "obs_mode", "--obs", choices=OBS_MODES, help=OBS_HELP)
    field(p, L, "frame_codec", choices=FRAME_CODECS, help=FRAME_CODEC_HELP)
    field(p, L, "env_steps", default=None, type=at_least(1),
          help=f"total env steps (default {L.env_steps}; with --resume: the resumed run's)")
    field(p, L, "warmup", type=at_least(1), help="online transitions before the learner samples (the rate limiter's min size)")
    field(p, L, "eval_every", type=at_least(1), help="env steps between evaluations")
    field(p, L, "eval_episodes", type=at_least(0), help="episodes per evaluation; 0 turns evaluation off")
    field(p, L, "final_eval_rounds", type=at_least(0), help="re-evaluations of the best parameters at the end, on fresh scenes")
    field(p, L, "eval_videos", type=at_least(0), help=EVAL_VIDEOS_HELP)
    field(p, L, "video_stride", type=at_least(1), help=VIDEO_STRIDE_HELP)
    field(p, L, "wandb", metavar="PROJECT", help=WANDB_HELP)
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
    field(p, L, "num_demos", type=at_least(1), help="demos for BC, the reward and the demo half of every batch")
    field(p, L, "demos", help="robomimic .hdf5 (default: cached scripted demos of the task)")
    field(p, L, "base_checkpoint", help="local base policy dir (default: the cached one, see --base-obs)")
    field(p, L, "base_obs", choices=("state", "image"),
          help="without --base-checkpoint: the task's cached default base policy on state, or on both cameras + "
               "proprioception like pi0.5 (built on first use: csil-base prepare --obs image)")
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
    run = values(args, LaunchConfig)
    if run["resume"]:
        return resumed(LaunchConfig, args, "csil-launch", "env_steps", "duration_s")
    return build(LaunchConfig, args, env_steps=run["env_steps"] or LaunchConfig.env_steps,
                 logdir=run["logdir"] or f"runs/{run['task']}-{time.strftime('%Y%m%d-%H%M%S')}",
                 agent=agent_config(run["algo"], run["size"], run["action_mode"],
                                    **values(args, AgentConfig, skip_none=True)))


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
