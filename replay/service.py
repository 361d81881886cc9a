"""The Reverb server as a Ray actor, so csil-launch can pin it next to the learner (on the head node).

It answers on the node's IP (not localhost) so actors on other nodes can write to it; checkpoints go to the
run directory and ``restore=True`` brings back the tables (sizes verified) for ``--resume``.

A background thread exports the tables to Prometheus (``csil.metrics``, tag ``table``) every ``POLL_S``: sizes
and capacities as gauges, and Reverb's running totals (inserts and samples completed, the table worker's
rate-limiter waits) as counters advanced by their change since the last poll, so ``rate()`` gives per-second
values. The totals count from this service's start (a restored table's earlier history is not replayed).
"""

from __future__ import annotations

import logging
import threading

import ray

from csil import metrics
from csil.config import ReplayConfig
from csil.specs import ObsSpec
from replay.server import ReplayServer, checkpoint_sizes

log = logging.getLogger(__name__)

POLL_S = 5.0

# Reverb's running totals (``ReplayServer.rate_limiter_info`` keys after "<table>/") -> (counter, extra tags, scale)
_TOTALS = {
    "rate_limiter_info/insert_stats/completed": ("csil_replay_inserts_total", {}, 1.0),
    "rate_limiter_info/sample_stats/completed": ("csil_replay_samples_total", {}, 1.0),
    "table_worker_time/waiting_for_sampling_ms": ("csil_replay_rate_limiter_wait_seconds_total",
                                                  {"waiting_for": "sampling"}, 1e-3),
    "table_worker_time/waiting_for_inserts_ms": ("csil_replay_rate_limiter_wait_seconds_total",
                                                 {"waiting_for": "inserts"}, 1e-3),
}


class ReplayService:
    """Made a Ray actor by the launcher (no CPU reserved)."""

    def __init__(self, cfg: ReplayConfig, spec_json: str, checkpoint_dir: str, restore: bool):
        self.server = ReplayServer(cfg, ObsSpec.from_json(spec_json), checkpoint_dir=checkpoint_dir, restore=restore)
        port = self.server.address.rsplit(":", 1)[1]
        self.address = f"{ray.util.get_node_ip_address()}:{port}"
        self._stop = threading.Event()
        self._totals = self._read_totals()  # the baseline: counters count from here
        threading.Thread(target=self._export_loop, name="replay-metrics", daemon=True).start()

    def _read_totals(self) -> dict[tuple[str, str], float]:
        info = self.server.rate_limiter_info()
        return {(key.split("/", 1)[0], field): info[key] for key in info for field in _TOTALS
                if key.split("/", 1)[1] == field}

    def export_metrics(self) -> None:
        """One poll: gauges set, counters advanced by what Reverb's totals grew since the previous poll."""
        info = self.server.rate_limiter_info()
        for table in {key.split("/", 1)[0] for key in info}:
            metrics.set_gauge("csil_replay_table_size", info[f"{table}/current_size"], table=table)
            metrics.set_gauge("csil_replay_table_max_size", info[f"{table}/max_size"], table=table)
        totals = self._read_totals()
        for (table, field), value in totals.items():
            name, tags, scale = _TOTALS[field]
            metrics.inc(name, (value - self._totals.get((table, field), 0.0)) * scale, table=table, **tags)
        self._totals = totals

    def _export_loop(self) -> None:
        while not self._stop.wait(POLL_S):
            try:
                self.export_metrics()
            except Exception as e:  # noqa: BLE001 - the server is stopping, or a transient error: try again later
                if self._stop.is_set():
                    return
                log.warning("replay metrics: %s", e)

    def get_address(self) -> str:
        return self.address

    def sizes(self) -> dict[str, int]:
        return self.server.sizes()

    def rate_limiter_info(self) -> dict[str, float]:
        return self.server.rate_limiter_info()

    def checkpoint(self) -> str:
        return self.server.checkpoint()

    def checkpointed_sizes(self, path: str) -> dict[str, int]:
        """Items per table in the checkpoint at ``path``: what ``--resume`` restores. Reading the live tables
        after checkpointing can count more: sample requests already in flight when the learner stopped still
        admit a few held-back inserts."""
        return checkpoint_sizes(path)

    def stop(self) -> None:
        self._stop.set()
        self.server.stop()
