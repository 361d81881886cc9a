"""csil-bench: benchmarks. Each prints one JSON line with its numbers and a ratio against a baseline
measured in the same run (machines here are noisy, so only same-run ratios are comparable)."""

from __future__ import annotations

import argparse
import dataclasses

from cli import emit_json
from cli.flags import at_least
from cli.serve import add_server_args, config_from_args
from csil.config import ALGORITHMS, FRAME_CODECS, SIZES, LaunchConfig, agent_config
from csil.envs import RENDER_QUALITIES
from csil.specs import OBS_MODES
from orchestration.bench.env import bench_env
from orchestration.bench.inference import bench_inference
from orchestration.bench.learner import bench_learner
from orchestration.bench.replay import bench_replay
from orchestration.bench.system import bench_system
from replay.writer import CHUNK_LENGTH, IMAGE_CHUNK_LENGTH


def add_system_args(p: argparse.ArgumentParser) -> None:
    """The flags of a fixed-duration system measurement (``csil-bench system``, ``csil-scale``), bar --actors."""
    p.add_argument("--task", default="Lift", help="task name (default %(default)s)")
    p.add_argument("--obs", choices=OBS_MODES, default="state",
                   help="the small policy's observations (image: actors render both cameras at 84x84; the raw env "
                        "baseline renders too) (default %(default)s)")
    p.add_argument("--frame-codec", choices=FRAME_CODECS, default="none",
                   help="how replay stores camera frames (image): raw or JPEG, decoded on the learner's side "
                        "(default %(default)s)")
    p.add_argument("--envs-per-actor", type=at_least(1), default=4, help="envs per actor (default %(default)s)")
    p.add_argument("--seconds", type=at_least(1, float), default=120.0,
                   help="seconds of acting, from the first env step (warmup fill included) (default %(default)s)")
    p.add_argument("--size", choices=SIZES, default="cpu", help="network sizes (default %(default)s)")
    p.add_argument("--batch-size", type=at_least(1), default=None,
                   help="online (and as many demo) samples per critic update, also BC pretraining's batch (default: "
                        "the preset's, 128; image runs on a CPU want 16-32)")
    p.add_argument("--utd", type=at_least(1), default=None, help="critic updates per env step (default: the preset's, 4)")
    p.add_argument("--warmup", type=at_least(1), default=1000, help="rate limiter min size (default %(default)s)")
    p.add_argument("--pretrain-steps", type=at_least(1), default=200,
                   help="BC and critic pretraining steps (quality does not change throughput)")
    p.add_argument("--num-demos", type=at_least(1), default=20, help="demos for pretraining and the demo half of every batch")
    p.add_argument("--fuse-updates", type=at_least(1), default=1,
                   help="learner updates per jit call when that many env steps' worth are admitted, as csil-launch's "
                        "(default %(default)s)")
    p.add_argument("--replay-on-device", action="store_true",
                   help="the online replay on the learner's device, as csil-launch's: Reverb's queue hands each "
                        "transition over once, the learner holds the UTD (the bare baseline is the same either way)")
    p.add_argument("--raw-env-steps", type=at_least(1), default=500, help="steps of the raw env baseline loop")
    p.add_argument("--seed", type=int, default=0, help="seed (default %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="csil-bench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    env = sub.add_parser("env", help="wrapped env vs raw robosuite env.step loop (steps/s, ratio)")
    env.add_argument("--task", default="Square", help="task name (default %(default)s)")
    env.add_argument("--steps", type=at_least(1), default=1000, help="env steps per round and variant (default %(default)s)")
    env.add_argument("--rounds", type=at_least(1), default=5, help="interleaved rounds; medians are reported")
    env.add_argument("--obs", choices=("state", "image"), default="state", help="observation mode")
    env.add_argument("--render-quality", choices=RENDER_QUALITIES, default="default",
                     help="image mode: the wrapped env's look; fast drops shadows, reflections and skybox while the "
                          "raw loop keeps robosuite's, so the ratio is what it buys (default %(default)s)")
    env.add_argument("--seed", type=int, default=0, help="seed for the env and the random actions")
    inference = sub.add_parser("inference", help="batched inference server vs openpi's one-at-a-time server "
                                                 "(requests/s, p50/p99 latency, ratio), one line per client count")
    inference.add_argument("--clients", default="1,4,16", help="comma-separated client counts (default %(default)s)")
    inference.add_argument("--duration", type=at_least(0.5, float), default=5.0, help="seconds measured per server and count")
    inference.add_argument("--baseline-port", type=at_least(1), default=8001, help="port of the unbatched openpi server")
    add_server_args(inference)
    learner = sub.add_parser("learner", help="fused learner update on device-resident batches vs fed through the "
                                             "Reverb dataset path (env steps/s, critic updates/s, ratio)")
    learner.add_argument("--obs", choices=("state", "image"), default="state",
                         help="state: Lift's 19-d vector; image: proprio state + two 84x84 cameras")
    learner.add_argument("--size", choices=(*SIZES, "tiny"), default="paper",
                         help="network sizes: paper (AgentConfig defaults), cpu (csil.config.cpu_sized) or tiny "
                              "(smoke tests only) (default %(default)s)")
    learner.add_argument("--algo", choices=ALGORITHMS, default="csil++", help="algorithm preset (default %(default)s)")
    learner.add_argument("--batch-size", type=at_least(1), default=None,
                         help="online (and as many demo) samples per critic update (default: the preset's)")
    learner.add_argument("--utd", type=at_least(1), default=None,
                         help="critic updates per fused update (default: the preset's)")
    learner.add_argument("--updates", type=at_least(1), default=20,
                         help="timed updates per path and round (default %(default)s)")
    learner.add_argument("--rounds", type=at_least(1), default=3, help="interleaved rounds; medians are reported")
    learner.add_argument("--fuse", type=at_least(1), default=1,
                         help="env steps' updates per jit call (CSILAgent.update_many); rates stay per env step")
    learner.add_argument("--replay-on-device", action="store_true",
                         help="feed the update as csil-launch --replay-on-device does: one new transition per env "
                              "step from Reverb's queue into the device replay, the online batch drawn there")
    learner.add_argument("--warmup", type=at_least(1), default=3, help="untimed updates per path first (compilation)")
    learner.add_argument("--items", type=at_least(1), default=2048, help="random transitions per Reverb table")
    learner.add_argument("--seed", type=int, default=0, help="seed for the agent and the random transitions")
    learner.add_argument("--unroll-utd", choices=("auto", "on", "off"), default="auto",
                         help="unroll the fused UTD loop (auto: for image observations) (default %(default)s)")
    replay = sub.add_parser("replay", help="Reverb bytes per transition (server RSS growth and checkpoint chunk "
                                           "bytes), insert and sample rates: frames stored once vs the naive "
                                           "obs+next_obs layout, one line per chunk length")
    replay.add_argument("--task", default="Lift", help="task whose scripted expert makes the frames (default %(default)s)")
    replay.add_argument("--obs", choices=("state", "image"), default="image", help="observation mode")
    replay.add_argument("--transitions", type=at_least(1), default=2000, help="transitions per layout (default %(default)s)")
    replay.add_argument("--chunk-lengths", default=str(CHUNK_LENGTH),
                        help="comma-separated chunk lengths of the small columns (default %(default)s)")
    replay.add_argument("--image-chunk-lengths", default=str(IMAGE_CHUNK_LENGTH),
                        help="comma-separated chunk lengths of the camera columns, image mode (default %(default)s)")
    replay.add_argument("--frame-codecs", default="none,jpeg",
                        help="frame codecs to compare, comma-separated, image mode only (default %(default)s)")
    replay.add_argument("--episodes", type=at_least(1), default=4,
                        help="expert episodes rendered, cycled to --transitions (default %(default)s)")
    replay.add_argument("--slots", type=at_least(1), default=4, help="env slots writing round-robin (default %(default)s)")
    replay.add_argument("--batch-size", type=at_least(1), default=256, help="items per sampled batch (default %(default)s)")
    replay.add_argument("--batches", type=at_least(1), default=10, help="batches per sampling round (default %(default)s)")
    replay.add_argument("--rounds", type=at_least(1), default=5,
                        help="sampling rounds, interleaved across the layouts' servers; medians are reported")
    replay.add_argument("--seed", type=int, default=0, help="seed of the expert episodes")
    system = sub.add_parser("system", help="the distributed system for --seconds vs its parts alone: env steps/s per "
                                           "actor vs the raw env loop, learner updates/s vs the bare update, "
                                           "measured UTD, staleness, rate-limiter blocked time")
    system.add_argument("--actors", type=at_least(1), default=2, help="env actors (default %(default)s)")
    add_system_args(system)
    return parser


def system_config(args: argparse.Namespace, actors: int) -> LaunchConfig:
    """A fixed-duration, evaluation-free launch config for ``system`` (and csil-scale)."""
    batch = {"batch_size": args.batch_size, "bc_batch_size": args.batch_size} if args.batch_size else {}
    agent = agent_config("csil++", args.size, bc_steps=args.pretrain_steps, critic_pretrain_steps=args.pretrain_steps,
                         **batch, **({"utd": args.utd} if args.utd else {}))
    return LaunchConfig(task=args.task, obs_mode=args.obs, frame_codec=args.frame_codec, size=args.size,
                        actors=actors, envs_per_actor=args.envs_per_actor, env_steps=10**12, duration_s=args.seconds,
                        warmup=args.warmup, eval_episodes=0, num_demos=args.num_demos, seed=args.seed, agent=agent,
                        fuse_updates=args.fuse_updates, replay_on_device=args.replay_on_device)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command == "env":
        emit_json(bench_env(args.task, args.steps, args.rounds, args.obs, args.seed, args.render_quality))
    elif args.command == "inference":
        cfg = dataclasses.replace(config_from_args(args), grpc_port=None)
        for record in bench_inference([int(n) for n in args.clients.split(",")], cfg, args.duration,
                                      args.baseline_port):
            emit_json(record)
    elif args.command == "learner":
        emit_json(bench_learner(args.obs, args.updates, args.size, args.algo, args.batch_size, args.utd, args.rounds,
                                args.warmup, args.items, args.seed,
                                unroll_utd={"auto": None, "on": True, "off": False}[args.unroll_utd], fuse=args.fuse,
                                replay_on_device=args.replay_on_device))
    elif args.command == "replay":
        lengths = [[int(n) for n in arg.split(",")] for arg in (args.chunk_lengths, args.image_chunk_lengths)]
        codecs = tuple(args.frame_codecs.split(","))
        if unknown := set(codecs) - set(FRAME_CODECS):
            raise SystemExit(f"csil-bench replay: unknown frame codec(s) {sorted(unknown)}; choose from {FRAME_CODECS}")
        for record in bench_replay(args.task, args.obs, args.transitions, *lengths, args.episodes, args.slots,
                                   args.batch_size, args.batches, args.rounds, args.seed, codecs):
            emit_json(record)
    elif args.command == "system":
        emit_json(bench_system(system_config(args, args.actors), args.raw_env_steps))


if __name__ == "__main__":
    main()
