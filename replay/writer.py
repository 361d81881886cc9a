"""Actor-side writer: one Reverb item per transition, with the rate limiter's backpressure made visible."""

from __future__ import annotations

import logging
import operator
import time
from collections.abc import Mapping

import reverb
import tree

from csil.specs import Transition
from replay.signature import conform, layout

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 5
PROBE_EVERY_MS = 5_000  # while blocked, check this often that the server is still there
MAX_IN_FLIGHT = 5  # items not yet confirmed by the server (Acme's default): bounds how far a writer runs ahead


def _as_mapping(transition: Transition | Mapping) -> Mapping:
    return transition._asdict() if isinstance(transition, Transition) else transition


class TransitionWriter:
    """Writes single-step items to one table through ``client.trajectory_writer``.

    Each write waits until at most ``MAX_IN_FLIGHT`` items are unconfirmed, so the online table's rate limiter
    throttles the caller (backpressure); ``wait_s`` accumulates that time. ``timeout_ms`` (None: wait as long as
    the limiter says) turns a longer wait into a TimeoutError, e.g. when the learner is gone. A server that no
    longer answers raises ConnectionError within about ``PROBE_EVERY_MS`` + ``CONNECT_TIMEOUT_S``.
    """

    def __init__(self, address: str, table: str = "online", timeout_ms: int | None = None):
        self.address, self.table, self.timeout_ms = address, table, timeout_ms
        self._client = reverb.Client(address)
        info = self._server_info()
        if table not in info:
            raise ValueError(f"the Reverb server at {address} has no table {table!r}; it has {sorted(info)}")
        self._expected = layout(info[table].signature)
        # One step per item: items never reference older steps, so one kept-alive step suffices.
        self._writer = self._client.trajectory_writer(num_keep_alive_refs=1)
        self.wait_s = 0.0

    def write(self, transition: Transition | Mapping) -> None:
        """Insert one transition (arrays without a batch axis)."""
        arrays, _ = conform(_as_mapping(transition), self._expected, batched=False)
        self._insert(arrays)

    def write_batch(self, transitions: Transition | Mapping) -> None:
        """Insert N transitions given with a leading axis N (one item each); all are checked before any is sent."""
        arrays, n = conform(_as_mapping(transitions), self._expected, batched=True)
        for i in range(n):
            self._insert(tree.map_structure(operator.itemgetter(i), arrays))

    def _insert(self, step: dict) -> None:
        self._writer.append(step)
        self._writer.create_item(self.table, priority=1.0,
                                 trajectory=tree.map_structure(lambda column: column[-1], self._writer.history))
        self._flush(MAX_IN_FLIGHT, self.timeout_ms)

    def settle(self) -> None:
        """Wait again for the backlog after ``write`` raised TimeoutError: that item is already in the writer, so
        retrying ``write`` would insert it twice."""
        self._flush(MAX_IN_FLIGHT, self.timeout_ms)

    def flush(self) -> None:
        """Wait until the server has confirmed every item written so far."""
        self._flush(0, self.timeout_ms)

    def _flush(self, block_until_num_items: int, timeout_ms: int | None) -> None:
        start = time.perf_counter()
        try:
            while True:
                left_ms = PROBE_EVERY_MS if timeout_ms is None else timeout_ms - 1000 * (time.perf_counter() - start)
                try:
                    self._writer.flush(block_until_num_items, timeout_ms=int(max(0, min(left_ms, PROBE_EVERY_MS))))
                    return
                except reverb.errors.DeadlineExceededError:
                    self._server_info()  # ConnectionError if the server is gone
                    if timeout_ms is not None and time.perf_counter() - start >= timeout_ms / 1000:
                        raise TimeoutError(
                            f"inserting into table {self.table!r} at {self.address} waited over {timeout_ms} ms: the "
                            "rate limiter holds inserts until the learner samples; is the learner running?") from None
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
            self._flush(0, timeout_ms)
        except (TimeoutError, ConnectionError) as e:
            (log.info if expect_loss else log.warning)("closing the writer to %r at %s dropped unconfirmed items: %s", self.table, self.address, e)
        finally:
            self._writer.close()

    def __enter__(self) -> TransitionWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
