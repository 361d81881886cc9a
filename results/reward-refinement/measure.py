"""Online reward refinement alone, offline: does CSIL's plain-SGD refinement of π_R blow up, and what does a
global-norm clip of its gradient change?

Lift, the grid's 25 demos, cpu-size networks, BC 5k steps (results/table1-20k's budget). Then only the reward
step (``CSILAgent.reward_step``, SGD lr 1e-3) runs, on [online; demo] batches of 128 + 128: the demo half from
the demos, the online half demo states with actions sampled from π_BC (what the early online policy plays).
Prints one JSON line per clip: the reward gradient's global norm (quantiles, max), the KL estimate and the loss
every 1,000 steps, and the first non-finite step if any.
Run: python results/reward-refinement/measure.py [--steps 20000] [--clips 0,75,10]
"""

import argparse
import dataclasses
import json

import jax
import numpy as np

from csil import hetstat
from csil.config import agent_config
from csil.demos import read_demos, spec_from_demos
from learner.agent import CSILAgent
from learner.batch import Batch
from learner.pretrain import DemoTransitions, pretrain_bc
from orchestration.pipeline import ensure_demos


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20_000)
    parser.add_argument("--clips", default="0,75,10")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    path = ensure_demos("Lift", "state", 25)
    data = read_demos(path, num_demos=25)
    spec = spec_from_demos(path, data.episodes[0].obs, "state")
    demos = DemoTransitions.from_episodes(data.episodes, spec)
    cfg = agent_config("csil++", "cpu")
    bc, _ = pretrain_bc(CSILAgent(cfg, spec), demos, jax.random.PRNGKey(args.seed), cfg.bc_steps, progress=False)

    for clip in (float(c) for c in args.clips.split(",")):
        agent = CSILAgent(dataclasses.replace(cfg, reward_grad_clip=clip), spec)
        state = agent.init_state(jax.random.PRNGKey(args.seed), bc)
        half = cfg.batch_size

        @jax.jit
        def step(state, online, demo, key):
            mu, sigma = agent.policy_net.apply(state.bc, online.obs)
            online = online._replace(action=hetstat.sample(key, mu, sigma)[0])
            return agent.reward_step(state, Batch.concat(online, demo), half)[:2]

        rng, norms, trace, first_bad = np.random.default_rng(args.seed), [], [], None
        for i in range(args.steps):
            state, m = step(state, demos.sample(rng, (half,)), demos.sample(rng, (half,)), jax.random.PRNGKey(i))
            m = {k: float(v) for k, v in m.items()}
            norms.append(m["reward_grad_norm"])
            if first_bad is None and not all(np.isfinite(list(m.values()))):
                first_bad = i
                break
            if i % 1000 == 999:
                trace.append({"step": i + 1, "kl_estimate": round(m["reward_kl_estimate"], 3),
                              "loss": round(m["reward_loss"], 3)})
        q = np.nanpercentile(norms, [50, 90, 99, 99.9])
        print(json.dumps({"clip": clip, "steps": len(norms), "first_non_finite": first_bad,
                          "grad_norm": {"p50": round(q[0], 1), "p90": round(q[1], 1), "p99": round(q[2], 1),
                                        "p99.9": round(q[3], 1), "max": round(float(np.nanmax(norms)), 1)},
                          "trace": trace}), flush=True)


if __name__ == "__main__":
    main()
