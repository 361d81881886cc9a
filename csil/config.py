"""Typed configuration, in one place. Every CLI flag maps onto a field here."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from csil import seeds


def cache_dir() -> Path:
    """Where generated demos and trained base policies are cached ($CSIL_CACHE, default ~/.cache/csil)."""
    return Path(os.environ.get("CSIL_CACHE", Path.home() / ".cache" / "csil"))


@dataclasses.dataclass(frozen=True)
class BaseTrainConfig:
    """The local base policy (CPU stand-in for pi0.5): an MLP that maps an observation to 10 actions.

    It is deliberately trained to be good but imperfect, like pi0.5 on robomimic tasks (Square 84% in the
    paper): ``num_demos`` and ``steps`` are the knobs; per-task settings live in ``BASE_POLICY_DEFAULTS``.
    """

    num_demos: int | None = None  # None: every demo in the file
    steps: int = 20_000
    batch_size: int = 256
    learning_rate: float = 1e-3  # cosine-decayed to 0 over ``steps``
    weight_decay: float = 1e-4
    hidden: tuple[int, ...] = (512, 512, 512)
    chunk_length: int = 10
    loss: str = "l1"  # "l1" (ACT's choice: sharper than MSE on multi-modal demos) or "mse"
    image_channels: tuple[int, ...] = (32, 64, 64)  # conv encoder per camera, image observations only
    image_shift: int = 4  # random-shift augmentation (pixels), image observations only
    image_pool: str = "mean"  # "mean" or "spatial_softmax": how a camera's feature maps become features
    seed: int = 0


# Settings that put the base policy's success between 30% and 85% (state observations, open-loop chunks
# of 10), measured with `csil-eval --episodes 50`; see README "Base policy" for the numbers.
BASE_POLICY_DEFAULTS: dict[str, BaseTrainConfig] = {
    "Lift": BaseTrainConfig(num_demos=25, steps=5_000),
    "Can": BaseTrainConfig(num_demos=50, steps=10_000),
    "Square": BaseTrainConfig(num_demos=100, steps=15_000),
    "NutAssembly": BaseTrainConfig(num_demos=None, steps=20_000),  # every demo of the file (200)
}

# The image base policy (π0.5's case: it sees both cameras at 84x84 + proprioception, no object state), measured
# like the state ones (results/base_policy.md). Rendered demos cost ~7-55 s each and image BC ~0.45 s a step at
# batch 64 on a CPU core, so the budgets are smaller than the state ones. Spatial-softmax pooling (keypoints: where
# each feature fires) is what places the square nut: with mean pooling the same Square setting scored 6 %, Lift 54 %.
# A task not listed here (NutAssembly, Stack) gets its state setting with spatial softmax: see base_policy_defaults.
# NutAssembly was tried: 200 demos x 10,000 steps with spatial softmax scored 0 % at batch 64 and 5 % at batch 128
# (one nut of two placed in half the episodes; state base: 36 %); its batch-256 run needs more CPU time than a
# session here has.
IMAGE_BASE_POLICY_DEFAULTS: dict[str, BaseTrainConfig] = {
    "Lift": BaseTrainConfig(num_demos=25, steps=3_000, batch_size=64, image_pool="spatial_softmax"),  # 72 %, state 64 %
    # Can: with 50 demos x 4,000 steps spatial softmax scores 88 %, above the 30-85 % band (mean pooling: 34 %)
    "Can": BaseTrainConfig(num_demos=25, steps=3_000, batch_size=64, image_pool="spatial_softmax"),  # 68 %, state 48 %
    "Square": BaseTrainConfig(num_demos=100, steps=6_000, batch_size=64, image_pool="spatial_softmax"),  # 56 % = state
}


def base_policy_defaults(task: str, obs_mode: str = "state") -> BaseTrainConfig:
    """The documented base-policy settings of a task for the base's observations ("state" or "image").

    A task without a measured image setting gets its state setting (demos, steps, batch) with the spatial-softmax
    pooling every measured image task uses: mean pooling is known to miss placements (Square: 6 %)."""
    if obs_mode not in ("state", "image"):
        raise ValueError(f"unknown base observation mode {obs_mode!r}; use 'state' or 'image'")
    state = BASE_POLICY_DEFAULTS.get(task, BaseTrainConfig())
    if obs_mode == "state":
        return state
    return IMAGE_BASE_POLICY_DEFAULTS.get(task) or dataclasses.replace(state, image_pool="spatial_softmax")


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """Scripted-expert demonstrations (``csil-demos generate``)."""

    task: str = "Lift"
    num: int = 200
    obs_mode: str = "state"
    seed: int = 0
    noise: float | None = None  # None: the expert's default noise level
    workers: int = 0  # 0: one per CPU core


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Policy evaluation (``csil-eval``): episodes are seeded seed, seed+1, ... whatever the parallelism."""

    task: str = "Lift"
    policy: str = "base"
    episodes: int = 50
    seed: int = seeds.EVAL_SCENES  # far from demo seeds (0, 1, ...), so evaluation scenes are not training scenes
    obs_mode: str = "state"
    workers: int = 0  # 0: one per CPU core
    envs_per_worker: int = 5


