"""csil-launch: the distributed CSIL++ system (Ray env actors, Reverb replay, learner service, evaluator).

With no flags it needs nothing but the install: it generates the task's demos and trains the local base policy
if they are not cached, starts Ray locally, the inference server (Ray Serve), the Reverb replay, the learner and
the env actors, and runs everything on this machine. ``--address auto`` runs the same
on an existing Ray cluster. Ends with one JSON summary line; the run directory holds config, metrics, evals,
checkpoints and the learning curve.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

from cli import emit_json


def build_parser() -> argparse.ArgumentParser:
    from csil.config import ALGORITHMS, SIZES, LaunchConfig

    d = LaunchConfig()
    p = argparse.ArgumentParser(prog="csil-launch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default=d.task, help="task name (default %(default)s)")
    p.add_argument("--actors", type=int, default=d.actors, help="env actors (Ray actors) (default %(default)s)")
    p.add_argument("--envs-per-actor", type=int, default=d.envs_per_actor,
                   help="envs each actor steps in lockstep (default %(default)s)")
    p.add_argument("--algo", choices=ALGORITHMS, default=d.algo, help="algorithm (default %(default)s)")
    p.add_argument("--size", choices=SIZES, default=d.size,
                   help="network sizes: paper, or cpu (narrower, ~4x faster updates on a CPU) (default %(default)s)")
    p.add_argument("--action-mode", choices=("ensemble", "residual"), default=d.action_mode,
                   help="ensemble: a = (a_base + a_pi)/2; residual: a = a_base + a_pi (default %(default)s)")
    p.add_argument("--obs", choices=("state",), default=d.obs_mode, help="observations (state only so far)")
    p.add_argument("--env-steps", type=int, default=None,
                   help=f"total env steps (default {d.env_steps}; with --resume: the resumed run's)")
    p.add_argument("--warmup", type=int, default=d.warmup,
                   help="online transitions before the learner samples (the rate limiter's min size)")
    p.add_argument("--eval-every", type=int, default=d.eval_every, help="env steps between evaluations")
    p.add_argument("--eval-episodes", type=int, default=d.eval_episodes,
                   help="episodes per evaluation; 0 turns evaluation off (default %(default)s)")
    p.add_argument("--final-eval-rounds", type=int, default=d.final_eval_rounds,
                   help="re-evaluations of the best parameters at the end (default %(default)s)")
    p.add_argument("--publish-every", type=int, default=d.publish_every,
                   help="learner updates between weight publications (default %(default)s)")
    p.add_argument("--checkpoint-every", type=float, default=d.checkpoint_every_s,
                   help="seconds between learner + replay checkpoints (also on SIGTERM and at the end)")
    p.add_argument("--base-policy", default=d.base_policy,
                   help="local: start the batched inference server (Ray Serve) with the cached local base policy; "
                        "or an existing server: ws://host:port (ours or any openpi server), grpc://host:port")
    p.add_argument("--serve-port", type=int, default=d.serve_port,
                   help="with --base-policy local: the started server's websocket port, for outside clients "
                        "(default %(default)s)")
    p.add_argument("--base-policy-timeout", type=float, default=d.base_policy_timeout_s,
                   help="seconds an actor tries to reach the base-policy server before logging and trying again "
                        "(actors never give up while the run lasts) (default %(default)s)")
    p.add_argument("--seconds", type=float, default=None,
                   help="also stop after this many seconds of acting (default: only --env-steps)")
    p.add_argument("--num-demos", type=int, default=d.num_demos, help="demos for BC, reward and the demo table")
    p.add_argument("--demos", default=None, help="robomimic .hdf5 (default: cached scripted demos of the task)")
    p.add_argument("--base-checkpoint", default=None, help="local base policy dir (default: the cached one)")
    p.add_argument("--bc-steps", type=int, default=None, help="BC pretraining steps (default: the algorithm's)")
    p.add_argument("--critic-steps", type=int, default=None, help="critic pretraining steps (default: the algorithm's)")
    p.add_argument("--address", default=None, help="Ray cluster address, e.g. auto (default: start Ray locally)")
    p.add_argument("--logdir", default=None, help="run directory (default runs/<task>-<time>)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --logdir from its checkpoints, with its saved config.json (only "
                        "--env-steps and --seconds may change)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed (default %(default)s)")
    return p


def config_from_args(args: argparse.Namespace):
    from csil.config import AgentConfig, LaunchConfig, algo_config, cpu_sized

    agent = AgentConfig()
    if args.bc_steps is not None:
        agent = dataclasses.replace(agent, bc_steps=args.bc_steps)
    if args.critic_steps is not None:
        agent = dataclasses.replace(agent, critic_pretrain_steps=args.critic_steps)
    if args.size == "cpu":
        agent = cpu_sized(agent)
    return LaunchConfig(
        task=args.task, algo=args.algo, size=args.size, action_mode=args.action_mode, obs_mode=args.obs,
        actors=args.actors, envs_per_actor=args.envs_per_actor, env_steps=args.env_steps or LaunchConfig.env_steps,
        warmup=args.warmup,
        eval_every=args.eval_every, eval_episodes=args.eval_episodes, final_eval_rounds=args.final_eval_rounds,
        publish_every=args.publish_every, checkpoint_every_s=args.checkpoint_every, base_policy=args.base_policy,
        serve_port=args.serve_port, base_policy_timeout_s=args.base_policy_timeout, duration_s=args.seconds,
        num_demos=args.num_demos, demos=args.demos, base_checkpoint=args.base_checkpoint, address=args.address,
        logdir=args.logdir or f"runs/{args.task}-{time.strftime('%Y%m%d-%H%M%S')}", resume=args.resume,
        seed=args.seed, agent=algo_config(args.algo, agent))


def resumed_config(args: argparse.Namespace):
    """The saved config of the run in ``--logdir``, with ``--env-steps``/``--seconds`` if given."""
    import json
    from pathlib import Path

    from csil.config import LaunchConfig, from_dict

    if not args.logdir:
        raise SystemExit("csil-launch: --resume needs --logdir (the run directory to continue)")
    saved = Path(args.logdir) / "config.json"
    if not saved.exists():
        raise SystemExit(f"csil-launch: --resume: {saved} does not exist")
    cfg = from_dict(LaunchConfig, json.loads(saved.read_text()))
    changes = {"resume": True, "logdir": args.logdir}
    if args.env_steps is not None:
        changes["env_steps"] = args.env_steps
    if args.seconds is not None:
        changes["duration_s"] = args.seconds
    return dataclasses.replace(cfg, **changes)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    from orchestration.launcher import System

    emit_json(System(resumed_config(args) if args.resume else config_from_args(args)).run())


if __name__ == "__main__":
    main()
