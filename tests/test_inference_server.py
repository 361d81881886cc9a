"""Inference server: openpi wire compatibility, batching, error isolation, gRPC, auth, clients, openpi backend.

One real server (Ray Serve on the session's local Ray) serves a small untrained chunking model; a 100 ms
constant model cost (``model_delay_ms``, a stand-in for a GPU call) makes concurrency and health-check timing
deterministic on a loaded 2-core box.
"""

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import grpc
import jax
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from openpi_client.base_policy import BasePolicy
from openpi_client.websocket_client_policy import WebsocketClientPolicy
from openpi_server import WebsocketPolicyServer
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect as ws_connect

from csil.base_policy import ChunkingBC, LocalBasePolicy, save_base_policy
from csil.config import BaseTrainConfig, InferenceServerConfig
from csil.specs import ObsSpec
from inference_server import app
from inference_server.backends import OpenPIBackend, check_observation
from inference_server.client import InferenceError, connect_base_policy

TOKEN = "test-token"
MODEL_DELAY_MS = 100.0
LIFT_SPEC = ObsSpec("state", (("robot0_eef_pos", 3), ("robot0_eef_quat", 4), ("robot0_gripper_qpos", 2),
                              ("object", 10)))


def observation(seed: int = 0) -> dict:
    state = np.random.default_rng(seed).normal(size=LIFT_SPEC.state_dim).astype(np.float32)
    return {"observation/state": state, "prompt": "lift the red cube"}


def get(url: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.status, response.read()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    """An untrained (randomly initialised) small chunking model: serving does not need a good policy."""
    cfg = BaseTrainConfig(hidden=(64, 64))
    params = ChunkingBC(cfg.hidden, cfg.chunk_length).init(jax.random.PRNGKey(0),
                                                           np.zeros((1, LIFT_SPEC.state_dim), np.float32), {})
    stats = {"state_mean": np.zeros(LIFT_SPEC.state_dim, np.float32),
             "state_std": np.ones(LIFT_SPEC.state_dim, np.float32)}
    return str(save_base_policy(tmp_path_factory.mktemp("base") / "tiny", params, stats, LIFT_SPEC, cfg,
                                {"task": "Lift"}))


@pytest.fixture(scope="module")
def reference(checkpoint) -> LocalBasePolicy:
    return LocalBasePolicy(checkpoint)


@pytest.fixture(scope="module")
def server(checkpoint, ray_local, free_port):
    cfg = InferenceServerConfig(checkpoint=checkpoint, port=free_port(), grpc_port=free_port(), token=TOKEN,
                                max_batch_size=16, batch_wait_timeout_s=0.01, num_cpus=0.25,
                                model_delay_ms=MODEL_DELAY_MS, app_name="test-inference")
    running = app.start(cfg)
    yield running
    app.stop(cfg.app_name, shutdown_serve=True)


def test_csil_serve_runs_until_sigint(checkpoint, ray_local, capsys, free_port):
    """The standalone command: startup JSON line, health, then a clean shutdown on SIGINT; every flag has help.

    Run in-process on the session's Ray (a second Ray cluster would double this test's time)."""
    from cli.serve import build_parser, main

    assert all(a.help for a in build_parser()._actions)
    port = free_port()
    answers = []

    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def probe_then_interrupt() -> None:
        deadline = time.monotonic() + 120
        while signal.getsignal(signal.SIGINT) is handlers[signal.SIGINT] and time.monotonic() < deadline:
            time.sleep(0.1)  # main() installs its handlers once the server is up
        answers.append(get(f"http://127.0.0.1:{port}/healthz"))
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=probe_then_interrupt, daemon=True).start()
    try:
        main(["--checkpoint", checkpoint, "--port", str(port), "--grpc-port", "0", "--num-cpus", "0.25",
              "--max-batch-size", "2"])
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    lines = capsys.readouterr().out.splitlines()  # Ray may print worker log lines to stdout too
    info = json.loads(next(line for line in lines if line.startswith('{"serving"')))
    assert info["websocket"] == f"ws://127.0.0.1:{port}" and info["grpc"] is None and not info["auth"]
    assert info["action_horizon"] == 10 and info["observation_spec"]["observation/state"]["shape"] == [19]
    assert answers == [(200, b"OK\n")]
    with pytest.raises(OSError):
        get(f"http://127.0.0.1:{port}/healthz")  # shut down


