"""The replay item (``csil.specs.Transition``, one per Reverb item): its tf.TensorSpec signature, the checks
writers apply, and the frame codec.

Frame codec: with ``"jpeg"`` every camera frame is stored as JPEG bytes (quality 95, no chroma subsampling: a
mean absolute error of ~1.5 of 255 levels on our renders, results/replay.md) in a scalar ``tf.string`` column
named ``jpeg:HxWx3``, so the table's signature says how to decode it; the learner's input pipeline decodes in
parallel tf.data workers. ``"none"`` stores the raw uint8 frames (Reverb compresses every chunk with snappy).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import tensorflow as tf

from csil.config import FRAME_CODECS
from csil.specs import ACTION_DIM, ObsSpec, Transition


JPEG_QUALITY = 95
_JPEG = "jpeg:"


def transition_signature(obs_spec: ObsSpec, frame_codec: str = "none") -> dict:
    """Nested ``tf.TensorSpec`` of one ``csil.specs.Transition`` (its fields, as a dict); both tables use it."""
    if frame_codec not in FRAME_CODECS:
        raise ValueError(f"unknown frame codec {frame_codec!r}; choose one of {FRAME_CODECS}")
    encoded = set(obs_spec.image_keys) if frame_codec == "jpeg" else set()
    obs = {key: tf.TensorSpec((), tf.string, name=_JPEG + "x".join(map(str, spec.shape))) if key in encoded
           else tf.TensorSpec(spec.shape, tf.as_dtype(spec.dtype)) for key, spec in obs_spec.arrays().items()}
    action = tf.TensorSpec((ACTION_DIM,), tf.float32)
    scalar = tf.TensorSpec((), tf.float32)
    counter = tf.TensorSpec((), tf.int64)
    return Transition(obs=obs, action=action, base_action=action, reward=scalar, discount=scalar,
                      next_obs=dict(obs), next_action=action, policy_version=counter, episode_id=counter)._asdict()


def jpeg_frames(signature: dict) -> dict[str, tuple[int, ...]]:
    """{obs key: frame shape} of the JPEG-encoded camera columns of a signature."""
    return {key: tuple(int(n) for n in spec.name[len(_JPEG):].split("x")) for key, spec in signature["obs"].items()
            if spec.dtype == tf.string and (spec.name or "").startswith(_JPEG)}


def encode_jpeg(frame: np.ndarray) -> np.ndarray:
    """One (H, W, 3) uint8 frame as a scalar object array holding its JPEG bytes (what a tf.string column takes)."""
    data = tf.io.encode_jpeg(frame, quality=JPEG_QUALITY, chroma_downsampling=False).numpy()
    return np.array(data, dtype=object)


def decode_jpeg(data: tf.Tensor, shape: tuple[int, ...]) -> tf.Tensor:
    """Inverse of ``encode_jpeg`` inside a tf.data pipeline."""
    return tf.ensure_shape(tf.io.decode_jpeg(data, channels=3), shape)


Layout = dict  # nested dict whose leaves are (shape, numpy dtype) pairs


def layout(signature: dict) -> Layout:
    """The signature with plain (shape, dtype) leaves, computed once per writer because TensorSpec access is slow."""
    return {key: layout(spec) if isinstance(spec, dict) else (tuple(spec.shape), np.dtype(spec.dtype.as_numpy_dtype))
            for key, spec in signature.items()}


def conform(transition: Mapping, expected: Layout, batched: bool) -> tuple[dict, int]:
    """Check ``transition`` against ``expected`` exactly (no silent casts) and return it as numpy arrays.

    Returns the nested arrays and the batch size (1 when not ``batched``). Raises ValueError naming the
    first offending key with expected vs got, because Reverb's own error for a mismatch names a column index.
    """
    sizes: list[int] = []
    arrays = _conform(transition, expected, (), batched, sizes)
    return arrays, sizes[0] if batched else 1


def _conform(node: object, expected: Layout, path: tuple[str, ...], batched: bool, sizes: list[int]) -> dict:
    where = f"transition[{'/'.join(path)!r}]" if path else "transition"
    if not isinstance(node, Mapping) or node.keys() != expected.keys():
        got = sorted(node) if isinstance(node, Mapping) else type(node).__name__
        raise ValueError(f"{where}: expected keys {sorted(expected)}, got {got}")
    out = {}
    for key, want in expected.items():
        if isinstance(want, dict):
            out[key] = _conform(node[key], want, path + (key,), batched, sizes)
            continue
        (shape, dtype), arr = want, np.asarray(node[key])
        if batched:
            ok = arr.ndim == len(shape) + 1 and arr.shape[1:] == shape and sizes in ([], [arr.shape[0]])
            want_shape = "(" + ", ".join(["N", *map(str, shape)]) + ("," if not shape else "") + ")"
            note = f" with N = {sizes[0]} as for the keys before it" if sizes else ""
        else:
            ok, want_shape, note = arr.shape == shape, str(shape), ""
        if not ok or arr.dtype != dtype:
            raise ValueError(f"transition[{'/'.join(path + (key,))!r}]: expected shape {want_shape} dtype "
                             f"{dtype.name}{note}, got shape {arr.shape} dtype {arr.dtype.name}")
        if batched and not sizes:
            sizes.append(arr.shape[0])
        out[key] = arr
    return out