# --- the learner ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class HetStatConfig:
    """The small HETSTAT policy (also the BC prior and the coherent reward's density); see csil/hetstat.py."""

    hidden: tuple[int, ...] = (512, 512)  # torso; first layer Dense -> LayerNorm -> tanh when layer_norm
    bottleneck: int = 32  # narrow last torso layer (ELU)
    features: int = 512  # width F of the periodic feature layer (even)
    activation: str = "periodic_relu"  # "periodic_relu" | "triangle" | "sin_cos"
    layer_norm: bool = True
    prior_var: float = 0.75
    min_var: float = 1e-5
    faithful: bool = True  # variance head sees stop_gradient(features)
    action_dim: int = 7
    # CSIL initialises the log-lengthscales at -5. Behind our LayerNorm->tanh torso the bottleneck z is O(0.45)
    # per unit (|z| ~ 2.5 at b=32), so -5 gives phases u = z diag(exp l) W of O(0.02) rad: the features are
    # affine in z (periodic_relu's +pi/4 half even sits on its flat top). Wide nets still fit BC (Adam rescales),
    # but the head then acts like a linear model and is *not* stationary: after 2k BC steps on a 3-d demo
    # manifold, sigma off the manifold was 0.04 (0.02 on it) instead of rising towards the prior, and the mean
    # stayed large; narrow nets also fit badly. 0 puts u at O(2.5) rad across the data, a fraction of a period:
    # BC fits as well (MSE 2e-4) and off-manifold sigma rises to 0.29 with |mu| 0.10 (vs 0.54 on the data).
    log_lengthscale_init: float = 0.0


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """Image observations only: one ResNet per camera + spatial softmax (CSIL++), random-shift augmentation."""

    channels: tuple[int, ...] = (16, 32, 64, 128)
    out_dim: int = 64  # features per camera
    shift: int = 4  # DrQ random-shift padding (pixels) on training batches
    # The policy's encoder online. "critic" (DrQ, CSIL's update_encoder): the policy acts on the critic's encoder,
    # copied after every critic step, no actor gradient into it, so critic steps alone move the policy a little
    # (tests/test_agent.py). "bc": the policy keeps its BC-trained encoder frozen and only actor steps move it.
    # README's first image run (Lift, 100 critic pretraining steps, batch 16, UTD 1) drops from 4/5 to 0/5
    # episodes within 200 updates either way, with KL(pi||pi_BC) after 100 updates 0.91 nats ("critic") vs 1.06
    # ("bc"): the shared encoder is not the cause (results/image-first-run: nor is critic pretraining alone).
    policy_encoder: str = "critic"
    # The convolutions' compute dtype: "float32", or "bfloat16" (mixed precision: bf16 convolutions and group
    # norms, float32 parameters, spatial softmax, head and losses). On this CPU bf16 is slower (XLA:CPU has no fast
    # bf16 convolutions, results/learner.md); what it buys on a GPU is measured by `python -m learner.throughput`.
    compute_dtype: str = "float32"


