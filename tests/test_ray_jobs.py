"""csil-launch as a Ray job on a multi-node cluster, the way deploy/README.md runs it: a head with the
``csil_learner`` resource and the dashboard that serves the Jobs API, an actor node (``csil_actor``) and an
inference node (``csil_inference``), each its own ``ray start`` (several raylets on this machine), then
`ray job submit --working-dir . -- ... --address auto`, the Jobs SDK for status, logs and placement, and
`ray job stop`, whose SIGTERM must reach the driver and leave a checkpoint.

Learner, replay and coordinator must land on the head, env actors on the actor node and the inference replica on
the inference node, as deploy/cluster.yaml's node types advertise them. The cluster is this test's own: its own
ports and temp dir, every ``ray start`` with ``--block`` in its own session, so that killing those process
groups stops exactly the Ray it started (``ray stop`` would stop every Ray on the machine). The stopped job is
then resubmitted with ``--resume`` and runs to the end of its budget, as deploy/README.md describes. The job keeps
its online replay on the learner's device (``--replay-on-device``, what a GPU head runs): the transitions the
learner held when stopped must come back with it."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from learner.checkpoint import numbered_checkpoints, read_arrays

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
ROLES = {"head": {"csil_learner": 1}, "actor": {"csil_actor": 2}, "inference": {"csil_inference": 1}}


def _ray_start(args: list[str], env: dict, free_port, log: Path) -> subprocess.Popen:
    """One node: ``ray start --block`` with ports of its own, in its own process group, its output in ``log``."""
    ports = {"node-manager-port": free_port(), "object-manager-port": free_port(),
             "dashboard-agent-listen-port": free_port(), "dashboard-agent-grpc-port": free_port(),
             "metrics-export-port": free_port(), "runtime-env-agent-port": free_port()}
    with log.open("ab") as out:
        return subprocess.Popen([RAY, "start", "--block", "--disable-usage-stats", "--object-store-memory=300000000",
                                 *args, *(f"--{k}={v}" for k, v in ports.items())],
                                env=env, start_new_session=True, stdout=out, stderr=subprocess.STDOUT)


def _stop(node: subprocess.Popen) -> None:
    """Kill a node's process group: ray start and the Ray processes it started (GCS, raylet, dashboard); the
    workers and job drivers exit when their raylet and supervisor are gone. (A graceful stop takes ~30 s.) A node
    whose `ray start` already exited still leaves its group's daemons, so the group is killed regardless."""
    try:
        os.killpg(node.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    node.wait(timeout=60)


def _tail(log: Path, lines: int = 30) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def _raylet_logs(temp: Path) -> str:
    """The tails of the cluster's raylet logs (every node's, in the head's temp dir): why a raylet did not register."""
    return "\n".join(f"--- {log.name}\n{_tail(log, 15)}" for log in sorted(temp.glob("session_*/logs/raylet*")))


@pytest.fixture
def ray_cluster(free_port):
    """The Jobs API address of a fresh three-node Ray cluster, and its node ids by role."""
    from ray.job_submission import JobSubmissionClient
    from ray.util.state import list_nodes

    temp = Path(tempfile.mkdtemp(prefix="rj", dir="/tmp"))  # short: Ray's socket paths must stay under 107 chars
    gcs, dashboard = free_port(), free_port()
    address = f"http://127.0.0.1:{dashboard}"
    # No memory monitor: this cluster's workers are not to be killed for memory other processes on the machine use.
    env = {**os.environ, "RAY_memory_monitor_refresh_ms": "0"}
    logs = {role: temp / f"{role}.log" for role in ROLES}
    nodes = {"head": _ray_start(["--head", "--num-cpus=2", f"--resources={json.dumps(ROLES['head'])}",
                                 "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--temp-dir={temp}",
                                 f"--port={gcs}", f"--dashboard-port={dashboard}",
                                 f"--ray-client-server-port={free_port()}"], env, free_port, logs["head"])}
    try:
        deadline = time.time() + 120
        while True:
            assert nodes["head"].poll() is None, "ray start --head exited:\n" + _tail(logs["head"])
            try:
                JobSubmissionClient(address).list_jobs()
                break
            except Exception:  # noqa: BLE001 - the dashboard is still starting
                assert time.time() < deadline, "the Ray dashboard (Jobs API) did not come up in 120 s"
                time.sleep(1)

        def join(role: str) -> subprocess.Popen:
            return _ray_start([f"--address=127.0.0.1:{gcs}", "--num-cpus=1", f"--resources={json.dumps(ROLES[role])}"],
                              env, free_port, logs[role])

        # One node at a time, each with its own deadline: a joining `ray start` gives its raylet a hard-coded 30 s
        # to register with the GCS and exits otherwise (ray/_private/node.py), taking its raylet with it. In CI,
        # with two raylets and their agents starting at once beside the session's own Ray on 2 cores, that
        # happened twice in a row to one node. Such a node gets up to two more starts, with fresh ports.
        for role in ("actor", "inference"):
            nodes[role], starts, deadline = join(role), 1, time.time() + 240
            while not any(n.state == "ALIVE" and set(ROLES[role]) <= set(n.resources_total)
                          for n in list_nodes(address=address)):
                assert nodes["head"].poll() is None, "ray start --head exited:\n" + _tail(logs["head"])
                if nodes[role].poll() is not None:
                    assert starts < 3, (f"ray start of the {role} node exited {starts} times:\n"
                                          + _tail(logs[role]) + "\n" + _raylet_logs(temp))
                    _stop(nodes[role])
                    nodes[role], starts = join(role), starts + 1
                assert time.time() < deadline, (f"the {role} node did not join in 240 s:\n" + _tail(logs[role])
                                                   + "\n" + _raylet_logs(temp))
                time.sleep(1)
        alive = [n for n in list_nodes(address=address) if n.state == "ALIVE"]
        by_role = {role: next(n.node_id for n in alive if set(resources) <= set(n.resources_total))
                   for role, resources in ROLES.items()}
        yield address, by_role
    finally:
        for node in reversed(nodes.values()):
            _stop(node)
        shutil.rmtree(temp, ignore_errors=True)


def _launch(lift_setup, logdir: Path, port: int) -> list[str]:
    """A csil-launch job that would run for ever (10**6 env steps of a CPU-sized learner, no evaluations), in
    residual mode (the learner's BC targets then come from the inference node too), with the online replay on the
    learner's device."""
    _, demos, base = lift_setup
    return [sys.executable, "-m", "cli.launch", "--address", "auto", "--task", "Lift", "--size", "cpu",
            "--action-mode", "residual", "--actors", "1", "--envs-per-actor", "1", "--env-steps", str(10**6),
            "--warmup", "20", "--eval-episodes", "0", "--num-demos", "3", "--demos", str(demos),
            "--base-checkpoint", str(base), "--bc-steps", "20", "--critic-steps", "10", "--serve-port", str(port),
            "--replay-on-device", "--logdir", str(logdir)]


def _placement(address: str) -> dict[str, set[str]]:
    """{actor class name: node ids} of the cluster's live actors."""
    from ray.util.state import list_actors

    placement: dict[str, set[str]] = {}
    for actor in list_actors(address=address, filters=[("state", "=", "ALIVE")], limit=1000):
        placement.setdefault(actor.class_name, set()).add(actor.node_id)
    return placement


@pytest.mark.timeout(600)
def test_ray_job_on_a_cluster_places_roles_stops_with_a_checkpoint_and_resumes(ray_cluster, lift_setup, free_port,
                                                                               tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    address, nodes = ray_cluster
    runtime_env = json.dumps({"env_vars": {"RAY_JOB_STOP_WAIT_TIME_S": "120", "MUJOCO_GL": "egl",
                                           "CSIL_CACHE": os.environ["CSIL_CACHE"]}})
    submit = [RAY, "job", "submit", "--address", address, "--working-dir", ".", "--runtime-env-json", runtime_env]
    client = JobSubmissionClient(address)
    run = tmp_path / "run"

    # a long run, stopped once it acts: SIGTERM reaches the driver, which checkpoints before it exits
    started = subprocess.run([*submit, "--no-wait", "--submission-id", "csil-stop-test", "--",
                              *_launch(lift_setup, run, free_port())], cwd=ROOT, capture_output=True, text=True,
                             timeout=120)
    assert started.returncode == 0, started.stderr
    deadline = time.time() + 300
    while not ((run / "progress.jsonl").exists() and any(
            json.loads(line)["env_steps"] > 0 for line in (run / "progress.jsonl").read_text().splitlines())):
        assert client.get_job_status("csil-stop-test") in (JobStatus.PENDING, JobStatus.RUNNING), \
            client.get_job_logs("csil-stop-test")
        assert time.time() < deadline, "the job did not start acting in 300 s"
        time.sleep(1)

    # each role on the node that advertises its resource
    placement = _placement(address)
    for role in ("LearnerService", "ReplayService", "Coordinator"):
        assert placement[role] == {nodes["head"]}, (role, placement, nodes)
    assert placement["EnvActor"] == {nodes["actor"]}, (placement, nodes)
    replicas = [where for name, where in placement.items() if "InferenceServer" in name]
    assert replicas and all(where == {nodes["inference"]} for where in replicas), (placement, nodes)

    stop = subprocess.run([RAY, "job", "stop", "--address", address, "csil-stop-test"], capture_output=True,
                          text=True, timeout=180)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    assert client.get_job_status("csil-stop-test") == JobStatus.STOPPED
    logs = client.get_job_logs("csil-stop-test")
    assert "signal 15: stopping" in logs, logs[-3000:]
    stopped = json.loads((run / "summary.json").read_text())
    assert stopped["interrupted"] and stopped["env_steps"] > 0, stopped
    newest = numbered_checkpoints(run / "checkpoints" / "learner")[-1]
    assert json.loads((newest / "record.json").read_text())["env_steps"] == stopped["env_steps"]  # written on the stop
    assert any((run / "checkpoints" / "replay").glob("*/DONE"))
    ring = read_arrays(newest)  # the transitions the learner had taken from Reverb's queue
    assert 0 < int(ring["added"]) == len(ring["action"]) <= stopped["env_steps"], (ring["added"], stopped)

    # resubmitted with --resume and a budget 20 steps on: `ray job submit` waits for the job, streams its logs
    # and exits with its status
    target = stopped["env_steps"] + 20
    done = subprocess.run([*submit, "--", sys.executable, "-m", "cli.launch", "--address", "auto", "--resume",
                           "--logdir", str(run), "--env-steps", str(target)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["env_steps"] >= target and not summary["interrupted"], summary
    assert summary["replay_restored"] == stopped["replay_sizes"]  # continued from the checkpoint the stop wrote
    resumed = read_arrays(numbered_checkpoints(run / "checkpoints" / "learner")[-1])
    assert int(resumed["added"]) >= int(ring["added"])
    for name, column in ring.items():  # the stopped learner's transitions, restored and kept, byte for byte
        if name != "added":
            np.testing.assert_array_equal(resumed[name][:len(column)], column)
    assert f'"logdir": "{run}"' in done.stdout  # csil-launch's JSON line, streamed by ray job submit
