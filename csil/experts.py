"""Scripted expert policies that read the true simulator state: demonstrations without a human.

Every expert is a short list of phases (hover, descend, close, lift, carry, place, release). Each phase
drives the gripper site towards a target pose with one proportional controller and ends when the target
is reached, after a fixed number of steps (gripper holds), or on a timeout. Targets are re-read from the
simulator every step, so a nut that slips in the fingers is still steered onto its peg.

Scripted demos are far more stereotyped than human ones; ``noise > 0`` widens the states they visit with
Gaussian action noise on the arm dimensions plus per-episode offsets of hover heights, grasp points and
speeds, all drawn from ``np.random.default_rng(seed)``. ``noise=0`` gives a deterministic expert.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import mujoco
import numpy as np

from csil.envs import CsilEnv

DEFAULT_NOISE = 0.15
"""Action-noise std (in action units) that the experts are measured at; still >= 95% success."""

POS_SCALE = 0.05  # metres per action unit (robosuite OSC_POSE output_max)
ROT_SCALE = 0.5  # radians per action unit
OPEN, CLOSE = -1.0, 1.0
WRIST_LIMIT = 2.6  # |joint 7| we plan to stay under; the Panda stops at 2.9 rad

Target = tuple[np.ndarray, float]  # gripper-site position (world) and finger-axis yaw (world, radians)


def wrap(angle: float) -> float:
    """Angle in [-pi, pi)."""
    return float((angle + np.pi) % (2 * np.pi) - np.pi)


def nearest_yaw(yaw: float, reference: float, period: float) -> float:
    """The yaw equivalent to ``yaw`` modulo ``period`` closest to ``reference``: symmetric objects can be
    grasped at any of their symmetric yaws, and the closest one needs the least wrist rotation."""
    return reference + float((yaw - reference + period / 2) % period - period / 2)


def yaw_of(rot: np.ndarray) -> float:
    """Heading of a frame's x axis in the world xy plane."""
    return float(np.arctan2(rot[1, 0], rot[0, 0]))


def down_rotation(yaw: float) -> np.ndarray:
    """Gripper-site frame pointing straight down with the finger axis (site x) at ``yaw``."""
    c, s = np.cos(yaw), np.sin(yaw)
    return np.array([[c, s, 0.0], [s, -c, 0.0], [0.0, 0.0, -1.0]])


def rotvec(rot: np.ndarray) -> np.ndarray:
    """Axis-angle vector (shortest way round) of a rotation matrix: the OSC_POSE rotation delta."""
    quat, vec = np.empty(4), np.empty(3)
    mujoco.mju_mat2Quat(quat, np.ascontiguousarray(rot).ravel())
    mujoco.mju_quat2Vel(vec, quat, 1.0)
    return vec


@dataclasses.dataclass(frozen=True)
class Phase:
    """One step of a plan: move towards ``target`` with the gripper at ``gripper`` until done.

    Done when the position error is below ``tol`` and the yaw error below ``yaw_tol``, or after ``hold``
    steps when ``hold`` is set (gripper open/close waits), or after ``max_steps`` in any case so that a
    blocked motion (a nut resting on the peg rim) cannot stall the episode. If ``verify`` then returns
    False (a stalled descent, an object that slipped out of the fingers), the plan starts over from the
    latest phase marked ``start`` (the hover of the current pick), or from the beginning if none is.
    """

    name: str
    target: Callable[[], Target]
    gripper: float
    tol: float = 0.01
    yaw_tol: float = 0.05
    hold: int | None = None
    max_steps: int = 100
    # Cap on how far below the gripper the target may be: descending in small steps keeps the xy error
    # dominant in the action, so whatever is below stays centred between the fingers on the way down.
    max_drop: float = np.inf
    noise: float = 1.0  # action-noise multiplier: lower where precision matters, as a careful operator
    error: Callable[[], np.ndarray] | None = None  # what ``tol`` is checked on; default: target - eef
    verify: Callable[[], bool] | None = None
    abort: Callable[[], bool] | None = None  # checked every step: True starts over as a failed ``verify`` does
    start: bool = False  # where a failed ``verify`` later in the plan starts over (one object of several)