@dataclasses.dataclass(frozen=True)
class CriticConfig:
    """``categorical``: XQC's critic at CSIL++'s scale, 2 x [512, 512] BN+WN, 101 atoms on [-8, 0] (the
    (1-gamma)-scaled reward's range). ``mse``: vanilla CSIL's LayerNorm MLP regressing a scalar."""

    kind: str = "categorical"  # "categorical" | "mse"
    hidden: tuple[int, ...] = (512, 512)
    num_critics: int = 2
    num_atoms: int = 101
    v_min: float = -8.0
    v_max: float = 0.0
    atoms: str = "uniform"  # "uniform" | "quantile" (denser where the demonstrator's returns lie)
    bn_momentum: float = 0.99
    bn_epsilon: float = 1e-3


@dataclasses.dataclass(frozen=True)
class AgentConfig:
    """Hyperparameters of the learner (CSIL++ paper Table II where it says, CSIL/XQC defaults otherwise).

    ``algo_config(name)`` gives the presets for CSIL++, vanilla CSIL and XQC+OD; they differ only in the fields
    marked "variant".
    """

    reward: str = "coherent"  # variant: "coherent" (CSIL) | "sparse" (-(1-gamma) per step until success)
    regularizer: str = "kl_bc"  # variant: "kl_bc" (beta KL(pi||pi_BC)) | "entropy" (learned alpha, XQC/SAC)
    kl_estimator: str = "exact"  # variant: "exact" (closed form, CSIL++) | "mc" (one-sample, CSIL)
    discount: float = 0.99
    utd: int = 4  # variant: critic updates per env step (one actor update per env step)
    # Unroll the fused UTD (and K-step) loop at trace time instead of an XLA while loop. None: unroll for image
    # observations. XLA CPU (jax 0.4.34) runs convolution gradients inside a while loop ~15x slower, and
    # lax.scan(unroll=True) keeps a one-trip loop: cpu size, batch 32, UTD 1, one core: 54 s per update in the
    # scan, 5.0 s unrolled at trace time (results/learner.md).
    unroll_utd: bool | None = None
    # How an update that came out non-finite is dropped: "cond" (one lax.cond on the state: on XLA CPU half the
    # image update's compile time of a select per leaf) or "select" (a select per leaf: no branch, so nothing on a
    # GPU waits for the predicate to reach the host; what that buys is `learner.throughput --preset gpu`'s question).
    nonfinite_guard: str = "cond"
    batch_size: int = 128  # online samples per critic update (plus as many demo samples)
    # KL(pi||pi_BC) coefficient (actor loss and soft value in the TD target), in the units ``beta_units`` names.
    # "reward" (default): beta multiplies the coherent reward's own coefficient per nat of log-ratio,
    # (1 - gamma) / d_a, i.e. the penalty is beta * (1 - gamma) / d_a * KL, so reward and regulariser stay in the
    # same units whatever the reward's scale (CSIL's coherence: at beta = 1 they weigh a nat equally and the
    # one-step optimum is pi ~ pi_BC * pi_R). "nats": beta * KL per nat, unscaled; beta = 0.3 there is what
    # results/table1 and every run before this option used: with the reward scaled by (1 - gamma) / d_a to fit
    # the critic's [-8, 0] support, that anchor weighs 0.3 * d_a / (1 - gamma) = 210x the reward per nat, the
    # optimum stays at BC (KL ~0.01 nats on Lift) and the critic sees no action better than the demos.
    # Lift, 3k steps, seed 0, 20-episode evals (results/kl-scaling), KL on online batches: beta = 1 drifts (KL
    # 11-14 nats and growing, final success 40 % from 90 % at step 0), 2.1 (the paper's 0.3 next to CSIL's
    # unscaled 1/d_a reward) KL 3.5 -> 5.3 and growing, 5: 1 -> 2, 10: 0.5-0.7, growing slowest, final 85 %.
    # 10 is the default (beta_eff = 0.0143 per nat, 21x below the old): off BC by ~35x the old KL with the least
    # drift of the settings that move; 5 is the next candidate (one seed cannot separate 10, 5
    # and 2.1). Reference ratios in these units: CSIL 0.07 (beta 0.01 next to its 1/d_a reward), CSIL++ 2.1 (if
    # its reward is CSIL's), the old default 210.
    beta: float = 10.0
    beta_units: str = "reward"
    target_entropy_per_dim: float = -0.5  # "entropy" regulariser: XQC's target entropy -d_a/2
    init_temperature: float = 0.01  # "entropy" regulariser: XQC's initial alpha
    actor_lr: float = 3e-4
    # Linear actor-lr warmup over this many updates (0: none). Adam's first steps move every weight by ~lr
    # whatever its gradient: on Lift (cpu size, after pretraining) one actor step puts the policy 6.3 nats from
    # BC and the KL term needs ~60 updates to pull it back; with 100 warmup steps the first 16 updates stay
    # within 0.003 nats (results/first-actor-updates); at reward-unit beta 10 it keeps the worst demo-batch KL of
    # a 3k-step Lift run at 0.72 nats instead of 4.15 (results/kl-scaling). results/table1 ran without it (0).
    actor_warmup_steps: int = 100
    critic_lr: float = 3e-4
    reward_lr: float = 1e-3
    tau: float = 0.005
    refine_reward: bool = True
    reward_kl_scale: float = 1.0
    # Global-norm clip of the reward refinement's gradient before its SGD step (0: CSIL's unclipped SGD). BC's σ
    # sits near its floor on Lift (≈ 0.01 in 6 of 7 dims), where π_R's likelihood is so sharp that plain SGD at
    # lr 1e-3 oscillates into NaN: in 18 steps offline, and after ~7.8k updates in 2 of 4 20k-step Lift runs.
    # With 75 (the clip of a CSIL tool script) 20k offline steps stay finite; the norm's median is 6.5 and only
    # the 1 % of steps above ~280 are clipped (results/reward-refinement).
    reward_grad_clip: float = 75.0
    reward_shift: str = "sigma_floor"  # "sigma_floor" (CSIL's MAX_REWARD form) | "strict"
    # CSIL's action-gradient penalty (weight 1 with its MSE critic). With the categorical BN critic it slowed
    # SARSA pretraining and flattened Q in the action: BC-action-beats-random rank 0.58 with weight 1 vs 0.89
    # without (synthetic task, 3k steps), so it is off by default here.
    grad_penalty_pretrain: float = 0.0
    grad_penalty_online: float = 0.0
    bc_steps: int = 50_000  # 25k for image observations (paper)
    bc_lr: float = 1e-3
    bc_batch_size: int = 256
    # Fraction of demo episodes kept out of BC to pick its parameters (lowest held-out loss); 0: the last step's.
    bc_holdout: float = 0.0
    critic_pretrain_steps: int = 20_000  # variant: 0 = no critic pretraining (XQC+OD)
    critic_pretrain_lr: float = 3e-3  # 3e-4 cannot move the categorical head's logits far enough in 20k steps
    # The target must track faster while values propagate from the demo ends: with gamma = 0.99 and tau = 0.005
    # a Bellman iteration takes ~200 steps and 20k steps would cover only ~100 of them.
    critic_pretrain_tau: float = 0.05
    # Image observations: critic pretraining keeps the encoder frozen, so each demo frame is encoded this many
    # times, each with its own DrQ shift, once before it; its steps then run only the heads (state-mode cost).
    critic_pretrain_shifts: int = 8
    policy: HetStatConfig = HetStatConfig()
    critic: CriticConfig = CriticConfig()
    encoder: EncoderConfig = EncoderConfig()


