"""The learner's agent: CSIL++ and, in the same code path, its baselines vanilla CSIL and XQC+OD.

One class; the variants are fields of ``AgentConfig`` (presets in ``csil.config.algo_config``):

- reward: ``coherent`` ``r = (1-γ)·[(1/d_a)(log π_R(a|s) − log p_U(a)) − B]`` clamped ≤ 0, or ``sparse``
  ``−(1−γ)`` per step and 0 on the success transition (XQC+OD);
- regulariser: ``kl_bc`` ``β·KL(π‖π_BC)`` (exact closed form for CSIL++, one-sample estimate for CSIL) or
  ``entropy`` ``α·log π`` with a learned temperature (XQC/SAC, target entropy −d_a/2). β per nat is
  ``csil.config.kl_coefficient``: ``beta`` itself (``beta_units="nats"``) or ``beta·(1−γ)/d_a``
  (``"reward"``: the coherent reward's own coefficient per nat, so that reward and regulariser stay in the same
  units, as CSIL's coherence needs; in "nats" the anchor weighs 210× the reward per nat and pins π to BC);
- critic: ``categorical`` XQC BN+WN (cross-entropy on a C51 target) or ``mse`` (CSIL's LayerNorm MLP);
- ``utd`` critic updates per call, then one actor update, fused in one jitted ``lax.scan`` (a loop unrolled at
  trace time for image observations, see ``AgentConfig.unroll_utd``).

Choices where the paper is silent (reference/algorithm.md §9):

- ``B`` defaults to CSIL's σ-floor bound ``−log σ_min + log 2`` (≈ 6.6): out-of-distribution values then sit
  near −B, inside the [−8, 0] support. The strict bound (``reward_shift="strict"``, ≈ 11.9, tanh Jacobian and
  tail included) never needs the clamp but pushes OOD values below the support.
- Batches are ``batch_size`` online + ``batch_size`` demo transitions, concatenated, for the critic, the actor
  and reward refinement (CSIL's composition); BN sees that mixture.
- The soft value in the target uses the same regulariser as the actor: atoms shift by
  ``r + γ·(1−d)·(z − β·KL(π(s')‖π_BC(s')))``; the next action is sampled from the current policy.
- XQC's target critic is kept (Polyak τ, run in train-mode BN on the joint batch); the critic with the
  smaller expected value supplies the target distribution for both critics.
- CSIL's action-gradient penalty ``sqrt(mean ||∂Q/∂a||²)`` at demo (s, a) is available for pretraining and
  online but off for CSIL++ (measurements in ``AgentConfig``'s field comment); vanilla CSIL keeps weight 1.
- Online reward refinement (CSIL's demo-likelihood term + KL estimator on online samples), plain SGD.
- Constant Adam learning rates (CSIL's); ``actor_warmup_steps`` optionally ramps the actor's up linearly, which
  removes the jump away from BC that Adam's first full-size steps cause (measured in ``AgentConfig``).
- Image observations: one encoder per camera, initialised from the BC policy's. Critic pretraining keeps it
  frozen and leaves the policy alone, so online training starts from exactly π_BC (the KL anchor's own encoder):
  a SARSA-trained encoder copied into the policy would change its features under its BC-trained heads. Online,
  the critic trains its encoder (CSIL's ``update_encoder``); the policy acts on it under stop-gradient, copied
  after every critic step (DrQ; ``EncoderConfig.policy_encoder="critic"``, the default), or keeps its BC
  encoder frozen ("bc"). π_BC keeps its own frozen encoder; π_R refines its copy.
  Training batches get DrQ random shifts. Each batch goes through each encoder once per step and the heads that
  read the same encoder share its features (``_critic_features``, ``_policy_features``); the critic's encoder
  gradient comes back through ``jax.vjp`` of its features (results/learner.md: −17 % FLOPs, paper-size images).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from csil import hetstat
from csil.config import AgentConfig, kl_coefficient
from csil.encoders import MultiCameraEncoder, random_shift
from csil.hetstat import SmallPolicy
from csil.specs import ObsSpec
from learner import critic as C
from learner.batch import Batch, Obs
from learner.critic import Critic

PyTree = Any


def reward_shift(cfg: AgentConfig) -> float:
    """B, the per-dimension log-ratio bound subtracted from the reward (see module docstring)."""
    if cfg.reward_shift == "strict":
        return hetstat.log_prob_upper_bound(cfg.policy)
    if cfg.reward_shift == "sigma_floor":
        return -math.log(hetstat.sigma_floor(cfg.policy)) + math.log(2.0)
    raise ValueError(f"unknown reward_shift {cfg.reward_shift!r}; use 'sigma_floor' or 'strict'")


def _check_variants(cfg: AgentConfig) -> None:
    choices = {"reward": ("coherent", "sparse"), "regularizer": ("kl_bc", "entropy"),
               "kl_estimator": ("exact", "mc")}
    for field, allowed in choices.items():
        if getattr(cfg, field) not in allowed:
            raise ValueError(f"AgentConfig.{field}={getattr(cfg, field)!r}; choose one of {allowed}")


class AgentState(NamedTuple):
    policy: PyTree
    policy_opt: PyTree
    bc: PyTree  # frozen BC parameters: the KL anchor
    reward: PyTree  # π_R, starts as a copy of BC
    reward_opt: PyTree
    critic: PyTree  # {"params", "batch_stats"}
    critic_opt: PyTree
    target_critic: PyTree  # {"params", "batch_stats"}
    atoms: jax.Array
    log_alpha: jax.Array  # entropy temperature ("entropy" regulariser only)
    alpha_opt: PyTree
    step: jax.Array


class CSILAgent:
    """Networks, optimisers and the jitted update for one observation spec."""

    def __init__(self, cfg: AgentConfig, spec: ObsSpec):
        _check_variants(cfg)
        self.cfg = cfg
        self.spec = spec
        self.action_dim = cfg.policy.action_dim
        self.policy_net = SmallPolicy(cfg.policy, spec.cameras, cfg.encoder)
        self.critic_net = Critic(cfg.critic, spec.cameras, cfg.encoder)
        self.encoder_net = MultiCameraEncoder.from_config(spec.cameras, cfg.encoder)
        self.categorical = cfg.critic.kind == "categorical"
        self.shift = reward_shift(cfg)
        self.beta = kl_coefficient(cfg)  # per nat of KL(π‖π_BC), in the units of cfg.beta_units
        warmup = cfg.actor_warmup_steps
        actor_lr = optax.linear_schedule(cfg.actor_lr / warmup, cfg.actor_lr, warmup) if warmup else cfg.actor_lr
        self.policy_opt = optax.adam(actor_lr)
        self.critic_opt = optax.adam(cfg.critic_lr)
        self.critic_pretrain_opt = optax.adam(cfg.critic_pretrain_lr)  # same state layout as critic_opt
        # CSIL's plain SGD, its gradient's global norm clipped first when reward_grad_clip > 0 (see AgentConfig)
        self.reward_opt = optax.sgd(cfg.reward_lr) if not cfg.reward_grad_clip else optax.chain(
            optax.clip_by_global_norm(cfg.reward_grad_clip), optax.sgd(cfg.reward_lr))
        self.alpha_opt = optax.adam(cfg.actor_lr)
        self.unroll_utd = bool(spec.cameras) if cfg.unroll_utd is None else cfg.unroll_utd
        if cfg.nonfinite_guard not in ("cond", "select"):
            raise ValueError(f"AgentConfig.nonfinite_guard={cfg.nonfinite_guard!r}; choose cond or select")
        if cfg.encoder.policy_encoder not in ("bc", "critic"):
            raise ValueError(f"EncoderConfig.policy_encoder={cfg.encoder.policy_encoder!r}; choose bc or critic")
        self.shared_encoder = cfg.encoder.policy_encoder == "critic"
        self.update = jax.jit(self._update)
        self.update_many = jax.jit(self._update_many)

    # --- construction -------------------------------------------------------------------------------

    def example_obs(self, batch: int = 2) -> dict[str, np.ndarray]:
        return {k: v.zeros((batch,)) for k, v in self.spec.arrays().items()}

    def init_policy(self, key: jax.Array) -> PyTree:
        return self.policy_net.init(key, self.example_obs(1))

    def init_critic(self, key: jax.Array, encoder_from: PyTree | None = None) -> PyTree:
        """A fresh critic (weight-normalised if categorical); its encoder copied from ``encoder_from`` if given."""
        variables = self.critic_net.init(key, self.example_obs(2), jnp.zeros((2, self.action_dim)), train=False)
        params = variables["params"]
        if encoder_from is not None:
            params = self._with_encoder(params, encoder_from)
        if self.categorical:
            params = C.weight_normalize(params)
        return {"params": params, "batch_stats": variables.get("batch_stats", {})}

    def init_state(self, key: jax.Array, bc_params: PyTree, critic: PyTree | None = None,
                   atoms: jax.Array | None = None) -> AgentState:
        """Policy and reward start as copies of BC; the critic is fresh unless a pretrained one is given."""
        critic = critic if critic is not None else self.init_critic(key, encoder_from=bc_params["params"])
        atoms = atoms if atoms is not None else C.make_atoms(self.cfg.critic)
        log_alpha = jnp.asarray(math.log(self.cfg.init_temperature), jnp.float32)
        return AgentState(
            policy=bc_params, policy_opt=self.policy_opt.init(bc_params), bc=bc_params,
            reward=bc_params, reward_opt=self.reward_opt.init(bc_params),
            critic=critic, critic_opt=self.critic_opt.init(critic["params"]),
            target_critic=critic, atoms=jnp.asarray(atoms, jnp.float32),
            log_alpha=log_alpha, alpha_opt=self.alpha_opt.init(log_alpha), step=jnp.zeros((), jnp.int32),
        )

    # --- image encoders -----------------------------------------------------------------------------

    def _with_encoder(self, params: PyTree, source: PyTree) -> PyTree:
        """``params`` (a ``{"params": ...}`` tree or its inner dict) with the encoder taken from ``source``."""
        if not self.spec.cameras:
            return params
        if "params" in params:
            return {**params, "params": self._with_encoder(params["params"], source)}
        source = source["params"] if "params" in source else source
        return {**params, "encoder": source["encoder"]}

    def encode(self, params: PyTree, obs: Obs) -> jax.Array:
        """The features the heads of ``params`` (a policy's or a critic's) see: its encoder applied to ``obs``
        (the state itself, without cameras). The update encodes each batch once per encoder and shares the result
        between the heads that read it."""
        return self._apply_encoder(self.encoder_params(params), obs)

    @staticmethod
    def encoder_params(params: PyTree) -> PyTree:
        """The encoder's parameters in a policy's or critic's tree (``{"params": ...}`` or its inner dict); ``{}``
        without cameras."""
        params = params["params"] if "params" in params else params
        return params.get("encoder", {})

    def _apply_encoder(self, encoder: PyTree, obs: Obs) -> jax.Array:
        """The encoder with parameters ``encoder`` (``{}`` without cameras: it then passes the state through)."""
        return self.encoder_net.apply({"params": encoder} if encoder else {}, obs)

    def _policy_features(self, state: AgentState, obs: Obs, critic_features: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(the policy's, π_BC's) features of ``obs``. With the shared (DrQ) encoder the policy's encoder is the
        critic's, copied after every critic step, so its features are ``critic_features`` (no gradient); with the
        frozen BC encoder they are π_BC's. Either way one encoder pass serves two heads."""
        bc = self.encode(state.bc, obs)
        return (jax.lax.stop_gradient(critic_features), bc) if self.shared_encoder else (bc, bc)

    def _critic_features(self, critic_params: PyTree, batch: Batch) -> tuple[jax.Array, Any, jax.Array]:
        """The online critic's input features, encoded once per critic step: [s; s'] for the categorical critic
        (its joint BN batch), s for the MSE one; the function taking their gradient to the encoder's (``jax.vjp``),
        and the features of s' (the policy's next action reads them when it shares the critic's encoder)."""
        encoder = critic_params.get("encoder", {})
        if self.categorical:
            joint = jax.tree_util.tree_map(lambda x, y: jnp.concatenate([x, y], axis=0), batch.obs, batch.next_obs)
            features, vjp = jax.vjp(lambda e: self._apply_encoder(e, joint), encoder)
            return features, vjp, features[batch.action.shape[0]:]
        features, vjp = jax.vjp(lambda e: self._apply_encoder(e, batch.obs), encoder)
        return features, vjp, self._apply_encoder(encoder, batch.next_obs)

    def augment(self, key: jax.Array, obs: Obs) -> Obs:
        """DrQ random shift of every camera image (a no-op for state observations)."""
        keys = jax.random.split(key, max(1, len(self.spec.image_keys)))
        out = dict(obs)
        for k, image_key in zip(keys, self.spec.image_keys):
            out[image_key] = random_shift(k, obs[image_key], self.cfg.encoder.shift)
        return out

    # --- pieces -------------------------------------------------------------------------------------

    def log_ratio(self, params: PyTree, obs: Obs | None, action: jax.Array,
                  features: jax.Array | None = None) -> jax.Array:
        """(1/d_a)(log π(a|s) − log p_U(a)): the per-dimension coherent log-ratio; ``features``: ``obs`` encoded by
        the encoder of ``params``, if already computed."""
        mu, sigma = self.policy_net.apply(params, obs, features)
        return (hetstat.log_prob(mu, sigma, action) - hetstat.uniform_log_prob(self.action_dim)) / self.action_dim

    def reward(self, params: PyTree, obs: Obs | None, action: jax.Array,
               features: jax.Array | None = None) -> jax.Array:
        """The coherent reward, ≤ 0 everywhere, ≈ −(1−γ)B far from the demonstrations."""
        return self._coherent_reward(self.log_ratio(params, obs, action, features))

    def _coherent_reward(self, log_ratio: jax.Array) -> jax.Array:
        return jnp.minimum((1.0 - self.cfg.discount) * (log_ratio - self.shift), 0.0)

    def rewards(self, reward_params: PyTree, obs: Obs | None, action: jax.Array, discount: jax.Array,
                features: jax.Array | None = None) -> jax.Array:
        """The training reward of the configured variant (sparse: −(1−γ) until the success transition)."""
        if self.cfg.reward == "sparse":
            return -(1.0 - self.cfg.discount) * discount
        return self.reward(reward_params, obs, action, features)

    def _values(self, out: jax.Array, atoms: jax.Array) -> jax.Array:
        return C.expected_value(out, atoms) if self.categorical else out[..., 0]

    def q_values(self, critic: PyTree, obs: Obs | None, action: jax.Array, atoms: jax.Array,
                 features: jax.Array | None = None) -> jax.Array:
        """(num_critics, B) values with running BN statistics (actor loss, diagnostics); ``features``: the
        critic encoder's output for ``obs``, if already computed."""
        return self._values(self.critic_net.apply(critic, obs, action, train=False, features=features), atoms)

    def _regularised_sample(self, policy: PyTree, state: AgentState, obs: Obs | None, key: jax.Array,
                            features: tuple[jax.Array, jax.Array] | None = None
                            ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(a ~ π(·|s), the per-sample penalty subtracted from Q, log π(a|s)).

        ``kl_bc``: β·KL(π‖π_BC) with β = ``self.beta`` (``kl_coefficient``), exact, or the one-sample
        ``log π(a|s) − log π_BC(a|s)`` (π_BC's density is Acme's clipped one, as in CSIL). ``entropy``:
        α·log π(a|s), α not differentiated here. ``features``: (the policy's, π_BC's) encoded ``obs``
        (``_policy_features``), if already computed.
        """
        policy_features, bc_features = features if features is not None else (None, None)
        mu, sigma = self.policy_net.apply(policy, obs, policy_features)
        action, logp = hetstat.sample(key, mu, sigma)
        if self.cfg.regularizer == "entropy":
            return action, jax.lax.stop_gradient(jnp.exp(state.log_alpha)) * logp, logp
        bc_mu, bc_sigma = self.policy_net.apply(state.bc, obs, bc_features)
        if self.cfg.kl_estimator == "exact":
            kl = hetstat.gaussian_kl(mu, sigma, bc_mu, bc_sigma)
        else:
            kl = logp - hetstat.log_prob(bc_mu, bc_sigma, action)
        return action, self.beta * kl, logp

    def _demo_q(self, critic: PyTree, batch: Batch, next_action: jax.Array, demo_action: jax.Array,
                atoms: jax.Array, features: jax.Array) -> jax.Array:
        """Σ over demo rows of min_k Q_k(s, a) with the demo half's actions replaced by ``demo_action``.

        The categorical critic is evaluated in train-mode BN on the same joint batch as the TD loss: an eval-mode
        (running-statistics) penalty drove the running-statistics predictions to collapse while the train-mode
        TD fit looked fine (eval Q −3.8 vs train Q −0.8 on a synthetic task). The LayerNorm critic has no batch
        statistics, so only the demo rows are evaluated.
        """
        half = demo_action.shape[0]
        if not self.categorical:
            return self.q_values(critic, None, demo_action, atoms, features[-half:]).min(0).sum()
        action = batch.action.at[-half:].set(demo_action)
        out, _, _ = C.joint_forward(self.critic_net.apply, critic, None, action, None, next_action, train=True,
                                    features=features)
        return self._values(out[:, -half:], atoms).min(0).sum()

    def _grad_penalty(self, critic: PyTree, batch: Batch, next_action: jax.Array, atoms: jax.Array,
                      demo_half: int, features: jax.Array) -> jax.Array:
        """sqrt(mean ||∂ min_k Q_k / ∂a||²) at the demo (s, a): makes demo actions first-order optimal (CSIL)."""
        grads = jax.grad(lambda a: self._demo_q(critic, batch, next_action, a, atoms, features))(
            batch.action[-demo_half:])
        return jnp.sqrt(jnp.mean(jnp.sum(grads**2, axis=-1)) + 1e-12)

    def _td_target(self, target_critic: PyTree, atoms: jax.Array, batch: Batch, rewards: jax.Array,
                   next_action: jax.Array, next_penalty: jax.Array,
                   features: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """Categorical: the C51-projected target distribution (target critic in train-mode BN on the joint
        batch). MSE: the scalar ``r + γ(1−d)(min_k Q_targ(s', a') − penalty)`` with the soft value clipped at
        ``v_max`` (CSIL's clip in negative-reward mode). Also the fraction of targets outside the support.
        ``features``: [s; s'] encoded by the target critic's encoder, if already computed."""
        cfg = self.cfg
        if self.categorical:
            _, logits_next, _ = C.joint_forward(self.critic_net.apply, target_critic, batch.obs, batch.action,
                                                batch.next_obs, next_action, train=True, features=features)
            probs = C.select_min_critic(logits_next, atoms)
            shifted = rewards[:, None] + cfg.discount * batch.discount[:, None] * (atoms[None, :] - next_penalty[:, None])
            return jax.lax.stop_gradient(C.project(shifted, probs, atoms)), C.clipped_fraction(shifted, atoms)
        next_features = None if features is None else features[next_action.shape[0]:]
        next_v = self.q_values(target_critic, batch.next_obs, next_action, atoms, next_features).min(0) - next_penalty
        target = rewards + cfg.discount * batch.discount * jnp.minimum(next_v, cfg.critic.v_max)
        outside = jnp.mean((target < cfg.critic.v_min) | (target > cfg.critic.v_max))
        return jax.lax.stop_gradient(target), outside

    def _critic_loss(self, critic_params: PyTree, features: jax.Array, state: AgentState, batch: Batch,
                     next_action: jax.Array, target: jax.Array, demo_half: int,
                     penalty_weight: float) -> tuple[jax.Array, tuple]:
        """The TD loss (+ CSIL's penalty) on the encoded batch (``_critic_features``); differentiated with respect
        to the heads' parameters and the features, whose gradient the encoder's vjp then takes."""
        critic = {"params": critic_params, "batch_stats": state.critic["batch_stats"]}
        if self.categorical:
            out, _, batch_stats = C.joint_forward(self.critic_net.apply, critic, None, batch.action, None,
                                                  next_action, train=True, features=features)
            td = C.cross_entropy(out, target[None]).mean(axis=1).sum()
        else:
            out = self.critic_net.apply(critic, None, batch.action, train=False, features=features)
            batch_stats = critic["batch_stats"]
            td = jnp.mean((out[..., 0] - target[None]) ** 2, axis=1).sum()
        penalty = jnp.zeros(())
        if penalty_weight:
            penalty = self._grad_penalty(critic, batch, next_action, state.atoms, demo_half, features)
        q = self._values(out, state.atoms).min(0)
        return td + penalty_weight * penalty, (batch_stats, td, penalty, q)

    def _critic_grads(self, state: AgentState, batch: Batch, features: jax.Array, encoder_vjp: Any,
                      next_action: jax.Array, target: jax.Array, demo_half: int, penalty_weight: float
                      ) -> tuple[PyTree, tuple]:
        """The critic loss's gradient: the heads' directly, the encoder's through ``encoder_vjp`` (None: the
        encoder is frozen, its gradient is left at zero)."""
        (_, aux), (grads, feature_grads) = jax.value_and_grad(self._critic_loss, argnums=(0, 1), has_aux=True)(
            state.critic["params"], features, state, batch, next_action, target, demo_half, penalty_weight)
        if "encoder" in grads and encoder_vjp is not None:
            grads = {**grads, "encoder": encoder_vjp(feature_grads)[0]}
        return grads, aux

    def _apply_critic_grads(self, state: AgentState, grads: PyTree, batch_stats: PyTree, tau: float,
                            opt: optax.GradientTransformation, online: bool = True) -> AgentState:
        """The critic step; online with a shared encoder the policy then acts on the critic's (DrQ), in pretraining
        the encoder stays the BC policy's and the policy stays π_BC."""
        updates, critic_opt = opt.update(grads, state.critic_opt, state.critic["params"])
        params = optax.apply_updates(state.critic["params"], updates)
        if self.categorical:
            params = C.weight_normalize(params)
        if not online:
            params = self._with_encoder(params, state.critic["params"])
        critic = {"params": params, "batch_stats": batch_stats}
        target = {"params": optax.incremental_update(params, state.target_critic["params"], tau),
                  "batch_stats": batch_stats}
        policy = self._with_encoder(state.policy, params) if online and self.shared_encoder else state.policy
        return state._replace(critic=critic, critic_opt=critic_opt, target_critic=target, policy=policy)

    # --- critic pretraining (SARSA on demos) ---------------------------------------------------------

    def pretrain_critic_step(self, state: AgentState, demos: Batch) -> tuple[AgentState, dict]:
        """Policy evaluation of the demonstrator: y = r + γ(1−d)·Z_targ(s', a'_demo), plus the penalty.

        ``demos.obs`` and ``demos.next_obs`` are already encoded (``learner.pretrain.encoded_demos``): in pretraining
        the critic's encoder stays BC's, which is also π_R's and the target critic's, so one encoding serves the
        reward, the target and the critic, and a step runs only the heads."""
        features, next_features = demos.obs, demos.next_obs
        rewards = self.rewards(state.reward, None, demos.action, demos.discount, features)
        zeros = jnp.zeros(demos.action.shape[0])
        joint = jnp.concatenate([features, next_features], axis=0)
        target, clipped = self._td_target(state.target_critic, state.atoms, demos, rewards, demos.next_action,
                                          zeros, joint)
        grads, (stats, td, penalty, q) = self._critic_grads(
            state, demos, joint if self.categorical else features, None, demos.next_action, target,
            demos.action.shape[0], self.cfg.grad_penalty_pretrain)
        state = self._apply_critic_grads(state, grads, stats, self.cfg.critic_pretrain_tau, self.critic_pretrain_opt,
                                         online=False)
        state = state._replace(step=state.step + 1)
        return state, {"critic_loss": td, "grad_penalty": penalty, "q_mean": q.mean(), "reward_mean": rewards.mean(),
                       "target_clipped": clipped}

    # --- the fused online update ----------------------------------------------------------------------

    def _critic_step(self, state: AgentState, batch: Batch, key: jax.Array) -> tuple[AgentState, dict]:
        cfg = self.cfg
        obs_key, next_key, sample_key = jax.random.split(key, 3)
        batch = batch._replace(obs=self.augment(obs_key, batch.obs), next_obs=self.augment(next_key, batch.next_obs))
        half = batch.action.shape[0] // 2  # [online; demo]
        features, encoder_vjp, next_features = self._critic_features(state.critic["params"], batch)
        next_action, next_penalty, _ = self._regularised_sample(
            state.policy, state, batch.next_obs, sample_key, self._policy_features(state, batch.next_obs, next_features))

        reward_metrics = {}
        if cfg.refine_reward and cfg.reward == "coherent":
            # π_R's pass over the batch gives the reward (at π_R before this step) and its refinement's gradient
            state, reward_metrics, log_ratio = self.reward_step(state, batch, half)
            rewards = self._coherent_reward(log_ratio)
        else:
            rewards = self.rewards(state.reward, batch.obs, batch.action, batch.discount)
        rewards = jax.lax.stop_gradient(rewards)
        target, clipped = self._td_target(state.target_critic, state.atoms, batch, rewards, next_action,
                                          next_penalty)
        grads, (stats, td, penalty, q) = self._critic_grads(state, batch, features, encoder_vjp, next_action, target,
                                                            half, cfg.grad_penalty_online)
        state = self._apply_critic_grads(state, grads, stats, cfg.tau, self.critic_opt)
        metrics = {"critic_loss": td, "grad_penalty": penalty, "q_online": q[:half].mean(), "q_demo": q[half:].mean(),
                   "reward_online": rewards[:half].mean(), "reward_demo": rewards[half:].mean(),
                   "target_clipped": clipped, "next_penalty": next_penalty.mean(), **reward_metrics}
        return state, metrics

    def reward_step(self, state: AgentState, batch: Batch, half: int) -> tuple[AgentState, dict, jax.Array]:
        """CSIL's online reward refinement on a [online; demo] batch: raise π_R's likelihood of the demo half,
        keep its log-ratio on the online half near 0 (Schulman's non-negative KL estimator, online half). Also
        returns the log-ratio before the step, which is what the TD target's reward is made of."""

        def reward_loss(reward_params):
            ratio = self.log_ratio(reward_params, batch.obs, batch.action)
            x = jnp.maximum(ratio[:half], -5.0)
            kl_estimate = jnp.mean(jnp.exp(-x) - 1.0 + x)
            return -jnp.mean(ratio[half:]) + self.cfg.reward_kl_scale * kl_estimate, (kl_estimate, ratio)

        (loss, (kl_estimate, ratio)), grads = jax.value_and_grad(reward_loss, has_aux=True)(state.reward)
        updates, reward_opt = self.reward_opt.update(grads, state.reward_opt, state.reward)
        state = state._replace(reward=optax.apply_updates(state.reward, updates), reward_opt=reward_opt)
        return state, {"reward_loss": loss, "reward_kl_estimate": kl_estimate,
                       "reward_grad_norm": optax.global_norm(grads)}, ratio

    def _actor_loss(self, policy_params: PyTree, state: AgentState, critic_features: jax.Array,
                    policy_features: tuple[jax.Array, jax.Array], key: jax.Array):
        # on features encoded outside: no actor gradient into an encoder (the critic's, DrQ, or the frozen BC one)
        action, penalty, logp = self._regularised_sample(policy_params, state, None, key, policy_features)
        q = self.q_values(state.critic, None, action, state.atoms, critic_features).min(0)
        return jnp.mean(penalty - q), (penalty, logp, q)

    def _temperature_step(self, state: AgentState, logp: jax.Array) -> tuple[AgentState, jax.Array]:
        """SAC's temperature loss −log α·(log π + H_target): α grows while the entropy is below the target."""
        target_entropy = self.cfg.target_entropy_per_dim * self.action_dim
        grad = -jnp.mean(jax.lax.stop_gradient(logp) + target_entropy)
        updates, alpha_opt = self.alpha_opt.update(grad, state.alpha_opt, state.log_alpha)
        log_alpha = optax.apply_updates(state.log_alpha, updates)
        return state._replace(log_alpha=log_alpha, alpha_opt=alpha_opt), jnp.exp(log_alpha)

    def _update(self, state: AgentState, online: Batch, demos: Batch, key: jax.Array) -> tuple[AgentState, dict]:
        """``utd`` critic (+ reward) updates, one per leading-axis slice of online/demos, then one actor update;
        all of it dropped (``state`` returned as it was, metric ``skipped`` 1) if any parameter or metric came
        out non-finite, so that one numerically bad batch cannot poison the weights the actors act with
        (``LearnerCore`` counts the skips and stops a learner that keeps skipping)."""
        new, metrics = self._update_unguarded(state, online, demos, key)
        leaves = jax.tree_util.tree_leaves((new.policy, new.critic, new.reward, new.log_alpha, metrics))
        applied = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))
        if self.cfg.nonfinite_guard == "select":
            state = jax.tree_util.tree_map(lambda a, b: jnp.where(applied, a, b), new, state)
        else:
            state = jax.lax.cond(applied, lambda: new, lambda: state)  # one branch, not a select per leaf
        return state, {**metrics, "skipped": 1.0 - applied.astype(jnp.float32)}

    def _update_unguarded(self, state: AgentState, online: Batch, demos: Batch, key: jax.Array
                          ) -> tuple[AgentState, dict]:
        batches = Batch.concat(online, demos, axis=1)  # (utd, 2B, ...)
        keys = jax.random.split(key, self.cfg.utd + 2)

        def body(s, xs):
            batch, k = xs
            return self._critic_step(s, batch, k)

        state, metrics = self._scan(body, state, (batches, keys[:-2]))
        last = jax.tree_util.tree_map(lambda x: x[-1], batches)
        obs = self.augment(keys[-2], last.obs)
        critic_features = jax.lax.stop_gradient(self.encode(state.critic, obs))
        (actor_loss, (penalty, logp, q)), grads = jax.value_and_grad(self._actor_loss, has_aux=True)(
            state.policy, state, critic_features, self._policy_features(state, obs, critic_features), keys[-1])
        # Diagnostics (eval-mode BN, the actor's view): how much better the critic rates the policy's sample than
        # the stored action, on the online half (replay's a_pi) and on the demo half (the demonstrator's action).
        half = online.action.shape[1]
        q_stored = self.q_values(state.critic, None, last.action, state.atoms, critic_features).min(0)
        gap = q - q_stored
        updates, policy_opt = self.policy_opt.update(grads, state.policy_opt, state.policy)
        state = state._replace(policy=optax.apply_updates(state.policy, updates), policy_opt=policy_opt,
                               step=state.step + 1)
        metrics = jax.tree_util.tree_map(jnp.mean, metrics)
        metrics.update(actor_loss=actor_loss, actor_penalty=penalty.mean(), entropy=-logp.mean(), q_actor=q.mean(),
                       q_gap_online=gap[:half].mean(), q_gap_demo=gap[half:].mean())
        if self.cfg.regularizer == "entropy":
            state, metrics["alpha"] = self._temperature_step(state, logp)
        else:
            kl = penalty / self.beta
            metrics.update(kl_to_bc=kl.mean(), kl_to_bc_online=kl[:half].mean(), kl_to_bc_demo=kl[half:].mean())
        return state, metrics

    def _update_many(self, state: AgentState, online: Batch, demos: Batch, keys: jax.Array) -> tuple[AgentState, dict]:
        """K env steps' worth of updates in one call: ``_update`` scanned over the leading axis of ``online``,
        ``demos`` (K, utd, B, ...) and ``keys`` (K, 2), the same sequence as K ``update`` calls (one dispatch
        instead of K: what a GPU learner is bound by). Metrics are the last update's, ``skipped`` the K's sum."""

        def body(s, xs):
            return self._update(s, *xs)

        state, metrics = self._scan(body, state, (online, demos, keys))
        return state, {**jax.tree_util.tree_map(lambda x: x[-1], metrics), "skipped": metrics["skipped"].sum()}

    def _scan(self, body, carry, xs):
        """``lax.scan(body, carry, xs)``, or with ``unroll_utd`` the same loop unrolled at trace time: on XLA CPU
        (jax 0.4.34) convolution gradients inside a while loop run ~15x slower, and ``lax.scan(unroll=True)``
        still emits a (one-trip) while loop."""
        if not self.unroll_utd:
            return jax.lax.scan(body, carry, xs)
        outputs = []
        for i in range(jax.tree_util.tree_leaves(xs)[0].shape[0]):
            carry, out = body(carry, jax.tree_util.tree_map(lambda x: x[i], xs))  # noqa: B023 - used at once
            outputs.append(out)
        return carry, jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *outputs)
