"""``record``: a whole recording job, from a jumanji env to episodes in a store.

The rollout runs one jitted ``lax.scan`` of ``chunk`` steps per call over ``num_envs`` vmapped
environments with the recorder state donated, so it is updated in place. The recorder keeps no
step rows itself: every step's rows of all envs go into a time-major ``[T, B, ...]`` store at the
scan's index (one ``dynamic_update_slice`` per array, no per-env scatter). There are two such
stores (double buffering): after chunk k the host hands its store, zero-copy, with the few reset
rows the recorder wrote (``RecordingWrapper._fetch``) to the writer, which cuts the episodes
while the device computes chunk k + 1 into the other store; chunk k + 2 reuses the first store
once chunk k is cut. The writer stores chunk k on a second thread while it cuts chunk k + 1
(``_Writer``). The host never waits for the device, nor the device for the disk, unless the
disk is the bottleneck.

Exactly once across restarts: every chunk is written as a store batch with id
``<run>:<chunk>``; with ``checkpoint_dir`` the job saves the recorder state, keys, counters, the
host-side carry of unfinished episodes and the run id at chunk boundaries. Restarted with the
same arguments it restores the newest checkpoint and recomputes the following chunks
deterministically; batches the killed run had already committed are not written again
(``FileStorage.record_episodes(..., batch_id=...)`` is idempotent).

Example:
    >>> import jumanji, tupli_jax as tj
    >>> result = tj.record(jumanji.make("Game2048-v1"), storage=tj.FileStorage("tupli_store"),
    ...                    num_envs=64, num_steps=1000)  # doctest: +SKIP
    >>> result.num_episodes  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import queue
import secrets
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, cast

import jax
import jax.numpy as jnp
import numpy as np
from jumanji import specs
from jumanji.env import Environment

from tupli_jax.flush import store_batch
from tupli_jax.recorder import RecorderState, RecordingWrapper
from tupli_jax.schema import EpisodeHeader
from tupli_jax.storage.base import TupliStorage
from tupli_jax.testing.contract import sample_action

__all__ = ["RecordResult", "ScalarWriter", "record", "uniform_policy"]

Policy = Callable[[jax.Array, Any], Any]


class ScalarWriter(Protocol):
    """Anything with TensorBoard's ``add_scalar(tag, value, step)``, e.g. a ``SummaryWriter``."""

    def add_scalar(self, tag: str, value: float, step: int) -> Any:
        """Logs ``value`` under ``tag`` at ``step``."""


@dataclasses.dataclass(frozen=True)
class RecordResult:
    """What a recording job did.

    Attributes:
        benchmark_id: Id of the benchmark the episodes belong to.
        num_episodes: Complete episodes stored by this job (including those a killed run of the
            same job had stored before it was resumed).
        num_transitions: Transitions in those episodes.
        num_steps_taken: Environment steps taken, ``num_envs * num_steps``.
        num_unfinished_steps: Steps of episodes still running at the end (not stored).
        resumed_from_chunk: The chunk a resumed job restarted after, else ``None``.
        compile_seconds: Time spent compiling the reset and the rollout chunks.
        seconds: Wall time of the job.
    """

    benchmark_id: str
    num_episodes: int
    num_transitions: int
    num_steps_taken: int
    num_unfinished_steps: int
    resumed_from_chunk: int | None
    compile_seconds: float
    seconds: float


def uniform_policy(action_spec: Any) -> Policy:
    """A pure policy sampling uniformly over ``action_spec`` (discrete, multi-discrete, bounded).

    Example:
        >>> policy = uniform_policy(env.action_spec)  # doctest: +SKIP
        >>> action = policy(jax.random.PRNGKey(0), observation)  # doctest: +SKIP
    """
    if type(action_spec) is specs.Array:
        raise TypeError(
            f"the default policy samples uniformly from bounded action specs; the action spec "
            f"{action_spec!r} is unbounded. Pass policy=lambda key, obs: ... to tj.record."
        )

    def policy(key: jax.Array, observation: Any) -> Any:
        del observation
        return sample_action(action_spec, key)

    return policy


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class _Carry:
    """Device state of the job between chunks (checkpointed)."""

    recorder: RecorderState
    key: jax.Array  # [2] uint32, consumed one split per step
    episode_return: jax.Array  # [B] float32, running return of each env's current episode
    episode_length: jax.Array  # [B] int32