def test_stock_openpi_client_gets_metadata_and_chunks(server, reference):
    policy = WebsocketClientPolicy(server.ws_url, api_key=TOKEN)
    meta = policy.get_server_metadata()
    assert meta["action_horizon"] == 10 and meta["action_dim"] == 7 and meta["backend"] == "local"
    assert meta["observation_spec"]["observation/state"] == {"shape": [19], "dtype": "float32"}
    assert meta["version"] and meta["batch_extension"]["key"] == "batch"
    first = policy.infer(observation(1))
    assert first["actions"].shape == (10, 7) and first["actions"].dtype == np.float32
    np.testing.assert_allclose(first["actions"], reference.infer(observation(1))["actions"], atol=1e-5)
    assert first["server_timing"]["model_ms"] >= MODEL_DELAY_MS and "prev_total_ms" not in first["server_timing"]
    assert "prev_total_ms" in policy.infer(observation(2))["server_timing"]


def test_concurrent_clients_are_batched_and_health_answers_meanwhile(server):
    n = 6
    policies = [WebsocketClientPolicy(server.ws_url, api_key=TOKEN) for _ in range(n)]
    barrier = threading.Barrier(n + 1)
    replies = []

    def run(p: WebsocketClientPolicy, seed: int) -> None:
        barrier.wait()
        for k in range(3):
            replies.append(p.infer(observation(seed + k)))

    threads = [threading.Thread(target=run, args=(p, i)) for i, p in enumerate(policies)]
    for t in threads:
        t.start()
    barrier.wait()
    time.sleep(0.03)  # a 100 ms model call is now running
    assert get(f"{server.http_url}/healthz")[0] == 200
    waiting = sum(t.is_alive() for t in threads)  # clients still waiting for model calls when health answered
    for t in threads:
        t.join()
    assert len(replies) == 3 * n
    assert max(r["server_timing"]["batch_size"] for r in replies) > 1
    stats = json.loads(get(f"{server.http_url}/stats")[1])
    assert stats["max_batch_size"] > 1 and stats["mean_batch_size"] > 1
    assert waiting > 0


def test_malformed_observation_gets_clear_error_and_server_keeps_serving(server):
    bad, good = WebsocketClientPolicy(server.ws_url, api_key=TOKEN), WebsocketClientPolicy(server.ws_url, api_key=TOKEN)
    with pytest.raises(RuntimeError, match=r"'observation/state' has shape \(5,\), expected \(19,\)"):
        bad.infer({"observation/state": np.zeros(5, np.float32)})
    with pytest.raises(RuntimeError, match="observation lacks 'observation/state'"):
        bad.infer({"prompt": "x"})
    assert good.infer(observation())["actions"].shape == (10, 7)
    assert bad.infer(observation())["actions"].shape == (10, 7)  # unlike openpi's server, the socket survives
    with ws_connect(server.ws_url, additional_headers={"Authorization": f"Api-Key {TOKEN}"}) as raw:
        raw.recv()  # metadata
        raw.send(b"\xc1 not msgpack")
        assert "could not decode" in raw.recv()


def test_our_websocket_client_sends_one_message_per_batch(server, reference):
    obs = [observation(s) for s in range(5)]
    with connect_base_policy(server.ws_url, token=TOKEN) as client:
        assert client.batched
        actions = client.infer_batch(obs)
        with pytest.raises(InferenceError, match=r"observation 1 of 2: 'observation/state' has shape"):
            client.infer_batch([obs[0], {"observation/state": np.zeros(3, np.float32)}])
    assert actions.shape == (5, 10, 7) and actions.dtype == np.float32
    np.testing.assert_allclose(actions, reference.infer_batch(obs), atol=1e-5)
    assert json.loads(get(f"{server.http_url}/stats")[1])["max_batch_size"] >= 5


def test_grpc_round_trip_health_and_errors(server, reference):
    with connect_base_policy(server.grpc_url, token=TOKEN) as client:
        assert client.metadata["action_horizon"] == 10
        actions = client.infer_batch([observation(0), observation(1)])
        np.testing.assert_allclose(actions, reference.infer_batch([observation(0), observation(1)]), atol=1e-5)
        with pytest.raises(InferenceError, match="INVALID_ARGUMENT.*observation/state"):
            client.infer_batch([{"observation/state": np.zeros(2)}])
    with grpc.insecure_channel(server.grpc_url.removeprefix("grpc://")) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "csil.inference.v1.ChunkService"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_token_is_required_on_both_ingresses_but_not_for_health(server):
    with pytest.raises(InvalidStatus, match="401"):
        WebsocketClientPolicy(server.ws_url)
    with pytest.raises(PermissionError, match="wrong or missing token"):
        connect_base_policy(server.ws_url, token="wrong")
    with pytest.raises(PermissionError, match="Api-Key"):
        connect_base_policy(server.grpc_url, token=None)
    assert get(f"{server.http_url}/healthz")[0] == 200


