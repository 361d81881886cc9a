"""What the launcher needs to survive faults: a crash-loop guard and a watch on the inference replicas.

The restarts themselves are the launcher's (``System``): env actors are restarted by Ray, the learner and the
replay server from their last checkpoints by the launcher, inference replicas by Serve, evaluation rollout
workers by Ray (their calls re-run on the same scenes).
"""

from __future__ import annotations

import collections
import logging
import threading
import time

log = logging.getLogger(__name__)


class ComponentFailed(RuntimeError):
    """A component that cannot go on: it died too often, or its state is broken (non-finite loss)."""

    def __init__(self, component: str, message: str):
        super().__init__(message)
        self.component = component


class RestartBudget:
    """At most ``limit`` restarts of one component within ``window_s`` seconds; one more ends the run, never a
    crash loop."""

    def __init__(self, limit: int = 3, window_s: float = 600.0):
        self.limit, self.window_s = limit, window_s
        self.times: dict[str, collections.deque] = collections.defaultdict(collections.deque)

    def spend(self, component: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        times = self.times[component]
        while times and now - times[0] > self.window_s:
            times.popleft()
        if len(times) >= self.limit:
            raise ComponentFailed(component, f"{component} died {len(times) + 1} times within "
                                             f"{self.window_s / 60:g} min: stopping the run (checkpoints kept)")
        times.append(now)


class ReplicaWatch:
    """Polls the inference app's replicas (``replica_info``) on a daemon thread and counts the distinct replicas
    that answered: beyond ``num_replicas``, each one is a replica Serve started to replace a dead one."""

    def __init__(self, handle, num_replicas: int, every_s: float = 2.0):
        self.handle, self.num_replicas, self.every_s = handle, num_replicas, every_s
        self.seen: set[str] = set()
        self.stop = threading.Event()
        threading.Thread(target=self._loop, name="replica-watch", daemon=True).start()

    @property
    def replaced(self) -> int:
        return max(len(self.seen) - self.num_replicas, 0)

    def _loop(self) -> None:
        while not self.stop.wait(self.every_s):
            try:
                info = self.handle.replica_info.remote().result(timeout_s=30)
            except Exception as e:  # noqa: BLE001 - a replica being replaced: try again later
                log.info("inference replica not answering (%s)", type(e).__name__)
                continue
            if info["replica_id"] not in self.seen:
                self.seen.add(info["replica_id"])
                if len(self.seen) > self.num_replicas:
                    log.warning("inference replica replaced by Serve (now %s, pid %d)", info["replica_id"],
                                info["pid"])
