"""The one client interface actors use to get base-policy action chunks.

``connect_base_policy(target)`` accepts:

- ``"local"``: a Ray Serve handle to our app in the current Ray cluster (no sockets, no auth);
- ``"ws://host:port"``: our server (a K-observation call is one message, the batch extension) or any stock
  openpi server (recognised by its metadata frame; it gets one message per observation);
- ``"grpc://host:port"``: our gRPC ingress.

Connection failures are retried with exponential backoff (one log line per retry) until ``timeout_s`` has
passed, then raise ``ConnectionError`` naming the target; requests are idempotent, so a request cut off by a
dropped connection is resent on a new one. An error the server answers for a request (a malformed
observation, a model failure) raises ``InferenceError`` at once and is not retried; a wrong token raises
``PermissionError``.
"""

from __future__ import annotations

import abc
import json
import logging
import time
from typing import Any, Callable, Sequence, TypeVar

import grpc
import numpy as np
from openpi_client import msgpack_numpy
from openpi_client.base_policy import BasePolicy

from csil import metrics
from csil.config import InferenceServerConfig
from inference_server import wire
from inference_server.proto import chunk_pb2, chunk_pb2_grpc

logger = logging.getLogger(__name__)
T = TypeVar("T")
MAX_BACKOFF_S = 5.0


class InferenceError(RuntimeError):
    """The server answered this request with an error; retrying the same request would fail the same way."""


class _Transient(Exception):
    """A failure worth retrying on a fresh connection (refused, reset, timed out, server restarting)."""


def _with_retries(target: str, timeout_s: float, what: str, attempt: Callable[[float], T]) -> T:
    """Call ``attempt(seconds_left)`` until it succeeds, backing off on _Transient, until ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    delay, tries = 0.1, 0
    while True:
        try:
            return attempt(max(deadline - time.monotonic(), 0.01))
        except _Transient as exc:
            tries += 1
            left = deadline - time.monotonic()
            reason = exc.__cause__ or exc
            if left <= 0:
                raise ConnectionError(f"base-policy server {target}: {what} failed for {timeout_s:g} s "
                                      f"({tries} attempts); last error: {type(reason).__name__}: {reason}") from reason
            pause = min(delay, left)
            logger.warning("base-policy server %s: %s failed (%s: %s); retry %d in %.1f s",
                           target, what, type(reason).__name__, reason, tries, pause)
            time.sleep(pause)
            delay = min(2 * delay, MAX_BACKOFF_S)


class BaseClient(BasePolicy, abc.ABC):
    """Chunks for a batch of openpi LIBERO-style observations; also an openpi ``BasePolicy`` (``infer``)."""

    target: str
    metadata: dict

    @abc.abstractmethod
    def infer_batch(self, observations: Sequence[dict]) -> np.ndarray:
        """(B, action_horizon, action_dim) float32, one chunk per observation."""

    def infer(self, obs: dict) -> dict:
        return {"actions": self.infer_batch([obs])[0]}

    def close(self) -> None:
        """Release the connection; the default has none."""

    def __enter__(self) -> "BaseClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _as_chunks(actions: Any, n: int, target: str) -> np.ndarray:
    """Server arrays are read-only views, maybe float64 (openpi unnormalises in float64): copy to float32."""
    out = np.array(actions, dtype=np.float32)
    if out.ndim != 3 or out.shape[0] != n:
        raise InferenceError(f"{target} returned actions of shape {out.shape} for {n} observation(s)")
    return out


class WebsocketClient(BaseClient):
    """openpi's websocket protocol, with the batch extension when the server offers it."""

    def __init__(self, url: str, timeout_s: float, token: str | None):
        self.target, self._timeout_s, self._token = url, timeout_s, token
        self._packer = msgpack_numpy.Packer()
        self._ws: Any = None
        self.metadata: dict = {}
        _with_retries(url, timeout_s, "connect", self._open)

    @property
    def batched(self) -> bool:
        return self.metadata.get("batch_extension", {}).get("key") == wire.BATCH_KEY

    def _open(self, seconds_left: float) -> None:
        import websockets
        from websockets.sync.client import connect

        try:
            ws = connect(self.target, compression=None, max_size=None, proxy=None, open_timeout=seconds_left,
                         additional_headers=wire.auth_header(self._token))
        except websockets.InvalidStatus as exc:
            if exc.response.status_code in (401, 403):
                raise PermissionError(f"{self.target} refused the connection "
                                      f"(HTTP {exc.response.status_code}): wrong or missing token") from None
            raise _Transient() from exc
        except (OSError, TimeoutError, websockets.WebSocketException) as exc:
            raise _Transient() from exc
        try:
            metadata = msgpack_numpy.unpackb(ws.recv(timeout=seconds_left))
        except (OSError, TimeoutError, websockets.WebSocketException) as exc:
            ws.close()
            raise _Transient() from exc
        self._ws, self.metadata = ws, metadata

    def _roundtrip(self, message: dict) -> dict:
        import websockets

        data = self._packer.pack(message)

        def attempt(seconds_left: float) -> bytes | str:
            if self._ws is None:
                self._open(seconds_left)
            try:
                self._ws.send(data)
                return self._ws.recv(timeout=seconds_left)
            except (OSError, TimeoutError, websockets.WebSocketException) as exc:
                self.close()  # lock-step protocol: after a timeout this socket's next reply is not ours
                raise _Transient() from exc

        reply = _with_retries(self.target, self._timeout_s, "inference request", attempt)
        if isinstance(reply, str):
            raise InferenceError(f"{self.target} rejected the request:\n{reply}")
        return msgpack_numpy.unpackb(reply)

    def infer_batch(self, observations: Sequence[dict]) -> np.ndarray:
        observations = list(observations)
        if self.batched:
            return _as_chunks(self._roundtrip({wire.BATCH_KEY: observations})["actions"], len(observations),
                              self.target)
        chunks = [self._roundtrip(obs)["actions"] for obs in observations]
        return _as_chunks(chunks, len(observations), self.target)

    def close(self) -> None:
        if self._ws is not None:
            self._ws.close()
            self._ws = None


