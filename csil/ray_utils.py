"""Starting or joining Ray the same way from every entry point."""

from __future__ import annotations

import logging
import os

from csil.metrics import start_service_discovery


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join ``address`` (e.g. "auto") or start a local Ray instance, once per process.

    Locally the dashboard is off and workers log to the driver only on errors: evaluation and demo
    generation should start in seconds and print progress bars, not Ray's banners. Ray's metrics agent still
    exports every node's metrics without the dashboard, but the Prometheus service-discovery file is written by
    the dashboard's reporter module, so a local start writes it itself (``csil.metrics.start_service_discovery``,
    the same file at the same path); a cluster's head (``ray start --head``) runs the dashboard and writes it.
    """
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    if address:
        ray.init(address=address)
    else:
        # "local": always a new instance. With no address Ray joins the cluster named in
        # /tmp/ray/ray_current_cluster, which `ray start` and ray.cluster_utils.Cluster leave behind (stale or not).
        context = ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=True,
                           configure_logging=True, logging_level="warning")
        try:
            start_service_discovery(context.address_info["session_dir"])
        except Exception as e:  # noqa: BLE001 - monitoring must never stop a run
            logging.getLogger(__name__).warning("no Prometheus service-discovery file: %s", e)


# Custom resources that pin each role to its node type in deploy/cluster.yaml. Fractions for the head's
# services (they share one unit), one unit per env actor and per inference replica (the node's capacity).
ROLE_RESOURCES = {"head": ("csil_learner", 0.01), "actor": ("csil_actor", 1.0), "inference": ("csil_inference", 1.0)}


def role_resources(role: str) -> dict[str, float]:
    """``{resource: amount}`` for a role if the cluster advertises the role's resource; ``{}`` on plain Ray."""
    import ray

    name, amount = ROLE_RESOURCES[role]
    return {name: amount} if ray.cluster_resources().get(name, 0) > 0 else {}
