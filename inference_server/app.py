"""The Ray Serve application: one deployment whose replicas batch every client's observations.

Design choices, and why:

- ``@serve.batch`` sits in the deployment that owns the sockets. A separate model deployment behind a handle
  costs a second hop per request and, on a small box, halves the batch sizes that form (serving-notes.md).
- Both ingresses are servers started inside each replica, on the replica's event loop, not Serve's proxies:
  - websocket (openpi protocol) with ``GET /healthz`` and ``GET /stats``: a ``websockets`` server like
    openpi's own. Serve's HTTP proxy in front of a FastAPI route worked but added a hop that cost about
    3 ms per request on a 2-core box, and it split 16 lock-step clients into two cohorts that never merged.
  - gRPC: a ``grpc.aio`` server. Serve's gRPC proxy has its own health API instead of grpc.health.v1 and
    routes on an "application" metadata key that plain gRPC clients do not send.
  Both bind with SO_REUSEPORT, so several replicas on one node share the ports and the kernel spreads
  connections. Serve still places, restarts and scales the replicas, and in-cluster callers use a handle.
- The model runs on a dedicated thread, never on the event loop, so ``/healthz``, handshakes and keepalive
  pings are answered while a batch computes. Per-request work (validation, openpi's input transforms) runs
  on the replica's thread pool before the observations join a batch, so a malformed observation fails its
  own request only.
- Batch sizes, model and request times, requests and errors go to Prometheus (``ray.util.metrics``, defined
  in ``csil.metrics``); batch sizes also to ``GET /stats`` and to each reply's ``server_timing["batch_size"]``,
  which tests read without a Prometheus.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import http
import json
import logging
import os
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Awaitable, Callable

import grpc
import numpy as np
import ray
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from openpi_client import msgpack_numpy
from ray import serve

from csil import metrics
from csil.config import InferenceServerConfig
from csil.ray_utils import ensure_ray, role_resources
from inference_server import wire
from inference_server.proto import chunk_pb2, chunk_pb2_grpc
from inference_server.backends import make_backend, zero_observation

logger = logging.getLogger(__name__)


class _Stats:
    """Batch sizes and request counts of this replica, for ``/stats`` and Prometheus."""

    def __init__(self) -> None:
        self.batch_sizes: collections.Counter[int] = collections.Counter()
        self.observations = 0
        self.errors = 0
        self.shapes: dict[str, list[int]] = {}  # of the last accepted request: what clients actually send
        for spec in metrics.SPECS:  # created now, in the replica's constructor, not on the event loop later
            if spec.component == "inference":
                metrics.get(spec.name)

    def batch(self, size: int, model_ms: float) -> None:
        self.batch_sizes[size] += 1
        self.observations += size
        metrics.observe("csil_inference_batch_size", size)
        metrics.observe("csil_inference_model_ms", model_ms)

    def accepted(self, obs: dict) -> None:
        self.shapes = {k: list(np.shape(v)) for k, v in obs.items() if not isinstance(v, str)}

    def request(self, ingress: str, ms: float) -> None:
        metrics.inc("csil_inference_requests_total", ingress=ingress)
        metrics.observe("csil_inference_request_ms", ms, ingress=ingress)

    def error(self, ingress: str) -> None:
        self.errors += 1
        metrics.inc("csil_inference_errors_total", ingress=ingress)

    def snapshot(self) -> dict:
        batches = sum(self.batch_sizes.values())
        return {"observations": self.observations, "batches": batches, "errors": self.errors,
                "mean_batch_size": self.observations / batches if batches else 0.0,
                "max_batch_size": max(self.batch_sizes, default=0),
                "batch_size_counts": {str(k): v for k, v in sorted(self.batch_sizes.items())},
                "observation_shapes": self.shapes}


async def _start_grpc(server: InferenceServer) -> Callable[[], Awaitable[None]]:
    """A grpc.aio server on the replica's event loop: the chunk service plus grpc.health.v1. Returns its stop.

    Defined (like ``_start_websocket``) before the deployment class: Serve serialises the class when it is
    decorated, and the functions it calls must exist by then."""
    class ChunkServicer(chunk_pb2_grpc.ChunkServiceServicer):
        async def _authorize(self, context: grpc.aio.ServicerContext) -> None:
            if not wire.token_ok(server.cfg.token, dict(context.invocation_metadata()).get("authorization")):
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong Api-Key")

        async def InferChunks(self, request: chunk_pb2.ChunkRequest, context: grpc.aio.ServicerContext):
            await self._authorize(context)
            try:
                observations = [wire.observation_from_proto(o) for o in request.observations]
                actions, timing = await server.infer_many(observations, "grpc")
            except ValueError as exc:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            except Exception as exc:  # logged by infer_many
                await context.abort(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}")
            return chunk_pb2.ChunkReply(actions=wire.to_tensor(actions), timing=chunk_pb2.ServerTiming(**timing))

        async def GetMetadata(self, request: chunk_pb2.MetadataRequest, context: grpc.aio.ServicerContext):
            await self._authorize(context)
            return chunk_pb2.MetadataReply(json=json.dumps(server.metadata))

    grpc_server = grpc.aio.server()
    chunk_pb2_grpc.add_ChunkServiceServicer_to_server(ChunkServicer(), grpc_server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, grpc_server)
    for service in ("", chunk_pb2.DESCRIPTOR.services_by_name["ChunkService"].full_name):
        await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    grpc_server.add_insecure_port(f"{server.cfg.host}:{server.cfg.grpc_port}")
    await grpc_server.start()
    return lambda: grpc_server.stop(grace=1.0)


async def _start_websocket(server: InferenceServer) -> Callable[[], Awaitable[None]]:
    """openpi's websocket protocol plus ``GET /healthz`` and ``GET /stats``, on the replica's event loop.
    Returns its stop."""
    from websockets.asyncio.server import serve as serve_websocket

    def process_request(connection: Any, request: Any) -> Any:
        if request.path == "/healthz":
            return connection.respond(http.HTTPStatus.OK, "OK\n")
        if request.path == "/stats":
            response = connection.respond(http.HTTPStatus.OK, json.dumps(server.stats.snapshot()) + "\n")
            response.headers["Content-Type"] = "application/json"
            return response
        if not wire.token_ok(server.cfg.token, request.headers.get("Authorization")):
            return connection.respond(http.HTTPStatus.UNAUTHORIZED, "missing or wrong Api-Key\n")
        return None  # go on with the websocket handshake

    ws_server = await serve_websocket(server.websocket_session, server.cfg.host, server.cfg.port,
                                      compression=None, max_size=None, process_request=process_request,
                                      reuse_port=True)

    async def stop() -> None:
        ws_server.close()
        await ws_server.wait_closed()

    return stop


@serve.deployment(max_ongoing_requests=1000)
class InferenceServer:
    """One replica: the backend, the batcher, both ingresses; in-cluster callers use it through a handle."""

    async def __init__(self, cfg: InferenceServerConfig):
        self.cfg = cfg
        self._stops: list[Callable[[], Awaitable[None]]] = []
        self._model_thread = ThreadPoolExecutor(1, thread_name_prefix="model")
        self._model_free = asyncio.Event()
        self._model_free.set()
        self.stats = _Stats()
        self._batched.set_max_batch_size(cfg.max_batch_size)
        self._batched.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)
        # Off the event loop: orbax's restore refuses to run inside one (it cannot patch Serve's uvloop).
        self.backend = await asyncio.get_running_loop().run_in_executor(self._model_thread, self._load_backend)
        self.metadata = wire.server_metadata(self.backend.name, self.backend.metadata, cfg.max_batch_size)
        self._stops.append(await _start_websocket(self))
        if cfg.grpc_port is not None:
            self._stops.append(await _start_grpc(self))

    def _load_backend(self) -> Any:
        cfg = self.cfg
        backend = make_backend(cfg.backend, cfg.checkpoint, openpi_config=cfg.openpi_config,
                               default_prompt=cfg.default_prompt, model_delay_ms=cfg.model_delay_ms)
        obs = zero_observation(backend.metadata["observation_spec"])
        if obs is None:
            logger.info("observation shapes are not fixed: each batch size compiles on first use")
            return backend
        size = 1
        while size < 2 * cfg.max_batch_size:  # compile every padded batch size now, not in the first requests
            backend.infer_batch([obs] * size)
            size *= 2
        return backend

    async def __del__(self) -> None:
        for stop in self._stops:
            await stop()
        self._model_thread.shutdown(wait=False)

    async def _submit(self, item: Any) -> tuple[np.ndarray, float, int]:
        """Join the next batch, waiting while the model is busy.

        Serve's batcher cuts the next batch as soon as the previous one has started, so with a slow model it
        keeps cutting small batches that then queue for the model (measured: mean batch 1.8 with 16 clients
        and a 50 ms model). Holding requests until the model is free makes everything that arrived during a
        model call one batch.
        """
        await self._model_free.wait()
        return await self._batched(item)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002)
    async def _batched(self, items: list[Any]) -> list[tuple[np.ndarray, float, int]]:
        self._model_free.clear()
        try:
            start = time.perf_counter()
            loop = asyncio.get_running_loop()
            actions = await loop.run_in_executor(self._model_thread, self.backend.infer_prepared, items)
            model_ms = 1000 * (time.perf_counter() - start)
        finally:
            self._model_free.set()
        self.stats.batch(len(items), model_ms)
        return [(a, model_ms, len(items)) for a in actions]

    def _prepare_all(self, observations: list[dict]) -> list[Any]:
        items = []
        for i, obs in enumerate(observations):
            try:
                items.append(self.backend.prepare(obs))
            except ValueError as exc:
                raise ValueError(f"observation {i} of {len(observations)}: {exc}" if len(observations) > 1
                                 else str(exc)) from None
        return items

    async def infer_many(self, observations: list[dict], ingress: str) -> tuple[np.ndarray, dict]:
        """(K, H, D) float32 actions for K observations, and the server timing of this request."""
        start = time.perf_counter()
        try:
            if not isinstance(observations, list) or not observations:
                raise ValueError("expected a non-empty list of observations")
            items = await asyncio.get_running_loop().run_in_executor(None, self._prepare_all, observations)
            self.stats.accepted(observations[-1])
            results = await asyncio.gather(*(self._submit(item) for item in items))
        except Exception as exc:
            self.stats.error(ingress)
            if not isinstance(exc, ValueError):
                logger.exception("inference failed")
            raise
        infer_ms = 1000 * (time.perf_counter() - start)
        self.stats.request(ingress, infer_ms)
        timing = {"infer_ms": infer_ms, "model_ms": max(r[1] for r in results),
                  "batch_size": max(r[2] for r in results)}
        return np.stack([r[0] for r in results]), timing

    async def infer_batch(self, observations: list[dict]) -> np.ndarray:
        """The in-cluster path (Serve handle): no auth, no serialisation beyond Ray's."""
        return (await self.infer_many(observations, "handle"))[0]

    def replica_info(self) -> dict:
        """Which replica answered (its Serve id and process): how a supervisor sees replicas being replaced."""
        return {"replica_id": serve.get_replica_context().replica_id.unique_id, "pid": os.getpid()}

    def server_metadata(self) -> dict:
        return self.metadata

    async def websocket_session(self, ws: Any) -> None:
        """openpi's protocol: metadata frame, then lock-step msgpack request/response; errors as text frames.

        Unlike openpi's server, an error does not close the connection: the client gets the message (stock
        clients raise RuntimeError with it) and may send its next request on the same socket.
        """
        from websockets.exceptions import ConnectionClosed

        packer = msgpack_numpy.Packer()
        prev_total_ms = None
        try:
            await ws.send(packer.pack(self.metadata))
            async for message in ws:
                start = time.perf_counter()
                try:
                    reply = await self._answer(message)
                except Exception as exc:
                    await ws.send("".join(traceback.format_exception_only(exc)))
                    continue
                if prev_total_ms is not None:
                    reply["server_timing"]["prev_total_ms"] = prev_total_ms
                await ws.send(packer.pack(reply))
                prev_total_ms = 1000 * (time.perf_counter() - start)
        except ConnectionClosed:
            pass  # the client went away; nothing to answer

    async def _answer(self, message: bytes | str) -> dict:
        if isinstance(message, str):
            raise ValueError("expected a binary msgpack frame (openpi_client.msgpack_numpy), got text")
        try:
            obs = msgpack_numpy.unpackb(message)
        except Exception as exc:
            raise ValueError(f"could not decode the msgpack-numpy frame: {exc}") from None
        batched = isinstance(obs, dict) and wire.BATCH_KEY in obs
        actions, timing = await self.infer_many(obs[wire.BATCH_KEY] if batched else [obs], "websocket")
        return {"actions": actions if batched else actions[0], "server_timing": timing}