class GrpcClient(BaseClient):
    """Our gRPC ingress (inference_server/proto/chunk.proto)."""

    def __init__(self, target: str, timeout_s: float, token: str | None):
        self.target, self._timeout_s = target, timeout_s
        self._pb = chunk_pb2
        self._channel = grpc.insecure_channel(target.removeprefix("grpc://"),
                                              options=[("grpc.max_receive_message_length", -1),
                                                       ("grpc.max_send_message_length", -1)])
        self._stub = chunk_pb2_grpc.ChunkServiceStub(self._channel)
        self._md = [(k.lower(), v) for k, v in wire.auth_header(token).items()]
        self.metadata = json.loads(self._call("GetMetadata", chunk_pb2.MetadataRequest()).json)

    def _call(self, method: str, request: Any) -> Any:
        import grpc

        def attempt(seconds_left: float) -> Any:
            try:
                return getattr(self._stub, method)(request, timeout=seconds_left, metadata=self._md)
            except grpc.RpcError as exc:
                code = exc.code()
                if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise _Transient() from exc
                if code == grpc.StatusCode.UNAUTHENTICATED:
                    raise PermissionError(f"{self.target}: {exc.details()}") from None
                raise InferenceError(f"{self.target} rejected the request ({code.name}): {exc.details()}") from None

        return _with_retries(self.target, self._timeout_s, method, attempt)

    def infer_batch(self, observations: Sequence[dict]) -> np.ndarray:
        request = self._pb.ChunkRequest(observations=[wire.observation_to_proto(o) for o in observations])
        reply = self._call("InferChunks", request)
        return _as_chunks(wire.from_tensor(reply.actions), len(observations), self.target)

    def close(self) -> None:
        self._channel.close()