class ScriptedExpert:
    """Phase machine and P-controller shared by all tasks; subclasses only write ``plan``."""

    task: str = ""

    def __init__(self, noise: float = 0.0, seed: int | None = None):
        if noise < 0:
            raise ValueError(f"noise must be >= 0, got {noise}")
        self.noise = float(noise)
        self.rng = np.random.default_rng(seed)
        self._env: CsilEnv | None = None
        self._phases: list[Phase] = []
        self._index = 0
        self._count = 0
        self.entry = np.zeros(3)  # gripper position when the current phase began
        self.speed = 1.0

    # --- simulator access ---------------------------------------------------------------------------

    @property
    def sim(self):
        return self._env.env.sim

    def eef_pos(self) -> np.ndarray:
        robot = self._env.env.robots[0]
        return self.sim.data.site_xpos[robot.eef_site_id["right"]].copy()

    def eef_rot(self) -> np.ndarray:
        robot = self._env.env.robots[0]
        return self.sim.data.site_xmat[robot.eef_site_id["right"]].reshape(3, 3).copy()

    def eef_yaw(self) -> float:
        """Finger-axis heading: the site's x axis is the direction the two finger pads close along."""
        return yaw_of(self.eef_rot())

    def wrist_angle(self) -> float:
        robot = self._env.env.robots[0]
        return float(self.sim.data.qpos[robot._ref_joint_pos_indexes[-1]])

    def body_pos(self, name: str) -> np.ndarray:
        return self.sim.data.body_xpos[self.sim.model.body_name2id(name)].copy()

    def body_rot(self, name: str) -> np.ndarray:
        return self.sim.data.body_xmat[self.sim.model.body_name2id(name)].reshape(3, 3).copy()

    def geom_half_size(self, name: str) -> np.ndarray:
        return self.sim.model.geom_size[self.sim.model.geom_name2id(name)].copy()

    # --- noise ---------------------------------------------------------------------------------------

    def jitter(self, scale: float, size: int | None = None) -> float | np.ndarray:
        """Per-episode offset, uniform in +-(noise * scale); zero (and no draw) when noise is 0."""
        if self.noise == 0.0:
            return 0.0 if size is None else np.zeros(size)
        return self.rng.uniform(-1.0, 1.0, size) * self.noise * scale

    # --- policy --------------------------------------------------------------------------------------

    def plan(self) -> list[Phase]:
        """The task's phases; called once per episode from ``reset`` with the scene already loaded."""
        raise NotImplementedError

    def reset(self, env: CsilEnv) -> None:
        self._env = env
        # Slower episodes visit more intermediate states, as slower human operators do.
        self.speed = 1.0 - float(abs(self.jitter(2.0)))
        self._phases = self.plan()
        self._enter(0)

    @property
    def phase(self) -> str:
        """Name of the current phase, for logging and debugging demos."""
        return self._phases[self._index].name

    def act(self, env: CsilEnv) -> np.ndarray:
        if env is not self._env:
            raise RuntimeError("call reset(env) after env.reset() before act(env)")
        phase = self._phases[self._index]
        pos, yaw = phase.target()
        pos[2] = max(pos[2], self.eef_pos()[2] - phase.max_drop)
        action = np.zeros(7)
        action[0:3] = self.move(pos, self.speed)
        action[3:6] = self.turn(yaw)
        action[6] = phase.gripper
        if self.noise > 0.0:
            action[:6] += self.rng.normal(0.0, self.noise * phase.noise, 6)
        self._count += 1
        if phase.abort is not None and phase.abort():
            self._enter(self._restart_index())
        elif self._index < len(self._phases) - 1 and self._done(phase, pos, yaw):
            retry = phase.verify is not None and not phase.verify()
            self._enter(self._restart_index() if retry else self._index + 1)
        return np.clip(action, -1.0, 1.0).astype(np.float32)

    def _restart_index(self) -> int:
        """The latest ``start`` phase at or before the current one: a failed grasp of the second nut
        retries that nut, it does not go back to the first (already placed) one."""
        return max((i for i in range(self._index + 1) if self._phases[i].start), default=0)

    def _enter(self, index: int) -> None:
        self._index, self._count, self.entry = index, 0, self.eef_pos()

    def move(self, target: np.ndarray, speed: float) -> np.ndarray:
        """Position P-control: one action unit per 5 cm of error, scaled down as a whole (not clipped per
        axis) to at most ``speed`` so the gripper moves in a straight line towards the target."""
        delta = (target - self.eef_pos()) / POS_SCALE
        largest = np.max(np.abs(delta))
        return delta * (speed / largest) if largest > speed else delta

    def turn(self, yaw: float) -> np.ndarray:
        """Orientation P-control towards 'pointing straight down at ``yaw``'; tilt is corrected too."""
        return np.clip(rotvec(down_rotation(yaw) @ self.eef_rot().T) / ROT_SCALE, -1.0, 1.0)

    def _done(self, phase: Phase, pos: np.ndarray, yaw: float) -> bool:
        if phase.hold is not None:
            return self._count >= phase.hold
        if self._count >= phase.max_steps:
            return True
        error = phase.error() if phase.error is not None else pos - self.eef_pos()
        return bool(np.linalg.norm(error) < phase.tol and abs(wrap(yaw - self.eef_yaw())) < phase.yaw_tol)

    # --- phases every pick-and-place shares ----------------------------------------------------------

    def pick(self, grasp: Callable[[], Target], hover: float, lift_z: float, tol: float = 0.01) -> list[Phase]:
        """Hover above the grasp pose, descend onto it, close, and lift straight up to ``lift_z``.

        The grasp target is re-read every step until the fingers close (the object may still be settling
        or be nudged by the fingers); the lift keeps the xy where the fingers closed so the object is not
        dragged sideways. A grasp point that did not rise with the fingers means a failed grasp: retry.
        """
        hover_z = hover + float(self.jitter(0.2))
        lift_z += float(self.jitter(0.2))

        def above() -> Target:
            pos, yaw = grasp()
            return pos + [0.0, 0.0, hover_z], yaw

        def funnel() -> Target:
            """The grasp pose, but held higher the further off-centre the fingers are: an open finger that
            comes down on the object's side pushes it away or tips it over."""
            pos, yaw = grasp()
            off_centre = np.linalg.norm(pos[:2] - self.eef_pos()[:2])
            return pos + [0.0, 0.0, min(3.0 * max(off_centre - tol, 0.0), hover_z)], yaw

        def lifted() -> Target:
            return np.array([*self.entry[:2], lift_z]), self.eef_yaw()

        def holding() -> bool:
            return bool(np.linalg.norm(grasp()[0] - self.eef_pos()) < 0.03)

        def arrived() -> bool:
            """False when the descent stalled (a finger resting on the object's edge): approach again."""
            return bool(np.linalg.norm(grasp()[0] - self.eef_pos()) < 2 * tol)

        return [
            Phase("hover", above, OPEN, tol=2 * tol, yaw_tol=0.03, start=True),  # the funnel fixes the rest
            Phase("descend", funnel, OPEN, tol=tol, max_steps=50, max_drop=0.025, noise=0.5, verify=arrived),
            Phase("close", grasp, CLOSE, hold=10),  # the gripper command ramps -1 -> 1 in 10 steps
            Phase("lift", lifted, CLOSE, tol=0.02, verify=holding),
        ]

    def steer(self, error: Callable[[], np.ndarray], z: float | None = None,
              yaw: Callable[[], float] | None = None) -> Callable[[], Target]:
        """Target that moves the gripper by the held object's ``error`` (goal minus object), so the object,
        not the fingers, is what gets placed, however it sits in the fingers; at height ``z`` if given."""
        def target() -> Target:
            pos = self.eef_pos() + error()
            if z is not None:
                pos[2] = z
            return pos, self.eef_yaw() if yaw is None else yaw()
        return target

    def carry(self, error: Callable[[], np.ndarray], z: float, yaw: Callable[[], float] | None = None,
              yaw_tol: float = 0.05) -> list[Phase]:
        """Carry the held object at height ``z`` until it is over its goal: a coarse move with full noise,
        then a fine alignment (4 mm) with less noise, as an operator slows down before placing."""
        target = self.steer(error, z, yaw)

        def xy_error() -> np.ndarray:
            return error()[:2]

        return [
            Phase("carry", target, CLOSE, tol=0.02, yaw_tol=max(yaw_tol, 0.1), error=xy_error),
            Phase("align", target, CLOSE, tol=0.004, yaw_tol=yaw_tol, error=xy_error, noise=0.5),
        ]

    def release(self, rise: float = 0.1) -> list[Phase]:
        """Open in place, then back off upwards (robosuite counts a placement only once the gripper has
        let go and moved away from the object)."""

        def here() -> Target:
            return self.entry, self.eef_yaw()

        def up() -> Target:
            return self.entry + [0.0, 0.0, rise], self.eef_yaw()

        return [Phase("release", here, OPEN, hold=8), Phase("retreat", up, OPEN, tol=0.01)]


