"""Monitoring: the metric registry, deploy/prometheus/prometheus.yml and deploy/grafana/csil.json against a real
Prometheus server (the Debian package) scraping a real csil-launch run through Ray's file service discovery."""

import dataclasses
import json
import re
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from csil.metrics import REGISTRY, SERVICE_DISCOVERY_FILE

ROOT = Path(__file__).resolve().parents[1]
PROMETHEUS_YML = ROOT / "deploy" / "prometheus" / "prometheus.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "csil.json"
METRICS_MD = ROOT / "deploy" / "METRICS.md"


def dashboard_queries() -> dict[str, str]:
    """Every PromQL expression of the dashboard, keyed by "<row> / <panel> / <refId>"."""
    queries, row = {}, ""

    def walk(panels):
        nonlocal row
        for panel in panels:
            if panel.get("type") == "row":
                row = panel["title"]
                walk(panel.get("panels", []))
            for target in panel.get("targets", []):
                queries[f"{row} / {panel['title']} / {target['refId']}"] = target["expr"]

    walk(json.loads(DASHBOARD.read_text())["panels"])
    return queries


def referenced_metrics(expr: str) -> set[str]:
    """The registry names behind the ``ray_csil_*`` series an expression reads."""
    names = set()
    for name in re.findall(r"\bray_csil_\w+", expr):
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        names.add(base if base in {s.exported for s in REGISTRY.values() if s.kind == "histogram"} else name)
    return names


