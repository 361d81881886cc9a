"""Starts, supervises and tears down the distributed system: inference server, coordinator, Reverb replay,
learner, env actors, evaluator.

The data flow: env actors (``actors.actor.EnvActor``) step their envs with the combined policy, asking the
inference server for base chunks, and write transitions to replay (``replay.service.ReplayService``); the
learner (``learner.service.LearnerService``) samples them, updates, and publishes versioned weights through
the coordinator (``orchestration.coordinator.Coordinator``), from which actors pull them without blocking.

The launcher process is the supervisor. It makes the plain service classes Ray actors (``ROLES``: restart
policy and concurrency of each) and keeps the run going through any single fault:

- an env actor that dies is restarted by Ray; the launcher re-issues its ``run`` (fresh episode seeds);
- a learner that dies is replaced by a new one restored from the newest learner checkpoint (one is written right
  after pretraining): the updates since that checkpoint are lost, actors take its (older) weights;
- a replay server that dies is restarted from its newest checkpoint at a new address, which the learner and the
  actors read from the coordinator when their connection fails: the transitions since that checkpoint are lost;
- an inference replica that dies is replaced by Serve; actors and evaluation wait (``PatientChunkSource``);
- a rollout worker that dies during an evaluation is restarted by Ray and its scenes re-run.

Each restart is logged with what was lost, counted by the coordinator (``csil_component_restarts``) and listed
in the summary (``restarts``, ``faults``). A component that dies a fourth time within 10 minutes, or a learner
whose loss turns non-finite, ends the run with a clear error (``failed`` in the summary, exit code 1); the failed
component's last good checkpoint is kept.

The launcher also has the evaluator (``orchestration.evaluator.Evaluator``) evaluate the newest weights every
``eval_every`` env steps on a background thread, checkpoints learner and replay every ``checkpoint_every_s`` and
on SIGTERM/SIGINT (which also interrupt pretraining within a step: nothing of it is kept, and ``--resume``
pretrains again), and at the end re-evaluates the best parameters ``final_eval_rounds`` × ``eval_episodes``
times (the paper's protocol).

``--resume`` continues a run from its checkpoints: learner state and counters, the replay tables, the eval
history and the best parameters so far.

Placement: on a cluster from deploy/cluster.yaml the coordinator, replay and learner go to the head
(``csil_learner``), actors to CPU workers (``csil_actor``) and inference replicas to GPU workers
(``csil_inference``); on a plain Ray they go wherever Ray puts them. ``--actor-env`` runs env actors and the
evaluator's rollout workers on another interpreter (``csil.ray_utils.python_env``), e.g. robosuite 1.4 for
MimicGen's tasks, while learner, replay and inference stay in the launcher's environment.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import signal
import time
from pathlib import Path

import jax
import ray
from tqdm import tqdm

from actors.actor import EnvActor
from actors.rollout import RolloutsCancelled
from csil.acting import small_policy_spec
from csil.config import InferenceServerConfig, LaunchConfig
from csil.demos import read_demos, spec_from_demos
from csil.envs import CsilEnv
from csil.hetstat import SmallPolicy
from csil.specs import ONLINE_TABLE, BaseObsSpec
from csil.ray_utils import ensure_ray, python_env, role_resources
from csil.tasks import get_task
from inference_server import app
from inference_server.client import connect_base_policy
from learner.pretrain import PretrainingStopped
from learner.service import LearnerService
from orchestration.coordinator import Coordinator
from orchestration.evaluator import Evaluator, crossed, evaluate_policy, write_eval_results
from orchestration.faults import ComponentFailed, ReplicaWatch, RestartBudget
from orchestration.pipeline import ensure_base_policy, ensure_demos
from orchestration.tracking import RunTracker
from replay.service import ReplayService

log = logging.getLogger(__name__)

# The services as Ray actors: restart policy and concurrency (CPU and placement are chosen at start).
ROLES = {
    "replay": ray.remote(num_cpus=0, max_restarts=0)(ReplayService),
    "coordinator": ray.remote(num_cpus=0, max_restarts=0)(Coordinator),
    # threaded: run() loops while checkpoint(), stats(), params() and interrupt() answer
    "learner": ray.remote(max_restarts=0, max_concurrency=4)(LearnerService),
    "actor": ray.remote(max_restarts=-1, max_task_retries=0)(EnvActor),
}


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived before acting started."""