class LiftExpert(ScriptedExpert):
    """Grasp the cube from above with the fingers square to its faces and lift it."""

    task = "Lift"

    def plan(self) -> list[Phase]:
        offset = np.append(self.jitter(0.03, 2), -0.005)  # 5 mm below the centre: fingers get more face

        def grasp() -> Target:
            yaw = nearest_yaw(yaw_of(self.body_rot("cube_main")), self.eef_yaw(), np.pi / 2)
            return self.body_pos("cube_main") + offset, yaw

        return self.pick(grasp, hover=0.08, lift_z=1.05)


class StackExpert(ScriptedExpert):
    """Pick cube A like Lift, carry it over cube B steering on cube A's own position, lower and let go."""

    task = "Stack"

    def plan(self) -> list[Phase]:
        offset = np.append(self.jitter(0.03, 2), -0.005)
        half_a = self.geom_half_size("cubeA_g0")[2]
        half_b = self.geom_half_size("cubeB_g0")[2]
        carry_z = 0.95 + float(self.jitter(0.2))

        def grasp() -> Target:
            yaw = nearest_yaw(yaw_of(self.body_rot("cubeA_main")), self.eef_yaw(), np.pi / 2)
            return self.body_pos("cubeA_main") + offset, yaw

        def onto_b() -> np.ndarray:
            """Where cube A must go (centred on B, its bottom 4 mm above B's top) minus where it is."""
            goal = self.body_pos("cubeB_main") + [0.0, 0.0, half_b + half_a + 0.004]
            return goal - self.body_pos("cubeA_main")

        return [
            *self.pick(grasp, hover=0.08, lift_z=carry_z),
            *self.carry(onto_b, carry_z),
            Phase("lower", self.steer(onto_b), CLOSE, tol=0.004, max_steps=60, noise=0.5),
            *self.release(),
        ]


