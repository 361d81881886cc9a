"""Learner input: tf.data over a Reverb table, batched to (utd, batch, ...) numpy arrays with prefetch."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

import numpy as np
import reverb
import tensorflow as tf

from csil.config import FRAME_CODECS
from csil.specs import ObsSpec
from replay.signature import decode_jpeg, jpeg_frames, transition_signature

CONNECT_TIMEOUT_S = 5
GRACE_S = 5.0  # beyond timeout_ms before the watchdog gives up on a stream that Reverb's own timeout did not end
_END = object()


class BatchIterator:
    """Yields nested dicts of numpy arrays shaped (utd, batch_size, ...) sampled uniformly from ``table``.

    The table may store camera frames raw or JPEG-encoded (``replay.signature``): either matches
    ``signature_obs_spec``, and encoded frames are decoded by parallel tf.data workers before batching, off the
    learner's thread.

    Sampling waits at most ``timeout_ms`` on the rate limiter (Reverb's default waits forever once writers are
    gone) and then raises TimeoutError. Reverb's timeout does not cover a server that stopped or died: its
    stream then retries forever, so a daemon thread pulls the batches and ``next()`` waits at most
    ``timeout_ms + GRACE_S`` (ConnectionError if the server no longer answers). After either error the next
    ``next()`` opens a fresh stream, because Reverb ends a dataset iterator for good at its first timeout.
    """

    def __init__(self, address: str, table: str, batch_size: int, utd: int, signature_obs_spec: ObsSpec,
                 prefetch: int = 2, timeout_ms: int = 60_000, ready_batches: int = 1):
        self.address, self.table, self.timeout_ms = address, table, timeout_ms
        self.ready_batches = ready_batches  # batches held ready (sampled, decoded) for next(); see ready()
        self._pump: _Pump | None = None
        self._client = reverb.Client(address)
        info = self._server_info(table)
        expected = [transition_signature(signature_obs_spec, codec) for codec in FRAME_CODECS]
        if info.signature not in expected:
            raise ValueError(f"table {table!r} at {address} stores {info.signature}, not the transitions of "
                             f"{signature_obs_spec} ({expected[0]}, frames raw or as JPEG)")
        n = batch_size * utd
        dataset = reverb.TrajectoryDataset.from_table_signature(
            address, table, max_in_flight_samples_per_worker=2 * n, rate_limiter_timeout_ms=timeout_ms,
            get_signature_timeout_secs=CONNECT_TIMEOUT_S)
        if jpeg := jpeg_frames(info.signature):
            def decode(sample: reverb.ReplaySample) -> reverb.ReplaySample:
                data = dict(sample.data)
                for field in ("obs", "next_obs"):
                    data[field] = {key: decode_jpeg(x, jpeg[key]) if key in jpeg else x
                                   for key, x in data[field].items()}
                return sample._replace(data=data)

            dataset = dataset.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)

        def split(sample: reverb.ReplaySample) -> dict:
            return tf.nest.map_structure(lambda x: tf.reshape(x, [utd, batch_size, *x.shape[1:]]), sample.data)

        self._dataset = dataset.batch(n, drop_remainder=True).map(split).prefetch(prefetch)

    def _server_info(self, table: str) -> reverb.TableInfo:
        try:
            info = self._client.server_info(timeout=CONNECT_TIMEOUT_S)
        except reverb.errors.DeadlineExceededError as e:
            raise ConnectionError(f"no Reverb server answered at {self.address} within {CONNECT_TIMEOUT_S} s") from e
        if table not in info:
            raise ValueError(f"the Reverb server at {self.address} has no table {table!r}; it has {sorted(info)}")
        return info[table]

    def __iter__(self) -> BatchIterator:
        return self

    def ready(self) -> bool:
        """Whether ``next()`` would return at once: a batch the rate limiter admitted is already sampled."""
        return self._pump is not None and not self._pump.batches.empty()

    def __next__(self) -> dict[str, np.ndarray | dict[str, np.ndarray]]:
        if self._pump is None:
            self._pump = _Pump(self._dataset.as_numpy_iterator(), self.ready_batches)
        try:
            item = self._pump.batches.get(timeout=self.timeout_ms / 1000 + GRACE_S)
        except queue.Empty:
            item = _END
        if item is _END or isinstance(item, Exception):
            self.close()
            raise item if isinstance(item, Exception) else self._stall_error()
        return item

    def close(self) -> None:
        """Let the pulling thread end (at once, or when its pending Reverb call returns); next() reopens."""
        if self._pump is not None:
            self._pump.stop.set()
            self._pump = None

    def __del__(self) -> None:
        self.close()

    def _stall_error(self) -> Exception:
        """Why no batch came: the server is gone (ConnectionError) or the table starves (TimeoutError)."""
        try:
            info = self._server_info(self.table)
        except ConnectionError as e:
            return ConnectionError(f"no batch from table {self.table!r} within {self.timeout_ms} ms: {e}")
        rl = info.rate_limiter_info
        inserts, samples = rl.insert_stats.completed, rl.sample_stats.completed
        state = f"it holds {info.current_size} items after {inserts} inserts and {samples} samples"
        if info.max_times_sampled == 1 and info.current_size == 0:  # a queue (the learner's device replay feeds)
            why = "the queue is empty: every transition written was handed over; are the writers running?"
        elif info.current_size < rl.min_size_to_sample:
            why = f"warmup not reached (sampling starts at {rl.min_size_to_sample} items); are the writers running?"
        else:
            why = (f"the rate limiter allows {rl.samples_per_insert:g} samples per insert (plus slack) and waits for "
                   "inserts; the writers are gone or slower than the learner")
        return TimeoutError(f"no batch from table {self.table!r} at {self.address} within {self.timeout_ms} ms: "
                            f"{state}; {why}")


class _Pump:
    """Daemon thread moving batches from a tf.data iterator into a queue of ``size`` slots; ends with _END or an
    exception."""

    def __init__(self, iterator: Iterator, size: int = 1):
        self.batches: queue.Queue = queue.Queue(maxsize=size)
        self.stop = threading.Event()
        threading.Thread(target=self._run, args=(iterator,), daemon=True, name="replay-batches").start()

    def _run(self, iterator: Iterator) -> None:
        try:
            for batch in iterator:
                if not self._put(batch):
                    return
            self._put(_END)  # Reverb's rate_limiter_timeout_ms ends the stream
        except Exception as e:  # handed to the consumer, which raises it
            self._put(e)

    def _put(self, item: object) -> bool:
        while not self.stop.is_set():
            try:
                self.batches.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False
