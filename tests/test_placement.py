"""csil-launch on a multi-node Ray cluster (several raylets on this machine, Ray's own test cluster): learner,
replay and coordinator land on the node with ``csil_learner``, env actors on ``csil_actor`` nodes and the
inference replica on the ``csil_inference`` node, as deploy/cluster.yaml's node types advertise them.

It runs in a subprocess: the test session's own local Ray must not be replaced by the test cluster."""

import json
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent('''
    import json, sys, threading, time
    import ray
    from ray.cluster_utils import Cluster
    from ray.util.state import list_actors
    from csil.config import AgentConfig, CriticConfig, HetStatConfig, LaunchConfig
    from orchestration.launcher import System

    args = json.loads(sys.argv[1])
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {"csil_learner": 1}})
    actor_node = cluster.add_node(num_cpus=1, resources={"csil_actor": 2})
    inference_node = cluster.add_node(num_cpus=1, resources={"csil_inference": 1})
    ray.init(address=cluster.address, log_to_driver=False)
    nodes = {"head": cluster.head_node.node_id, "actor": actor_node.node_id, "inference": inference_node.node_id}
    agent = AgentConfig(policy=HetStatConfig(hidden=(32,), bottleneck=8, features=32), critic=CriticConfig(hidden=(32,)),
                        batch_size=8, bc_batch_size=32, bc_steps=20, critic_pretrain_steps=20)
    cfg = LaunchConfig(task="Lift", actors=2, envs_per_actor=1, env_steps=60, warmup=20,
                       eval_episodes=0, num_demos=3, demos=args["demos"], base_checkpoint=args["base"],
                       serve_port=args["port"], logdir=args["logdir"], address=cluster.address, agent=agent,
                       action_mode="residual")  # the learner's residual BC targets come from the inference node
    system = System(cfg, progress=False)
    placement = {}

    def record():
        while not placement:
            time.sleep(1)
            coordinator = getattr(system, "coordinator", None)
            if coordinator is not None and ray.get(coordinator.stats.remote())["env_steps"] > 0:
                for a in list_actors(filters=[("state", "=", "ALIVE")]):
                    placement.setdefault(a.class_name, set()).add(a.node_id)

    threading.Thread(target=record, daemon=True).start()
    summary = system.run()
    print(json.dumps({"nodes": nodes, "env_steps": summary["env_steps"],
                      "placement": {k: sorted(v) for k, v in placement.items()}}))
''')


@pytest.mark.timeout(600)
def test_roles_are_placed_by_their_custom_resources(lift_setup, free_port, tmp_path):
    _, demos, base = lift_setup
    args = json.dumps({"demos": str(demos), "base": str(base), "port": free_port(), "logdir": str(tmp_path / "run")})
    done = subprocess.run([sys.executable, "-c", SCRIPT, args], capture_output=True, text=True, timeout=540)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    nodes, placement = result["nodes"], result["placement"]
    assert result["env_steps"] > 0
    for role in ("LearnerService", "ReplayService", "Coordinator"):
        assert placement[role] == [nodes["head"]], (role, placement)
    assert placement["EnvActor"] == [nodes["actor"]]
    serve_replicas = [v for k, v in placement.items() if "InferenceServer" in k]
    assert serve_replicas and all(v == [nodes["inference"]] for v in serve_replicas), placement
