"""The base policy as an env actor sees it: a client that waits out an unreachable server instead of crashing.

An actor that raised on an unreachable inference server would be restarted by Ray, fail again in the same way
and crash-loop (each restart costs building K MuJoCo envs). Instead the actor keeps trying, with the client's
exponential backoff and one log line per attempt, until the server answers or the run stops.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Sequence

import numpy as np

from csil import metrics

log = logging.getLogger(__name__)


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

    def infer_batch(self, observations: Sequence[dict]) -> np.ndarray:
        from inference_server.client import connect_base_policy

        while True:
            try:
                if self.client is None:
                    self.client = connect_base_policy(self.target, timeout_s=self.timeout_s)
                start = time.perf_counter()
                chunks = self.client.infer_batch(observations)
                metrics.observe("csil_actor_chunk_request_seconds", time.perf_counter() - start, actor=self.actor_id)
                return chunks
            except ConnectionError as exc:
                self.outages += 1
                metrics.inc("csil_actor_base_policy_outages_total", actor=self.actor_id)
                log.warning("base policy %s unreachable for %.0f s (%s); the actor keeps waiting",
                            self.target, self.timeout_s, exc)
                self.close()
                if self.stopped():
                    raise RunStopped() from exc

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