def _make_chunk(rec: RecordingWrapper, policy: Policy, num_envs: int, length: int) -> Any:
    """``jit(chunk, donate_argnums=(0, 2))``: ``length`` steps of ``num_envs`` envs in one scan.

    ``chunk(carry, observation, rows)`` writes step ``t``'s rows of all envs into ``rows``
    (``(words [T, B, Ws], large leaves [T, B, n_i])``, see :func:`_empty_rows`) at index ``t``:
    one ``dynamic_update_slice`` per array at the scan's shared index, in place (donated), so a
    chunk neither scatters per env nor allocates (and page-faults) a new output each call.
    """
    step = jax.vmap(rec._step_emitting_row)
    act = jax.vmap(policy)

    def one_step(carry: tuple[_Carry, Any, Any], t: jax.Array) -> tuple[Any, Any]:
        c, observation, rows = carry
        key, act_key = jax.random.split(c.key)
        action = act(jax.random.split(act_key, num_envs), observation)
        recorder, timestep, (words, big) = step(c.recorder, action)
        rows = jax.tree.map(
            lambda buf, row: jax.lax.dynamic_update_slice_in_dim(buf, row[None], t, axis=0),
            rows,
            (words, tuple(big)),
        )
        episode_return = c.episode_return + timestep.reward.astype(jnp.float32)
        episode_length = c.episode_length + 1
        last = timestep.last()
        out = (last, episode_return, episode_length)
        zero_f, zero_i = jnp.zeros_like(episode_return), jnp.zeros_like(episode_length)
        new = _Carry(
            recorder=recorder,
            key=key,
            episode_return=jnp.where(last, zero_f, episode_return),
            episode_length=jnp.where(last, zero_i, episode_length),
        )
        return (new, timestep.observation, rows), out

    def chunk(carry: _Carry, observation: Any, rows: Any) -> tuple[_Carry, Any]:
        (carry, observation, rows), outs = jax.lax.scan(
            one_step, (carry, observation, rows), jnp.arange(length)
        )
        return carry, (observation, outs, rows)

    return jax.jit(chunk, donate_argnums=(0, 2))


def _empty_rows(rec: RecordingWrapper, num_envs: int, length: int) -> Any:
    """Time-major step-row storage of one chunk: ``(words [T, B, Ws], big [T, B, n_i])``."""
    return rec.buffer_spec.step_codec.empty(length, num_envs)


_OVERLAP = True
"""The writer cuts chunk k + 1 while it stores chunk k (False: one after the other, for
``benchmarks_perf/bench_writer.py`` and the tests)."""


