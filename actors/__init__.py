"""Env actors: Ray actors stepping K robosuite envs with the combined policy, writing transitions to replay;
and the seeded rollout workers that evaluation and demo generation use."""
