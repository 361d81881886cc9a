"""Actor-side writer: one Reverb item per transition, each observation stored once, with the rate limiter's
backpressure made visible.

Layout: every env slot has its own ``TrajectoryWriter`` (its own stream of steps). Step t of a slot holds
``obs_t`` and transition t's other fields (action, reward, ...); item t references step t and the ``obs`` of
step t+1 as ``next_obs``, so consecutive items share the frames' chunks and the sampled item has exactly the
``csil.specs.Transition`` fields and shapes of the table signature (the learner sees no difference). The last
transition of an episode appends its ``next_obs`` (the terminal or truncated observation) as a step of its
own, closed with zeros in the other fields, and no item starts there. The stream goes on with the slot's next
episode: a chunk may hold the end of one episode and the start of the next, an item never does (Reverb's
``end_episode`` is not used because it blocks on the rate limiter like a full flush). Tables whose signature
stores frames as JPEG (``replay.signature``) get each frame encoded once, when its step is appended.
"""

from __future__ import annotations

import dataclasses
import logging
import operator
import time
from collections.abc import Hashable, Mapping

import numpy as np
import reverb
import tree

from csil.specs import Transition
from replay.signature import conform, encode_jpeg, jpeg_frames, layout

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 5
PROBE_EVERY_MS = 5_000  # while blocked, check this often that the server is still there
MAX_IN_FLIGHT = 5  # items sent but not confirmed by the server (Acme's default): bounds how far a writer runs ahead
# Steps per Reverb chunk, per column (each chunk is compressed on its own, snappy in Reverb 0.14). The server
# pays ~0.75 kB per chunk besides the data, so the small columns (state, actions, scalars) take long chunks;
# a sample ships and decompresses every chunk it touches, so camera columns take short ones (longer ones
# compress frames barely better and sample slower). `csil-bench replay` measures both (results/replay.md).
CHUNK_LENGTH = 16
IMAGE_CHUNK_LENGTH = 1
STEP_FIELDS = tuple(field for field in Transition._fields if field != "next_obs")


def _as_mapping(transition: Transition | Mapping) -> Mapping:
    return transition._asdict() if isinstance(transition, Transition) else transition


@dataclasses.dataclass
class _Stream:
    """One env slot's Reverb stream; ``open_obs`` is the newest ``next_obs``, whose step is still open."""

    writer: reverb.TrajectoryWriter
    open_obs: dict | None = None
    episode_id: int | None = None

    def continues(self, arrays: dict) -> bool:
        """``arrays`` picks up where this stream's episode stopped: its ``obs`` is the open step's observation."""
        return (self.open_obs is not None and int(arrays["episode_id"]) == self.episode_id
                and all(a is b or np.array_equal(a, b)
                        for a, b in zip(tree.flatten(arrays["obs"]), tree.flatten(self.open_obs))))