class CanExpert(ScriptedExpert):
    """Grasp the can from above at its body origin, lift it clear of the bin walls, carry it over the
    target bin and drop it from a few centimetres."""

    task = "Can"
    # Short of the target-bin centre (0.1975, 0.4025): at z ~ 1 the centre is at the edge of the Panda's
    # reach and the arm stalls there; this point is still well inside the success quadrant.
    DROP_XY = np.array([0.1675, 0.3425])

    def plan(self) -> list[Phase]:
        offset = np.append(self.jitter(0.03, 2), 0.0)
        drop = np.append(self.DROP_XY + self.jitter(0.1, 2), 0.95 + float(self.jitter(0.1)))
        carry_z = 1.0 + float(self.jitter(0.2))

        def grasp() -> Target:
            return self.body_pos("Can_main") + offset, self.eef_yaw()  # a cylinder: any yaw will do

        def fixed(pos: np.ndarray) -> Callable[[], Target]:
            return lambda: (pos, self.eef_yaw())

        return [
            *self.pick(grasp, hover=0.12, lift_z=carry_z),
            Phase("carry", fixed(np.append(drop[:2], carry_z)), CLOSE, tol=0.02),
            Phase("lower", fixed(drop), CLOSE, tol=0.01),
            *self.release(),
        ]


