"""The flags of a training run, shared by csil-train and csil-launch (and their help texts, which csil-experiment
reuses): what to learn on which task, how long, how it is evaluated and logged, and the learner's
hyperparameters; ``run_config`` turns them into the command's config (or the saved one with ``--resume``)."""

from __future__ import annotations

import argparse
import time

from cli.flags import at_least, build, field, fraction, resumed, values
from csil.acting import ACTION_MODES
from csil.config import ALGORITHMS, BETA_UNITS, FRAME_CODECS, MODE_PRESETS, SIZES, AgentConfig, agent_config
from csil.specs import OBS_MODES

ALGO_HELP = ("csil++; csil: vanilla CSIL (LayerNorm MSE critic, one-sample KL, UTD 1); xqc-od: XQC with offline "
             "data (sparse reward, entropy-regularised, no critic pretraining)")
SIZE_HELP = ("network sizes: paper (HETSTAT 512 features, critic 2x512) or cpu (128 features, critic 2x256: ~4x "
             "faster updates on a CPU)")
MODE_HELP = ("ensemble: a = (a_base + a_pi)/2; residual: a = a_base + a_pi, and the small policy and critic also see "
             "a_base and its place in its chunk; alone: a = a_pi, the base policy is never asked (CSIL without a "
             "base, the paper's Fig. 6)")
OBS_HELP = ("what the small policy and critic see: state (robomimic's low-dim vector) or image (agentview + wrist "
            "cameras 84x84 + proprioception, the paper's setting; demos rendered on first use). The base policy gets "
            "what its server's metadata asks for, whatever this is")
FRAME_CODEC_HELP = ("how replay stores camera frames (--obs image): none (raw uint8, snappy-compressed chunks) or "
                    "jpeg (quality 95, lossy: ~1.5/255 mean pixel error, ~0.4x the replay memory; decoded by "
                    "parallel tf.data workers on the learner side)")
EVAL_VIDEOS_HELP = ("MP4s of the first N episodes of each evaluation: <logdir>/videos/, TensorBoard (as GIFs) and W&B; "
                    "0: none")
VIDEO_STRIDE_HELP = "film every k-th env step (1: real time at 20 fps; rendering costs ~40 ms a step on a CPU core)"
WANDB_HELP = ("also log to this Weights & Biases project (pip install -e '.[wandb]'; WANDB_MODE=offline works without "
              "network); TensorBoard event files go to the run directory either way")
BETA_UNITS_HELP = ("nats: beta per nat of KL (results/table1); reward: beta times the coherent reward's (1-gamma)/d_a "
                   "per nat, so 1 weighs KL and reward log-ratio equally (see AgentConfig.beta_units)")


def add_agent_flags(p: argparse.ArgumentParser) -> None:
    """The learner's hyperparameters a run may change (csil-train, csil-launch); unset ones keep the preset's
    (``agent_config``: algorithm and --size)."""
    g = p.add_argument_group("learner (unset: the --algo/--size preset's value)")
    field(g, AgentConfig, "bc_steps", type=at_least(0), default=None,
          help=f"BC pretraining steps (preset: {AgentConfig.bc_steps:,}; the paper uses 25k on images)")
    field(g, AgentConfig, "critic_pretrain_steps", "--critic-steps", type=at_least(0), default=None,
          help=f"SARSA critic pretraining steps (preset: {AgentConfig.critic_pretrain_steps:,}; xqc-od never "
               "pretrains its critic)")
    field(g, AgentConfig, "actor_warmup_steps", "--actor-warmup", type=at_least(0), default=None,
          help=f"linear actor learning-rate warmup, updates (preset: {AgentConfig.actor_warmup_steps})")
    field(g, AgentConfig, "beta", default=None,
          help=f"KL(pi||pi_BC) coefficient (csil++, csil), in --beta-units (preset: {AgentConfig.beta:g})")
    field(g, AgentConfig, "beta_units", default=None, choices=BETA_UNITS,
          help=f"{BETA_UNITS_HELP} (preset: {AgentConfig.beta_units})")
    field(g, AgentConfig, "batch_size", type=at_least(1), default=None,
          help=f"online samples per critic update, plus as many demo samples (preset: {AgentConfig.batch_size}; "
               "on a CPU with --obs image, 16-32: one image update at 128 x UTD 4 takes ~70 s on a core)")
    field(g, AgentConfig, "bc_holdout", type=fraction, default=None,
          help=f"fraction of demo episodes kept out of BC; BC then returns its parameters with the lowest loss on "
               f"them instead of the last step's (preset: {MODE_PRESETS['residual']['bc_holdout']:g} in residual "
               f"mode, else {AgentConfig.bc_holdout:g}: no hold-out)")
    field(g, AgentConfig, "bc_batch_size", type=at_least(1), default=None,
          help=f"demo samples per BC pretraining step (preset: {AgentConfig.bc_batch_size})")
    field(g, AgentConfig, "utd", type=at_least(1), default=None,
          help=f"critic updates per env step (preset: {AgentConfig.utd}; vanilla csil is always 1)")


