"""The in-process Reverb server: the "online" table, the UTD rate limiter, checkpoint and restore.

The demos are not here: they never change during a run, so the learner holds them on its device and draws their
half of each batch there (``learner.core``).

Callers import the whole replay API from here (``TransitionWriter`` and ``BatchIterator`` live in their own
modules and are re-exported).
"""

from __future__ import annotations

import collections
import logging
import os
from collections.abc import Iterator

import reverb
import tensorflow as tf
from reverb.cc import schema_pb2
from reverb.cc.checkpointing import checkpoint_pb2

from csil.config import ReplayConfig
from csil.specs import ONLINE_TABLE, ObsSpec
from replay.dataset import BatchIterator
from replay.signature import transition_signature
from replay.writer import TransitionWriter

__all__ = ["BatchIterator", "ReplayConfig", "ReplayServer", "TransitionWriter", "latest_checkpoint"]

log = logging.getLogger(__name__)


def rate_limiter(cfg: ReplayConfig) -> reverb.rate_limiters.SampleToInsertRatio:
    """The UTD control of ``cfg`` (see ``ReplayConfig``'s docstring for the arithmetic)."""
    return reverb.rate_limiters.SampleToInsertRatio(
        samples_per_insert=cfg.samples_per_insert, min_size_to_sample=cfg.min_size, error_buffer=cfg.error_buffer)


def latest_checkpoint(checkpoint_dir: str) -> str | None:
    """The checkpoint Reverb would load from ``checkpoint_dir``: the newest subdirectory with a DONE marker."""
    if not os.path.isdir(checkpoint_dir):
        return None
    done = [d for d in sorted(os.listdir(checkpoint_dir)) if os.path.exists(os.path.join(checkpoint_dir, d, "DONE"))]
    return os.path.join(checkpoint_dir, done[-1]) if done else None


