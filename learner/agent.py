"""The CSIL++ agent: coherent reward, categorical BN+WN critic, exact-KL actor, one fused UTD update.

Choices where the paper is silent (reference/algorithm.md §9), each a field of ``AgentConfig``:

- Reward ``r = (1-γ)·[(1/d_a)(log π_R(a|s) − log p_U(a)) − B]``, clamped ≤ 0. ``B`` defaults to CSIL's
  σ-floor bound ``−log σ_min + log 2`` (≈ 6.6): out-of-distribution values then sit near −B, inside the
  [−8, 0] support. The strict bound (``reward_shift="strict"``, ≈ 11.9, tanh Jacobian and tail included) never
  needs the clamp but pushes OOD values below the support.
- Batches are ``batch_size`` online + ``batch_size`` demo transitions, concatenated, for the critic, the actor
  and reward refinement (CSIL's composition); BN sees that mixture.
- The soft value in the target uses the same exact KL as the actor: atoms shift by
  ``r + γ·(1−d)·(z − β·KL(π(s')‖π_BC(s')))``; the next action is sampled from the current policy.
- XQC's target critic is kept (Polyak τ, run in train-mode BN on the joint batch); the critic with the
  smaller expected value supplies the target distribution for both critics.
- CSIL's action-gradient penalty ``sqrt(mean ||∂Q/∂a||²)`` at demo (s, a) is available for pretraining and
  online (``grad_penalty_pretrain``/``grad_penalty_online``) but off by default (measurements in the field comment).
- Online reward refinement (CSIL's demo-likelihood term + KL estimator on online samples), plain SGD.
- UTD: ``utd`` critic updates (each on its own batch) then one actor update per call, fused in one jitted
  ``lax.scan``; weight normalisation after every critic step.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from csil import hetstat
from csil.hetstat import HetStatConfig, HetStatPolicy
from learner import critic as C
from learner.critic import CriticConfig, XQCCritic

PyTree = Any


@dataclasses.dataclass(frozen=True)
class AgentConfig:
    """CSIL++ hyperparameters (paper Table II where it says, CSIL/XQC defaults otherwise)."""

    discount: float = 0.99
    utd: int = 4
    batch_size: int = 128  # online samples per critic update (plus as many demo samples)
    beta: float = 0.3  # KL(π‖π_BC) coefficient, actor loss and soft value
    actor_lr: float = 3e-4
    critic_lr: float = 3e-4
    reward_lr: float = 1e-3
    tau: float = 0.005
    refine_reward: bool = True
    reward_kl_scale: float = 1.0
    reward_shift: str = "sigma_floor"  # "sigma_floor" (CSIL's MAX_REWARD form) | "strict"
    # CSIL's action-gradient penalty (weight 1 with its MSE critic). With the categorical BN critic it slowed
    # SARSA pretraining and flattened Q in the action: BC-action-beats-random rank 0.58 with weight 1 vs 0.89
    # without (synthetic task, 3k steps), so it is off by default here.
    grad_penalty_pretrain: float = 0.0
    grad_penalty_online: float = 0.0
    bc_steps: int = 50_000
    bc_lr: float = 1e-3
    bc_batch_size: int = 256
    critic_pretrain_steps: int = 20_000
    critic_pretrain_lr: float = 3e-3  # 3e-4 cannot move the categorical head's logits far enough in 20k steps
    # The target must track faster while values propagate from the demo ends: with gamma = 0.99 and tau = 0.005
    # a Bellman iteration takes ~200 steps and 20k steps would cover only ~100 of them.
    critic_pretrain_tau: float = 0.05
    policy: HetStatConfig = HetStatConfig()
    critic: CriticConfig = CriticConfig()


def reward_shift(cfg: AgentConfig) -> float:
    """B, the per-dimension log-ratio bound subtracted from the reward (see module docstring)."""
    if cfg.reward_shift == "strict":
        return hetstat.log_prob_upper_bound(cfg.policy)
    if cfg.reward_shift == "sigma_floor":
        return -math.log(hetstat.sigma_floor(cfg.policy)) + math.log(2.0)
    raise ValueError(f"unknown reward_shift {cfg.reward_shift!r}; use 'sigma_floor' or 'strict'")


class Batch(NamedTuple):
    """Transitions as the learner consumes them; ``discount`` is 0 at terminal (success) steps, else 1."""

    obs: jax.Array
    action: jax.Array  # the small policy's own action a_pi (pre-combination)
    discount: jax.Array
    next_obs: jax.Array
    next_action: jax.Array  # the next demo action (SARSA pretraining); unused online

    @staticmethod
    def concat(a: "Batch", b: "Batch", axis: int = 0) -> "Batch":
        return Batch(*(jnp.concatenate([x, y], axis=axis) for x, y in zip(a, b)))


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
    step: jax.Array


class CSILAgent:
    """Networks, optimisers and the jitted update of CSIL++ for one observation size."""

    def __init__(self, cfg: AgentConfig, obs_dim: int):
        self.cfg = cfg
        self.obs_dim = obs_dim
        self.action_dim = cfg.policy.action_dim
        self.policy_net = HetStatPolicy(cfg.policy)
        self.critic_net = XQCCritic(cfg.critic)
        self.shift = reward_shift(cfg)
        self.policy_opt = optax.adam(cfg.actor_lr)
        self.critic_opt = optax.adam(cfg.critic_lr)
        self.critic_pretrain_opt = optax.adam(cfg.critic_pretrain_lr)  # same state layout as critic_opt
        self.reward_opt = optax.sgd(cfg.reward_lr)
        self.update = jax.jit(self._update)

    # --- construction -------------------------------------------------------------------------------

    def init_policy(self, key: jax.Array) -> PyTree:
        return self.policy_net.init(key, jnp.zeros((1, self.obs_dim)))

    def init_critic(self, key: jax.Array) -> PyTree:
        variables = self.critic_net.init(key, jnp.zeros((2, self.obs_dim)), jnp.zeros((2, self.action_dim)),
                                         train=False)
        return {"params": C.weight_normalize(variables["params"]), "batch_stats": variables["batch_stats"]}

    def init_state(self, key: jax.Array, bc_params: PyTree, critic: PyTree | None = None,
                   atoms: jax.Array | None = None) -> AgentState:
        """Policy and reward start as copies of BC; the critic is fresh unless a pretrained one is given."""
        critic = critic if critic is not None else self.init_critic(key)
        atoms = atoms if atoms is not None else C.make_atoms(self.cfg.critic)
        return AgentState(
            policy=bc_params, policy_opt=self.policy_opt.init(bc_params), bc=bc_params,
            reward=bc_params, reward_opt=self.reward_opt.init(bc_params),
            critic=critic, critic_opt=self.critic_opt.init(critic["params"]),
            target_critic=critic, atoms=jnp.asarray(atoms, jnp.float32), step=jnp.zeros((), jnp.int32),
        )

    # --- pieces -------------------------------------------------------------------------------------

    def log_ratio(self, params: PyTree, obs: jax.Array, action: jax.Array) -> jax.Array:
        """(1/d_a)(log π(a|s) − log p_U(a)): the per-dimension coherent log-ratio."""
        mu, sigma = self.policy_net.apply(params, obs)
        return (hetstat.log_prob(mu, sigma, action) - hetstat.uniform_log_prob(self.action_dim)) / self.action_dim

    def reward(self, params: PyTree, obs: jax.Array, action: jax.Array) -> jax.Array:
        """The coherent reward, ≤ 0 everywhere, ≈ −(1−γ)B far from the demonstrations."""
        r = (1.0 - self.cfg.discount) * (self.log_ratio(params, obs, action) - self.shift)
        return jnp.minimum(r, 0.0)

    def q_values(self, critic: PyTree, obs: jax.Array, action: jax.Array, atoms: jax.Array) -> jax.Array:
        """(num_critics, B) expected values with running BN statistics (actor loss, diagnostics)."""
        return C.expected_value(self.critic_net.apply(critic, obs, action, train=False), atoms)

    def _grad_penalty(self, critic: PyTree, batch: Batch, next_action: jax.Array, atoms: jax.Array,
                      demo_half: int) -> jax.Array:
        """sqrt(mean ||∂ min_k Q_k / ∂a||²) at the demo (s, a): makes demo actions first-order optimal (CSIL).

        Evaluated in train-mode BN on the same joint batch as the TD loss. An eval-mode (running-statistics)
        penalty was tried first: its parameter gradient drives the running-statistics predictions to collapse
        while the train-mode TD fit looks fine (eval Q -3.8 vs train Q -0.8 on a synthetic task).
        """
        def demo_q(demo_action: jax.Array) -> jax.Array:
            action = batch.action.at[-demo_half:].set(demo_action)
            logits, _, _ = C.joint_forward(self.critic_net.apply, critic, batch.obs, action, batch.next_obs,
                                           next_action, train=True)
            return C.expected_value(logits[:, -demo_half:], atoms).min(0).sum()

        grads = jax.grad(demo_q)(batch.action[-demo_half:])
        return jnp.sqrt(jnp.mean(jnp.sum(grads**2, axis=-1)) + 1e-12)

    def _td_target(self, target_critic: PyTree, atoms: jax.Array, batch: Batch, rewards: jax.Array,
                   next_action: jax.Array, next_kl: jax.Array) -> tuple[jax.Array, jax.Array]:
        """C51 target distribution from the target critic (train-mode BN on the joint batch)."""
        _, logits_next, _ = C.joint_forward(self.critic_net.apply, target_critic, batch.obs, batch.action,
                                            batch.next_obs, next_action, train=True)
        probs = C.select_min_critic(logits_next, atoms)
        shifted = rewards[:, None] + self.cfg.discount * batch.discount[:, None] * (
            atoms[None, :] - self.cfg.beta * next_kl[:, None])
        return jax.lax.stop_gradient(C.project(shifted, probs, atoms)), C.clipped_fraction(shifted, atoms)

    def _critic_loss(self, critic_params: PyTree, state: AgentState, batch: Batch, next_action: jax.Array,
                     target: jax.Array, demo_half: int, penalty_weight: float) -> tuple[jax.Array, tuple]:
        critic = {"params": critic_params, "batch_stats": state.critic["batch_stats"]}
        logits, _, batch_stats = C.joint_forward(self.critic_net.apply, critic, batch.obs, batch.action,
                                                 batch.next_obs, next_action, train=True)
        ce = C.cross_entropy(logits, target[None]).mean(axis=1).sum()
        penalty = jnp.zeros(())
        if penalty_weight:
            penalty = self._grad_penalty(critic, batch, next_action, state.atoms, demo_half)
        q = C.expected_value(logits, state.atoms).min(0)
        return ce + penalty_weight * penalty, (batch_stats, ce, penalty, q)

    def _apply_critic_grads(self, state: AgentState, grads: PyTree, batch_stats: PyTree, tau: float,
                            opt: optax.GradientTransformation) -> AgentState:
        updates, critic_opt = opt.update(grads, state.critic_opt, state.critic["params"])
        params = C.weight_normalize(optax.apply_updates(state.critic["params"], updates))
        critic = {"params": params, "batch_stats": batch_stats}
        target = {"params": optax.incremental_update(params, state.target_critic["params"], tau),
                  "batch_stats": batch_stats}
        return state._replace(critic=critic, critic_opt=critic_opt, target_critic=target)

    # --- critic pretraining (SARSA on demos) ---------------------------------------------------------

    def pretrain_critic_step(self, state: AgentState, demos: Batch) -> tuple[AgentState, dict]:
        """Policy evaluation of the demonstrator: y = r + γ(1−d)·Z_targ(s', a'_demo), plus the penalty."""
        rewards = self.reward(state.reward, demos.obs, demos.action)
        zeros = jnp.zeros(demos.obs.shape[0])
        target, clipped = self._td_target(state.target_critic, state.atoms, demos, rewards, demos.next_action,
                                          zeros)
        (loss, (stats, ce, penalty, q)), grads = jax.value_and_grad(self._critic_loss, has_aux=True)(
            state.critic["params"], state, demos, demos.next_action, target, demos.obs.shape[0],
            self.cfg.grad_penalty_pretrain)
        state = self._apply_critic_grads(state, grads, stats, self.cfg.critic_pretrain_tau, self.critic_pretrain_opt)
        state = state._replace(step=state.step + 1)
        return state, {"critic_ce": ce, "grad_penalty": penalty, "q_mean": q.mean(), "reward_mean": rewards.mean(),
                       "target_clipped": clipped}

    # --- the fused online update ----------------------------------------------------------------------

    def _critic_step(self, state: AgentState, batch: Batch, key: jax.Array) -> tuple[AgentState, dict]:
        cfg = self.cfg
        half = batch.obs.shape[0] // 2  # [online; demo]
        next_mu, next_sigma = self.policy_net.apply(state.policy, batch.next_obs)
        next_action, _ = hetstat.sample(key, next_mu, next_sigma)
        bc_mu, bc_sigma = self.policy_net.apply(state.bc, batch.next_obs)
        next_kl = hetstat.gaussian_kl(next_mu, next_sigma, bc_mu, bc_sigma)

        def reward_loss(reward_params):
            ratio = self.log_ratio(reward_params, batch.obs, batch.action)
            x = jnp.maximum(ratio[:half], -5.0)
            kl_estimate = jnp.mean(jnp.exp(-x) - 1.0 + x)  # Schulman's non-negative KL estimator (online half)
            return -jnp.mean(ratio[half:]) + cfg.reward_kl_scale * kl_estimate, kl_estimate

        rewards = jax.lax.stop_gradient(self.reward(state.reward, batch.obs, batch.action))
        target, clipped = self._td_target(state.target_critic, state.atoms, batch, rewards, next_action, next_kl)
        (loss, (stats, ce, penalty, q)), grads = jax.value_and_grad(self._critic_loss, has_aux=True)(
            state.critic["params"], state, batch, next_action, target, half, cfg.grad_penalty_online)
        state = self._apply_critic_grads(state, grads, stats, cfg.tau, self.critic_opt)
        metrics = {"critic_ce": ce, "grad_penalty": penalty, "q_online": q[:half].mean(), "q_demo": q[half:].mean(),
                   "reward_online": rewards[:half].mean(), "reward_demo": rewards[half:].mean(),
                   "target_clipped": clipped, "next_kl": next_kl.mean()}
        if cfg.refine_reward:
            (r_loss, kl_est), r_grads = jax.value_and_grad(reward_loss, has_aux=True)(state.reward)
            updates, reward_opt = self.reward_opt.update(r_grads, state.reward_opt, state.reward)
            state = state._replace(reward=optax.apply_updates(state.reward, updates), reward_opt=reward_opt)
            metrics.update(reward_loss=r_loss, reward_kl_estimate=kl_est)
        return state, metrics

    def _actor_loss(self, policy_params: PyTree, state: AgentState, obs: jax.Array, key: jax.Array):
        mu, sigma = self.policy_net.apply(policy_params, obs)
        action, _ = hetstat.sample(key, mu, sigma)
        bc_mu, bc_sigma = self.policy_net.apply(state.bc, obs)
        kl = hetstat.gaussian_kl(mu, sigma, bc_mu, bc_sigma)
        q = self.q_values(state.critic, obs, action, state.atoms).min(0)
        return jnp.mean(self.cfg.beta * kl - q), (kl.mean(), q.mean())

    def _update(self, state: AgentState, online: Batch, demos: Batch, key: jax.Array) -> tuple[AgentState, dict]:
        """``utd`` critic (+ reward) updates, one per leading-axis slice of online/demos, then one actor update."""
        batches = Batch.concat(online, demos, axis=1)  # (utd, 2B, ...)
        keys = jax.random.split(key, self.cfg.utd + 1)

        def body(s, xs):
            batch, k = xs
            return self._critic_step(s, batch, k)

        state, metrics = jax.lax.scan(body, state, (batches, keys[:-1]))
        last = jax.tree_util.tree_map(lambda x: x[-1], batches)
        (actor_loss, (kl, q)), grads = jax.value_and_grad(self._actor_loss, has_aux=True)(
            state.policy, state, last.obs, keys[-1])
        updates, policy_opt = self.policy_opt.update(grads, state.policy_opt, state.policy)
        state = state._replace(policy=optax.apply_updates(state.policy, updates), policy_opt=policy_opt,
                               step=state.step + 1)
        metrics = jax.tree_util.tree_map(jnp.mean, metrics)
        metrics.update(actor_loss=actor_loss, kl_to_bc=kl, q_actor=q)
        return state, metrics

    # --- acting -------------------------------------------------------------------------------------

    @functools.partial(jax.jit, static_argnums=0)
    def act(self, policy: PyTree, obs: jax.Array, key: jax.Array) -> jax.Array:
        mu, sigma = self.policy_net.apply(policy, obs)
        return hetstat.sample(key, mu, sigma)[0]

    @functools.partial(jax.jit, static_argnums=0)
    def act_deterministic(self, policy: PyTree, obs: jax.Array) -> jax.Array:
        return hetstat.mode(self.policy_net.apply(policy, obs)[0])
