"""How far the first online actor updates move CSIL++'s policy from BC, with and without actor-lr warmup.

Lift, 10 demos, cpu-size networks, BC 5k + critic pretraining 5k steps (csil-experiment's budget), then 100
fused updates on demo batches (as online and demo halves). Prints one JSON line per setting: after update k,
KL(pi || pi_BC) on the update's batch and the mean |mode(pi) - mode(pi_BC)| per action dim on 512 demo states.
Run: python results/first-actor-updates/measure.py
"""

import dataclasses
import json

import jax
import numpy as np

from csil import hetstat
from csil.config import agent_config
from csil.demos import read_demos, spec_from_demos
from learner.agent import CSILAgent
from learner.pretrain import DemoTransitions, initial_atoms, pretrain_bc, pretrain_critic
from orchestration.pipeline import ensure_demos

CHECKPOINTS = (1, 2, 4, 8, 16, 32, 64, 100)


def main() -> None:
    path = ensure_demos("Lift")
    data = read_demos(path, num_demos=10)
    spec = spec_from_demos(path, data.episodes[0].obs, "state")
    demos = DemoTransitions.from_episodes(data.episodes, spec)
    cfg = agent_config("csil++", "cpu", bc_steps=5_000, critic_pretrain_steps=5_000, beta=0.3,
                       beta_units="nats")  # as measured (before results/kl-scaling)
    agent = CSILAgent(cfg, spec)
    key = jax.random.PRNGKey(1)
    bc, _ = pretrain_bc(agent, demos, key, cfg.bc_steps, progress=False)
    pretrained = agent.init_state(key, bc, atoms=initial_atoms(agent, bc, demos))
    pretrained, _ = pretrain_critic(agent, pretrained, demos, cfg.critic_pretrain_steps, seed=1, progress=False)
    probe = demos.sample(np.random.default_rng(9), (512,)).obs
    bc_mode = hetstat.mode(agent.policy_net.apply(bc, probe)[0])

    for warmup in (0, 100):
        agent = CSILAgent(dataclasses.replace(cfg, actor_warmup_steps=warmup), spec)
        state = pretrained._replace(policy_opt=agent.policy_opt.init(pretrained.policy))
        rng, rows = np.random.default_rng(3), []
        for i in range(1, CHECKPOINTS[-1] + 1):
            batch = lambda: demos.sample(rng, (cfg.utd, cfg.batch_size))  # noqa: E731
            state, metrics = agent.update(state, batch(), batch(), jax.random.PRNGKey(i))
            if i in CHECKPOINTS:
                gap = np.abs(np.asarray(hetstat.mode(agent.policy_net.apply(state.policy, probe)[0]) - bc_mode))
                rows.append({"update": i, "kl_to_bc": round(float(metrics["kl_to_bc"]), 4),
                             "mode_gap": round(float(gap.mean()), 4)})
        print(json.dumps({"actor_warmup_steps": warmup, "after_update": rows}), flush=True)


if __name__ == "__main__":
    main()