class ReplayServer:
    """In-process reverb.Server with the table "online" of the transition signature: uniform sampling, FIFO
    removal at ``cfg.online_size``, SampleToInsertRatio (the UTD control); with ``cfg.on_device`` a queue of
    ``cfg.queue_size`` instead, each transition sampled once (by the learner, into its device replay).
    With ``checkpoint_dir`` the server can ``checkpoint()`` there (Reverb keeps only the newest checkpoint);
    ``restore=True`` starts from the newest checkpoint, whose table options (sizes, limiter and its counters)
    win over ``cfg``.
    """

    def __init__(self, cfg: ReplayConfig, obs_spec: ObsSpec, *, port: int | None = None,
                 checkpoint_dir: str | None = None, restore: bool = False):
        self.cfg = cfg
        self._checkpoint_dir = checkpoint_dir
        checkpointer, expected, found = None, None, None
        if checkpoint_dir is not None:
            found = latest_checkpoint(checkpoint_dir)
            if restore and found is None:
                raise FileNotFoundError(f"restore=True but {checkpoint_dir!r} holds no complete Reverb checkpoint "
                                        "(a subdirectory with a DONE file)")
            if not restore and found is not None:
                # Reverb always loads the newest checkpoint in its directory; refuse rather than resume silently.
                raise FileExistsError(f"{checkpoint_dir!r} already holds the Reverb checkpoint {found!r}; pass "
                                      "restore=True to resume from it or use an empty checkpoint_dir")
            if restore:
                expected = checkpoint_item_counts(found)
            checkpointer = reverb.checkpointers.DefaultCheckpointer(path=checkpoint_dir)
        elif restore:
            raise ValueError("restore=True needs a checkpoint_dir")

        signature = transition_signature(obs_spec, cfg.frame_codec)
        tables = [
            reverb.Table.queue(ONLINE_TABLE, cfg.queue_size, signature=signature) if cfg.on_device else
            reverb.Table(name=ONLINE_TABLE, sampler=reverb.selectors.Uniform(), remover=reverb.selectors.Fifo(),
                         max_size=cfg.online_size, rate_limiter=rate_limiter(cfg), signature=signature),
        ]
        # Reverb loads every table of a checkpoint and refuses one it has no table for: a run checkpointed before
        # the demos moved to the learner's device also holds a "demos" table, loaded here and never read.
        legacy = {} if found is None or not restore else {
            name: size for name, size in checkpoint_table_sizes(found).items() if name != ONLINE_TABLE}
        for name, size in legacy.items():
            log.warning("the replay checkpoint %s holds table %r, which this version does not use: loaded, unread",
                        found, name)
            tables.append(reverb.Table(name=name, sampler=reverb.selectors.Uniform(),
                                       remover=reverb.selectors.Fifo(), max_size=max(1, size),
                                       rate_limiter=reverb.rate_limiters.MinSize(1), signature=signature))
        try:
            self._server = reverb.Server(tables, port=port, checkpointer=checkpointer)
        except RuntimeError as e:
            if expected is None:
                raise
            raise RuntimeError(f"cannot restore the Reverb checkpoint {found!r}: {e}") from e
        self._stopped = False
        self.address = f"localhost:{self._server.port}"
        self._client = reverb.Client(self.address)
        if expected is not None:
            try:
                self._check_restored(found, expected, signature)
            except (RuntimeError, ValueError):
                self.stop()
                raise

    def _check_restored(self, path: str, expected: dict[str, int], signature: dict) -> None:
        """Reverb restores a checkpoint's own tables, signature included, and silently skips items whose chunks
        it cannot read: compare with the item records and with the signature this run expects."""
        infos = self._client.server_info()
        for name, info in infos.items():
            if info.signature != signature:
                raise ValueError(f"the Reverb checkpoint {path!r} stores table {name!r} with {info.signature}, not "
                                 f"the transitions of this run's observation spec ({signature})")
        sizes = {name: info.current_size for name, info in infos.items()}
        if any(sizes.get(table, 0) != n for table, n in expected.items()):
            raise RuntimeError(f"the Reverb checkpoint {path!r} is corrupt: its items file lists {expected} items per "
                               f"table but the server restored {sizes}")
        info = infos[ONLINE_TABLE]
        if (info.max_times_sampled == 1) != self.cfg.on_device:
            kinds = ("a queue for a device replay", "uniform replay") if self.cfg.on_device else (
                "uniform replay", "a queue for a device replay")
            raise ValueError(f"the Reverb checkpoint {path!r} holds the {ONLINE_TABLE!r} table as "
                             f"{kinds[1]}, but this run wants {kinds[0]}: resume with the replay-on-device "
                             "setting it was started with")
        restored = (info.max_size, info.rate_limiter_info.samples_per_insert, info.rate_limiter_info.min_size_to_sample)
        wanted = (self.cfg.queue_size, 1.0, 1) if self.cfg.on_device else (
            self.cfg.online_size, self.cfg.samples_per_insert, self.cfg.min_size)
        if restored != wanted:
            log.warning("restored table %r keeps its checkpointed (max_size, samples_per_insert, min_size) = %s, "
                        "not the configured %s", ONLINE_TABLE, restored, wanted)
        log.info("restored replay from %s: %s", path, sizes)

    def sizes(self) -> dict[str, int]:
        return {name: info.current_size for name, info in self._client.server_info().items()}

    def rate_limiter_info(self) -> dict[str, float]:
        """Every number Reverb reports per table, flattened to ``"<table>/<field>/..."`` keys for metrics.

        Includes ``rate_limiter_info/insert_stats/completed`` and ``.../sample_stats/completed`` (totals),
        ``min_diff``/``max_diff``, ``current_size``, and ``table_worker_time/*_ms`` (cumulative;
        ``waiting_for_sampling_ms`` grows while inserts are held back by the limiter).
        """
        out: dict[str, float] = {}
        for name, info in self._client.server_info().items():
            for field in ("current_size", "max_size", "num_episodes", "num_unique_samples"):
                out[f"{name}/{field}"] = float(getattr(info, field))
            _flatten_proto(info.rate_limiter_info, f"{name}/rate_limiter_info", out)
            _flatten_proto(info.table_worker_time, f"{name}/table_worker_time", out)
        return out

    def checkpoint(self) -> str:
        """Write all tables to ``checkpoint_dir`` and return the checkpoint's path.

        Blocks every insert and sample while it serialises, and keeps items alive that FIFO would drop meanwhile.
        """
        if self._checkpoint_dir is None:
            raise ValueError("this ReplayServer has no checkpoint_dir")
        return self._client.checkpoint()

    def stop(self) -> None:
        if not self._stopped:
            self._stopped = True
            self._server.stop()

    def __enter__(self) -> ReplayServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def checkpoint_item_counts(path: str) -> dict[str, int]:
    """Items per table in a checkpoint's items.tfrecord (Reverb 0.14 layout: ZLIB TFRecords of PrioritizedItem)."""
    counts: collections.Counter = collections.Counter()
    try:
        records = tf.data.TFRecordDataset(os.path.join(path, "items.tfrecord"), compression_type="ZLIB")
        for batch in records.batch(65_536).as_numpy_iterator():
            counts.update(schema_pb2.PrioritizedItem.FromString(record).table for record in batch)
    except (tf.errors.OpError, ValueError) as e:
        raise RuntimeError(f"the Reverb checkpoint {path!r} is corrupt: cannot read items.tfrecord ({e})") from e
    return dict(counts)


def checkpoint_sizes(path: str) -> dict[str, int]:
    """Items per table in a checkpoint, its empty tables included: what a server restored from it holds."""
    return {**{table: 0 for table in checkpoint_table_sizes(path)}, **checkpoint_item_counts(path)}


def checkpoint_table_sizes(path: str) -> dict[str, int]:
    """The tables of a checkpoint (its tables.tfrecord) and their max sizes."""
    records = tf.data.TFRecordDataset(os.path.join(path, "tables.tfrecord"), compression_type="ZLIB")
    try:
        tables = [checkpoint_pb2.PriorityTableCheckpoint.FromString(r) for r in records.as_numpy_iterator()]
    except (tf.errors.OpError, ValueError) as e:
        raise RuntimeError(f"the Reverb checkpoint {path!r} is corrupt: cannot read tables.tfrecord ({e})") from e
    return {table.table_name: table.max_size for table in tables}


def checkpoint_chunks(path: str) -> Iterator[bytes]:
    """The serialized ``ChunkData`` records of a checkpoint's chunks.tfrecord: the compressed chunks exactly as the
    server holds them, for measuring what the tables store."""
    records = tf.data.TFRecordDataset(os.path.join(path, "chunks.tfrecord"), compression_type="ZLIB")
    for batch in records.batch(1024).as_numpy_iterator():
        yield from batch


def _flatten_proto(message, prefix: str, out: dict[str, float]) -> None:
    for field in message.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        if field.message_type is not None:
            _flatten_proto(value, f"{prefix}/{field.name}", out)
        else:
            out[f"{prefix}/{field.name}"] = float(value)