def test_local_handle_client(server, reference):
    client = connect_base_policy("local", app_name=server.app_name, timeout_s=10)
    assert client.metadata["backend"] == "local"
    np.testing.assert_allclose(client.infer_batch([observation(3)]), reference.infer_batch([observation(3)]), atol=1e-5)
    with pytest.raises(InferenceError, match="observation lacks"):
        client.infer_batch([{}])


class Float64Policy(BasePolicy):
    """Stock-openpi-server stand-in: float64 actions like openpi's unnormalised outputs; rejects bad states."""

    def infer(self, obs: dict) -> dict:
        state = np.asarray(obs["observation/state"])
        if state.shape != (19,):
            raise ValueError("bad state")
        return {"actions": np.full((10, 7), state[0], np.float64)}


@pytest.fixture()
def stock_server(free_port):
    port = free_port()
    server = WebsocketPolicyServer(Float64Policy(), "127.0.0.1", port)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"ws://127.0.0.1:{port}"


def test_our_client_against_stock_openpi_server(stock_server):
    client = connect_base_policy(stock_server, timeout_s=10)  # also waits for the server thread to listen
    assert client.metadata == {} and not client.batched
    actions = client.infer_batch([observation(0), observation(1)])
    assert actions.shape == (2, 10, 7) and actions.dtype == np.float32 and actions.flags.writeable
    np.testing.assert_allclose(actions[1, 0, 0], observation(1)["observation/state"][0], rtol=1e-6)
    with pytest.raises(InferenceError, match="bad state"):
        client.infer_batch([{"observation/state": np.zeros(3)}])
    # openpi's server closed that connection after the error; the client reconnects for the next request.
    assert client.infer_batch([observation(2)]).shape == (1, 10, 7)
    client.close()


def test_client_backs_off_then_names_the_target(caplog, free_port):
    port = free_port()
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="inference_server.client"):
        with pytest.raises(ConnectionError, match=f"ws://127.0.0.1:{port}.*connect failed"):
            connect_base_policy(f"ws://127.0.0.1:{port}", timeout_s=1.0)
    assert time.monotonic() - start < 3
    retries = [r for r in caplog.records if "retry" in r.getMessage()]
    assert len(retries) >= 2 and all(f"127.0.0.1:{port}" in r.getMessage() for r in retries)
    # A server that comes up while the client is retrying is found.
    server = WebsocketPolicyServer(Float64Policy(), "127.0.0.1", port)
    threading.Timer(0.5, lambda: threading.Thread(target=server.serve_forever, daemon=True).start()).start()
    with connect_base_policy(f"ws://127.0.0.1:{port}", timeout_s=10) as client:
        assert client.infer_batch([observation()]).shape == (1, 10, 7)
    with pytest.raises(ValueError, match="unknown base-policy target"):
        connect_base_policy("http://x")


class StandInOpenPIPolicy:
    """Honours openpi's ``Policy`` interface (transforms, jitted ``sample_actions`` on a batch, rng, metadata)
    without openpi: the model maps a normalised 19-dim state to a (10, 32) padded chunk, as pi0.5 does."""

    def __init__(self):
        self._model = type("Model", (), {"action_horizon": 10, "action_dim": 32})()
        self._rng = jax.random.key(0)
        self._sample_kwargs = {"num_steps": 10}
        self.metadata = {"reset_pose": [0.0]}
        self.batch_sizes: list[int] = []
        self._weights = np.random.default_rng(0).normal(size=(19, 10 * 32)).astype(np.float32)

    def _input_transform(self, data: dict) -> dict:
        # Like openpi's Normalize + TokenizePrompt: arrays only from here on.
        return {"state": (np.asarray(data["observation/state"], np.float32) - 1.0) / 2.0,
                "tokenized_prompt": np.array([len(data["prompt"])], np.int32)}

    def _output_transform(self, data: dict) -> dict:
        return {"actions": np.asarray(data["actions"])[..., :7] * 2.0}

    def _sample_actions(self, rng, observation, num_steps: int):
        state = observation["state"]
        self.batch_sizes.append(state.shape[0])
        return np.tanh(np.asarray(state) @ self._weights).reshape(-1, 10, 32)

    def infer(self, obs: dict) -> dict:
        """openpi's single-observation ``Policy.infer``, the reference the batched path must match."""
        inputs = jax.tree.map(lambda x: np.asarray(x)[np.newaxis], self._input_transform(obs))
        actions = self._sample_actions(None, inputs, **self._sample_kwargs)
        return self._output_transform({"state": inputs["state"][0], "actions": actions[0]})