class ServeHandleClient(BaseClient):
    """In-cluster: a Ray Serve handle to the app (the caller must be connected to the Ray cluster)."""

    def __init__(self, app_name: str, timeout_s: float):
        self.target, self._timeout_s = f"local (Serve app {app_name!r})", timeout_s

        def attempt(seconds_left: float) -> tuple[Any, dict]:
            from ray import serve
            from ray.serve.exceptions import RayServeException

            try:
                handle = serve.get_app_handle(app_name)
                return handle, handle.server_metadata.remote().result(timeout_s=seconds_left)
            except (RayServeException, TimeoutError) as exc:
                raise _Transient() from exc

        self._handle, self.metadata = _with_retries(self.target, timeout_s, "connect", attempt)

    def infer_batch(self, observations: Sequence[dict]) -> np.ndarray:
        from ray.exceptions import ActorUnavailableError, RayActorError
        from ray.serve.exceptions import RayServeException

        try:
            actions = self._handle.infer_batch.remote(list(observations)).result(timeout_s=self._timeout_s)
        except TimeoutError as exc:
            raise ConnectionError(f"base-policy server {self.target}: no answer in {self._timeout_s:g} s") from exc
        except (RayActorError, ActorUnavailableError, RayServeException) as exc:  # a replica died: Serve replaces it
            raise ConnectionError(f"base-policy server {self.target}: {type(exc).__name__}: {exc}") from exc
        except ValueError as exc:  # the replica's ValueError, re-raised by Ray as a RayTaskError subclass of it
            raise InferenceError(f"{self.target} rejected the request: {getattr(exc, 'cause', exc)}") from None
        return _as_chunks(actions, len(observations), self.target)


def connect_base_policy(target: str, *, timeout_s: float = 30.0, token: str | None = None,
                        app_name: str = InferenceServerConfig.app_name) -> BaseClient:
    """A client for ``"local"``, ``"ws://host:port"`` or ``"grpc://host:port"``; see the module docstring."""
    if target == "local":
        return ServeHandleClient(app_name, timeout_s)
    if target.startswith(("ws://", "wss://")):
        return WebsocketClient(target, timeout_s, token)
    if target.startswith("grpc://"):
        return GrpcClient(target, timeout_s, token)
    raise ValueError(f"unknown base-policy target {target!r}: use 'local', 'ws://host:port' or 'grpc://host:port'")


# --- the patient client: what actors (and the residual-mode learner) use --------------------------------------
# An actor that raised on an unreachable inference server would be restarted by Ray, fail again in the same way
# and crash-loop (each restart costs building K MuJoCo envs). Instead it keeps trying, with the client's
# exponential backoff and one log line per attempt, until the server answers or the run stops.


class RunStopped(Exception):
    """The run ended while the actor was waiting for the base-policy server."""


class PatientChunkSource:
    """``infer_batch`` for ``EnvRunner``: connects on first use, reconnects after failures, never gives up
    while ``stopped()`` is False. ``timeout_s`` bounds one connect/request attempt cycle of the client.

    Prometheus (tag ``actor``): the latency of every answered request (``csil_actor_chunk_request_seconds``,
    connecting excluded) and the failed attempt cycles (``csil_actor_base_policy_outages_total``)."""

    def __init__(self, target: str, stopped: Callable[[], bool], timeout_s: float = 30.0, actor_id: int | str = ""):
        self.target, self.stopped, self.timeout_s, self.actor_id = target, stopped, timeout_s, actor_id
        self.client = None
        self.outages = 0

    @property
    def metadata(self) -> dict:
        """The server's metadata frame (what a request must carry), connecting first if needed."""
        return self._patiently(lambda client: client.metadata)

    def infer_batch(self, observations: Sequence[dict]) -> np.ndarray:
        def infer(client: BaseClient) -> np.ndarray:
            start = time.perf_counter()
            chunks = client.infer_batch(observations)
            metrics.observe("csil_actor_chunk_request_seconds", time.perf_counter() - start, actor=self.actor_id)
            return chunks

        return self._patiently(infer)

    def _patiently(self, call: Callable[[BaseClient], Any]) -> Any:
        while True:
            try:
                if self.client is None:
                    self.client = connect_base_policy(self.target, timeout_s=self.timeout_s)
                return call(self.client)
            except ConnectionError as exc:
                self.outages += 1
                metrics.inc("csil_actor_base_policy_outages_total", actor=self.actor_id)
                logger.warning("base policy %s unreachable for %.0f s (%s); the actor keeps waiting",
                            self.target, self.timeout_s, exc)
                self.close()
                if self.stopped():
                    raise RunStopped() from exc

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