BETA_UNITS = ("nats", "reward")


def kl_coefficient(cfg: AgentConfig) -> float:
    """The coefficient per nat of KL(pi||pi_BC) that the actor loss and the soft value use (see ``beta_units``)."""
    if cfg.beta_units == "nats":
        return cfg.beta
    if cfg.beta_units == "reward":
        return cfg.beta * (1.0 - cfg.discount) / cfg.policy.action_dim
    raise ValueError(f"AgentConfig.beta_units={cfg.beta_units!r}; choose one of {BETA_UNITS}")


ALGORITHMS = ("csil++", "csil", "xqc-od")


def algo_config(algo: str, base: AgentConfig = AgentConfig()) -> AgentConfig:
    """The preset of one algorithm on top of ``base`` (sizes, learning rates and steps are kept from ``base``).

    - ``csil++``: coherent reward, categorical BN+WN critic, exact KL to BC, UTD 4 (``base`` as is).
    - ``csil``: vanilla CSIL: the same coherent reward and KL anchor, but CSIL's LayerNorm MLP critic with an MSE
      loss and its action-gradient penalty, the one-sample KL estimate, UTD 1. The penalty weight is CSIL's 1
      times (1-gamma): our reward is (1-gamma)-scaled, which shrinks the squared TD error by (1-gamma)^2 but the
      gradient-norm penalty only by (1-gamma); at weight 1 the penalty dominates and flattens Q in the action
      (BC-beats-random rank 0.35 on the synthetic test task, 0.59 at 0.01, 0.69 at 0; the categorical critic
      reaches > 0.8). Critic pretraining at lr 1e-3 (SCHERER-EARLY; CSIL's 1e-4 is too slow at this scale).
    - ``xqc-od``: XQC with offline data: sparse reward -(1-gamma) per step until success, the demo batch
      concatenated, entropy-regularised with a learned temperature, the same BC-initialised HETSTAT policy, no
      reward learning and no critic pretraining.
    """
    if algo == "csil++":
        return base
    if algo == "csil":
        return dataclasses.replace(
            base, kl_estimator="mc", utd=1, grad_penalty_pretrain=0.01, grad_penalty_online=0.01,
            critic_pretrain_lr=1e-3, critic=dataclasses.replace(base.critic, kind="mse"))
    if algo == "xqc-od":
        return dataclasses.replace(base, reward="sparse", regularizer="entropy", refine_reward=False,
                                   critic_pretrain_steps=0)
    raise ValueError(f"unknown algorithm {algo!r}; choose one of {', '.join(ALGORITHMS)}")


