"""Model backends: what the server batches requests into.

A backend splits inference in two so the server can isolate bad requests and still make one model call:
``prepare`` runs per observation (validation, openpi's input transforms) and may raise for that request
only; ``infer_prepared`` runs once per batch. ``infer_batch`` composes the two for in-process callers.

Heavy imports (jax for the local model, openpi for pi0.5) happen inside the backend that needs them, so this
module imports in either environment.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from csil.specs import ACTION_DIM, PI05_LIBERO

# Observation spec on the wire: key -> {"shape": list[int] | None (any), "dtype": numpy dtype name or "str"}.
WireSpec = dict[str, dict[str, Any]]


class Backend(Protocol):
    name: str

    @property
    def metadata(self) -> dict:
        """action_horizon, action_dim, observation_spec, and anything model-specific."""

    def prepare(self, obs: dict) -> Any:
        """Per-observation work; raises ValueError naming the problem for a malformed observation."""

    def infer_prepared(self, items: Sequence[Any]) -> np.ndarray:
        """One model call for the whole batch: (B, action_horizon, action_dim) float32."""

    def infer_batch(self, observations: Sequence[dict]) -> np.ndarray:
        """prepare + infer_prepared, for in-process use."""


def check_observation(obs: Any, spec: WireSpec) -> dict:
    """Raise a ValueError naming the first key that is missing or has the wrong shape or dtype."""
    if not isinstance(obs, dict):
        raise ValueError(f"an observation must be a dict, got {type(obs).__name__}")
    for key, want in spec.items():
        if key not in obs:
            if want["dtype"] == "str":
                continue  # the prompt is optional: the local model ignores it and openpi injects a default
            raise ValueError(f"observation lacks {key!r}; expected keys {sorted(spec)}")
        if want["dtype"] == "str":
            if not isinstance(obs[key], str):
                raise ValueError(f"{key!r} must be a str, got {type(obs[key]).__name__}")
            continue
        arr = np.asarray(obs[key])
        if want["shape"] is not None and list(arr.shape) != list(want["shape"]):
            raise ValueError(f"{key!r} has shape {arr.shape}, expected {tuple(want['shape'])}")
        if want["dtype"] == "uint8" and arr.dtype != np.uint8:
            raise ValueError(f"{key!r} has dtype {arr.dtype}, expected uint8 images")
        if want["dtype"] != "uint8" and arr.dtype.kind not in "biuf":
            raise ValueError(f"{key!r} has dtype {arr.dtype}, expected a real number array")
    return obs


def zero_observation(spec: WireSpec) -> dict | None:
    """An all-zeros observation matching ``spec`` (for warm-up), or None if some shape is not fixed."""
    if any(v["shape"] is None for v in spec.values()):
        return None
    return {k: "" if v["dtype"] == "str" else np.zeros(v["shape"], v["dtype"]) for k, v in spec.items()}


class _BackendBase:
    """What both backends share: ``infer_batch``, and the optional constant cost per batched call (benchmarks)."""

    model_delay_s: float = 0.0

    def infer_batch(self, observations: Sequence[dict]) -> np.ndarray:
        return self.infer_prepared([self.prepare(o) for o in observations])

    def _delay(self) -> None:
        # Models an accelerator, where one batched call costs about as much as a single observation.
        if self.model_delay_s:
            time.sleep(self.model_delay_s)


class LocalBackend(_BackendBase):
    """Our action-chunking BC model (csil.base_policy.LocalBasePolicy), batched natively."""

    name = "local"

    def __init__(self, checkpoint: str, model_delay_ms: float = 0.0):
        # Lazy: in openpi's environment (the openpi backend) our model's pinned jax/flax stack is not installed.
        from csil.base_policy import LocalBasePolicy

        self.policy = LocalBasePolicy(checkpoint)
        self.model_delay_s = model_delay_ms / 1000
        self.spec: WireSpec = self.policy.metadata["observation_spec"]

    @property
    def metadata(self) -> dict:
        return self.policy.metadata

    def prepare(self, obs: dict) -> dict:
        return check_observation(obs, self.spec)

    def infer_prepared(self, items: Sequence[dict]) -> np.ndarray:
        actions = self.policy.infer_batch(items)
        self._delay()
        return actions


class OpenPIBackend(_BackendBase):
    """Real pi0.5 through openpi's own policy loading, with one batched model call per batch.

    openpi's ``Policy.infer`` takes one observation (it adds a batch axis of 1). We reuse the policy's parts:
    its input transforms per observation, one ``sample_actions`` on the stacked batch (padded to a power of
    two so jit compiles few shapes), and its output transforms per item. JAX policies only; a PyTorch
    checkpoint (model.safetensors) is refused with a clear error.

    ``policy`` and ``observation_from_dict`` exist so tests can inject a stand-in that honours openpi's
    Policy interface; in production both come from openpi.
    """

    name = "openpi"
    # LIBERO keys (pi05_libero); shapes are not fixed: openpi resizes images to 224x224 itself.
    spec: WireSpec = {
        "observation/state": {"shape": None, "dtype": "float32"},
        "observation/image": {"shape": None, "dtype": "uint8"},
        "observation/wrist_image": {"shape": None, "dtype": "uint8"},
        "prompt": {"shape": [], "dtype": "str"},
    }

    def __init__(self, config_name: str | None, checkpoint: str | None, *, policy: Any = None,
                 observation_from_dict: Callable[[dict], Any] | None = None, default_prompt: str | None = None,
                 model_delay_ms: float = 0.0):
        import jax

        if policy is None:
            if not (config_name and checkpoint):
                raise ValueError("the openpi backend needs --openpi-config (e.g. pi05_libero) and --checkpoint DIR")
            try:
                from openpi.policies import policy_config
                from openpi.training import config as openpi_config
            except ImportError as exc:
                raise ImportError("the openpi backend runs in openpi's own environment (jax 0.5.3, its uv lock); "
                                  f"`import openpi` failed here: {exc}") from exc
            policy = policy_config.create_trained_policy(openpi_config.get_config(config_name), checkpoint,
                                                         default_prompt=default_prompt)
        if observation_from_dict is None:
            from openpi.models.model import Observation

            observation_from_dict = Observation.from_dict
        if getattr(policy, "_is_pytorch_model", False):
            raise NotImplementedError("the openpi backend batches JAX policies only; this checkpoint is PyTorch")
        self._jax = jax
        self.policy = policy
        self._from_dict = observation_from_dict
        self.config_name = config_name
        self.model_delay_s = model_delay_ms / 1000

    @property
    def metadata(self) -> dict:
        metadata = {**dict(self.policy.metadata), "action_horizon": int(self.policy._model.action_horizon),
                    "action_dim": ACTION_DIM, "observation_spec": self.spec, "openpi_config": self.config_name}
        if self.config_name is None or "libero" in self.config_name:  # the keys above are LIBERO's
            metadata["observation_sources"] = PI05_LIBERO.to_metadata()
        return metadata

    def prepare(self, obs: dict) -> dict:
        check_observation(obs, self.spec)
        try:
            return self.policy._input_transform(self._jax.tree.map(lambda x: x, obs))
        except Exception as exc:  # openpi's transforms raise KeyError/TypeError; the client needs the reason
            raise ValueError(f"openpi input transforms rejected the observation: {type(exc).__name__}: {exc}") from exc

    def infer_prepared(self, items: Sequence[dict]) -> np.ndarray:
        jax, jnp = self._jax, self._jax.numpy
        n = len(items)
        padded = list(items) + [items[-1]] * ((1 << max(0, (n - 1).bit_length())) - n)
        batch = jax.tree.map(lambda *xs: jnp.stack([jnp.asarray(x) for x in xs]), *padded)
        self.policy._rng, rng = jax.random.split(self.policy._rng)
        actions = self.policy._sample_actions(rng, self._from_dict(batch), **self.policy._sample_kwargs)
        state, actions = np.asarray(batch["state"]), np.asarray(actions)
        self._delay()
        chunks = [self.policy._output_transform({"state": state[i], "actions": actions[i]})["actions"]
                  for i in range(n)]
        return np.asarray(np.stack(chunks), np.float32)


def make_backend(kind: str, checkpoint: str | None, *, openpi_config: str | None = None,
                 default_prompt: str | None = None, model_delay_ms: float = 0.0) -> Backend:
    """The backend a server config names. The server loads what it is given and never builds anything: the
    local backend needs a checkpoint directory (``csil-serve`` resolves a task's cached default first)."""
    if kind == "local":
        if checkpoint is None:
            raise ValueError("the local backend needs a checkpoint: a csil-base directory (csil-serve --task T "
                             "without --checkpoint serves T's cached default base policy)")
        return LocalBackend(checkpoint, model_delay_ms)
    if kind == "openpi":
        return OpenPIBackend(openpi_config, checkpoint, default_prompt=default_prompt, model_delay_ms=model_delay_ms)
    raise ValueError(f"unknown backend {kind!r}; choose 'local' or 'openpi'")
