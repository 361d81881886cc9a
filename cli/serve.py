"""csil-serve: run the batched base-policy inference server standalone until SIGINT/SIGTERM.

Websocket (openpi protocol) and /healthz, /stats on --port; gRPC on --grpc-port. Prints one JSON line with
where it answers once it is ready, then serves; on SIGINT/SIGTERM it shuts Serve down cleanly.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import threading

from cli import emit_json
from cli.flags import at_least
from csil.config import InferenceServerConfig
from inference_server import app
from orchestration.pipeline import ensure_base_policy

TOKEN_ENV = "CSIL_SERVE_TOKEN"


def add_server_args(parser: argparse.ArgumentParser) -> None:
    """The server flags, shared with ``csil-bench inference``; each maps onto an InferenceServerConfig field."""
    d = InferenceServerConfig()
    parser.add_argument("--backend", choices=("local", "openpi"), default=d.backend,
                        help="local: our chunking BC model; openpi: real pi0.5 (needs openpi's environment)")
    parser.add_argument("--checkpoint", default=None,
                        help="local: a base-policy dir from `csil-base train` (default: the cached default of "
                             "--task, built if absent); openpi: the checkpoint dir")
    parser.add_argument("--task", default="Lift", help="local backend without --checkpoint: whose cached base policy "
                                                         "(default %(default)s)")
    parser.add_argument("--openpi-config", default=None, help="openpi train config name, e.g. pi05_libero")
    parser.add_argument("--default-prompt", default=None, help="openpi: prompt for requests that carry none")
    parser.add_argument("--host", default=d.host,
                        help="address to bind both ingresses (default loopback; 0.0.0.0 to serve other hosts)")
    parser.add_argument("--port", type=at_least(1), default=d.port, help="websocket + HTTP port (default %(default)s)")
    parser.add_argument("--grpc-port", type=int, default=d.grpc_port,
                        help="gRPC port (default %(default)s; 0 turns the gRPC ingress off)")
    parser.add_argument("--max-batch-size", type=at_least(1), default=d.max_batch_size,
                        help="most observations per model call (default %(default)s)")
    parser.add_argument("--batch-wait-ms", type=at_least(0, float), default=1000 * d.batch_wait_timeout_s,
                        help="how long a partial batch waits for more requests (default %(default)s ms)")
    parser.add_argument("--num-replicas", type=at_least(1), default=d.num_replicas, help="model replicas")
    parser.add_argument("--num-gpus", type=at_least(0, float), default=None,
                        help="GPUs per replica (default: 1 if the Ray cluster has GPUs, else 0)")
    parser.add_argument("--num-cpus", type=at_least(0, float), default=d.num_cpus, help="CPUs per replica (default %(default)s)")
    parser.add_argument("--token", default=os.environ.get(TOKEN_ENV),
                        help=f"shared token clients must send as 'Authorization: Api-Key <token>' "
                             f"(default: ${TOKEN_ENV}; unset: no auth)")
    parser.add_argument("--model-delay-ms", type=at_least(0, float), default=d.model_delay_ms,
                        help="benchmarks only: add a constant cost per batched model call (models a GPU)")


def config_from_args(args: argparse.Namespace) -> InferenceServerConfig:
    """The server config; the local backend without --checkpoint gets --task's cached base policy (built here,
    once, if absent: the server itself only loads)."""
    checkpoint = args.checkpoint
    if checkpoint is None and args.backend == "local":
        checkpoint = str(ensure_base_policy(args.task))
    return InferenceServerConfig(
        backend=args.backend, checkpoint=checkpoint, openpi_config=args.openpi_config,
        default_prompt=args.default_prompt, host=args.host, port=args.port, grpc_port=args.grpc_port or None,
        max_batch_size=args.max_batch_size, batch_wait_timeout_s=args.batch_wait_ms / 1000,
        num_replicas=args.num_replicas, num_gpus=args.num_gpus, num_cpus=args.num_cpus, token=args.token,
        model_delay_ms=args.model_delay_ms)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="csil-serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_server_args(parser)
    parser.add_argument("--address", default=None,
                        help="Ray cluster to join (e.g. auto); default: start a local Ray instance")
    return parser


def check_ports_free(cfg: InferenceServerConfig) -> None:
    """A taken port is a clear error before Serve starts (Serve itself only says the deployment failed)."""
    for what, port in (("--port", cfg.port), ("--grpc-port", cfg.grpc_port)):
        if port is None:
            continue
        with socket.socket() as s:
            try:
                s.bind((cfg.host, port))
            except OSError as exc:
                raise SystemExit(f"csil-serve: {what} {port} on {cfg.host} is in use ({exc.strerror}); pick another "
                                 "port or stop what holds it") from None


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args)
    check_ports_free(cfg)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    stop = threading.Event()
    server = app.start(cfg, address=args.address)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    metadata = server.handle.server_metadata.remote().result()
    emit_json({"serving": cfg.app_name, "backend": cfg.backend, "websocket": server.ws_url,
               "health": f"{server.http_url}/healthz", "stats": f"{server.http_url}/stats",
               "grpc": server.grpc_url, "auth": bool(cfg.token), "replicas": cfg.num_replicas,
               "action_horizon": metadata["action_horizon"], "action_dim": metadata["action_dim"],
               "observation_spec": metadata["observation_spec"]})
    stop.wait()
    logging.info("shutting down")
    app.stop(cfg.app_name, shutdown_serve=True)


if __name__ == "__main__":
    main()
