"""``csil-bench replay``: what one transition costs the Reverb server, frames stored once vs the naive layout.

Both layouts hold the same transitions in the same table signature (the learner cannot tell them apart):

- ``naive``: the layout before shared frames, one single-step item per transition carrying ``obs`` and
  ``next_obs`` (every frame stored twice), written as the old writer did (Reverb still compresses each chunk).
- ``shared``: ``replay.writer.TransitionWriter``, each frame stored once, with the given chunk lengths (small
  columns, camera columns) and frame codec (raw frames, or JPEG as ``ReplayConfig.frame_codec="jpeg"``).

The transitions come from real robosuite episodes (the task's scripted expert with its default noise, rendered
through ``CsilEnv``), cycled with fresh episode ids to reach ``transitions`` and written round-robin from
``slots`` env slots as the actors do. Random frames would not compress and would mislead. Each layout gets its
own server in a child process: bytes per transition are its RSS growth over the inserts (the memory the head
node pays) and the serialized chunks of a checkpoint (the payload, without allocator overhead). Insert rate:
transitions/s through the writer until confirmed; sample rate: items/s through ``BatchIterator``.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import multiprocessing
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator

import numpy as np
import psutil
import reverb
import tree

from csil.config import ReplayConfig
from csil.envs import CsilEnv
from csil.experts import DEFAULT_NOISE, make_expert
from csil.specs import ONLINE_TABLE, ObsSpec, Transition
from replay.server import BatchIterator, ReplayServer, checkpoint_chunks
from replay.signature import conform, layout
from replay.writer import IMAGE_CHUNK_LENGTH, MAX_IN_FLIGHT, TransitionWriter

GIB = 2**30


def expert_episodes(task: str, obs_mode: str, episodes: int, seed: int) -> tuple[ObsSpec, list[list[Transition]]]:
    """``episodes`` rollouts of the task's scripted expert as transitions (next_obs of step t is obs of t+1)."""
    env = CsilEnv(task, obs_mode, seed=seed)
    out = []
    for episode in range(episodes):
        obs = env.reset(seed=seed + episode)
        expert = make_expert(env.task.name, noise=DEFAULT_NOISE, seed=seed + episode)
        expert.reset(env)
        steps, done = [], False
        while not done:
            action = np.clip(expert.act(env), -1, 1).astype(np.float32)
            next_obs, reward, success, truncated, _ = env.step(action)
            steps.append(Transition(obs=obs, action=action, base_action=action, reward=np.float32(reward),
                                    discount=np.float32(not success), next_obs=next_obs, next_action=action,
                                    policy_version=np.int64(0), episode_id=np.int64(0)))
            obs, done = next_obs, success or truncated
        out.append(steps)
    env.close()
    return env.spec, out


def slot_streams(episodes: list[list[Transition]], transitions: int, slots: int) -> list[list[Transition]]:
    """The episodes cycled into ``slots`` streams of whole episodes, each run with a fresh episode id, until they
    hold ``transitions`` in all (the last episode cut short)."""
    streams: list[list[Transition]] = [[] for _ in range(slots)]
    total = episode_id = 0
    while total < transitions:
        steps = episodes[episode_id % len(episodes)][: transitions - total]
        streams[episode_id % slots] += [t._replace(episode_id=np.int64(episode_id)) for t in steps]
        total, episode_id = total + len(steps), episode_id + 1
    return streams


def interleaved(streams: list[list[Transition]]) -> Iterator[tuple[int, Transition]]:
    """``(slot, transition)`` in the order an actor stepping all slots together writes them."""
    for step in itertools.zip_longest(*streams):
        yield from ((slot, t) for slot, t in enumerate(step) if t is not None)


def _serve(spec_json: str, capacity: int, checkpoint_dir: str, frame_codec: str, conn) -> None:
    """Child process: a ReplayServer whose limiter never blocks; sends its address, stops when told."""
    cfg = ReplayConfig(online_size=capacity, samples_per_insert=1.0, min_size=1, error_buffer_fraction=1e12,
                       frame_codec=frame_codec)
    with ReplayServer(cfg, ObsSpec.from_json(spec_json), checkpoint_dir=checkpoint_dir) as server:
        conn.send(server.address)
        conn.recv()


class ChildServer:
    """A ReplayServer alone in a child process, so that its memory can be measured."""

    def __init__(self, spec: ObsSpec, capacity: int, checkpoint_dir: str, frame_codec: str = "none"):
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._process = ctx.Process(target=_serve, args=(spec.to_json(), capacity, checkpoint_dir, frame_codec, child),
                                    daemon=True)
        self._process.start()
        self.address = self._conn.recv()

    def rss(self) -> int:
        return psutil.Process(self._process.pid).memory_info().rss

    def __enter__(self) -> ChildServer:
        return self

    def __exit__(self, *exc) -> None:
        self._conn.send("stop")
        self._process.join(timeout=30)