def test_dashboard_docs_and_scrape_config_match_the_registry():
    exported = {spec.exported: spec for spec in REGISTRY.values()}
    queries = dashboard_queries()
    rows = {key.split(" / ")[0] for key in queries}
    assert rows == {"Actors", "Learner", "Replay", "Inference", "Run"}
    used = set()
    for key, expr in queries.items():
        names = referenced_metrics(expr)
        assert names, f"{key}: reads no csil metric"
        assert names <= set(exported), f"{key}: {names - set(exported)} are not exported (csil/metrics.py)"
        used |= names
    assert {exported[n].component for n in used} == {"actor", "learner", "replay", "inference", "run"}
    docs = METRICS_MD.read_text()
    for spec in REGISTRY.values():  # every metric documented with its exported name, type and labels
        line = next((ln for ln in docs.splitlines() if ln.startswith(f"| `{spec.exported}` |")), None)
        assert line is not None, f"{spec.exported} missing from deploy/METRICS.md"
        kind, labels = (cell.strip() for cell in line.split("|")[2:4])
        assert kind == spec.kind and labels.replace("—", "") == ", ".join(f"`{t}`" for t in spec.tags), line
        if spec.kind == "counter":
            assert spec.name.endswith("_total")  # Ray exports counters as <name>_total: keep the names equal
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    (job,) = config["scrape_configs"]
    assert job["file_sd_configs"][0]["files"] == [f"/tmp/ray/{SERVICE_DISCOVERY_FILE}"]
    if shutil.which("promtool"):
        check = subprocess.run(["promtool", "check", "config", "--syntax-only", str(PROMETHEUS_YML)],
                               capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr


def _get(url: str, timeout: float = 5.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


def _start_prometheus(sd_file: Path, tmp_path: Path, port: int) -> subprocess.Popen:
    """deploy/prometheus/prometheus.yml with a 1 s scrape interval, pointed at this Ray session's SD file."""
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["scrape_configs"][0]["file_sd_configs"][0].update(files=[str(sd_file)], refresh_interval="2s")
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    with (tmp_path / "prometheus.log").open("w") as log:
        process = subprocess.Popen(["prometheus", f"--config.file={path}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                    f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 60
    while time.time() < deadline:
        assert process.poll() is None, (tmp_path / "prometheus.log").read_text()[-3000:]
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=2):
                return process
        except OSError:
            time.sleep(0.5)
    process.kill()
    raise TimeoutError("Prometheus did not become ready in 60 s")


@pytest.mark.skipif(shutil.which("prometheus") is None, reason="needs prometheus (apt-get install prometheus)")
@pytest.mark.timeout(600)
def test_every_dashboard_query_has_data_from_a_real_run(lift_setup, tiny_agent, free_port, ray_local, tmp_path):
    """A short csil-launch run scraped by Prometheus through Ray's file SD: every dashboard query returns series.

    Ray's metrics agent reports every few seconds and metrics of killed actors leave the endpoint, so the queries
    are polled while the run is on; the run is stopped as soon as all of them have answered. (The two
    ``... or vector(0)`` queries, for errors that do not happen here, answer trivially; the static test above
    checks their metric names against the registry.)"""
    from csil.config import LaunchConfig
    from orchestration.launcher import System

    ray = ray_local
    session_dir = Path(ray._private.worker._global_node.get_session_dir_path())
    sd_file = session_dir / SERVICE_DISCOVERY_FILE  # written by ensure_ray's writer (the dashboard is off)
    deadline = time.time() + 30
    while not (sd_file.exists() and json.loads(sd_file.read_text())[0]["targets"]) and time.time() < deadline:
        time.sleep(0.5)
    targets = json.loads(sd_file.read_text())[0]["targets"]
    node = ray.nodes()[0]
    assert f"{node['NodeManagerAddress']}:{node['MetricsExportPort']}" in targets

    port = free_port()
    prometheus = _start_prometheus(sd_file, tmp_path, port)
    api = f"http://127.0.0.1:{port}/api/v1"
    queries = dashboard_queries()
    answered: dict[str, int] = {}
    errors: dict[str, str] = {}
    _, demos, base = lift_setup
    # The slowest queries need a finished episode: Lift's 400-step time limit (the tiny base policy does not
    # succeed). One env per actor gets there in 400 env steps, not K x 400, and UTD 1 keeps the learner (which
    # the rate limiter paces the actor by) from being the bottleneck; pretraining only has to produce weights.
    agent = dataclasses.replace(tiny_agent, utd=1, bc_steps=50, critic_pretrain_steps=20)
    cfg = LaunchConfig(task="Lift", actors=1, envs_per_actor=1, env_steps=10**9, duration_s=120, warmup=40,
                       eval_episodes=0, publish_every=5, num_demos=3, demos=str(demos), base_checkpoint=str(base),
                       serve_port=free_port(), logdir=str(tmp_path / "run"), agent=agent)
    system = System(cfg, progress=False)
    done = threading.Event()

    def poll():
        while not done.is_set():
            for key, expr in queries.items():
                if key not in answered:
                    try:
                        result = _get(f"{api}/query?" + urllib.parse.urlencode({"query": expr}))
                    except urllib.error.HTTPError as e:  # a query Prometheus rejects (400: bad PromQL)
                        errors[key] = e.read().decode(errors="replace")
                        continue
                    except OSError:
                        continue
                    if result["data"]["result"]:
                        answered[key] = len(result["data"]["result"])
            if len(answered) == len(queries):
                system.stop_requested = True  # what SIGTERM does: the run ends within a second
                return
            done.wait(2.0)

    poller = threading.Thread(target=poll, daemon=True)
    try:
        poller.start()
        summary = system.run()
        done.set()
        poller.join(timeout=30)
        health = _get(f"{api}/targets")["data"]["activeTargets"]
        scraped = _get(f"{api}/label/__name__/values")["data"]
    finally:
        done.set()
        prometheus.terminate()
        prometheus.wait(timeout=30)
    assert health and all(t["health"] == "up" for t in health if t["scrapeUrl"].endswith(
        f":{node['MetricsExportPort']}/metrics")), health
    assert not errors, errors
    missing = sorted(set(queries) - set(answered))
    assert not missing, (f"no series for {missing} after {summary['acting_s']} s of acting "
                         f"({summary['env_steps']} env steps, {summary['learner_updates']} updates); scraped: "
                         f"{sorted(n for n in scraped if n.startswith('ray_csil_'))}")
