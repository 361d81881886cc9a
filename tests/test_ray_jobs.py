"""csil-launch as a Ray job, the way deploy/README.md submits it: a Ray head started here (`ray start --head`, with
the dashboard that serves the Jobs API), `ray job submit --working-dir . -- ... --address auto`, the Jobs SDK for
status and logs, and `ray job stop`, whose SIGTERM must reach the driver and leave a checkpoint.

The head is this test's own: its own ports and temp dir, started with ``--block`` in its own session so that
killing that process group stops exactly the Ray it started (``ray stop`` would stop every Ray on the machine). The stopped
job is then resubmitted with ``--resume`` and runs to the end of its budget, as deploy/README.md describes."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


@pytest.fixture
def ray_head(free_port):
    """The Jobs API address of a fresh one-node Ray cluster."""
    from ray.job_submission import JobSubmissionClient

    temp = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's socket paths must stay under 107 characters
    dashboard = free_port()
    ports = {"port": free_port(), "dashboard-port": dashboard, "ray-client-server-port": free_port(),
             "dashboard-agent-listen-port": free_port(), "dashboard-agent-grpc-port": free_port(),
             "metrics-export-port": free_port(), "runtime-env-agent-port": free_port()}
    # No memory monitor: this cluster's workers are not to be killed for memory other processes on the machine use.
    head = subprocess.Popen([RAY, "start", "--head", "--block", "--num-cpus=4", "--include-dashboard=true",
                             "--dashboard-host=127.0.0.1", f"--temp-dir={temp}", "--disable-usage-stats",
                             *(f"--{k}={v}" for k, v in ports.items())],
                            env={**os.environ, "RAY_memory_monitor_refresh_ms": "0"}, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    address = f"http://127.0.0.1:{dashboard}"
    deadline = time.time() + 120
    while True:
        assert head.poll() is None, "ray start --head exited"
        try:
            JobSubmissionClient(address).list_jobs()
            break
        except Exception:  # noqa: BLE001 - the dashboard is still starting
            assert time.time() < deadline, "the Ray dashboard (Jobs API) did not come up in 120 s"
            time.sleep(1)
    try:
        yield address
    finally:
        # Its own process group: ray start and the Ray processes it started (GCS, raylet, dashboard); the workers
        # and job drivers exit when their raylet and supervisor are gone. (A graceful stop takes ~30 s.)
        os.killpg(head.pid, signal.SIGKILL)
        head.wait(timeout=60)
        shutil.rmtree(temp, ignore_errors=True)


def _launch(lift_setup, logdir: Path, port: int) -> list[str]:
    """A csil-launch job that would run for ever (10**6 env steps of a CPU-sized learner, no evaluations)."""
    _, demos, base = lift_setup
    return [sys.executable, "-m", "cli.launch", "--address", "auto", "--task", "Lift", "--size", "cpu",
            "--actors", "1", "--envs-per-actor", "1", "--env-steps", str(10**6), "--warmup", "20",
            "--eval-episodes", "0", "--num-demos", "3", "--demos", str(demos), "--base-checkpoint", str(base),
            "--bc-steps", "20", "--critic-steps", "10", "--serve-port", str(port), "--logdir", str(logdir)]


@pytest.mark.timeout(600)
def test_ray_job_stop_leaves_a_checkpoint_and_a_resubmitted_job_runs_to_the_end(ray_head, lift_setup, free_port,
                                                                                tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    runtime_env = json.dumps({"env_vars": {"RAY_JOB_STOP_WAIT_TIME_S": "120", "MUJOCO_GL": "egl",
                                           "CSIL_CACHE": os.environ["CSIL_CACHE"]}})
    submit = [RAY, "job", "submit", "--address", ray_head, "--working-dir", ".", "--runtime-env-json", runtime_env]
    client = JobSubmissionClient(ray_head)
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
    stop = subprocess.run([RAY, "job", "stop", "--address", ray_head, "csil-stop-test"], capture_output=True,
                          text=True, timeout=180)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    assert client.get_job_status("csil-stop-test") == JobStatus.STOPPED
    logs = client.get_job_logs("csil-stop-test")
    assert "signal 15: stopping" in logs, logs[-3000:]
    stopped = json.loads((run / "summary.json").read_text())
    assert stopped["interrupted"] and stopped["env_steps"] > 0, stopped
    newest = max((run / "checkpoints" / "learner").glob("*/record.json"), key=lambda p: int(p.parent.name))
    assert json.loads(newest.read_text())["env_steps"] == stopped["env_steps"]  # written on the stop, not at start
    assert any((run / "checkpoints" / "replay").glob("*/DONE"))

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
    assert f'"logdir": "{run}"' in done.stdout  # csil-launch's JSON line, streamed by ray job submit