class NutExpert(ScriptedExpert):
    """Nut-on-peg placing shared by Square and NutAssembly: grasp a nut by its handle, turn it to an
    allowed heading, lower it over its peg, let go."""

    # The handle site is only ~1 cm (square nut) or ~6 mm (round nut) from the nut ring; fingers closing
    # there clip the ring, so grasp this far further out along the handle.
    HANDLE_OFFSET = {"SquareNut": 0.008, "RoundNut": 0.014}
    # Allowed nut headings (handle direction) at the peg. Square nut: multiples of 90 degrees align the
    # square hole with the axis-aligned peg. Not 0 (handle pointing away from the robot): the gripper
    # would then be at x ~ 0.29, the edge of the Panda's reach, which caused most failures. The round
    # nut fits its round peg at any heading; the same reach limit keeps its handle off the +x sector.
    PLACE_YAWS = {
        "SquareNut": (np.pi / 2, -np.pi / 2, np.pi),
        "RoundNut": tuple(y for y in np.linspace(-np.pi, np.pi, 24, endpoint=False) if abs(y) > np.pi / 2 - 1e-9),
    }

    # Square's settings; NutAssembly, which must come back from the first peg, changes them.
    REACH_WEIGHT = 0.0  # cost per unit of (1 + cos(nut heading at the peg)): handles away from the robot
    RELEASE_Z = 0.03  # nut height above the table where it is let go (success needs < 5 cm)
    CHECK_DROP = False  # a nut lost between lift and release is picked up again
    # Turn the nut to its peg heading right where it was lifted (near the robot), then carry it without
    # turning: the nut swings round the fingers as it turns, and steering on it while the arm is out over
    # the pegs drove the elbow straight against its limit, from where OSC cannot pull the arm back.
    TURN_FIRST = False

    def place_nut(self, nut: str, peg: str, avoid_yaw: float | None = None) -> list[Phase]:
        """Pick ``nut`` by its handle, carry it over ``peg``, lower it around the peg and let go.

        ``avoid_yaw``: a nut heading to prefer against (the handle pointing at a neighbouring peg whose
        nut is already in place), taken only if every other heading would overrun the wrist.
        """
        table_z = float(self._env.env.table_offset[2])
        outward = self.HANDLE_OFFSET[nut] + float(self.jitter(0.02))
        body = f"{nut}_main"
        handle_site = self.sim.model.site_name2id(f"{nut}_handle_site")
        plan: dict[str, float] = {}  # grasp yaw, nut heading at the peg and the turn left: set when the pick starts
        lift_z = 1.02

        def nut_yaw() -> float:
            return yaw_of(self.body_rot(body))

        def grasp() -> Target:
            if not plan:
                plan["grasp"], plan["place"], plan["turn"] = self._choose_yaws(nut, avoid_yaw)
            handle = self.body_rot(body)[:, 0]
            pos = self.sim.data.site_xpos[handle_site] + outward * handle
            # Fingers close across the handle (nut y axis); keep the side chosen when the pick began.
            return pos, nearest_yaw(nut_yaw() + np.pi / 2, plan["grasp"], np.pi)

        def onto_peg() -> np.ndarray:
            """Where the nut must go (around the peg, ``RELEASE_Z`` above the table) minus where it is."""
            goal = self.body_pos(peg)
            goal[2] = table_z + self.RELEASE_Z
            return goal - self.body_pos(body)

        def place_yaw() -> float:
            """Gripper yaw that turns the nut to the chosen heading, in the direction chosen with the grasp:
            the turn left is followed continuously (never re-wrapped), so a turn near 180 degrees cannot
            flip direction half way and run joint 7 into its limit; at most 1 rad ahead of the fingers."""
            plan["turn"] = nearest_yaw(plan["place"] - nut_yaw(), plan["turn"], 2 * np.pi)
            return self.eef_yaw() + float(np.clip(plan["turn"], -1.0, 1.0))

        def height_error() -> np.ndarray:
            return onto_peg()[2:]

        def dropped() -> bool:
            """The handle is no longer between the fingers: steering by the nut would fling the arm about."""
            return bool(np.linalg.norm(grasp()[0] - self.eef_pos()) > 0.04)

        def turned_in_place() -> Target:
            return np.array([*self.entry[:2], lift_z]), place_yaw()

        turning = [Phase("turn", turned_in_place, CLOSE, tol=0.02, yaw_tol=0.05)] if self.TURN_FIRST else []
        carrying = [*turning, *self.carry(onto_peg, lift_z, place_yaw, yaw_tol=0.03),
                    # Lower in 3 cm steps so the xy correction stays dominant while the nut slides down the peg.
                    Phase("lower", self.steer(onto_peg, yaw=place_yaw), CLOSE, tol=0.015, max_steps=40,
                          max_drop=0.03, error=height_error, noise=0.5)]
        if self.CHECK_DROP:
            carrying = [dataclasses.replace(phase, abort=dropped) for phase in carrying]
        return [*self.pick(grasp, hover=0.06, lift_z=lift_z, tol=0.005), *carrying, *self.release()]

    def _choose_yaws(self, nut: str, avoid_yaw: float | None = None) -> tuple[float, float, float]:
        """Which side to grasp the handle from, which way the nut faces at the peg, and the turn (signed)
        that gets it there.

        The grasp side is the one nearer the current finger yaw (at most 90 degrees of wrist turn). The
        wrist (joint 7) then turns again to turn the nut; of the allowed nut headings, take the one
        with the least turn that keeps joint 7 inside its range (the finger yaw grows as joint 7 falls),
        at the grasp and at the peg (a second nut starts with the wrist wherever the first one left it).
        The turn may go either way round (the long way when the short one would overrun joint 7); it is
        chosen here, once, and kept (``place_yaw``). With ``REACH_WEIGHT``, headings with the handle (and
        so the gripper) away from the robot cost more: placing with the handle sideways (gripper 6 cm
        further out) stretches the arm to joint 2's limit with the elbow (joint 4) almost straight, from
        where OSC cannot pull it back to a second nut.
        """
        start_yaw, wrist = self.eef_yaw(), self.wrist_angle()
        heading = yaw_of(self.body_rot(f"{nut}_main"))
        nearest = nearest_yaw(heading + np.pi / 2, start_yaw, np.pi)
        # The far side of the handle (90-270 degrees of turn before the grasp) only when the near side would
        # overrun joint 7 (a second nut, with the wrist where the first one left it): it shifts joint 7 by
        # 180 degrees. Not otherwise: a big turn before the grasp also swings joints 5 and 6 far round.
        grasps = (nearest,)
        if abs(wrist - (nearest - start_yaw)) > WRIST_LIMIT:
            grasps += (nearest - np.pi if nearest > start_yaw else nearest + np.pi,)

        def turns(place: float) -> tuple[float, float]:
            short = wrap(place - heading)
            return short, short - np.sign(short) * 2 * np.pi

        def cost(option: tuple[float, float, float]) -> float:
            grasp, place, turn = option
            grasped = wrist - (grasp - start_yaw)  # joint 7 once the fingers are across the handle
            overshoot = max(abs(grasped), abs(grasped - turn)) - WRIST_LIMIT
            near_avoided = avoid_yaw is not None and abs(wrap(place - avoid_yaw)) < np.pi / 3
            return (abs(grasp - start_yaw) + abs(turn) + 100.0 * max(overshoot, 0.0) + 10.0 * near_avoided
                    + self.REACH_WEIGHT * (1 + np.cos(place)))

        return min(((g, p, t) for g in grasps for p in self.PLACE_YAWS[nut] for t in turns(p)), key=cost)


