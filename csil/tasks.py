"""Task registry: which robosuite environments we run, with the robomimic settings.

robomimic's benchmark settings (Panda, OSC_POSE delta control at 20 Hz, sparse reward, success ends the
episode, PH horizons) are fixed here once, so every service builds exactly the same environment from a
task name. MimicGen tasks (their D0 variants, MimicGen's horizons) need a second Python environment: robosuite
1.4.1 + mujoco 2.3.2 + the MimicGen sources (deploy/actor-env-rs14.sh, then MimicGen installed into it), where
``csil-launch --actor-env`` runs the env actors; building one anywhere else fails with an error that says so.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """Everything that identifies a task, independent of how it is observed."""

    name: str  # our name, used on every command line
    env_name: str  # robosuite environment class
    horizon: int  # robomimic PH rollout horizon (steps at 20 Hz)
    prompt: str  # language instruction sent to the base policy (openpi "prompt")
    env_kwargs: tuple[tuple[str, object], ...] = ()  # extra robosuite kwargs
    requires: str | None = None  # a package the installed stack lacks; None = runs here


ROBOSUITE_TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in (
        TaskSpec("Lift", "Lift", 400, "lift the red cube"),
        TaskSpec("Can", "PickPlaceCan", 400, "pick up the can and place it in the bin"),
        TaskSpec("Square", "NutAssemblySquare", 400, "put the square nut on the square peg"),
        TaskSpec("NutAssembly", "NutAssembly", 500, "put each nut on its matching peg"),
        TaskSpec("Stack", "Stack", 400, "stack the red cube on the green cube"),
    )
}

_MIMICGEN_NOTE = (
    "robosuite 1.4.1 + mujoco 2.3.2 + the MimicGen sources (git clone https://github.com/NVlabs/mimicgen; "
    "never `pip install mimicgen`, that PyPI name is an unrelated package) in a separate Python environment: "
    "build it with deploy/actor-env-rs14.sh, install MimicGen into it, and run csil-launch --actor-env VENV"
)

MIMICGEN_TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in (
        TaskSpec("Coffee", "Coffee_D0", 400, "make coffee", requires=_MIMICGEN_NOTE),
        TaskSpec("Threading", "Threading_D0", 400, "thread the needle", requires=_MIMICGEN_NOTE),
        TaskSpec("MugCleanup", "MugCleanup_D0", 500, "put the mug in the drawer", requires=_MIMICGEN_NOTE),
        TaskSpec("HammerCleanup", "HammerCleanup_D0", 500, "put the hammer in the drawer",
                 requires=_MIMICGEN_NOTE + ", plus robosuite-task-zoo"),
    )
}

ALL_TASKS: dict[str, TaskSpec] = {**ROBOSUITE_TASKS, **MIMICGEN_TASKS}

SUCCESS_REWARD = 1.0
"""robosuite's sparse reward (reward_scale 1) on a success state. Not "reward > 0": NutAssembly pays 0.5 per
nut on its peg, so one nut placed of two is a positive reward but not a success."""


def is_success(reward):
    """Success from a sparse robosuite reward (a float or an array of them, as in demo files)."""
    return reward >= SUCCESS_REWARD - 1e-6


class UnknownTaskError(ValueError):
    """A task name that is not in the registry."""


class TaskUnavailableError(RuntimeError):
    """A registered task whose simulator cannot run in this Python environment."""


def get_task(name: str) -> TaskSpec:
    """Look a task up by our name (or its robosuite class name); unknown names list what exists."""
    for task in ALL_TASKS.values():
        if name in (task.name, task.env_name):
            return task
    raise UnknownTaskError(
        f"unknown task {name!r}. Tasks that run here: {', '.join(ROBOSUITE_TASKS)}. "
        f"MimicGen tasks (need a separate environment): {', '.join(MIMICGEN_TASKS)}."
    )


def check_available(task: TaskSpec) -> None:
    """Raise a clear error if the task's simulator is not installed in this environment."""
    if task.requires is None:
        return
    try:
        import mimicgen  # noqa: F401  (registers the MimicGen envs with robosuite when it works)
        import robosuite

        if robosuite.__version__.startswith("1.4"):
            return
        found = f"robosuite {robosuite.__version__} is installed"
    except Exception as exc:  # ImportError, or mimicgen failing against robosuite 1.5
        found = f"importing it failed: {exc}"
    raise TaskUnavailableError(
        f"task {task.name!r} ({task.env_name}) is a MimicGen task; it needs {task.requires}. Here {found}."
    )
