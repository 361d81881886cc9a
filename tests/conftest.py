"""Shared fixtures: a per-session cache dir (no test touches ~/.cache) and one local Ray instance."""

import os

import pytest

os.environ.setdefault("MUJOCO_GL", "egl")


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    os.environ["CSIL_CACHE"] = str(tmp_path_factory.mktemp("csil_cache"))
    yield


@pytest.fixture(scope="session")
def ray_local():
    """Real local Ray, started once for the whole session (two CPUs, like CI)."""
    import ray

    from csil.ray_utils import ensure_ray

    ensure_ray(num_cpus=2)
    yield ray
    ray.shutdown()