@dataclasses.dataclass(frozen=True)
class RunningServer:
    """Where a started server answers."""

    app_name: str
    ws_url: str
    http_url: str  # GET /healthz, /stats
    grpc_url: str | None
    handle: Any  # ray.serve.handle.DeploymentHandle of the ingress


def start(cfg: InferenceServerConfig, address: str | None = None) -> RunningServer:
    """Deploy the app on the current (or a new local) Ray cluster and wait until its replicas serve.

    Replicas go to the nodes that advertise ``csil_inference`` (deploy/cluster.yaml) when the cluster has them."""
    ensure_ray(address)
    num_gpus = cfg.num_gpus if cfg.num_gpus is not None else (1 if ray.cluster_resources().get("GPU", 0) else 0)
    serve.start(proxy_location="Disabled")  # the replicas own their sockets; see the module docstring
    deployment = InferenceServer.options(num_replicas=cfg.num_replicas,
                                         logging_config={"enable_access_log": False},  # not a line per request
                                         ray_actor_options={"num_cpus": cfg.num_cpus, "num_gpus": num_gpus,
                                                            "resources": role_resources("inference")})
    handle = serve.run(deployment.bind(cfg), name=cfg.app_name, route_prefix=None)
    return RunningServer(cfg.app_name, f"ws://{cfg.host}:{cfg.port}", f"http://{cfg.host}:{cfg.port}",
                         f"grpc://{cfg.host}:{cfg.grpc_port}" if cfg.grpc_port is not None else None, handle)


def stop(app_name: str = InferenceServerConfig.app_name, shutdown_serve: bool = False) -> None:
    """Delete the app (its replicas close their sockets); with ``shutdown_serve`` also stop Serve."""
    serve.delete(app_name)
    if shutdown_serve:
        serve.shutdown()