def test_openpi_backend_batches_one_model_call_with_per_item_transforms():
    stand_in = StandInOpenPIPolicy()
    backend = OpenPIBackend("pi05_libero", None, policy=stand_in, observation_from_dict=lambda batch: batch)
    obs = [{**observation(s), "observation/image": np.zeros((8, 8, 3), np.uint8),
            "observation/wrist_image": np.zeros((8, 8, 3), np.uint8)} for s in range(3)]
    actions = backend.infer_batch(obs)
    assert stand_in.batch_sizes == [4]  # one model call, padded to a power of two
    assert actions.shape == (3, 10, 7) and actions.dtype == np.float32
    np.testing.assert_allclose(actions, [stand_in.infer(o)["actions"] for o in obs], rtol=1e-5, atol=1e-6)
    assert backend.metadata["action_horizon"] == 10 and backend.metadata["reset_pose"] == [0.0]
    with pytest.raises(ValueError, match="observation lacks 'observation/image'"):
        backend.prepare(observation())
    with pytest.raises(ValueError, match="input transforms rejected.*KeyError"):
        backend.prepare({k: v for k, v in obs[0].items() if k != "prompt"})


def test_benchmark_driver_measures_batched_and_unbatched(server, checkpoint, free_port):
    """``drive`` against our server and against the benchmark's baseline: openpi's server over the same backend."""
    from inference_server.backends import LocalBackend
    from orchestration.bench.inference import BackendPolicy, drive

    port = free_port()
    baseline = WebsocketPolicyServer(BackendPolicy(LocalBackend(checkpoint)), "127.0.0.1", port)
    threading.Thread(target=baseline.serve_forever, daemon=True).start()
    connect_base_policy(f"ws://127.0.0.1:{port}", timeout_s=10).close()  # wait until it listens
    unbatched = drive(f"ws://127.0.0.1:{port}", observation(), clients=2, duration_s=0.3, warmup_s=0.1)
    assert unbatched["requests_per_s"] > 0 and unbatched["p99_ms"] >= unbatched["p50_ms"] > 0
    batched = drive(server.ws_url, observation(), clients=2, duration_s=0.5, warmup_s=0.1, token=TOKEN)
    assert batched["p50_ms"] >= MODEL_DELAY_MS and batched["p99_overhead_ms"] < batched["p99_ms"] - MODEL_DELAY_MS / 2


def test_imports_and_runs_without_reverb_tensorflow_robosuite(checkpoint, stock_server):
    code = f"""
import sys
for name in ("reverb", "tensorflow", "robosuite"):
    sys.modules[name] = None  # any import of these now raises ImportError
import numpy as np
import cli.serve, inference_server.app, orchestration.bench.inference, inference_server.wire
from inference_server.backends import LocalBackend
from inference_server.client import connect_base_policy
backend = LocalBackend({checkpoint!r})
assert backend.infer_batch([{{"observation/state": np.zeros(19, np.float32)}}]).shape == (1, 10, 7)
assert connect_base_policy({stock_server!r}, timeout_s=10).infer_batch(
    [{{"observation/state": np.zeros(19, np.float32)}}]).shape == (1, 10, 7)
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


def test_observation_checks_name_the_problem():
    """Images must arrive as uint8 (openpi's convention): a float image would be silently wrong after a cast."""
    spec = {"observation/image": {"shape": [4, 4, 3], "dtype": "uint8"}}
    with pytest.raises(ValueError, match="uint8"):
        check_observation({"observation/image": np.zeros((4, 4, 3), np.float32)}, spec)
    with pytest.raises(ValueError, match="must be a dict"):
        check_observation([1, 2], spec)
