"""Starting or joining Ray the same way from every entry point."""

from __future__ import annotations

import logging
import os
import platform
import subprocess
from pathlib import Path

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


def python_env(path: str | None) -> dict | None:
    """The Ray ``runtime_env`` that runs a role's workers on another interpreter: ``path`` is a venv directory
    or its python (e.g. the robosuite-1.4 actor environment of deploy/actor-env-rs14.sh); None: this one.

    Ray only works across environments with the same Python and Ray versions, so they are checked here, up
    front, with a clear error instead of workers that never start. Workers inherit this process's environment
    variables (PYTHONPATH included), so a checkout on PYTHONPATH is what they import too.
    """
    if path is None:
        return None
    import ray

    python = Path(path) / "bin" / "python" if Path(path).is_dir() else Path(path)
    if not python.is_file():
        raise FileNotFoundError(f"actor environment {path!r}: no python at {python} (give a venv directory or its "
                                "python; deploy/actor-env-rs14.sh builds the robosuite-1.4 one)")
    probe = subprocess.run([str(python), "-c", "import platform, ray; print(platform.python_version(), ray.__version__)"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        raise RuntimeError(f"actor environment {python}: importing ray failed:\n{probe.stderr.strip()[-2000:]}")
    theirs = probe.stdout.split()
    ours = [platform.python_version(), ray.__version__]
    if theirs != ours:
        raise RuntimeError(f"actor environment {python} has Python {theirs[0]} / Ray {theirs[1]}; this one has Python "
                           f"{ours[0]} / Ray {ours[1]}: Ray needs both to match")
    return {"py_executable": str(python)}