class TransitionWriter:
    """Writes transitions to one table, one item each, storing each observation once per env slot.

    ``write(transition, slot)``: consecutive writes to one ``slot`` whose ``obs`` equals the previous
    ``next_obs`` (same ``episode_id``) continue its episode and share that frame; any other write starts a new
    episode in the slot. Interleave env slots freely, but give each its own ``slot`` (any hashable), or every
    transition is its own episode (still exact, just stored like obs+next_obs). Sampled items always equal the
    written transitions.

    Items wait in the writer until their chunks are complete (up to ``chunk_length`` per slot), then each write
    waits until at most ``MAX_IN_FLIGHT`` sent items are unconfirmed, so the online table's rate limiter
    throttles the caller (backpressure); ``wait_s`` accumulates that time. ``timeout_ms`` (None: wait as long as
    the limiter says) turns a longer wait into a TimeoutError, e.g. when the learner is gone. A server that no
    longer answers raises ConnectionError within about ``PROBE_EVERY_MS`` + ``CONNECT_TIMEOUT_S``.
    """

    def __init__(self, address: str, table: str = "online", timeout_ms: int | None = None,
                 chunk_length: int = CHUNK_LENGTH, image_chunk_length: int = IMAGE_CHUNK_LENGTH):
        if min(chunk_length, image_chunk_length) < 1:
            raise ValueError(f"chunk lengths must be >= 1, got {chunk_length} and {image_chunk_length}")
        self.address, self.table, self.timeout_ms = address, table, timeout_ms
        self._client = reverb.Client(address)
        info = self._server_info()
        if table not in info:
            raise ValueError(f"the Reverb server at {address} has no table {table!r}; it has {sorted(info)}")
        self._expected = layout(info[table].signature)
        self._jpeg = jpeg_frames(info[table].signature)
        for key, shape in self._jpeg.items():  # callers give raw frames; they are encoded on append
            self._expected["obs"][key] = self._expected["next_obs"][key] = (shape, np.dtype(np.uint8))
        self._filler = {key: np.zeros(*self._expected[key]) for key in STEP_FIELDS if key != "obs"}
        # Column path -> chunk length; camera frames are the (H, W, 3) observations.
        self._chunk_lengths = {("obs", key): image_chunk_length if len(shape) == 3 else chunk_length
                               for key, (shape, _) in self._expected["obs"].items()}
        self._chunk_lengths.update({(key,): chunk_length for key in self._filler})
        self._streams: dict[Hashable, _Stream] = {}
        self.wait_s = 0.0

    def write(self, transition: Transition | Mapping, slot: Hashable = 0) -> None:
        """Insert one transition (arrays without a batch axis) from env ``slot``."""
        arrays, _ = conform(_as_mapping(transition), self._expected, batched=False)
        self._insert(arrays, slot)

    def write_batch(self, transitions: Transition | Mapping, slot: Hashable = 0) -> None:
        """Insert N consecutive transitions of one slot given with a leading axis N (one item each; episodes
        split where ``obs`` is not the previous ``next_obs``); all are checked before any is sent."""
        arrays, n = conform(_as_mapping(transitions), self._expected, batched=True)
        for i in range(n):
            self._insert(tree.map_structure(operator.itemgetter(i), arrays), slot)

    def _stream(self, slot: Hashable) -> _Stream:
        if slot not in self._streams:
            keep = 2 * self._backlog  # see _backlog
            writer = self._client.trajectory_writer(num_keep_alive_refs=keep)
            for path, length in self._chunk_lengths.items():
                writer.configure(path, num_keep_alive_refs=keep, max_chunk_length=length)
            self._streams[slot] = _Stream(writer)
        return self._streams[slot]

    def _insert(self, arrays: dict, slot: Hashable) -> None:
        stream = self._stream(slot)
        writer = stream.writer
        if not stream.continues(arrays):
            if stream.open_obs is not None:
                writer.append(self._filler)  # closes the previous episode's final step; no item starts there
            writer.append({"obs": self._stored(arrays["obs"])}, partial_step=True)
        writer.append({key: arrays[key] for key in self._filler})
        writer.append({"obs": self._stored(arrays["next_obs"])}, partial_step=True)
        stream.open_obs, stream.episode_id = arrays["next_obs"], int(arrays["episode_id"])
        history = writer.history
        item = {key: history[key][-2] for key in self._filler}
        item["obs"] = tree.map_structure(lambda column: column[-2], history["obs"])
        item["next_obs"] = tree.map_structure(lambda column: column[-1], history["obs"])
        writer.create_item(self.table, priority=1.0, trajectory=item)
        self._flush([stream], self._backlog, self.timeout_ms)

    def _stored(self, obs: dict) -> dict:
        """An observation as the table stores it (JPEG bytes for the encoded camera columns)."""
        return {key: encode_jpeg(value) if key in self._jpeg else value for key, value in obs.items()} \
            if self._jpeg else obs

    @property
    def _backlog(self) -> int:
        """Unconfirmed items a write may leave per slot: a chunk still filling plus ``MAX_IN_FLIGHT`` sent (a
        smaller bound would cut chunks short). Streams keep twice that many steps alive: an item sent after its
        frame's chunk left the keep-alive window makes Reverb send that chunk again, a second copy on the server
        (seen with 16 kept steps and 16-step chunks)."""
        return max(self._chunk_lengths.values()) + 1 + MAX_IN_FLIGHT

    def settle(self) -> None:
        """Wait again for the backlog after ``write`` raised TimeoutError: that item is already in the writer, so
        retrying ``write`` would insert it twice."""
        self._flush(list(self._streams.values()), self._backlog, self.timeout_ms)

    def flush(self) -> None:
        """Wait until the server has confirmed every item written so far (this ends the chunks being filled)."""
        self._flush(list(self._streams.values()), 0, self.timeout_ms)

    def _flush(self, streams: list[_Stream], block_until_num_items: int, timeout_ms: int | None) -> None:
        """Flush every stream, all within ``timeout_ms`` together."""
        start = time.perf_counter()
        try:
            for stream in streams:
                while True:
                    elapsed_ms = 1000 * (time.perf_counter() - start)
                    left_ms = PROBE_EVERY_MS if timeout_ms is None else timeout_ms - elapsed_ms
                    try:
                        stream.writer.flush(block_until_num_items,
                                            timeout_ms=int(max(0, min(left_ms, PROBE_EVERY_MS))))
                        break
                    except reverb.errors.DeadlineExceededError:
                        self._server_info()  # ConnectionError if the server is gone
                        if timeout_ms is not None and time.perf_counter() - start >= timeout_ms / 1000:
                            raise TimeoutError(
                                f"inserting into table {self.table!r} at {self.address} waited over {timeout_ms} ms: "
                                "the rate limiter holds inserts until the learner samples; is the learner running?"
                            ) from None
        finally:
            self.wait_s += time.perf_counter() - start

    def _server_info(self) -> dict[str, reverb.TableInfo]:
        try:
            return self._client.server_info(timeout=CONNECT_TIMEOUT_S)
        except reverb.errors.DeadlineExceededError as e:
            raise ConnectionError(f"no Reverb server answered at {self.address} within {CONNECT_TIMEOUT_S} s") from e

    def close(self, timeout_ms: int = 10_000, expect_loss: bool = False) -> None:
        """Flush for at most ``timeout_ms`` (so shutdown never hangs on a stopped learner), then close.
        ``expect_loss``: the caller knows the last items may be held back for good (the run is over), so
        dropping them is logged at INFO, not as a warning."""
        try:
            self._flush(list(self._streams.values()), 0, timeout_ms)
        except (TimeoutError, ConnectionError) as e:
            (log.info if expect_loss else log.warning)("closing the writer to %r at %s dropped unconfirmed items: %s",
                                                       self.table, self.address, e)
        finally:
            for stream in self._streams.values():
                stream.writer.close()

    def __enter__(self) -> TransitionWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
