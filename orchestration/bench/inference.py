"""``csil-bench inference``: our batched server vs. openpi's one-at-a-time server, same model, same run.

The unbatched baseline is openpi's own websocket server (the ``openpi-server`` package, a verbatim copy of
openpi's ``websocket_policy_server.py``) wrapped around the same backend, in a Ray actor with the same CPU
share as our Serve replica. Both are driven by N stock ``openpi_client`` clients in lock-step (send, wait,
send again). ``model_delay_ms`` adds a constant cost per model call to both servers: it models an
accelerator, where a batch of 16 costs about as much as one observation, which is where batching pays.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
import urllib.request
from typing import Any

import numpy as np
import ray
from openpi_client.base_policy import BasePolicy

from csil.config import InferenceServerConfig
from inference_server import app
from inference_server.backends import make_backend, zero_observation


class BackendPolicy(BasePolicy):
    """An openpi policy over one of our backends (one observation per call), for openpi's own server."""

    def __init__(self, backend: Any):
        self.backend = backend

    def infer(self, obs: dict) -> dict:
        return {"actions": self.backend.infer_batch([obs])[0]}


@ray.remote
class UnbatchedServer:
    """openpi's WebsocketPolicyServer, in a thread of this actor, over the same backend as ours."""

    def __init__(self, cfg: InferenceServerConfig):
        from openpi_server import WebsocketPolicyServer  # openpi's own server: only this baseline needs it

        backend = make_backend(cfg.backend, cfg.checkpoint, openpi_config=cfg.openpi_config,
                               model_delay_ms=cfg.model_delay_ms)
        server = WebsocketPolicyServer(BackendPolicy(backend), cfg.host, cfg.port, backend.metadata)
        threading.Thread(target=server.serve_forever, daemon=True).start()


def _get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def _wait_for_health(url: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def drive(url: str, observation: dict, clients: int, duration_s: float, warmup_s: float = 1.0,
          token: str | None = None) -> dict:
    """N stock openpi clients in threads, each in lock-step for ``duration_s``; throughput and latencies."""
    from openpi_client.websocket_client_policy import WebsocketClientPolicy

    policies = [WebsocketClientPolicy(url, api_key=token) for _ in range(clients)]
    records: list[list[tuple[float, float, float]]] = [[] for _ in range(clients)]  # (end, latency, model) ms
    start_barrier = threading.Barrier(clients + 1)
    stop_at = [0.0]

    def loop(i: int) -> None:
        start_barrier.wait()
        while (now := time.perf_counter()) < stop_at[0]:
            reply = policies[i].infer(observation)
            end = time.perf_counter()
            timing = reply["server_timing"]
            records[i].append((end, 1000 * (end - now), timing.get("model_ms", timing["infer_ms"])))

    threads = [threading.Thread(target=loop, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    t0 = time.perf_counter()
    stop_at[0] = t0 + warmup_s + duration_s
    start_barrier.wait()
    for t in threads:
        t.join()
    for p in policies:
        p._ws.close()  # openpi-client 0.1.2 has no close()
    window = [r for rec in records for r in rec if r[0] >= t0 + warmup_s]
    latency = np.array([r[1] for r in window])
    overhead = latency - np.array([r[2] for r in window])
    return {"requests_per_s": round(len(window) / duration_s, 1),
            "p50_ms": round(float(np.percentile(latency, 50)), 2), "p99_ms": round(float(np.percentile(latency, 99)), 2),
            "p50_overhead_ms": round(float(np.percentile(overhead, 50)), 2),
            "p99_overhead_ms": round(float(np.percentile(overhead, 99)), 2)}


def bench_inference(client_counts: list[int], cfg: InferenceServerConfig, duration_s: float,
                    baseline_port: int) -> list[dict]:
    """One record per client count: batched vs. unbatched throughput and latency, and their ratio."""
    server = app.start(cfg)
    baseline = UnbatchedServer.options(num_cpus=cfg.num_cpus).remote(dataclasses.replace(cfg, port=baseline_port))
    try:
        _wait_for_health(f"http://{cfg.host}:{baseline_port}/healthz")
        observation = zero_observation(server.handle.server_metadata.remote().result()["observation_spec"])
        if observation is None:
            raise ValueError("the benchmark needs a backend with fixed observation shapes (the local backend)")
        state = observation["observation/state"]
        observation["observation/state"] = np.random.default_rng(0).normal(size=state.shape).astype(np.float32)
        results = []
        for n in client_counts:
            unbatched = drive(f"ws://{cfg.host}:{baseline_port}", observation, n, duration_s)
            before = _get_json(f"{server.http_url}/stats")
            batched = drive(server.ws_url, observation, n, duration_s)
            after = _get_json(f"{server.http_url}/stats")
            batched["mean_batch_size"] = round((after["observations"] - before["observations"])
                                               / max(after["batches"] - before["batches"], 1), 2)
            results.append({"bench": "inference", "backend": cfg.backend, "clients": n,
                            "model_delay_ms": cfg.model_delay_ms, "max_batch_size": cfg.max_batch_size,
                            "batch_wait_timeout_s": cfg.batch_wait_timeout_s, "duration_s": duration_s,
                            "batched": batched, "unbatched": unbatched,
                            "throughput_ratio": round(batched["requests_per_s"] / unbatched["requests_per_s"], 2)})
        return results
    finally:
        ray.kill(baseline)
        app.stop(cfg.app_name)
