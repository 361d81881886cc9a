"""Image critic pretraining speed (cpu size, batch 16 + 16, Lift's 10 rendered demos) of the code on PYTHONPATH.

Run from the repository root: `python results/image-first-run/pretrain_speed.py STEPS` (needs the cached Lift image
demos, e.g. from the README's first image run). The README here has the numbers, old and new code on one core.
"""
import dataclasses
import json
import sys
import time

import jax

from csil.config import AgentConfig, cpu_sized
from csil.demos import read_demos, spec_from_demos
from learner.agent import CSILAgent
from learner.pretrain import DemoTransitions, pretrain_critic
from orchestration.pipeline import ensure_demos

path = ensure_demos("Lift", "image", 10)
steps = int(sys.argv[1])
data = read_demos(path, num_demos=10)
spec = spec_from_demos(path, data.episodes[0].obs, "image")
demos = DemoTransitions.from_episodes(data.episodes, spec)
agent = CSILAgent(dataclasses.replace(cpu_sized(AgentConfig()), batch_size=16), spec)
state = agent.init_state(jax.random.PRNGKey(1), agent.init_policy(jax.random.PRNGKey(0)))
pretrain_critic(agent, state, demos, 2, progress=False)  # compile
t = time.perf_counter()
s, log = pretrain_critic(agent, state, demos, steps, progress=False)
jax.block_until_ready(s)
dt = time.perf_counter() - t
print(json.dumps({"steps": steps, "s": round(dt, 2), "steps_per_s": round(steps / dt, 2),
                  "critic_loss": round(log[-1]["critic_loss"], 3)}))
