"""What the server and the clients agree on.

Websocket frames use ``openpi_client.msgpack_numpy`` itself, so they are byte-compatible with openpi-client by
construction. Our metadata frame is a superset of openpi's (which is ``{}`` for pi05_libero): it adds
``server``, ``version``, ``backend``, ``action_horizon``, ``action_dim``, ``observation_spec`` and
``batch_extension``. The batch extension: a message ``{"batch": [obs, ...]}`` is answered with
``{"actions": (K, H, D)}``; stock clients never send that key, so they are unaffected, and a client learns
that the server understands it from the metadata frame. gRPC carries the same observations as protobufs.
"""

from __future__ import annotations

import hmac
import importlib.metadata

import numpy as np

from inference_server.proto import chunk_pb2

SERVER_NAME = "csil-inference"
BATCH_KEY = "batch"


def version() -> str:
    return importlib.metadata.version("csil")


def auth_header(token: str | None) -> dict[str, str]:
    """openpi-client's ``api_key`` header format, used on both ingresses."""
    return {"Authorization": f"Api-Key {token}"} if token else {}


def token_ok(expected: str | None, authorization: str | None) -> bool:
    """True when no token is configured, or the Authorization value carries it (constant-time compare)."""
    if not expected:
        return True
    return hmac.compare_digest((authorization or "").encode(), f"Api-Key {expected}".encode())


def server_metadata(backend_name: str, backend_metadata: dict, max_batch_size: int) -> dict:
    """The metadata frame sent on every websocket connect (and by the GetMetadata RPC)."""
    return {**backend_metadata, "server": SERVER_NAME, "version": version(), "backend": backend_name,
            "batch_extension": {"key": BATCH_KEY, "max_batch_size": max_batch_size}}


def to_tensor(array: np.ndarray) -> chunk_pb2.Tensor:
    array = np.ascontiguousarray(array)
    return chunk_pb2.Tensor(dtype=array.dtype.str, shape=array.shape, data=array.tobytes())


def from_tensor(tensor: chunk_pb2.Tensor) -> np.ndarray:
    try:
        return np.frombuffer(tensor.data, np.dtype(tensor.dtype)).reshape(tuple(tensor.shape))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"bad tensor (dtype {tensor.dtype!r}, shape {list(tensor.shape)}): {exc}") from exc


def observation_to_proto(obs: dict) -> chunk_pb2.Observation:
    msg = chunk_pb2.Observation()
    for key, value in obs.items():
        if isinstance(value, str):
            msg.strings[key] = value
        else:
            msg.arrays[key].CopyFrom(to_tensor(np.asarray(value)))
    return msg


def observation_from_proto(msg: chunk_pb2.Observation) -> dict:
    return {**{k: from_tensor(t) for k, t in msg.arrays.items()}, **dict(msg.strings)}
