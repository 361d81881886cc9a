"""Shared fixtures: a per-session cache dir (no test touches ~/.cache) and one local Ray instance.

Under pytest-xdist (pyproject's addopts) "session" means one worker's session: each worker has its own cache dir
and Ray instance. The Lift demos and tiny base policies are built once per run for both workers (``built_once``)."""

import os
import random
import shutil
import socket
from pathlib import Path

import pytest

from csil.config import AgentConfig, CriticConfig, HetStatConfig

os.environ.setdefault("MUJOCO_GL", "egl")


def pytest_collection_modifyitems(items):
    """Files with the longest tests first. pytest-xdist's workers take whole files in collection order (pyproject:
    ``--dist loadfile --no-loadscope-reorder``), and a long file taken last leaves one worker running it alone
    (~100 s of the suite's wall time). A ``timeout`` mark is a test's cost estimate; files without one follow,
    those with the most tests first (xdist's own order)."""
    files: dict = {}
    for item in items:
        mark = item.get_closest_marker("timeout")
        limit = (mark.args[0] if mark.args else mark.kwargs.get("timeout", 0)) if mark else 0
        longest, count = files.get(item.path, (0, 0))
        files[item.path] = (max(longest, limit), count + 1)
    items.sort(key=lambda item: (-files[item.path][0], -files[item.path][1]))  # stable: a file stays together


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    os.environ["CSIL_CACHE"] = str(tmp_path_factory.mktemp("csil_cache"))
    yield


@pytest.fixture(scope="session")
def free_port():
    """A function returning a loopback port that is free right now, never the same one twice in a session.

    Picked below the kernel's ephemeral range (``ip_local_port_range``, where outgoing connections take their
    local ports) and above Ray's worker ports (10002-19999): a port bound to 0 comes from the ephemeral range, and
    a Ray node started with it crashed with "bind: Address already in use" once another node's connections took
    it between the pick and the bind. Each pytest-xdist worker picks from its own residue class, so two workers
    never pick the same port."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0")[2:])
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    candidates = [port for port in range(20000, low) if port % workers == worker]
    random.Random(os.getpid()).shuffle(candidates)

    def pick() -> int:
        while candidates:
            port = candidates.pop()
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
            return port
        raise RuntimeError("no free loopback port left in 20000-" + str(low))

    return pick


@pytest.fixture(scope="session")
def actor_env() -> Path | None:
    """The robosuite-1.4 actor environment (deploy/actor-env-rs14.sh): ``$CSIL_ACTOR_ENV`` or ``.venv-rs14`` in
    the checkout; None where there is none, a failure where CSIL_ACTOR_ENV names one that is missing (CI)."""
    path = Path(os.environ.get("CSIL_ACTOR_ENV") or Path(__file__).resolve().parents[1] / ".venv-rs14")
    if (path / "bin" / "python").exists():
        return path
    if os.environ.get("CSIL_ACTOR_ENV"):
        pytest.fail(f"CSIL_ACTOR_ENV={path} has no bin/python: deploy/actor-env-rs14.sh did not build it")
    return None


@pytest.fixture(scope="session")
def ray_local():
    """Real local Ray, started once for the whole session (two CPUs, like CI)."""
    import ray

    from csil.ray_utils import ensure_ray

    ensure_ray(num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_agent() -> AgentConfig:
    """A learner small enough for end-to-end tests on 2 CPU cores."""
    return AgentConfig(
        policy=HetStatConfig(hidden=(64, 64), bottleneck=16, features=64), critic=CriticConfig(hidden=(64, 64)),
        batch_size=16, bc_batch_size=64, bc_steps=200, critic_pretrain_steps=100,
    )


@pytest.fixture(scope="session")
def built_once(tmp_path_factory, worker_id):
    """A function ``(name, build) -> dir``: ``build(dir)`` runs once per test run, in the first pytest-xdist worker
    that asks; the other worker waits for it and reuses the directory (pytest-xdist's recipe for session
    fixtures). Tests must only read what it holds."""
    from filelock import FileLock

    # xdist: basetemp is <run>/popen-gwN, and <run> is this run's own; -n 0: this session's basetemp
    shared = tmp_path_factory.getbasetemp() if worker_id == "master" else tmp_path_factory.getbasetemp().parent

    def get(name: str, build) -> Path:
        root = shared / f"built-{name}"
        with FileLock(f"{root}.lock"):
            if not (root / "DONE").exists():
                shutil.rmtree(root, ignore_errors=True)
                root.mkdir()
                build(root)
                (root / "DONE").touch()
        return root

    return get


@pytest.fixture(scope="session")
def lift_setup(built_once, ray_local):
    """Lift demos (3, scripted expert) and a tiny local base policy, built once per test run."""
    from csil.config import BaseTrainConfig, DemoConfig
    from orchestration.pipeline import generate_demos, train_base_from_file

    def build(root: Path) -> None:
        generate_demos(DemoConfig(task="Lift", num=3, workers=2), root / "lift.hdf5", progress=False)
        train_base_from_file(root / "lift.hdf5", root / "base", BaseTrainConfig(steps=100, batch_size=32, hidden=(32,)),
                             progress=False)

    root = built_once("lift", build)
    return root, root / "lift.hdf5", root / "base"


@pytest.fixture(scope="session")
def lift_image_setup(built_once, ray_local):
    """Lift demos rendered with both cameras (2, scripted expert) and a tiny image base policy trained on them,
    built once per test run."""
    from csil.config import BaseTrainConfig, DemoConfig
    from orchestration.pipeline import generate_demos, train_base_from_file

    def build(root: Path) -> None:
        generate_demos(DemoConfig(task="Lift", num=2, obs_mode="image", workers=2), root / "lift_image.hdf5",
                       progress=False)
        train_base_from_file(root / "lift_image.hdf5", root / "image_base",
                             BaseTrainConfig(steps=20, batch_size=16, hidden=(32,), image_channels=(8,)),
                             obs_mode="image", progress=False)

    root = built_once("lift-image", build)
    return root, root / "lift_image.hdf5", root / "image_base"


@pytest.fixture(scope="session")
def tiny_image_agent(tiny_agent) -> AgentConfig:
    """``tiny_agent`` with a small per-camera encoder, at UTD 1 (XLA compiles the unrolled image update for
    minutes on 2 cores otherwise)."""
    import dataclasses

    from csil.config import EncoderConfig

    return dataclasses.replace(tiny_agent, encoder=EncoderConfig(channels=(8, 16), out_dim=16),
                               bc_steps=20, critic_pretrain_steps=10, utd=1)


@pytest.fixture(scope="session")
def tensorboard_scalars():
    """A function: the scalars of the TensorBoard event files in a directory, read back with TensorBoard's own
    event reader, as {tag: [(step, value), ...]}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorflow import make_ndarray

    def read(logdir) -> dict[str, list[tuple[int, float]]]:
        events = EventAccumulator(str(logdir), size_guidance={"tensors": 0})  # 0: keep every event
        events.Reload()
        return {tag: [(e.step, float(make_ndarray(e.tensor_proto))) for e in events.Tensors(tag)]
                for tag in events.Tags()["tensors"] if not tag.startswith("eval/video/")}

    return read