def cpu_sized(cfg: AgentConfig) -> AgentConfig:
    """Narrower networks for CPU-only experiments: the paper-size fused update takes ~0.4 s on 2 cores, dominated
    by the HETSTAT variance head (d_a quadratic forms of width F for policy, BC anchor and reward), so F drops from
    512 to 128 and the torsos to 256 units. Batch, UTD and every other hyperparameter are unchanged."""
    return dataclasses.replace(
        cfg, policy=dataclasses.replace(cfg.policy, hidden=(256, 256), bottleneck=32, features=128),
        critic=dataclasses.replace(cfg.critic, hidden=(256, 256)))


def tiny_sized(cfg: AgentConfig) -> AgentConfig:
    """Minimal widths for smoke tests of benchmarks (they compile and run in seconds; timings mean nothing)."""
    return dataclasses.replace(
        cfg, policy=dataclasses.replace(cfg.policy, hidden=(16,), bottleneck=8, features=16),
        critic=dataclasses.replace(cfg.critic, hidden=(16,), num_atoms=11),
        encoder=EncoderConfig(channels=(4,), out_dim=8))


# Network sizes: name -> how it changes the paper's networks. Training CLIs offer SIZES; "tiny" is for smoke tests.
_SIZERS = {"paper": lambda cfg: cfg, "cpu": cpu_sized, "tiny": tiny_sized}
SIZES = ("paper", "cpu")


# What an action mode changes in the agent's defaults. Residual BC targets a_demo − a_base on the base policy's
# own training demos are mostly the demonstrator's noise (the base fits those demos): trained to the end, BC
# memorises it and replays it on new states, 12 pp below the base on Lift; kept at its lowest held-out loss it
# starts at the base (results/residual-step0.md).
MODE_PRESETS = {"residual": {"bc_holdout": 0.1}}


def agent_config(algo: str = "csil++", size: str = "paper", action_mode: str = "ensemble",
                 **overrides) -> AgentConfig:
    """The one way an agent config is built: the ``action_mode``'s preset (``MODE_PRESETS``) and ``AgentConfig``
    fields ``overrides`` (e.g. ``bc_steps``; they win), then the network ``size``, then the algorithm preset
    (``algo_config``), whose variant fields win: XQC+OD never pretrains its critic whatever
    ``critic_pretrain_steps`` says."""
    if size not in _SIZERS:
        raise ValueError(f"unknown size {size!r}; choose one of {', '.join(_SIZERS)}")
    fields = {**MODE_PRESETS.get(action_mode, {}), **overrides}
    return algo_config(algo, _SIZERS[size](dataclasses.replace(AgentConfig(), **fields)))


FRAME_CODECS = ("none", "jpeg")  # how replay stores camera frames (replay.signature)


