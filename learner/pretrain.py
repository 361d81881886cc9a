"""Pretraining on demonstrations: BC (the policy, the KL anchor and the initial reward) and the SARSA critic.

Both run before any environment step. Afterwards the BC policy is optimal for the coherent reward and the
critic evaluates it, which is why fine-tuning starts at the BC policy's performance with no initial drop.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tqdm import tqdm, trange

from csil import hetstat
from csil.acting import ChunkSource, open_loop_base_actions, with_plan
from csil.demos import flatten_obs
from csil.specs import ACTION_DIM, BaseObsSpec, ObsSpec
from csil.tasks import is_success
from learner.agent import AgentState, CSILAgent
from learner.batch import Batch, DemoPool, sample_demos
from learner.critic import make_atoms


@dataclasses.dataclass
class DemoTransitions:
    """All demo transitions as flat arrays; ``discount`` is 0 after a success step (the episode ends there).

    Observations are the flat dicts of ``csil.specs`` (``state`` plus camera images in image mode)."""

    obs: dict[str, np.ndarray]
    action: np.ndarray
    discount: np.ndarray
    next_obs: dict[str, np.ndarray]
    next_action: np.ndarray
    last: np.ndarray  # True at the final step of each episode

    def __len__(self) -> int:
        return len(self.action)

    @classmethod
    def from_episodes(cls, episodes, spec: ObsSpec) -> "DemoTransitions":
        """Success (sparse reward 1, ``csil.tasks.is_success``), not the end of the file's trajectory, is terminal:
        robomimic's done_mode 2 also marks the last step of failed trajectories as done. NutAssembly's 0.5 for
        the first nut on its peg is not terminal."""
        parts: dict[str, list] = {f.name: [] for f in dataclasses.fields(cls)}
        for ep in episodes:
            if ep.next_obs is None:
                raise ValueError("demo episodes need next_obs (read_demos(..., load_next_obs=True))")
            actions = np.asarray(ep.actions, np.float32)
            parts["obs"].append(flatten_obs(ep.obs, spec))
            parts["next_obs"].append(flatten_obs(ep.next_obs, spec))
            parts["action"].append(actions)
            parts["next_action"].append(np.concatenate([actions[1:], actions[-1:]]))
            parts["discount"].append((~is_success(np.asarray(ep.rewards))).astype(np.float32))
            parts["last"].append(np.arange(len(actions)) == len(actions) - 1)
        concat = lambda *xs: np.concatenate(xs)  # noqa: E731
        return cls(**{k: jax.tree_util.tree_map(concat, *v) for k, v in parts.items()})

    def sample(self, rng: np.random.Generator, shape: tuple[int, ...]) -> Batch:
        idx = rng.integers(0, len(self), shape)
        pick = lambda x: x[idx]  # noqa: E731
        return Batch(*jax.tree_util.tree_map(pick, (self.obs, self.action, self.discount, self.next_obs,
                                                     self.next_action)))

    def split_episodes(self, fraction: float) -> tuple[DemoTransitions, DemoTransitions]:
        """(kept, held out): every episode whose index i has floor((i+1)·fraction) > floor(i·fraction) is held out
        (an evenly spread ``fraction`` of them, at least one, never all)."""
        episode = np.concatenate([[0], np.cumsum(self.last[:-1])])
        count = int(episode[-1]) + 1
        index = np.arange(count)
        held = np.floor((index + 1) * fraction) > np.floor(index * fraction)
        if not held.any():
            held[-1] = True
        if held.all() or count < 2:
            raise ValueError(f"cannot hold out {fraction:.0%} of {count} demo episode(s) and keep some for BC")

        def pick(mask: np.ndarray) -> DemoTransitions:
            return DemoTransitions(**{f.name: jax.tree_util.tree_map(lambda x: x[mask], getattr(self, f.name))
                                      for f in dataclasses.fields(self)})

        return pick(~held[episode]), pick(held[episode])

    def episode_step(self) -> np.ndarray:
        """Each transition's step within its demo episode (0 at each episode's first)."""
        starts = np.concatenate([[0], np.flatnonzero(self.last[:-1]) + 1])
        return np.arange(len(self)) - np.repeat(starts, np.diff(np.append(starts, len(self))))

    def as_residuals(self, base: ChunkSource, prompt: str, spec: ObsSpec) -> DemoTransitions:
        """Residual mode: the demo actions the small policy should output, ``a_demo − a_base`` (clipped to the
        action box), so that BC makes ``a_base + a_pi`` reproduce the demos (a BC-initialised residual starts at
        the base's performance rather than adding a second full action to it), and the critic's demo half lives
        in the same action space as replay's ``a_pi``. ``a_base`` is what the base plays at that step while acting:
        chunks asked for every H steps from each episode's start and played open loop
        (``open_loop_base_actions``); the first action of a chunk asked for at every demo state would be another
        policy than the one the residual is added to. The observations gain that base plan (``"base_plan"``, as
        acting gives it to a residual policy). The base is asked with the demos' own observations (``spec``), so
        they must be what it asks for.
        """
        wants, demos_hold = BaseObsSpec.from_metadata(base.metadata), BaseObsSpec.of_local(spec)
        if wants != demos_hold:
            def show(b: BaseObsSpec) -> str:
                return f"state {list(b.state_keys)} and cameras {[(i.camera, i.size) for i in b.images]}"

            raise ValueError(
                f"residual mode asks the base policy for its actions on the demo states, but it asks for "
                f"{show(wants)} while the {spec.mode} demos hold {show(demos_hold)}: use demos with the base "
                f"policy's observations (csil-demos generate --obs image for a camera-based base) or "
                f"--action-mode ensemble")
        plan = open_loop_base_actions(base, self.obs, self.episode_step(), prompt)
        # next_obs and next_action are the next step's (the last step repeats its own): so is their base plan
        next_plan = np.where(self.last[:, None], plan, np.roll(plan, -1, axis=0))
        residual = lambda a, p: np.clip(a - p[:, :ACTION_DIM], -1.0, 1.0).astype(np.float32)  # noqa: E731
        return dataclasses.replace(self, obs=with_plan(self.obs, plan),
                                   next_obs=with_plan(self.next_obs, next_plan), action=residual(self.action, plan),
                                   next_action=residual(self.next_action, next_plan))

    def on_device(self) -> DemoPool:
        """Every transition on the device, each observation once (``DemoPool``), for ``sample_demos``.

        The demos never change during a run, so they cross to the device once; the demo half of each update is then
        drawn there, and the host feeds only the online half (what keeps a GPU learner fed: issue 16). A step's
        next_obs is stored as the next step's obs where the two are equal (always, within a demo), so only each
        demo's final next_obs is a frame of its own."""
        n = len(self)
        shared = ~self.last[:-1]
        for key, value in self.obs.items():
            shared &= (self.next_obs[key][:-1] == value[1:]).all(axis=tuple(range(1, value.ndim)))
        own = np.flatnonzero(~np.append(shared, False))  # transitions whose next_obs is a frame of its own
        next_row = np.arange(1, n + 1, dtype=np.int32)
        next_row[own] = n + np.arange(len(own), dtype=np.int32)
        frames = {key: np.concatenate([value, self.next_obs[key][own]]) for key, value in self.obs.items()}
        return jax.device_put(DemoPool(frames, np.arange(n, dtype=np.int32), next_row, self.action, self.discount,
                                       self.next_action))

    def discounted_returns(self, rewards: np.ndarray, discount: float) -> np.ndarray:
        """Per-step discounted return-to-go within each demo under ``rewards`` (for quantile atoms)."""
        out = np.zeros(len(rewards))
        running = 0.0
        for t in range(len(rewards) - 1, -1, -1):
            running = rewards[t] + (0.0 if self.last[t] else discount * self.discount[t] * running)
            out[t] = running
        return out


LOG_EVERY = 100  # pretraining steps between logged metrics (BC's held-out loss is computed at those steps)


class PretrainingStopped(Exception):
    """``should_stop()`` turned true during pretraining (SIGINT/SIGTERM): nothing of it is kept."""


def _run(what: str, steps: int, step: Callable[[], dict], shown: dict[str, str], progress: bool,
         on_log: Callable[[dict], None] | None, should_stop: Callable[[], bool] | None) -> list[dict]:
    """``steps`` calls of ``step`` under a progress bar; every ``LOG_EVERY``-th step's metrics are logged (the ``shown``
    ones, ``{key: format}``, in the bar) and passed to ``on_log``; ``should_stop`` is polled every step."""
    log = []
    bar = trange(steps, desc=what, disable=not progress, mininterval=1.0)
    for i in bar:
        if should_stop is not None and should_stop():
            raise PretrainingStopped(f"{what} stopped at step {i}: its progress is discarded")
        metrics = step()
        if i % LOG_EVERY == 0 or i == steps - 1:
            log.append({"step": i, **{k: float(v) for k, v in metrics.items()}})
            bar.set_postfix({k: format(log[-1][k], f) for k, f in shown.items()})
            if on_log is not None:
                on_log(log[-1])
    return log


def pretrain_bc(agent: CSILAgent, demos: DemoTransitions, key: jax.Array, steps: int,
                progress: bool = True, on_log: Callable[[dict], None] | None = None,
                should_stop: Callable[[], bool] | None = None) -> tuple[dict, list[dict]]:
    """CSIL's faithful BC loss with Adam; returns the parameters and a metrics log (every 100 steps, each entry
    also passed to ``on_log``: how a remote learner reports its progress). ``should_stop`` is polled every
    step and ends pretraining with ``PretrainingStopped`` (Ctrl-C answered within one step).

    With ``AgentConfig.bc_holdout`` > 0 that fraction of the demo episodes is kept out of BC and the parameters
    with the lowest loss on them (checked every ``LOG_EVERY`` steps) are returned: on few demos the policy
    otherwise memorises the demonstrator's noise, which it then replays as confident actions on states it never
    saw (robomimic selects its BC checkpoints on held-out data for the same reason)."""
    cfg = agent.cfg
    params = agent.init_policy(key)
    opt = optax.adam(cfg.bc_lr)
    opt_state = opt.init(params)
    demos, held_out = demos.split_episodes(cfg.bc_holdout) if cfg.bc_holdout else (demos, None)
    # Demo arrays enter the jitted functions as arguments: closed over, XLA would bake every frame into the
    # program as a constant, several copies of them (see csil.base_policy.train_base_policy).
    obs, actions = jax.tree_util.tree_map(jnp.asarray, demos.obs), jnp.asarray(demos.action)

    @jax.jit
    def step(p, o, k, obs, actions):
        k, sub, aug = jax.random.split(k, 3)
        idx = jax.random.randint(sub, (cfg.bc_batch_size,), 0, actions.shape[0])
        batch_obs = agent.augment(aug, jax.tree_util.tree_map(lambda x: x[idx], obs))
        (loss, metrics), grads = jax.value_and_grad(hetstat.bc_loss, argnums=1, has_aux=True)(
            agent.policy_net.apply, p, batch_obs, actions[idx])
        updates, o = opt.update(grads, o, p)
        return optax.apply_updates(p, updates), o, k, metrics

    held_out_loss = None if held_out is None else functools.partial(
        jax.jit(lambda p, obs, action: hetstat.bc_loss(agent.policy_net.apply, p, obs, action)[0]),
        obs=jax.tree_util.tree_map(jnp.asarray, held_out.obs), action=jnp.asarray(held_out.action))
    done, best = 0, (np.inf, params, 0)  # (held-out loss, its parameters, the step they come from)

    def bc_step() -> dict:
        nonlocal params, opt_state, key, done, best
        params, opt_state, key, metrics = step(params, opt_state, key, obs, actions)
        done += 1
        if held_out_loss is not None and ((done - 1) % LOG_EVERY == 0 or done == steps):  # the steps _run logs
            metrics = {**metrics, "held_out_loss": held_out_loss(params)}
            if float(metrics["held_out_loss"]) < best[0]:
                best = (float(metrics["held_out_loss"]), params, done - 1)
        return metrics

    shown = {"mse": ".4f", "nll": ".2f", **({"held_out_loss": ".2f"} if held_out is not None else {})}
    log = _run("BC pretraining", steps, bc_step, shown, progress, on_log, should_stop)
    if held_out is None:
        return params, log
    log[-1]["selected_step"] = best[2]  # the step whose parameters are returned
    return best[1], log


def initial_atoms(agent: CSILAgent, bc_params, demos: DemoTransitions):
    """The critic's support: uniform, or (``atoms="quantile"``) denser where the demonstrator's returns lie under
    the training reward of the BC-initialised reward network."""
    cfg = agent.cfg
    if cfg.critic.atoms != "quantile":
        return make_atoms(cfg.critic)
    rewards = np.asarray(agent.rewards(bc_params, demos.obs, demos.action, demos.discount))
    return make_atoms(cfg.critic, demos.discounted_returns(rewards, cfg.discount))


def encoded_demos(agent: CSILAgent, state: AgentState, demos: DemoTransitions, key: jax.Array,
                  progress: bool = True, chunk: int = 256) -> DemoPool:
    """The demos as a ``DemoPool`` of features, for critic pretraining: every frame encoded by the critic's encoder
    ``critic_pretrain_shifts`` times, each with its own DrQ shift (state observations: once, unshifted).

    In pretraining the critic's encoder is frozen at BC's, and π_R and the target critic read the same one, so a
    step that encoded its batch would compute features it could have looked up: image critic pretraining then
    costs what state pretraining does (results/image-first-run: 100 steps took 2.5 min that way)."""
    for other, name in ((state.target_critic, "target critic"), (state.reward, "reward (π_R)")):
        same = jax.tree_util.tree_map(lambda a, b: bool(jnp.array_equal(a, b)),
                                      agent.encoder_params(state.critic), agent.encoder_params(other))
        if not all(jax.tree_util.tree_leaves(same)):
            raise ValueError(f"critic pretraining expects the {name} to share the critic's (BC's) encoder")
    pool = demos.on_device()
    copies = max(1, agent.cfg.critic_pretrain_shifts) if agent.spec.cameras else 1
    frames = len(jax.tree_util.tree_leaves(pool.frames)[0])
    encode = jax.jit(lambda obs, k: agent.encode(state.critic, agent.augment(k, obs) if agent.spec.cameras else obs))
    starts = [start for _ in range(copies) for start in range(0, frames, chunk)]  # copy after copy, in chunks
    bar = tqdm(starts, desc="encoding demo frames", disable=not progress or not agent.spec.cameras, mininterval=1.0)
    parts = [encode(jax.tree_util.tree_map(lambda x: x[start:start + chunk], pool.frames), k)
             for start, k in zip(bar, jax.random.split(key, len(starts)))]
    offsets = (np.arange(copies) * frames)[:, None]
    tile = lambda x: jnp.tile(x, (copies,) + (1,) * (x.ndim - 1))  # noqa: E731
    return DemoPool(jnp.concatenate(parts), (pool.obs_row[None] + offsets).reshape(-1),
                    (pool.next_row[None] + offsets).reshape(-1), tile(pool.action), tile(pool.discount),
                    tile(pool.next_action))


def pretrain_critic(agent: CSILAgent, state: AgentState, demos: DemoTransitions, steps: int, seed: int = 0,
                    progress: bool = True, on_log: Callable[[dict], None] | None = None,
                    should_stop: Callable[[], bool] | None = None) -> tuple[AgentState, list[dict]]:
    """SARSA policy evaluation of the demonstrator under the training reward (batch = 2 × batch_size); ``on_log``
    and ``should_stop`` as in ``pretrain_bc``. Batches are drawn on the device from the encoded demos
    (``encoded_demos``)."""
    if steps == 0:  # XQC+OD: no critic pretraining, nothing to encode
        return state, []
    key, encode_key = jax.random.split(jax.random.PRNGKey(seed))
    pool = encoded_demos(agent, state, demos, encode_key, progress)
    batch = 2 * agent.cfg.batch_size

    @jax.jit
    def step(state, pool, key):
        return agent.pretrain_critic_step(state, sample_demos(pool, key, (batch,)))

    def critic_step() -> dict:
        nonlocal state, key
        key, sub = jax.random.split(key)
        state, metrics = step(state, pool, sub)
        return metrics

    log = _run("critic pretraining", steps, critic_step, {"critic_loss": ".3f", "q_mean": ".2f"}, progress, on_log,
               should_stop)
    if agent.spec.cameras:
        # The frozen encoder's Adam moments are still zero while the optimiser's shared step count is not, so bias
        # correction would scale its first online steps up to ~6× the learning rate (the policy reads that encoder):
        # online training starts its own Adam instead.
        state = state._replace(critic_opt=agent.critic_opt.init(state.critic["params"]))
    return state, log
