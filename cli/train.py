"""csil-train: single-process CSIL++ or a baseline (pretraining, then online training with an in-process Reverb
server). The debugging path and test bed of the distributed system."""

from __future__ import annotations

import argparse
import dataclasses
import time

from cli import emit_json


def build_parser() -> argparse.ArgumentParser:
    from csil.config import ALGORITHMS, SIZES, AgentConfig, TrainConfig

    d, a = TrainConfig(), AgentConfig()
    p = argparse.ArgumentParser(prog="csil-train", description=__doc__)
    p.add_argument("--task", default=d.task, help="task name (default %(default)s)")
    p.add_argument("--algo", choices=ALGORITHMS, default=d.algo,
                   help="csil++ (default); csil: vanilla CSIL (LayerNorm MSE critic, one-sample KL, UTD 1); "
                        "xqc-od: XQC with offline data (sparse reward, entropy-regularised, no critic pretraining)")
    p.add_argument("--size", choices=SIZES, default=d.size,
                   help="network sizes: paper (HETSTAT 512 features, critic 2x512) or cpu (128 features, critic "
                        "2x256: ~4x faster updates on a CPU) (default %(default)s)")
    p.add_argument("--action-mode", choices=("ensemble", "residual"), default=d.action_mode,
                   help="ensemble: a = (a_base + a_pi)/2; residual: a = a_base + a_pi (default %(default)s)")
    p.add_argument("--obs", choices=("state",), default=d.obs_mode,
                   help="observations (the single-process trainer runs state observations only)")
    p.add_argument("--env-steps", type=int, default=d.env_steps, help="online env steps (default %(default)s)")
    p.add_argument("--warmup", type=int, default=d.warmup,
                   help="online transitions collected by the BC-initialised policy before updates start")
    p.add_argument("--num-envs", type=int, default=d.num_envs, help="envs stepped in lockstep (default %(default)s)")
    p.add_argument("--eval-every", type=int, default=d.eval_every, help="env steps between evaluations")
    p.add_argument("--eval-episodes", type=int, default=d.eval_episodes, help="episodes per evaluation")
    p.add_argument("--num-demos", type=int, default=d.num_demos, help="demos for BC, reward and the demo table")
    p.add_argument("--demos", default=None, help="robomimic .hdf5 (default: cached scripted demos of the task)")
    p.add_argument("--base-policy", default=None, help="csil-base checkpoint dir (default: the cached one)")
    p.add_argument("--bc-steps", type=int, default=a.bc_steps, help="BC pretraining steps (default %(default)s)")
    p.add_argument("--critic-steps", type=int, default=a.critic_pretrain_steps,
                   help="SARSA critic pretraining steps (default %(default)s; xqc-od never pretrains its critic)")
    p.add_argument("--logdir", default=None, help="run directory (default runs/<task>-<time>)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed (default %(default)s)")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    from csil.config import AgentConfig, TrainConfig, algo_config, cpu_sized
    from orchestration.trainer import Trainer

    agent = dataclasses.replace(AgentConfig(), bc_steps=args.bc_steps, critic_pretrain_steps=args.critic_steps)
    if args.size == "cpu":
        agent = cpu_sized(agent)
    cfg = TrainConfig(
        task=args.task, algo=args.algo, size=args.size, action_mode=args.action_mode, obs_mode=args.obs,
        env_steps=args.env_steps, warmup=args.warmup, num_envs=args.num_envs, eval_every=args.eval_every, eval_episodes=args.eval_episodes,
        num_demos=args.num_demos, demos=args.demos, base_policy=args.base_policy, seed=args.seed,
        logdir=args.logdir or f"runs/{args.task}-{time.strftime('%Y%m%d-%H%M%S')}",
        agent=algo_config(args.algo, agent),
    )
    emit_json(Trainer(cfg).train())


if __name__ == "__main__":
    main()