@dataclasses.dataclass(frozen=True)
class ReplayConfig:
    """Sizes of the online table and the sample-to-insert control.

    The SampleToInsertRatio limiter tracks ``diff = inserts * samples_per_insert - samples`` (totals since the
    table was created, checkpoints included) and, once the table holds ``min_size`` items, blocks any insert or
    sample that would take ``diff`` outside ``min_size * samples_per_insert ± error_buffer``. So after warmup

        samples = (inserts - min_size) * samples_per_insert ± error_buffer,

    i.e. actors can run at most ``error_buffer / samples_per_insert`` inserts ahead of the learner and the learner
    at most that many inserts' worth of samples ahead of the actors. Defaults: error_buffer = 0.1 * 10k * 512 =
    512k samples = 1000 inserts = 1000 fused updates of UTD 4 x batch 128. Before warmup inserts never block.
    A caller that writes and samples on one thread must stay within that slack, or its write blocks for good
    (give its TransitionWriter a ``timeout_ms`` to turn that into an error).
    """

    online_size: int = 250_000  # FIFO capacity of "online"
    samples_per_insert: float = 512.0  # UTD x batch: the UTD control
    min_size: int = 10_000  # warmup: no sampling before this many online items
    error_buffer_fraction: float = 0.1  # limiter slack as a fraction of min_size x samples_per_insert (Acme's rule)
    sample_timeout_ms: int = 60_000  # for BatchIterator(timeout_ms=...): give up instead of blocking forever
    # How camera frames are stored: "none" (raw uint8, snappy-compressed chunks) or "jpeg" (quality 95, lossy,
    # ~0.4x the memory of "none" for two 84x84 cameras; results/replay.md). State-only tables are unaffected.
    frame_codec: str = "none"
    # The learner keeps the online replay (online_size transitions) on its device (learner.device_replay) and
    # "online" becomes a FIFO queue that hands it each new transition once; the learner then runs one fused update
    # per transition after min_size, and the queue's size (queue_size) is the slack the limiter gave.
    on_device: bool = False

    @property
    def error_buffer(self) -> float:
        """Acme's rule, raised to 8 inserts' worth of samples: the learner's input pipeline keeps up to ~5 batches
        sampled ahead (tf.data prefetch, Reverb's in-flight samples, the hand-off queue), and with less slack than
        that a caller that writes and samples in lockstep can stall on its own prefetch (seen at warmup 30)."""
        return max(self.error_buffer_fraction * self.min_size * self.samples_per_insert, 8 * self.samples_per_insert)

    @property
    def queue_size(self) -> int:
        """``on_device``: how many transitions actors may write ahead of the learner (the limiter's slack in
        inserts)."""
        return int(self.error_buffer / self.samples_per_insert)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The single-process trainer (``csil-train``)."""

    task: str = "Lift"
    algo: str = "csil++"  # a name in ALGORITHMS; ``agent`` holds its preset
    size: str = "paper"  # a name in SIZES; ``agent`` holds its network sizes
    action_mode: str = "ensemble"
    obs_mode: str = "state"
    frame_codec: str = "none"  # how replay stores camera frames (ReplayConfig.frame_codec)
    env_steps: int = 100_000
    warmup: int = 10_000  # online transitions (collected by the BC-initialised policy) before updates start
    num_envs: int = 4
    eval_every: int = 10_000
    eval_episodes: int = 20
    final_eval_rounds: int = 5  # the paper's protocol: the best parameters re-evaluated 5 x eval_episodes at the end
    eval_videos: int = 1  # MP4s of each evaluation's first episodes (<logdir>/videos, TensorBoard, W&B); 0: none
    video_stride: int = 1  # film every k-th env step (k = 1: real time at 20 fps); rendering costs ~40 ms a step
    wandb: str | None = None  # W&B project to log to besides TensorBoard (needs csil[wandb]); None: TensorBoard only
    num_demos: int = 200
    demos: str | None = None  # None: the cached scripted demos of the task
    base_checkpoint: str | None = None  # the local base policy's csil-base dir (None: the cached default of the task)
    base_obs: str = "state"  # without base_checkpoint: the cached default base policy on state or on images
    logdir: str = "runs/latest"
    seed: int = 0
    checkpoint_every_s: float = 600.0  # learner + replay checkpoints (also after each evaluation and on Ctrl-C)
    resume: bool = False  # continue the run in ``logdir`` from its checkpoints
    agent: AgentConfig = AgentConfig()


@dataclasses.dataclass(frozen=True)
class InferenceServerConfig:
    """The base-policy inference server (``csil-serve``, and csil-launch's embedded default)."""

    backend: str = "local"  # "local" (our chunking BC model) or "openpi" (real pi0.5, in openpi's own env)
    checkpoint: str | None = None  # local: a csil-base dir (required: the server builds nothing); openpi: ckpt dir
    openpi_config: str | None = None  # openpi train config name, e.g. "pi05_libero"
    default_prompt: str | None = None  # openpi: prompt injected when a request has none
    host: str = "127.0.0.1"  # loopback unless told otherwise
    port: int = 8000  # websocket ingress (openpi protocol) + GET /healthz, /stats, served by each replica
    grpc_port: int | None = 50051  # gRPC ingress, served by each replica; None: off
    max_batch_size: int = 32
    batch_wait_timeout_s: float = 0.005  # how long a partial batch waits for more requests (see results/inference.md)
    num_replicas: int = 1
    num_gpus: float | None = None  # per replica; None: 1 if the cluster has GPUs, else 0
    num_cpus: float = 1.0  # per replica
    token: str | None = None  # shared token; clients send "Authorization: Api-Key <token>" on both ingresses
    app_name: str = "csil-inference"
    model_delay_ms: float = 0.0  # benchmarks only: constant extra cost per batched model call (models a GPU)


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    """The distributed system (``csil-launch``): Ray actors, Reverb replay, the learner service, the evaluator."""

    task: str = "Lift"
    algo: str = "csil++"
    size: str = "paper"
    action_mode: str = "ensemble"
    obs_mode: str = "state"
    frame_codec: str = "none"  # how replay stores camera frames (ReplayConfig.frame_codec)
    actors: int = 2
    envs_per_actor: int = 4
    env_steps: int = 500_000
    warmup: int = 10_000
    eval_every: int = 50_000
    eval_episodes: int = 50  # 0: no evaluation at all (benchmarks, scale-out)
    final_eval_rounds: int = 5  # the paper's protocol: the best parameters re-evaluated 5 x eval_episodes
    eval_videos: int = 1  # MP4s of each evaluation's first episodes (<logdir>/videos, TensorBoard, W&B); 0: none
    video_stride: int = 1  # film every k-th env step (k = 1: real time at 20 fps); rendering costs ~40 ms a step
    wandb: str | None = None  # W&B project to log to besides TensorBoard (needs csil[wandb]); None: TensorBoard only
    publish_every: int = 10  # learner updates between weight publications
    # Learner updates per jit call (K): when the rate limiter has admitted K env steps' worth of batches, they go
    # through one ``CSILAgent.update_many``, the same updates as K calls with one dispatch instead of K (GPU
    # learners are dispatch-bound; on a CPU 1); fewer are updated one by one as they come (LearnerService.run).
    # The learner holds up to K sampled batches per table ready: with images ~87 MB each at batch 128 x UTD 4.
    fuse_updates: int = 1
    # The online replay on the learner's device (ReplayConfig.on_device): Reverb hands the learner each transition
    # once instead of 512 / 4 sampled per env step, so the host's input cost stops bounding a GPU learner.
    replay_on_device: bool = False
    checkpoint_every_s: float = 600.0  # learner + replay checkpoints (and always on SIGTERM / at the end)
    base_policy: str = "local"  # "local" (csil-launch starts the inference server) | "ws://host:port" | "grpc://..."
    serve_port: int = 8000  # "local": the started server's websocket port (openpi protocol), for outside clients
    base_policy_timeout_s: float = 30.0  # actors: one connect/request attempt cycle before logging and retrying
    duration_s: float | None = None  # stop after this many seconds of acting (benchmarks, scale-out), or None
    num_demos: int = 200
    demos: str | None = None
    base_checkpoint: str | None = None  # the local base policy's directory (None: the cached default)
    base_obs: str = "state"  # without base_checkpoint: the cached default base policy on state or on images
    address: str | None = None  # None: start Ray locally; "auto": join the running cluster
    # A second Python environment (a venv dir, or its python) for the env actors and the evaluator, e.g. the
    # robosuite-1.4 one of deploy/actor-env-rs14.sh for MimicGen's tasks; None: the launcher's own.
    actor_env: str | None = None
    logdir: str = "runs/latest"
    resume: bool = False
    seed: int = 0
    agent: AgentConfig = AgentConfig()

    def replay(self) -> ReplayConfig:
        """The replay this run's learner and Reverb server share: UTD x batch samples per insert after warmup."""
        return ReplayConfig(samples_per_insert=self.agent.utd * self.agent.batch_size, min_size=self.warmup,
                            frame_codec=self.frame_codec, on_device=self.replay_on_device)


# csil-experiment's methods: name -> (algorithm, action mode); "base" is the base policy alone.
METHODS = {
    "base": (None, None),
    "csil++-ensemble": ("csil++", "ensemble"),
    "csil++-residual": ("csil++", "residual"),
    "xqc-od-ensemble": ("xqc-od", "ensemble"),
    "xqc-od-residual": ("xqc-od", "residual"),
    "csil-ensemble": ("csil", "ensemble"),
    "csil++-alone": ("csil++", "alone"),  # the small policy without a base: the algorithm separated from the pairing
    "csil-alone": ("csil", "alone"),
}


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """``csil-experiment``: tasks x methods x seeds of single-process runs (local base policy),
    the paper's Table I and Fig. 5 at a budget that fits a CPU."""

    name: str = "table1"
    tasks: tuple[str, ...] = ("Lift", "Square")
    methods: tuple[str, ...] = ("base", "csil++-ensemble", "xqc-od-ensemble", "xqc-od-residual")
    seeds: int = 3
    env_steps: int = 3_000
    eval_every: int = 1_000
    eval_episodes: int = 20
    final_eval_rounds: int = 5  # the paper's protocol: each run's best parameters re-evaluated 5 x eval_episodes
    obs_mode: str = "state"  # what the small policy sees (the base policy gets what it asks for)
    frame_codec: str = "none"  # how replay stores camera frames (ReplayConfig.frame_codec; JPEG is lossy)
    warmup: int = 1_000
    size: str = "cpu"
    # Demos per task for BC, the reward, the critic pretraining and the demo half of each update. None: the ones the task's
    # base policy was trained on (BASE_POLICY_DEFAULTS: the paper gives both policies the same demos).
    num_demos: int | None = None
    bc_steps: int = 5_000
    critic_steps: int = 5_000
    actor_warmup: int = AgentConfig.actor_warmup_steps  # AgentConfig.actor_warmup_steps of every trained method
    beta: float = AgentConfig.beta  # AgentConfig.beta of every KL-regularised method
    beta_units: str = AgentConfig.beta_units  # AgentConfig.beta_units (XQC+OD has no KL term and ignores both)
    # Videos of every evaluation of every run: off by default, a CPU grid would spend most of its evaluation time
    # rendering (TrainConfig.eval_videos).
    eval_videos: int = 0
    wandb: str | None = None  # W&B project: one W&B run per (task, method, seed), grouped by the experiment's name
    runs_dir: str | None = None  # where runs live (None: <cache>/experiments/<name>); finished runs are reused
    out_dir: str = "results"  # results/<name>/table.md, curves.png, runs.csv

    def demos_of(self, task: str) -> int:
        """How many demos a run on ``task`` uses (``num_demos``, or the base policy's own)."""
        if self.num_demos is not None:
            return self.num_demos
        return BASE_POLICY_DEFAULTS.get(task, BaseTrainConfig()).num_demos or DemoConfig.num


def from_dict(cls, data: dict):
    """A config dataclass from ``dataclasses.asdict`` output read back from JSON (nested configs, tuples)."""
    import typing

    hints = typing.get_type_hints(cls)
    kwargs = {}
    for field in dataclasses.fields(cls):
        if field.name not in data:
            continue
        value, hint = data[field.name], hints[field.name]
        if dataclasses.is_dataclass(hint):
            value = from_dict(hint, value)
        elif isinstance(value, list):
            value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
        kwargs[field.name] = value
    return cls(**kwargs)