class _Writer:
    """Writes fetched chunks in order on two threads: one cuts chunk k + 1 while the other
    stores chunk k (each a queue of one chunk).

    Cutting (numpy gathers) and storing (Arrow, SQLite, fsync) release the GIL for most of
    their time, so on a host with a free core for each the writer moves 1.2-1.4x the
    transitions per second of cutting and storing one after the other (CartPole-like,
    Game2048, Snake; 2 cores, no device work: ``benchmarks_perf/bench_writer.py``). It holds
    at most two cut batches in memory (one being stored, the next one cut). The cut thread
    makes each chunk's carry current as soon as it is cut; the store thread stores the batches
    in chunk order. If either fails, the job stops (the next ``put``, ``wait_released`` or
    ``drain`` raises) and the recorder is not used again: resuming goes through a checkpoint,
    saved only after ``drain``.
    """

    def __init__(
        self, rec: RecordingWrapper, run_id: str, episodes: int = 0, transitions: int = 0
    ) -> None:
        self._rec = rec
        self._run_id = run_id
        self._chunks: queue.Queue[tuple[int, Any] | None] = queue.Queue(maxsize=1)
        self._batches: queue.Queue[tuple[int, Any] | None] = queue.Queue(maxsize=1)
        self._error: BaseException | None = None
        self.episodes = episodes  # stored by this job so far (a resumed job starts from its
        self.transitions = transitions  # checkpoint's counts; replayed batches count once)
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._released = -1  # the last chunk index whose rows the cut thread let go of
        self._overlap = _OVERLAP
        self._threads = [
            threading.Thread(target=self._cut_loop, name="tupli-jax-cut", daemon=True),
            threading.Thread(target=self._store_loop, name="tupli-jax-store", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def _fail(self, error: BaseException) -> None:
        with self._changed:
            if self._error is None:
                self._error = error
            self._changed.notify_all()

    def _cut_loop(self) -> None:
        try:
            while self._cut_next():
                pass
        except BaseException as e:  # not from a chunk's work (that is caught in _cut_next)
            self._fail(e)
        finally:
            self._batches.put(None)  # the store thread always ends after the cut thread

    def _cut_next(self) -> bool:
        """Cuts the next queued chunk; False at the end of the queue."""
        item = self._chunks.get()
        try:
            if item is None:
                return False
            chunk_index, pending = item
            item = None
            batch = None
            if self._error is None:
                batch, commit = self._rec._cut(pending)
                commit()
            # Drop every host view of the chunk's rows before saying so: their device
            # buffers are donated to a later chunk, which copies them if a view lives.
            del pending
            with self._changed:
                self._released = chunk_index
                self._changed.notify_all()
            if batch is not None:
                self._batches.join()  # at most two batches: the one being stored and this one
                self._batches.put((chunk_index, batch))
                del batch
                if not self._overlap:  # stored before the next cut
                    self._batches.join()
        except BaseException as e:  # reported to the main thread on the next call
            self._fail(e)
        finally:
            self._chunks.task_done()
        return True

    def _store_loop(self) -> None:
        # Stores every batch cut before a failure (the cut thread cuts nothing after one), and
        # nothing after a failure of its own: the store holds a prefix of the job's chunks.
        storage = self._rec.storage
        failed = False
        while True:
            item = self._batches.get()
            try:
                if item is None:
                    return
                chunk_index, batch = item
                item = None
                if not failed:
                    batch_id = f"{self._run_id}:{chunk_index}"
                    headers = store_batch(cast(TupliStorage, storage), batch, batch_id)
                    with self._lock:
                        self.episodes += len(headers)
                        self.transitions += _transitions(headers)
                del batch
            except BaseException as e:
                failed = True
                self._fail(e)
            finally:
                self._batches.task_done()

    def wait_released(self, chunk_index: int) -> None:
        """Blocks until the cut of chunk ``chunk_index`` no longer reads its rows (or failed)."""
        with self._changed:
            while self._released < chunk_index and self._error is None:
                self._changed.wait()
        self._raise()

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def put(self, chunk_index: int, pending: Any) -> None:
        self._raise()
        self._chunks.put((chunk_index, pending))

    def drain(self) -> None:
        """Blocks until every queued chunk is durable in the store."""
        self._chunks.join()
        self._batches.join()
        self._raise()

    def close(self) -> None:
        cut_thread = self._threads[0]
        while cut_thread.is_alive():  # a dead cut thread takes nothing from the queue
            try:
                self._chunks.put(None, timeout=0.1)
                break
            except queue.Full:
                continue
        for thread in self._threads:
            thread.join()
        self._raise()


class _Progress:
    """A rich progress bar (transitions/s, episodes, bytes); silent when not on a terminal."""

    def __init__(self, enabled: bool, total: int, storage: TupliStorage) -> None:
        self._enabled = enabled and sys.stderr.isatty()
        self._storage = storage
        if not self._enabled:
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        self._bar = Progress(
            TextColumn("recording"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn(
                "{task.fields[rate]} transitions/s, {task.fields[episodes]} episodes, "
                "{task.fields[bytes]}"
            ),
            TimeRemainingColumn(),
            transient=False,
        )
        self._task = self._bar.add_task("record", total=total, rate="-", episodes=0, bytes="-")
        self._bar.start()

    def _bytes(self) -> str:
        root = getattr(self._storage, "root", None)
        if root is None:
            return "-"
        size = sum(p.stat().st_size for p in Path(root, "shards").glob("*.arrow"))
        return f"{size / 2**20:.1f} MiB"

    def update(self, done: int, rate: float, episodes: int) -> None:
        if self._enabled:
            self._bar.update(
                self._task,
                completed=done,
                rate=f"{rate:,.0f}",
                episodes=episodes,
                bytes=self._bytes(),
            )

    def close(self) -> None:
        if self._enabled:
            self._bar.stop()


def _transitions(headers: Sequence[EpisodeHeader]) -> int:
    """The transitions of the stored episodes (at once from a lazy ``EpisodeHeaders``)."""
    n_tuples = getattr(headers, "n_tuples", None)
    if n_tuples is not None:
        return int(np.sum(n_tuples))
    return sum(h.n_tuples for h in headers)


def _log_episodes(writer: ScalarWriter | None, outs: Any, first_step: int, num_envs: int) -> None:
    if writer is None:
        return
    last, returns, lengths = (np.asarray(x) for x in jax.device_get(outs))
    t_index, env_index = np.nonzero(last)
    for t, b in zip(t_index.tolist(), env_index.tolist(), strict=True):
        step = first_step + (t + 1) * num_envs
        writer.add_scalar("episode/return", float(returns[t, b]), step)
        writer.add_scalar("episode/length", int(lengths[t, b]), step)


def _host_state(
    rec: RecordingWrapper, run_id: str, chunk_index: int, chunks: list[int], out: _Writer | None
) -> dict[str, Any]:
    return {
        "run_id": run_id,
        "chunk_index": chunk_index,
        "chunks": chunks,
        "flush": rec.flush_state(),
        "episodes": out.episodes if out else 0,
        "transitions": out.transitions if out else 0,
    }


def record(
    env: Environment,
    storage: TupliStorage,
    num_envs: int = 64,
    num_steps: int = 1000,
    policy: Policy | None = None,
    seed: int = 0,
    name: str | None = None,
    capacity: int = 256,
    checkpoint_dir: str | Path | None = None,
    progress: bool = True,
    writer: ScalarWriter | None = None,
    checkpoint_every: int = 1,
) -> RecordResult:
    """Records ``num_steps`` steps of ``num_envs`` environments into ``storage``.

    Host call (it jits internally). Episodes complete by the end are stored exactly once under a
    benchmark named ``name`` (stored, or found by hash, from ``env``); unfinished ones are not.

    Args:
        env: A single jumanji environment (not auto-resetting, not batched).
        storage: Where episodes go, e.g. ``tj.FileStorage("tupli_store")``.
        num_envs: Environments stepped in parallel (``B``).
        num_steps: Steps per environment; ``num_envs * num_steps`` transitions in total.
        policy: Pure ``policy(key, observation) -> action`` for ONE environment (vmapped here);
            default: uniform over ``env.action_spec``.
        seed: Seed of every random choice (resets and default policy).
        name: Benchmark name (default: the env's class name).
        capacity: Steps per chunk; also the recorder's buffer capacity.
        checkpoint_dir: Save a checkpoint every ``checkpoint_every`` chunks there and resume from
            it when restarted with the same arguments.
        progress: Show a progress bar (only when stderr is a terminal).
        writer: Optional ``add_scalar(tag, value, step)`` sink: per-episode return and length,
            per-chunk throughput, sent once per chunk.
        checkpoint_every: Chunks between checkpoints.

    Returns:
        A :class:`RecordResult`.

    Example:
        >>> result = record(jumanji.make("Snake-v1"), storage=store, num_envs=1024,
        ...                 num_steps=2000, capacity=200)  # doctest: +SKIP
    """
    if num_envs < 1 or num_steps < 1 or capacity < 1 or checkpoint_every < 1:
        raise ValueError(
            f"num_envs, num_steps, capacity and checkpoint_every must be >= 1, received "
            f"{num_envs}, {num_steps}, {capacity}, {checkpoint_every}"
        )
    started = time.perf_counter()
    rec = RecordingWrapper(env, storage=storage, capacity=capacity)
    rec._keep_step_rows_outside()  # step rows come out of each chunk's scan, time-major
    benchmark_id = rec.store(name=name or type(env).__name__, metadata={})
    policy = policy or uniform_policy(env.action_spec)
    chunks = [capacity] * (num_steps // capacity) + (
        [num_steps % capacity] * (num_steps % capacity > 0)
    )

    key, reset_key = jax.random.split(jax.random.PRNGKey(seed))
    t0 = time.perf_counter()
    reset = jax.jit(jax.vmap(rec.reset)).lower(jax.random.split(reset_key, num_envs)).compile()
    compile_seconds = time.perf_counter() - t0
    recorder_state, timestep = reset(jax.random.split(reset_key, num_envs))
    carry = _Carry(
        recorder=recorder_state,
        key=key,
        episode_return=jnp.zeros(num_envs, jnp.float32),
        episode_length=jnp.zeros(num_envs, jnp.int32),
    )
    # Copies: the carry is donated to each chunk, and donation refuses a buffer that appears twice
    # (env states may alias leaves, e.g. Snake's body and tail; observations alias the state).
    carry = jax.tree.map(jnp.copy, carry)
    observation = jax.tree.map(jnp.copy, timestep.observation)
    run_id = secrets.token_hex(8)
    start_chunk = 0
    resumed_from: int | None = None
    counts = (0, 0)

    checkpointer = None
    if checkpoint_dir is not None:
        from tupli_jax.checkpoint import Checkpointer

        checkpointer = Checkpointer(checkpoint_dir)
        latest = checkpointer.latest_step()
        if latest is not None:
            abstract = jax.eval_shape(lambda: (carry, observation))
            (carry, observation), host = checkpointer.restore(latest, abstract)
            if host["chunks"] != chunks:
                raise ValueError(
                    f"checkpoint in '{checkpoint_dir}' belongs to a job with chunks "
                    f"{host['chunks'][:3]}...; restart with the same num_steps and capacity, or "
                    "use a new checkpoint_dir"
                )
            run_id = host["run_id"]
            rec.restore_flush_state(host["flush"])
            start_chunk = resumed_from = int(host["chunk_index"])
            counts = (int(host["episodes"]), int(host["transitions"]))
        else:  # step 0 pins the run id before any batch is written
            checkpointer.save(0, (carry, observation), _host_state(rec, run_id, 0, chunks, None))

    compiled: dict[int, Any] = {}
    # Two step-row stores per chunk length: the device fills one while the writer reads the
    # other (double buffering); a store is reused once the chunk it held is written.
    spare_rows: dict[int, list[tuple[int, Any]]] = {}
    out = _Writer(rec, run_id, *counts)
    bar = _Progress(progress, num_envs * num_steps, storage)
    logged: tuple[Any, int] | None = None
    last_handoff = time.perf_counter()
    try:
        done_steps = sum(chunks[:start_chunk])
        for index in range(start_chunk, len(chunks)):
            length = chunks[index]
            spares = spare_rows.setdefault(length, [])
            if len(spares) < 2:
                rows_in = _empty_rows(rec, num_envs, length)
            else:
                written_index, rows_in = spares.pop(0)
                out.wait_released(written_index)
            if length not in compiled:
                t0 = time.perf_counter()
                fn = _make_chunk(rec, policy, num_envs, length)
                compiled[length] = fn.lower(carry, observation, rows_in).compile()
                compile_seconds += time.perf_counter() - t0
            carry, (observation, outs, rows) = compiled[length](carry, observation, rows_in)
            del rows_in
            spares.append((index + 1, rows))
            # Reset-row counts read from the device (waits for this chunk, which the next one
            # needs anyway): only the reset rows actually written are copied, not all C + 1.
            recorder_state, pending = rec._fetch(carry.recorder, rows)
            carry = dataclasses.replace(carry, recorder=recorder_state)
            out.put(index + 1, pending)
            if logged is not None:  # the previous chunk's outputs: reading them does not stall
                _log_episodes(writer, *logged, num_envs)
            logged = (outs, done_steps * num_envs) if writer is not None else None
            done_steps += length
            if writer is not None:  # wall time between chunk hand-offs: steady-state rate
                now = time.perf_counter()
                rate = length * num_envs / max(now - last_handoff, 1e-9)
                last_handoff = now
                writer.add_scalar("throughput/transitions_per_s", rate, done_steps * num_envs)
            bar.update(
                done_steps * num_envs,
                done_steps * num_envs / max(time.perf_counter() - started, 1e-9),
                out.episodes,
            )
            if checkpointer is not None and ((index + 1) % checkpoint_every == 0):
                out.drain()
                checkpointer.save(
                    index + 1,
                    (carry, observation),
                    _host_state(rec, run_id, index + 1, chunks, out),
                )
        if logged is not None:
            _log_episodes(writer, *logged, num_envs)
        out.drain()
    finally:
        try:
            out.close()
        finally:
            bar.close()
            if checkpointer is not None:
                checkpointer.close()

    return RecordResult(
        benchmark_id=benchmark_id,
        num_episodes=out.episodes,
        num_transitions=out.transitions,
        num_steps_taken=num_envs * num_steps,
        num_unfinished_steps=num_envs * num_steps - out.transitions,
        resumed_from_chunk=resumed_from,
        compile_seconds=compile_seconds,
        seconds=time.perf_counter() - started,
    )