def write_naive(address: str, streams: list[list[Transition]]) -> None:
    """The old writer: per transition one step with obs and next_obs, one item on it, at most MAX_IN_FLIGHT
    unconfirmed."""
    client = reverb.Client(address)
    expected = layout(client.server_info()[ONLINE_TABLE].signature)
    with client.trajectory_writer(num_keep_alive_refs=1) as writer:
        for _, transition in interleaved(streams):
            writer.append(conform(transition._asdict(), expected, batched=False)[0])
            writer.create_item(ONLINE_TABLE, 1.0, tree.map_structure(lambda column: column[-1], writer.history))
            writer.flush(MAX_IN_FLIGHT)


def write_shared(address: str, streams: list[list[Transition]], chunk_length: int, image_chunk_length: int) -> None:
    with TransitionWriter(address, ONLINE_TABLE, chunk_length=chunk_length,
                          image_chunk_length=image_chunk_length) as writer:
        for slot, transition in interleaved(streams):
            writer.write(transition, slot)


def fill(server: ChildServer, streams: list[list[Transition]], write: Callable) -> dict:
    """``write(address, streams)`` into an empty server: RSS growth and checkpoint chunk bytes per transition,
    transitions/s until confirmed."""
    n = sum(map(len, streams))
    rss = server.rss()
    start = time.perf_counter()
    write(server.address, streams)
    inserts_per_s = n / (time.perf_counter() - start)
    rss = server.rss() - rss
    chunk_bytes = sum(map(len, checkpoint_chunks(reverb.Client(server.address).checkpoint())))
    return {"rss_bytes_per_transition": rss / n, "chunk_bytes_per_transition": chunk_bytes / n,
            "inserts_per_s": inserts_per_s}


def bench_replay(task: str, obs_mode: str, transitions: int, chunk_lengths: list[int], image_chunk_lengths: list[int],
                 episodes: int = 4, slots: int = 4, batch_size: int = 256, batches: int = 10, rounds: int = 5,
                 seed: int = 0, frame_codecs: tuple[str, ...] = ("none",)) -> list[dict]:
    """One record per (chunk length, camera chunk length, frame codec) layout (the last two only in image mode),
    each against the naive layout measured in the same run; every layout has its own live server and the
    sampling rounds are interleaved across them (medians reported)."""
    spec, rollouts = expert_episodes(task, obs_mode, episodes, seed)
    streams = slot_streams(rollouts, transitions, slots)
    raw = sum(x.nbytes for x in tree.flatten(streams[0][0]._asdict()))
    image = obs_mode == "image"
    layouts = list(itertools.product(chunk_lengths, image_chunk_lengths if image else [IMAGE_CHUNK_LENGTH],
                                     frame_codecs if image else ["none"]))
    writers = {"naive": write_naive} | {
        lay: functools.partial(write_shared, chunk_length=lay[0], image_chunk_length=lay[1]) for lay in layouts}
    with contextlib.ExitStack() as stack:
        results, iterators = {}, {}
        for name, write in writers.items():
            server = stack.enter_context(ChildServer(spec, transitions, stack.enter_context(
                tempfile.TemporaryDirectory()), "none" if name == "naive" else name[2]))
            results[name] = fill(server, streams, write)
            iterators[name] = BatchIterator(server.address, ONLINE_TABLE, batch_size, 1, spec)
            stack.callback(iterators[name].close)
        rates: dict = {name: [] for name in writers}
        for _ in range(rounds + 1):  # the first round warms up
            for name, iterator in iterators.items():
                start = time.perf_counter()
                for _ in range(batches):
                    next(iterator)
                rates[name].append(batches * batch_size / (time.perf_counter() - start))
    for name in writers:
        results[name]["samples_per_s"] = statistics.median(rates[name][1:])
    naive = results["naive"]
    frames = (f"{task} scripted expert (noise {DEFAULT_NOISE}), {sum(map(len, rollouts))} steps in {episodes} "
              "episodes, cycled")
    records = []
    for lay in layouts:
        shared = results[lay]
        per = shared["rss_bytes_per_transition"]
        records.append({
            "bench": "replay", "task": task, "obs": obs_mode, "transitions": transitions, "slots": slots,
            "frames": frames, "chunk_length": lay[0], "image_chunk_length": lay[1] if image else None,
            "frame_codec": lay[2] if image else None,
            "raw_bytes_per_transition": raw,
            **{f"naive_{k}": round(v, 1) for k, v in naive.items()},
            **{f"shared_{k}": round(v, 1) for k, v in shared.items()},
            "ratio": round(per / naive["rss_bytes_per_transition"], 4),
            "chunk_ratio": round(shared["chunk_bytes_per_transition"] / naive["chunk_bytes_per_transition"], 4),
            "ratio_vs_raw": round(per / raw, 4),
            "transitions_in_16gib": int(16 * GIB / per), "transitions_in_64gib": int(64 * GIB / per),
            "naive_transitions_in_16gib": int(16 * GIB / naive["rss_bytes_per_transition"]),
            "insert_ratio": round(shared["inserts_per_s"] / naive["inserts_per_s"], 4),
            "sample_ratio": round(shared["samples_per_s"] / naive["samples_per_s"], 4)})
    return records