def add_run_flags(p: argparse.ArgumentParser, cls) -> None:
    """What csil-train and csil-launch (config class ``cls``) share: the task and method, the observations, the
    budget, evaluation, logging and the demos. Each command adds its own (warmup, base policy, resources)."""
    field(p, cls, "task", help="task name")
    field(p, cls, "algo", choices=ALGORITHMS, help=ALGO_HELP)
    field(p, cls, "size", choices=SIZES, help=SIZE_HELP)
    field(p, cls, "action_mode", choices=ACTION_MODES, help=MODE_HELP)
    field(p, cls, "obs_mode", "--obs", choices=OBS_MODES, help=OBS_HELP)
    field(p, cls, "frame_codec", choices=FRAME_CODECS, help=FRAME_CODEC_HELP)
    field(p, cls, "env_steps", default=None, type=at_least(1),
          help=f"online env steps (default {cls.env_steps:,}; with --resume: the resumed run's)")
    field(p, cls, "eval_every", type=at_least(1), help="env steps between evaluations")
    field(p, cls, "eval_episodes", type=at_least(0), help="episodes per evaluation (0: no evaluation)")
    field(p, cls, "final_eval_rounds", type=at_least(0),
          help="at the end, the best evaluated parameters re-evaluated this many times on fresh scenes (the paper's "
               "protocol: 5)")
    field(p, cls, "eval_videos", type=at_least(0), help=EVAL_VIDEOS_HELP)
    field(p, cls, "video_stride", type=at_least(1), help=VIDEO_STRIDE_HELP)
    field(p, cls, "wandb", metavar="PROJECT", help=WANDB_HELP)
    field(p, cls, "num_demos", type=at_least(1), help="demos for BC, the reward and the demo half of every batch")
    field(p, cls, "demos", help="robomimic .hdf5 (default: cached scripted demos of the task)")
    field(p, cls, "base_obs", choices=("state", "image"),
          help="without --base-checkpoint: the task's cached default base policy on state, or on both cameras + "
               "proprioception like pi0.5 (built on first use: csil-base prepare --obs image)")


def run_config(cls, args: argparse.Namespace, prog: str, *changeable: str):
    """The run's config (a ``cls``) from the parsed flags: the --algo/--size preset with the learner flags given,
    a run directory named after the task and the time unless --logdir; with --resume, the saved config of the run
    in --logdir with only the ``changeable`` fields taken from the command line."""
    run = values(args, cls)
    if run["resume"]:
        return resumed(cls, args, prog, *changeable)
    return build(cls, args, env_steps=run["env_steps"] or cls.env_steps,
                 logdir=run["logdir"] or f"runs/{run['task']}-{time.strftime('%Y%m%d-%H%M%S')}",
                 agent=agent_config(run["algo"], run["size"], run["action_mode"],
                                    **values(args, AgentConfig, skip_none=True)))