class SquareExpert(NutExpert):
    """Grasp the square nut by its handle, turn it square to the peg, lower it over the peg, let go."""

    task = "Square"

    def plan(self) -> list[Phase]:
        return self.place_nut("SquareNut", "peg1")


class NutAssemblyExpert(NutExpert):
    """Both nuts, one after the other: the square nut onto the square peg (peg1, +y), then the round nut
    onto the round peg (peg2, -y), each as in Square but turned near the robot before the carry (the arm
    then never stretches out, so it comes back for the second nut). A failed grasp retries only the nut in
    hand; neither nut is placed with its handle pointing at the other peg (the fingers would come down next
    to the nut already there). 500 steps is tight for two nuts: no waypoint between them."""

    task = "NutAssembly"
    REACH_WEIGHT = 5.0  # a sideways handle costs more than the long way round (~3 rad more turn)
    # Let go 8 cm above the table (the nut is then 5 cm down the 13 cm peg and slides the rest): lowered to
    # 3 cm as in Square, the hand comes down on the peg's top, tilts, and the arm, stretched out over the
    # peg, ends with its elbow straight against its limit, from where OSC cannot pull it back to the
    # second nut (Square never needs to come back).
    RELEASE_Z = 0.08
    CHECK_DROP = True
    TURN_FIRST = True

    def plan(self) -> list[Phase]:
        return [
            *self.place_nut("SquareNut", "peg1", avoid_yaw=-np.pi / 2),
            *self.place_nut("RoundNut", "peg2", avoid_yaw=np.pi / 2),
        ]


def make_expert(task: str, noise: float = 0.0, seed: int | None = None) -> ScriptedExpert:
    """The scripted expert for one of ``EXPERT_TASKS``; ``DEFAULT_NOISE`` is the measured noisy setting."""
    if task not in _EXPERTS:
        raise ValueError(f"no scripted expert for task {task!r}; experts exist for {', '.join(EXPERT_TASKS)}")
    return _EXPERTS[task](noise=noise, seed=seed)


_EXPERTS: dict[str, type[ScriptedExpert]] = {cls.task: cls for cls in (LiftExpert, CanExpert, SquareExpert, NutAssemblyExpert, StackExpert)}
EXPERT_TASKS: tuple[str, ...] = tuple(_EXPERTS)
