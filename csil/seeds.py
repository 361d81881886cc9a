"""Every seed a run uses, derived from its one ``--seed`` here, so the scenes of different roles never overlap.

Scene seeds (``env.reset(seed=...)``) by role, for run seed ``k``:

- demos: the scripted expert's scenes ``0, 1, ...`` (``DemoConfig.seed``);
- evaluation: ``EVAL_SCENES + k·EVAL_STRIDE + r·ROUND_STRIDE + i`` for episode ``i`` of evaluation round ``r``
  (round 0: every periodic evaluation, so all of them see the same scenes, paired with the base policy's;
  rounds 1.. re-evaluate the best parameters on fresh scenes);
- the single-process trainer's envs: ``(k + 1)·TRAINER_SCENES + episode``;
- env actors: ``ACTOR_SCENES + k·10M + actor·100k + (incarnation − 1)·10k + episode`` (a restarted actor gets
  fresh scenes).
"""

from __future__ import annotations

EVAL_SCENES = 1_000_000
EVAL_STRIDE = 100_000
ROUND_STRIDE = 10_000  # more evaluation episodes than this per round would reuse the next round's scenes
TRAINER_SCENES = 10_000_000
ACTOR_SCENES = 1_000_000_000


def eval_scene(seed: int, round: int = 0) -> int:
    """The first scene of evaluation round ``round`` of run seed ``seed``."""
    return EVAL_SCENES + seed * EVAL_STRIDE + round * ROUND_STRIDE


def trainer_episode_seed(seed: int, episode: int) -> int:
    return TRAINER_SCENES * (seed + 1) + episode


def actor_episode_seed(seed: int, actor_id: int, incarnation: int, episode: int) -> int:
    return ACTOR_SCENES + seed * 10_000_000 + actor_id * 100_000 + (incarnation - 1) * 10_000 + episode


def learner_key_seed(seed: int) -> int:
    """The learner's JAX PRNG seed (the trainer acts with ``seed`` itself)."""
    return seed + 1
