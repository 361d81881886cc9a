"""Every Prometheus metric csil exports: one table (name, type, description, tags), and thin helpers that create
the ``ray.util.metrics`` objects lazily inside the process that records them (env actors, the learner, the replay
service, the inference replicas).

Ray's metrics agent on each node exports them on the node's metrics export port with a ``ray_`` prefix
(``csil_actor_env_steps_total`` is scraped as ``ray_csil_actor_env_steps_total``; histograms as ``_bucket``,
``_sum`` and ``_count``) plus Ray's own labels (``WorkerId``, ``NodeAddress``, ``SessionName``, ...). Counters
are named with their ``_total`` suffix here so that ``MetricSpec.exported`` is the scraped name. The agent
reports every few seconds, so a value shows up at the endpoint 5-10 s after it was recorded.
``deploy/METRICS.md`` documents the table, ``deploy/grafana/csil.json`` plots it.

Counters are incremented in batches where the code already aggregates (an actor's steps between two weight
syncs, the learner's updates between two weight publications, the replay's totals polled every few seconds),
so the hot loops pay at most a few metric calls per second.

This module imports nothing heavy (the inference server, which must run without reverb/tensorflow/robosuite,
uses it); ``ray`` is imported when a metric is first recorded.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
import time
from typing import Any

log = logging.getLogger(__name__)

RAY_PREFIX = "ray_"  # what Ray's metrics agent prepends to every application metric
SERVICE_DISCOVERY_FILE = "prom_metrics_service_discovery.json"  # Ray's file-SD file, in the session dir


@dataclasses.dataclass(frozen=True)
class MetricSpec:
    name: str
    kind: str  # "counter" | "gauge" | "histogram"
    description: str
    component: str  # "actor" | "learner" | "replay" | "inference" | "run"
    tags: tuple[str, ...] = ()
    boundaries: tuple[float, ...] = ()  # histograms (Ray wants them > 0)
    unit: str = ""

    @property
    def exported(self) -> str:
        """The name at the export endpoint (histograms: plus ``_bucket``/``_sum``/``_count``)."""
        return RAY_PREFIX + self.name


SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
MILLISECONDS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)

SPECS: tuple[MetricSpec, ...] = (
    # --- env actors (actors/actor.py, inference_server/client.py: PatientChunkSource); recorded at each weight sync, every ~0.5 s ---
    MetricSpec("csil_actor_env_steps_total", "counter", "env steps taken (transitions written to replay)", "actor",
               ("actor",)),
    MetricSpec("csil_actor_episodes_total", "counter", "episodes finished (success or time limit)", "actor",
               ("actor",)),
    MetricSpec("csil_actor_episode_successes_total", "counter", "episodes that ended in task success", "actor",
               ("actor",)),
    MetricSpec("csil_actor_episode_return", "histogram", "undiscounted return of each finished episode", "actor",
               ("actor",), (0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500)),
    MetricSpec("csil_actor_episode_length", "histogram", "env steps of each finished episode", "actor",
               ("actor",), (25, 50, 100, 150, 200, 250, 300, 350, 400, 450, 500), "steps"),
    MetricSpec("csil_actor_chunk_request_seconds", "histogram",
               "one batched base-policy chunk request (infer_batch of the envs whose chunk ran out)", "actor",
               ("actor",), SECONDS, "s"),
    MetricSpec("csil_actor_base_policy_outages_total", "counter",
               "base-policy connect/request cycles that failed (the actor waits and retries)", "actor", ("actor",)),
    MetricSpec("csil_actor_weight_version_lag", "gauge",
               "newest published weight version minus the version the actor acted with (learner updates), "
               "at each sync reply", "actor", ("actor",)),
    MetricSpec("csil_actor_rate_limited_seconds_total", "counter",
               "seconds the actor's replay inserts were held back (Reverb rate limiter)", "actor", ("actor",),
               unit="s"),
    # --- learner (learner/service.py) ---
    MetricSpec("csil_learner_updates_total", "counter", "fused learner updates (utd critic steps + 1 actor step)",
               "learner"),
    MetricSpec("csil_learner_stat", "gauge",
               "the learner's metrics dict (losses, Q, rewards, entropy, kl_to_bc or alpha), every 100 updates; "
               "tag key = the dict key", "learner", ("key",)),
    MetricSpec("csil_learner_update_seconds", "histogram",
               "seconds per update, averaged over each 100-update window, waits for samples excluded", "learner",
               boundaries=SECONDS, unit="s"),
    MetricSpec("csil_learner_weights_published_total", "counter", "weight versions published to the actors",
               "learner"),
    MetricSpec("csil_learner_sample_wait_seconds_total", "counter",
               "seconds the update loop waited for replay samples (actors behind or rate limiter)", "learner",
               unit="s"),
    # --- replay (replay/service.py), polled from Reverb's server_info every REPLAY_POLL_S ---
    MetricSpec("csil_replay_table_size", "gauge", "items in the table", "replay", ("table",)),
    MetricSpec("csil_replay_table_max_size", "gauge", "the table's capacity (items)", "replay", ("table",)),
    MetricSpec("csil_replay_inserts_total", "counter", "inserts completed (through the rate limiter)", "replay",
               ("table",)),
    MetricSpec("csil_replay_samples_total", "counter", "samples completed (through the rate limiter)", "replay",
               ("table",)),
    MetricSpec("csil_replay_rate_limiter_wait_seconds_total", "counter",
               "seconds the table worker waited on the rate limiter: waiting_for=sampling (inserts held back "
               "until the learner samples), waiting_for=inserts (samples held back until actors insert)", "replay",
               ("table", "waiting_for"), unit="s"),
    # --- the run (orchestration/coordinator.py, recorded when the launcher restarts a component) ---
    MetricSpec("csil_component_restarts", "gauge",
               "in-run restarts of a component so far (actor, learner, replay, inference, evaluation); a gauge "
               "set from 0 at the run's start, so a run without faults shows its zeros", "run", ("component",)),
    # --- inference server (inference_server/app.py), per replica ---
    MetricSpec("csil_inference_requests_total", "counter", "requests answered (a request carries 1..K observations)",
               "inference", ("ingress",)),
    MetricSpec("csil_inference_errors_total", "counter", "failed requests", "inference", ("ingress",)),
    MetricSpec("csil_inference_batch_size", "histogram", "observations per model call", "inference",
               boundaries=(1, 2, 4, 8, 16, 32, 64, 128), unit="observations"),
    MetricSpec("csil_inference_model_ms", "histogram", "batched model call time (ms)", "inference",
               boundaries=MILLISECONDS, unit="ms"),
    MetricSpec("csil_inference_request_ms", "histogram", "server time per request (ms)", "inference", ("ingress",),
               MILLISECONDS, "ms"),
)
REGISTRY: dict[str, MetricSpec] = {spec.name: spec for spec in SPECS}

_objects: dict[str, Any] = {}
_lock = threading.Lock()
_discovery_generation = 0  # a new Ray session in this process retires the previous session's writer


def get(name: str) -> Any:
    """The ``ray.util.metrics`` object of ``name`` in this process, created on first use."""
    metric = _objects.get(name)
    if metric is None:
        from ray.util import metrics

        spec = REGISTRY[name]
        with _lock:
            metric = _objects.get(name)
            if metric is None:
                if spec.kind == "counter":
                    metric = metrics.Counter(spec.name, spec.description, tag_keys=spec.tags)
                elif spec.kind == "gauge":
                    metric = metrics.Gauge(spec.name, spec.description, tag_keys=spec.tags)
                else:
                    metric = metrics.Histogram(spec.name, spec.description, boundaries=list(spec.boundaries),
                                               tag_keys=spec.tags)
                _objects[name] = metric
    return metric


def _tags(tags: dict[str, Any]) -> dict[str, str] | None:
    return {k: str(v) for k, v in tags.items()} or None


def inc(name: str, value: float = 1.0, **tags: Any) -> None:
    """Add ``value`` to a counter; nothing for ``value <= 0`` (Ray refuses those)."""
    if value > 0:
        get(name).inc(value, tags=_tags(tags))


def set_gauge(name: str, value: float, **tags: Any) -> None:
    get(name).set(value, tags=_tags(tags))


def observe(name: str, value: float, **tags: Any) -> None:
    get(name).observe(value, tags=_tags(tags))


# --- Prometheus file service discovery for a local Ray ---------------------------------------------------------


def service_discovery_content() -> list[dict]:
    """What Ray's dashboard writes to ``prom_metrics_service_discovery.json``: every alive node's metrics export
    address (plus the autoscaler's and dashboard's metrics addresses when they are registered)."""
    import ray
    from ray.experimental import internal_kv

    targets = [f"{n['NodeManagerAddress']}:{n['MetricsExportPort']}" for n in ray.nodes() if n["alive"]]
    for key in (b"AutoscalerMetricsAddress", b"DashboardMetricsAddress"):
        try:
            address = internal_kv._internal_kv_get(key)
        except Exception:  # noqa: BLE001 - optional extras, as in Ray's writer
            address = None
        if address:
            targets.append(address.decode())
    return [{"labels": {"job": "ray"}, "targets": targets}]


def start_service_discovery(session_dir: str, temp_dir: str = "/tmp/ray", every_s: float = 5.0) -> threading.Thread:
    """Keep ``<session_dir>/prom_metrics_service_discovery.json`` current, as Ray's dashboard does.

    A local Ray started without the dashboard (``ensure_ray``) exports metrics but has no one writing this file;
    this daemon thread writes it (atomically) every ``every_s`` seconds until Ray shuts down, and points
    ``<temp_dir>/prom_metrics_service_discovery.json`` at it once (the newest session wins, as with Ray's own).
    """
    import ray

    global _discovery_generation
    _discovery_generation += 1
    generation = _discovery_generation
    path = os.path.join(session_dir, SERVICE_DISCOVERY_FILE)

    def write() -> None:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(service_discovery_content(), f)
        os.replace(tmp, path)

    def loop() -> None:
        while ray.is_initialized() and generation == _discovery_generation:
            try:
                write()
            except Exception as e:  # noqa: BLE001 - Ray shutting down, or a transient GCS error
                if not ray.is_initialized():
                    return
                log.debug("writing %s failed: %s", path, e)
            time.sleep(every_s)

    write()
    legacy = os.path.join(temp_dir, SERVICE_DISCOVERY_FILE)
    try:
        if os.path.islink(legacy) or os.path.exists(legacy):
            os.remove(legacy)
        os.symlink(path, legacy)
    except OSError as e:
        log.debug("cannot link %s to %s: %s", legacy, path, e)
    thread = threading.Thread(target=loop, name="prometheus-service-discovery", daemon=True)
    thread.start()
    return thread