class System:
    def __init__(self, cfg: LaunchConfig, progress: bool = True):
        self.cfg, self.progress = cfg, progress
        self.task = get_task(cfg.task)
        self.actor_env = python_env(cfg.actor_env)  # env actors' and evaluator's interpreter, checked up front
        self.logdir = Path(cfg.logdir)
        if self.logdir.exists() and any(self.logdir.iterdir()) and not cfg.resume:
            raise FileExistsError(f"{self.logdir} already holds a run; pass --resume to continue it or pick --logdir")
        self.logdir.mkdir(parents=True, exist_ok=True)
        (self.logdir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2, default=str))
        self.demos_path = str(cfg.demos or ensure_demos(self.task.name, cfg.obs_mode, cfg.num_demos))
        self.base_dir = str(cfg.base_checkpoint or ensure_base_policy(self.task.name, obs_mode=cfg.base_obs))
        data = read_demos(self.demos_path, num_demos=cfg.num_demos)
        self.spec = small_policy_spec(spec_from_demos(self.demos_path, data.episodes[0].obs, cfg.obs_mode),
                                      cfg.action_mode)
        self.network = SmallPolicy(cfg.agent.policy, self.spec.cameras, cfg.agent.encoder)  # actors, evaluator
        ensure_ray(cfg.address)
        self.tracker = RunTracker(self.logdir, dataclasses.asdict(cfg), cfg.wandb)
        # Evaluation asks the same base-policy server as the actors: it measures what they run.
        self.evaluator = Evaluator(functools.partial(self._evaluate, cfg.base_policy), cfg.eval_episodes, cfg.seed,
                                   self.logdir, cfg.eval_videos, self.tracker)
        self.stop_requested = False
        self.actors: list = []
        self.runs: dict[int, ray.ObjectRef] = {}
        self.inference = self.replicas = self.replay_ping = None
        self.budget = RestartBudget()
        self.restarts: dict[str, int] = {}  # in-run restarts per component (the coordinator's count)
        self.faults: list[dict] = []  # what happened, for the summary
        self.learner_updates = 0
        self.learner_metrics: dict = {}  # the learner's newest record sent to TensorBoard/W&B

    def _evaluate(self, base: str, params, first_scene: int, episodes: int, videos: int, stop) -> dict:
        result = evaluate_policy(self.task, self.cfg.obs_mode, base, params, self.network, self.cfg.action_mode,
                                 episodes, first_scene, videos, self.cfg.video_stride, self.actor_env, stop)
        for _ in range(result["worker_restarts"]):  # on the evaluator's thread; the coordinator serialises
            self._record("evaluation", "a rollout worker died; Ray restarted it and re-ran its scenes", "nothing")
        return result

    # --- start --------------------------------------------------------------------------------------

    def _start(self) -> None:
        cfg = self.cfg
        learner_ckpt = self.logdir / "checkpoints" / "learner"
        resume_learner = cfg.resume and any(learner_ckpt.glob("[0-9]*/record.json"))
        if cfg.resume and not resume_learner:
            log.warning("--resume: %s holds no learner checkpoint (the run stopped during pretraining): "
                        "pretraining again", learner_ckpt)
        self.coordinator = ROLES["coordinator"].options(resources=role_resources("head")).remote()
        self._start_replay(restore=resume_learner)
        self.replay_restored = self.replay_sizes if resume_learner else None
        counters = self._start_learner(pretrain=not resume_learner)
        ray.get(self.learner.stats.remote())  # placed (and holding its GPU) before inference replicas ask for one
        if cfg.base_policy == "local":  # started while the learner pretrains
            # Reserves no CPU, like the other services of a run (an inference node's GPU is what it needs).
            self.inference = app.start(InferenceServerConfig(checkpoint=self.base_dir, port=cfg.serve_port,
                                                             grpc_port=None, num_cpus=0.0))
            self.replicas = ReplicaWatch(self.inference.handle, num_replicas=1)
        self._check_base_policy()
        counters = self._wait_for_pretraining(counters, show=not resume_learner)
        self.env_steps_offset = counters.get("env_steps", 0) if resume_learner else 0
        if not resume_learner:
            self.checkpoint(0)  # from here on a learner or replay that dies restarts from a checkpoint
        if cfg.resume:
            self.evaluator.load(self.network.init(jax.random.PRNGKey(0), {
                k: v.zeros((1,)) for k, v in self.spec.arrays().items()}))
        actor = ROLES["actor"].options(resources=role_resources("actor"), runtime_env=self.actor_env)
        self.actors = [actor.remote(i, cfg, self.replay_address, self.coordinator, self.network)
                       for i in range(cfg.actors)]
        self.runs = {i: a.run.remote() for i, a in enumerate(self.actors)}
        self.learner_run = self.learner.run.remote()

    def _check_base_policy(self) -> None:
        """Up front, not in every actor: the base policy's server must ask for what this task's env can render
        (``csil.specs.BaseObsSpec``). A server given by URL that does not answer yet is left to the actors, which
        wait for it."""
        try:
            with connect_base_policy(self.cfg.base_policy, timeout_s=self.cfg.base_policy_timeout_s) as client:
                spec = BaseObsSpec.from_metadata(client.metadata)
        except ConnectionError as e:
            log.warning("could not check the base policy's observation spec up front (%s); actors will wait", e)
            return
        CsilEnv(self.task, self.cfg.obs_mode, base_spec=spec).close()  # raises, naming both, on a mismatch
        log.info("base policy %s asks for state %s and images %s", self.cfg.base_policy, list(spec.state_keys),
                 [f"{i.key}: {i.camera} {i.size}x{i.size}" for i in spec.images])

    def _start_replay(self, restore: bool) -> None:
        """The replay service (restored from its checkpoint with ``restore``), its address told to the coordinator."""
        self.replay = ROLES["replay"].options(resources=role_resources("head")).remote(
            self.cfg.replay(), self.spec.to_json(), str(self.logdir / "checkpoints" / "replay"), restore)
        self.replay_address = ray.get(self.replay.get_address.remote())
        self.replay_sizes = ray.get(self.replay.sizes.remote())
        ray.get(self.coordinator.set_replay.remote(self.replay_address))

    def _start_learner(self, pretrain: bool) -> ray.ObjectRef:
        """The learner service; returns its ``pretrain`` (fresh) or ``restore`` (newest checkpoint) call."""
        gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        self.learner = ROLES["learner"].options(num_cpus=1, num_gpus=gpus, resources=role_resources("head")).remote(
            self.cfg, self.spec.to_json(), self.demos_path, self.replay_address, self.coordinator, str(self.logdir))
        return self.learner.pretrain.remote() if pretrain else self.learner.restore.remote()

    def _wait_for_pretraining(self, ref, show: bool) -> dict:
        """The learner's pretrain/restore result, with a progress bar of its BC + critic pretraining steps; a
        stop request interrupts pretraining (``Interrupted``)."""
        total = ray.get(self.learner.stats.remote())["pretrain"]["total"]
        with tqdm(total=total, desc="pretraining (BC + critic)", unit="step", mininterval=1.0,
                  disable=not self.progress or not show) as bar:
            while not ray.wait([ref], timeout=1.0)[0]:
                if self.stop_requested:
                    ray.get(self.learner.interrupt.remote())
                    break
                bar.update(ray.get(self.learner.stats.remote())["pretrain"]["steps"] - bar.n)
            try:
                result = ray.get(ref)
            except ray.exceptions.RayTaskError as e:
                if isinstance(e.cause, PretrainingStopped):
                    raise Interrupted(str(e.cause)) from None
                raise
            bar.update(total - bar.n)
        return result

    # --- supervision ----------------------------------------------------------------------------------

    def _supervise(self) -> None:
        """Restart what died (or raise ``ComponentFailed``); called once a second while the run acts."""
        for i, ref in list(self.runs.items()):
            if ray.wait([ref], timeout=0)[0]:
                try:
                    ray.get(ref)
                except ray.exceptions.ActorUnavailableError:  # Ray is still restarting it: ask again next second
                    pass
                except ray.exceptions.RayActorError as e:
                    log.warning("actor %d died (%s); Ray restarts it, re-issuing its run", i, type(e).__name__)
                    self.budget.spend(f"actor {i}")
                    self.faults.append({"component": "actor", "time": round(time.time(), 1),
                                        "what": f"actor {i} died ({type(e).__name__}); Ray restarted it",
                                        "lost": "its episodes in progress and up to 5 unconfirmed inserts"})
                except ray.exceptions.RayTaskError as e:  # its loop raised: log it, run it again (budgeted)
                    log.error("actor %d's run failed: %s; re-issuing it", i, e.cause)
                    self.budget.spend(f"actor {i}")
                if not self.stop_requested:
                    self.runs[i] = self.actors[i].run.remote()
        if ray.wait([self.learner_run], timeout=0)[0]:
            try:
                ray.get(self.learner_run)
            except ray.exceptions.RayTaskError as e:
                if isinstance(e.cause, FloatingPointError):
                    raise ComponentFailed("learner", f"{e.cause}; the last checkpoint is kept") from None
                raise
            except ray.exceptions.RayActorError as e:
                self._restart_learner(type(e).__name__)
        if self.replay_ping is None:
            self.replay_ping = self.replay.sizes.remote()
        elif ray.wait([self.replay_ping], timeout=0)[0]:
            try:
                self.replay_sizes = ray.get(self.replay_ping)
            except ray.exceptions.RayActorError as e:
                self._restart_replay(type(e).__name__)
            self.replay_ping = None
        if self.replicas is not None and self.replicas.replaced > self.restarts.get("inference", 0):
            self.budget.spend("inference")
            self._record("inference", "Serve replaced a dead inference replica; actors reconnected", "nothing")

    def _record(self, component: str, what: str, lost: str, **details) -> None:
        """Count a restart (coordinator and metric) and keep its event for the summary."""
        self.restarts[component] = ray.get(self.coordinator.record_restart.remote(component))
        self.faults.append({"component": component, "time": round(time.time(), 1), "what": what, "lost": lost,
                            **details})
        log.warning("%s restarted: %s; lost: %s", component, what, lost)

    def _restart_learner(self, why: str) -> None:
        """A new learner from the newest checkpoint; what it had learnt since is lost, the run goes on."""
        self.budget.spend("learner")  # before starting anything: a crash loop ends here
        before = self.learner_updates
        ray.kill(self.learner, no_restart=True)
        counters = ray.get(self._start_learner(pretrain=False))
        self._record("learner", f"died ({why}); restored from its checkpoint at update {counters['updates']}",
                     f"{max(before - counters['updates'], 0)} updates since that checkpoint")
        self.learner_run = self.learner.run.remote()

    def _restart_replay(self, why: str) -> None:
        """A new replay server from its newest checkpoint, at a new address learner and actors reconnect to."""
        self.budget.spend("replay")
        before = self.replay_sizes  # as of the last poll, a second or so before it died
        self._start_replay(restore=True)
        online = self.replay_sizes.get(ONLINE_TABLE, 0)
        self._record("replay", f"died ({why}); restored {online:,} online transitions from its last checkpoint",
                     f"the transitions written after that checkpoint (the last poll counted "
                     f"{before.get(ONLINE_TABLE, 0):,} online)", restored=self.replay_sizes)

    def evaluate(self, env_steps: int) -> None:
        """Evaluate the learner's current weights in the background (skipped, with a warning, while the learner
        is dead: supervision restarts it and the next evaluation goes ahead)."""
        if self.cfg.eval_episodes:
            params = self._alive(self.learner.params, None)
            if params is None:
                log.warning("no evaluation at %d env steps: the learner is being restarted", env_steps)
                return
            self.evaluator.submit(env_steps, *params)

    # --- the run ------------------------------------------------------------------------------------

    def checkpoint(self, env_steps: int, skip: str | None = None) -> str | None:
        """Learner and replay checkpoints (not ``skip``'s: a failed component keeps its last good one); the
        replay checkpoint's path (None if skipped).

        With the replay on the learner's device, Reverb's queue goes first: a transition the learner drains in
        between is then in both checkpoints (restored twice), never in neither. (What a stopped learner's input
        pipeline had already taken from the queue, up to ``fuse_updates`` + ~8 transitions, is in neither.)"""
        learner = (lambda: []) if skip == "learner" else (lambda: [self.learner.checkpoint.remote(env_steps)])
        replay = [] if skip == "replay" else [self.replay.checkpoint.remote()]
        if self.cfg.replay_on_device:
            ray.get(replay)
        ray.get(learner() + replay)
        return ray.get(replay[0]) if replay else None

    @staticmethod
    def _alive(method, fallback):
        """``method()`` of a service, or ``fallback`` if the service is dead."""
        try:
            return ray.get(method.remote(), timeout=30)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            return fallback

    def run(self) -> dict:
        start = time.time()
        previous = {s: signal.signal(s, self._request_stop) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            try:
                self._start()
            except Interrupted as e:
                return self._summary(start, {"interrupted": True, "phase": "pretraining", "note": str(e)})
            history = self.evaluator.history
            if not history or history[-1]["env_steps"] != self.env_steps_offset:
                self.evaluate(self.env_steps_offset)
            acting_since = time.time()
            try:
                self._act(acting_since)
                failure = None
            except ComponentFailed as e:
                log.error("%s", e)
                failure = e
            return self._finish(start, acting_since, failure)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            self._teardown()

    def _act(self, acting_since: float) -> None:
        """Supervise until the env-step budget (or ``duration_s``, or a stop request)."""
        cfg = self.cfg
        bar = tqdm(total=cfg.env_steps, initial=self.env_steps_offset, desc="csil-launch", unit="step",
                   disable=not self.progress, mininterval=1.0)
        last_steps = env_steps = self.env_steps_offset
        last_ckpt = last_time = time.time()
        blocked_s = 0.0
        with (self.logdir / "progress.jsonl").open("a") as progress:
            while not self.stop_requested:
                time.sleep(1.0)
                stats = ray.get(self.coordinator.stats.remote())
                env_steps = self.env_steps_offset + stats["env_steps"]
                self._supervise()
                self.evaluator.collect()
                # a learner that died since _supervise looked is restarted on the next pass, not a crash here
                learner = self._alive(self.learner.stats, {"updates": self.learner_updates, "updates_per_s": 0.0,
                                                           "metrics": self.learner_metrics})
                self.learner_updates = learner["updates"]
                now, blocked = time.time(), sum(a["blocked_s"] for a in stats["actors"].values())
                self.tracker.scalars(env_steps, {
                    "system/env_steps_per_s": (env_steps - last_steps) / (now - last_time),
                    "system/updates_per_s": learner["updates_per_s"],
                    "system/rate_limited_fraction": (blocked - blocked_s) / ((now - last_time) * cfg.actors),
                    "system/weight_staleness": stats["staleness"],
                    "system/restarts": sum(stats["component_restarts"].values()),
                    "actors/train_success": stats["train_success"], "actors/episode_return": stats["train_return"],
                    "actors/episodes": stats["episodes"], "learner/updates": learner["updates"]})
                self._track_learner(env_steps, learner["metrics"])
                last_time, blocked_s = now, blocked
                progress.write(json.dumps({"time": round(time.time(), 3), "env_steps": env_steps,
                                           "updates": learner["updates"], "updates_per_s": learner["updates_per_s"],
                                           "blocked_s": blocked,
                                           "staleness": stats["staleness"]}) + "\n")
                progress.flush()
                bar.update(env_steps - last_steps)
                last = self.evaluator.last_success()
                bar.set_postfix({"updates/s": f"{learner['updates_per_s']:.1f}",
                                 "eval": "-" if last is None else f"{last:.0%}",
                                 "restarts": sum(stats["component_restarts"].values())})
                if cfg.eval_episodes and crossed(env_steps, last_steps, cfg.eval_every) and env_steps < cfg.env_steps:
                    self.evaluate(env_steps)
                last_steps = env_steps
                if time.time() - last_ckpt > cfg.checkpoint_every_s:
                    try:
                        self.checkpoint(env_steps)
                        last_ckpt = time.time()
                    except ray.exceptions.RayActorError:  # died since _supervise looked: retried next pass
                        log.warning("periodic checkpoint at %d env steps deferred: a component is being restarted",
                                    env_steps)
                if env_steps >= cfg.env_steps or (cfg.duration_s and time.time() - acting_since >= cfg.duration_s):
                    break
        bar.close()

    def _track_learner(self, env_steps: int, metrics: dict) -> None:
        """The learner's newest record (each learner's first update, then every 100) to TensorBoard/W&B, once."""
        if metrics and metrics != self.learner_metrics:
            self.learner_metrics = metrics
            self.tracker.scalars(env_steps, {f"learner/{k}": v for k, v in metrics.items()})

    def _finish(self, start: float, acting_since: float, failure: ComponentFailed | None) -> dict:
        """Stop actors and learner, checkpoint, evaluate (unless interrupted or failed), write the summary. A
        failed component is not checkpointed: its last good checkpoint stays the one to resume from."""
        cfg = self.cfg
        ray.get(self.coordinator.stop.remote())
        failed = failure.component if failure else None
        if failed != "learner":
            ray.get(self.learner_run)
        acting_s = time.time() - acting_since
        ray.wait(list(self.runs.values()), num_returns=len(self.runs), timeout=30)
        stats = ray.get(self.coordinator.stats.remote())
        learner = self._alive(self.learner.stats, {"updates": self.learner_updates, "run_s": None, "wait_s": None})
        env_steps = self.env_steps_offset + stats["env_steps"]
        self._track_learner(env_steps, learner.get("metrics", {}))  # a record made since the last poll
        replay_checkpoint = self.checkpoint(env_steps, skip=failed)
        # the tables as checkpointed (what --resume restores), or as last seen if the replay failed
        replay_sizes = ray.get(self.replay.checkpointed_sizes.remote(replay_checkpoint)) if replay_checkpoint \
            else self._alive(self.replay.sizes, self.replay_sizes)
        summary = {"env_steps": env_steps, "learner_updates": learner["updates"],
                   "interrupted": self.stop_requested, "actor_restarts": sum(stats["restarts"].values()),
                   "restarts": stats["component_restarts"], "faults": self.faults,
                   "mean_staleness": stats["staleness"], "acting_s": round(acting_s, 1),
                   "replay_sizes": replay_sizes,
                   "replay_restored": self.replay_restored,
                   "actors": stats["actors"], "learner": {k: learner[k] for k in ("updates", "run_s", "wait_s")}}
        if failure is not None:
            summary["failed"] = str(failure)
        elif not self.stop_requested and cfg.eval_episodes:
            try:
                self.evaluate(env_steps)
                summary.update(self.evaluator.reevaluate_best(cfg.final_eval_rounds))
            except RolloutsCancelled:  # stopped during the final evaluations: checkpointed all the same
                summary["interrupted"] = True
        self.evaluator.collect(wait=True)
        if self.evaluator.history:
            write_eval_results(self.logdir, self.evaluator.history, f"{cfg.algo} ({cfg.action_mode})",
                               self.task.name)
        return self._summary(start, summary)

    def _summary(self, start: float, fields: dict) -> dict:
        summary = {"task": self.cfg.task, "algo": self.cfg.algo, **fields, "wall_s": round(time.time() - start, 1),
                   "logdir": str(self.logdir)}
        (self.logdir / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary

    def _teardown(self) -> None:
        """Release everything this run started on the cluster (the next run in this Ray starts clean)."""
        self.evaluator.close()
        self.tracker.close()
        if self.replicas is not None:
            self.replicas.stop.set()
        for handle in [*self.actors, *(getattr(self, n, None) for n in ("learner", "replay", "coordinator"))]:
            if handle is not None:
                ray.kill(handle, no_restart=True)
        if self.inference is not None:
            app.stop(self.inference.app_name)

    def _request_stop(self, signum, frame) -> None:
        log.warning("signal %d: stopping (pretraining is discarded; after it, learner and replay are "
                    "checkpointed)", signum)
        self.stop_requested = True
        self.evaluator.cancel()
