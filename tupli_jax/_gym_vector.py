"""``TupliVectorEnvWrapper``: records every sub-env of a Gymnasium ``VectorEnv`` into one store.

Steps are written time-major into growing numpy buffers ``[capacity, num_envs, ...]`` (one
vectorised assignment per leaf per step); each sub-env remembers the row its episode started at.
An episode that ends is only noted (sub-env, start row, end row); its rows stay in the buffers
until the next write, which gathers every pending episode with one fancy index per leaf into
one ``EpisodeBatch`` (one shard). Rows are overwritten only once gathered (``_VectorStore``).
The env's ``metadata["autoreset_mode"]`` decides what a row means:

- ``NEXT_STEP``: the step after a done is a reset step (reward 0, action ignored): its observation
  starts the next episode and it is not a transition.
- ``SAME_STEP``: a done step returns the reset observation; the final observation of the ended
  episode is ``info["final_obs"][i]`` and its info ``info["final_info"]``.
- ``DISABLED``: a done sub-env waits for ``reset(options={"reset_mask": mask})``.

Partial resets (``options["reset_mask"]``) assume the env honours the mask, as
``SyncVectorEnv`` and ``AsyncVectorEnv`` do.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import warnings
from typing import Any

import gymnasium
import numpy as np
from gymnasium.vector import AsyncVectorEnv, AutoresetMode, SyncVectorEnv, VectorEnv

from tupli_jax import _tree
from tupli_jax._gym_columns import PendingBatch, PendingItem, batch_discounts
from tupli_jax._gym_record import (
    DEFAULT_BATCH_BYTES,
    DEFAULT_BATCH_STEPS,
    DEFAULT_INTERVAL_S,
    BenchmarkMixin,
    EpisodeSink,
    extra_tuple_fields,
    tuple_info,
)
from tupli_jax._rows import ranges
from tupli_jax.episode import EpisodeBatch
from tupli_jax.schema import EpisodeMetadataCallback, RLTuple, to_builtin
from tupli_jax.storage.base import TupliStorage

__all__ = ["TupliVectorEnvWrapper"]

_INITIAL_ROWS = 256


def _leaves(tree: Any) -> tuple[list[np.ndarray], Any]:
    if type(tree) is np.ndarray:
        return [tree], None
    return _tree.flatten(tree)


def _build(spec: Any, leaves: list[np.ndarray]) -> Any:
    return leaves[0] if spec is None else _tree.unflatten(spec, leaves)


def _unbatch_info(infos: dict[str, Any], i: int) -> dict[str, Any]:
    """Sub-env ``i``'s info from a vector info dict (gymnasium's ``_key`` mask convention)."""
    out: dict[str, Any] = {}
    for key, value in infos.items():
        if key.startswith("_") and key[1:] in infos:
            continue  # a mask
        mask = infos.get("_" + key)
        if mask is not None and not mask[i]:
            continue
        out[key] = _unbatch_info(value, i) if isinstance(value, dict) else value[i]
    return out


def _gather_index(
    envs: np.ndarray, starts: np.ndarray, counts: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """``(env, row)`` index arrays selecting rows ``starts[e] .. starts[e] + counts[e] - 1`` of
    sub-env ``envs[e]`` for every ``e``, episode after episode.

    Example:
        >>> envs, rows = _gather_index(np.array([2, 0]), np.array([5, 1]), np.array([2, 3]))
        >>> envs.tolist(), rows.tolist()
        ([2, 2, 0, 0, 0], [5, 6, 1, 2, 3])
    """
    return np.repeat(envs, counts), ranges(starts, counts)


def _identity(env: gymnasium.Env[Any, Any]) -> gymnasium.Env[Any, Any]:
    return env


class _VectorStore:
    """Time-major buffers of a vector recorder and its finished, not yet written episodes.

    Row ``r`` holds step ``r``'s observations ``obs_bufs[k][r, i]``, actions and rewards for every
    sub-env ``i``. A finished episode stays in the buffers as ``(sub-env, start row, end row)``
    until ``drain`` (a write) gathers all of them with one fancy index per leaf into one
    ``EpisodeBatch``. Holds no reference to the wrapper, so a finalizer may drain it.
    """

    def __init__(self, num_envs: int, *, same_step: bool) -> None:
        self.same_step = same_step
        self.row = -1  # last written row; -1 before the first reset
        self.obs_spec: Any = None
        self.obs_bufs: list[np.ndarray] = []
        self.act_spec: Any = None
        self.act_bufs: list[np.ndarray] | None = None
        self.rew_buf = np.zeros((_INITIAL_ROWS, num_envs), dtype=np.float64)
        self.pending_low = np.iinfo(np.int64).max  # lowest row a finished episode needs
        self.sealed: list[PendingItem] = []
        self._chunks: list[_Chunk] = []

    def add(
        self,
        envs: np.ndarray,
        starts: np.ndarray,
        end: int,
        terminated: np.ndarray,
        truncated: np.ndarray,
        benchmark_id: str,
        metadata: list[dict[str, Any]] | None,
        infos: list[list[dict[str, Any]] | None] | None,
        finals: list[list[np.ndarray]] | None,
    ) -> None:
        """Queues the episodes of sub-envs ``envs`` (rows ``starts .. end``)."""
        self._chunks.append(
            _Chunk(envs, starts, end, terminated, truncated, benchmark_id, metadata, infos, finals)
        )
        self.pending_low = min(self.pending_low, int(starts.min()))

    @property
    def step_nbytes(self) -> int:
        """Bytes a transition of one sub-env takes: observation, action and reward."""
        leaves = [*self.obs_bufs, *(self.act_bufs or [])]
        return 8 + sum(buf.itemsize * int(np.prod(buf.shape[2:])) for buf in leaves)

    def ends_at(self, row: int, mask: np.ndarray) -> bool:
        """Whether a queued episode of a sub-env in ``mask`` ends at ``row``."""
        return any(c.end == row and mask[c.envs].any() for c in self._chunks)

    def shift(self, low: int) -> None:
        """The rows moved down by ``low`` (``_make_room``)."""
        for chunk in self._chunks:
            chunk.starts = chunk.starts - low
            chunk.end -= low
        if self._chunks:
            self.pending_low -= low

    def seal(self) -> None:
        """Gathers the queued episodes out of the buffers (before rows are overwritten)."""
        if not self._chunks:
            return
        chunks, self._chunks = self._chunks, []
        self.pending_low = np.iinfo(np.int64).max
        first = 0
        for k in range(1, len(chunks) + 1):  # one batch per run of one benchmark id
            if k == len(chunks) or chunks[k].benchmark_id != chunks[first].benchmark_id:
                self.sealed.append(self._gather(chunks[first:k]))
                first = k

    def drain(self) -> list[PendingItem]:
        """Takes every finished episode, in order."""
        self.seal()
        items, self.sealed = self.sealed, []
        return items

    def _gather(self, chunks: list[_Chunk]) -> PendingBatch:
        envs = np.concatenate([c.envs for c in chunks])
        starts = np.concatenate([c.starts for c in chunks])
        ends = np.concatenate([np.full(c.envs.size, c.end, dtype=np.int64) for c in chunks])
        lengths = ends - starts  # transitions per episode
        terminated = np.concatenate([c.terminated for c in chunks])
        # Observation rows start .. end (SAME_STEP: .. end - 1, then final_obs); actions and
        # rewards rows start + 1 .. end.
        obs_env, obs_row = _gather_index(envs, starts, lengths if self.same_step else lengths + 1)
        act_env, act_row = _gather_index(envs, starts + 1, lengths)
        if self.same_step:
            finals = [f for c in chunks for f in (c.finals or [])]
            last = np.cumsum(lengths + 1) - 1  # row of each final observation in the batch
            keep = np.ones(int(last[-1]) + 1, dtype=bool)
            keep[last] = False
            obs_leaves = []
            for k, buf in enumerate(self.obs_bufs):
                out = np.empty((keep.size, *buf.shape[2:]), buf.dtype)
                out[keep] = buf[obs_row, obs_env]
                out[last] = np.stack([final[k] for final in finals])
                obs_leaves.append(out)
        else:
            obs_leaves = [buf[obs_row, obs_env] for buf in self.obs_bufs]
        assert self.act_bufs is not None
        metadata: list[dict[str, Any]] | None = None
        if any(c.metadata is not None for c in chunks):
            metadata = [m for c in chunks for m in (c.metadata or [{}] * c.envs.size)]
        infos: list[list[dict[str, Any]] | None] | None = None
        if any(c.infos is not None for c in chunks):
            infos = [i for c in chunks for i in (c.infos or [None] * c.envs.size)]
        batch = EpisodeBatch(
            observations=_build(self.obs_spec, obs_leaves),
            actions=_build(self.act_spec, [buf[act_row, act_env] for buf in self.act_bufs]),
            rewards=self.rew_buf[act_row, act_env],
            discounts=batch_discounts(lengths, terminated),
            n_tuples=lengths,
            terminated=terminated,
            truncated=np.concatenate([c.truncated for c in chunks]),
            benchmark_id=chunks[0].benchmark_id,
            metadata=metadata,
        )
        return PendingBatch(batch, infos)


@dataclasses.dataclass
class _Chunk:
    """Episodes that ended on one step: sub-envs, start rows, the end row and what else they
    carry (per-episode metadata, infos, final observations)."""

    envs: np.ndarray
    starts: np.ndarray
    end: int
    terminated: np.ndarray
    truncated: np.ndarray
    benchmark_id: str
    metadata: list[dict[str, Any]] | None
    infos: list[list[dict[str, Any]] | None] | None
    finals: list[list[np.ndarray]] | None


class TupliVectorEnvWrapper(BenchmarkMixin, gymnasium.vector.VectorWrapper):
    """Records the episodes of every sub-env of a ``VectorEnv`` (pytupli's API, vectorised).

    Each finished episode is stored exactly as ``TupliEnvWrapper`` would store it for a single
    env run with the same seed and actions. Episodes are written in batches spanning steps (see
    ``batch_steps``; with ``batch_steps=0`` all episodes that end on one step go to storage in
    one batch, inside that step), visible in this process when the step that ends them returns.

    Args:
        env: Any ``gymnasium.vector.VectorEnv`` (``SyncVectorEnv``, ``AsyncVectorEnv``, a
            numpy-vectorised env from ``gymnasium.make_vec``) declaring
            ``metadata["autoreset_mode"]`` (``NEXT_STEP`` is assumed, with a warning, if absent).
        storage: Where benchmarks and episodes go.
        benchmark_id: Id of an already stored benchmark (else call ``store()``).
        metadata_callback: As in ``TupliEnvWrapper``; each sub-env uses its own deep copy.
        rl_tuple_cls: As in ``TupliEnvWrapper``.
        sub_env_key: If set, each episode's metadata gets ``{sub_env_key: sub_env_index}``.
        benchmark_env: The single env ``store()`` serializes; by default the first sub-env
            (``SyncVectorEnv``), one built from ``env_fns[0]`` (``AsyncVectorEnv``), else the
            vector env itself.
        batch_steps: As in ``TupliEnvWrapper``.
        interval_s: As in ``TupliEnvWrapper``.
        batch_bytes: As in ``TupliEnvWrapper``.

    Example:
        >>> envs = gym.make_vec("CartPole-v1", num_envs=8)  # doctest: +SKIP
        >>> rec = TupliVectorEnvWrapper(envs, FileStorage("store"))  # doctest: +SKIP
        >>> rec.store(name="cartpole"); obs, _ = rec.reset(seed=0)  # doctest: +SKIP
    """

    def __init__(
        self,
        env: VectorEnv,
        storage: TupliStorage,
        benchmark_id: str | None = None,
        metadata_callback: EpisodeMetadataCallback | None = None,
        rl_tuple_cls: type[RLTuple] = RLTuple,
        *,
        sub_env_key: str | None = None,
        benchmark_env: gymnasium.Env[Any, Any] | None = None,
        batch_steps: int = DEFAULT_BATCH_STEPS,
        interval_s: float = DEFAULT_INTERVAL_S,
        batch_bytes: int = DEFAULT_BATCH_BYTES,
    ) -> None:
        gymnasium.vector.VectorWrapper.__init__(self, env)
        self.storage = storage
        self.id = benchmark_id
        self.rl_tuple_cls = rl_tuple_cls
        self.metadata_callback = metadata_callback
        self.sub_env_key = sub_env_key
        self._bench_env: Any = benchmark_env
        self._related_artifacts: list[str] = []
        self._record_episodes = True
        mode = env.metadata.get("autoreset_mode")
        if mode is None:
            warnings.warn(
                f"{env} has no metadata['autoreset_mode']; TupliVectorEnvWrapper assumes "
                "AutoresetMode.NEXT_STEP: set the metadata if the env resets otherwise",
                stacklevel=2,
            )
            mode = AutoresetMode.NEXT_STEP
        self.autoreset_mode = AutoresetMode(mode)
        n = int(env.num_envs)
        self._tree_actions = isinstance(
            env.single_action_space, gymnasium.spaces.Tuple | gymnasium.spaces.Dict
        )
        # Buffers and finished episodes not yet written (no reference back to this wrapper).
        self._b = _VectorStore(n, same_step=self.autoreset_mode is AutoresetMode.SAME_STEP)
        self._sink = EpisodeSink(
            storage,
            batch_steps=batch_steps,
            interval_s=interval_s,
            batch_bytes=batch_bytes,
            source=self._b,
        )
        self._extra_fields = extra_tuple_fields(rl_tuple_cls)
        self._needs_tuples = metadata_callback is not None or rl_tuple_cls is not RLTuple
        self._callbacks = [copy.deepcopy(metadata_callback) for _ in range(n)]
        self._tuples: list[list[RLTuple]] = [[] for _ in range(n)]
        self._episode_metadata: list[dict[str, Any]] = [{} for _ in range(n)]
        # Row of each sub-env's episode start (reset observation), -1 when not recording it.
        self._start = np.full(n, -1, dtype=np.int64)
        self._reset_step_next = np.zeros(n, dtype=bool)  # NEXT_STEP: next step is a reset step
        self._row_infos: list[dict[str, Any] | None] = [None] * _INITIAL_ROWS
        self._last_info_row = -1  # last row whose step returned a non-empty info

    # -- benchmark ------------------------------------------------------------------------
    def _benchmark_env(self) -> Any:
        if self._bench_env is None:
            vec = self.env.unwrapped
            if isinstance(vec, SyncVectorEnv):
                self._bench_env = vec.envs[0]
            elif isinstance(vec, AsyncVectorEnv):
                self._bench_env = vec.env_fns[0]()
            else:
                self._bench_env = vec
        return self._bench_env

    @classmethod
    def load(
        cls,
        storage: TupliStorage,
        benchmark_id: str,
        num_envs: int,
        metadata_callback: EpisodeMetadataCallback | None = None,
        rl_tuple_cls: type[RLTuple] = RLTuple,
        trusted: bool = False,
        *,
        vectorization_mode: str = "sync",
        vector_kwargs: dict[str, Any] | None = None,
        **wrapper_kwargs: Any,
    ) -> TupliVectorEnvWrapper:
        """Loads a stored (single-env) benchmark as ``num_envs`` sub-envs of a vector env.

        Args:
            storage: The storage holding the benchmark.
            benchmark_id: The benchmark's id.
            num_envs: Number of sub-envs (each deserialized separately).
            metadata_callback: As in the constructor.
            rl_tuple_cls: As in the constructor.
            trusted: Allow any callable in the stored payload.
            vectorization_mode: ``"sync"`` (``SyncVectorEnv``) or ``"async"``.
            vector_kwargs: Keyword arguments of the vector env (e.g. ``autoreset_mode``).
            **wrapper_kwargs: Keyword-only arguments of the constructor.

        Example:
            >>> rec = TupliVectorEnvWrapper.load(storage, bench_id, num_envs=4)  # doctest: +SKIP
        """
        stored = storage.load_benchmark(benchmark_id)
        envs = [
            cls.deserialize_env(stored.serialized, storage, trusted=trusted)
            for _ in range(num_envs)
        ]
        fns = [functools.partial(_identity, e) for e in envs]
        if vectorization_mode == "sync":
            vec: VectorEnv = SyncVectorEnv(fns, **(vector_kwargs or {}))
        elif vectorization_mode == "async":
            vec = AsyncVectorEnv(fns, **(vector_kwargs or {}))
        else:
            raise ValueError(
                f"expected vectorization_mode 'sync' or 'async', received {vectorization_mode!r}"
            )
        return cls(vec, storage, benchmark_id, metadata_callback, rl_tuple_cls, **wrapper_kwargs)

    # -- recording ------------------------------------------------------------------------
    def activate_recording(self) -> None:
        """Records every sub-env from its next episode start on."""
        self._record_episodes = True

    def deactivate_recording(self) -> None:
        """Stops recording; every episode in progress is dropped."""
        self._record_episodes = False
        self._drop(np.ones(self.num_envs, dtype=bool))

    def _drop(self, mask: np.ndarray) -> None:
        if self._needs_tuples:
            for i in np.flatnonzero(mask & (self._start >= 0)):
                self._begin(int(i), -1)
        self._start[mask] = -1

    def _begin(self, i: int, row: int) -> None:
        if self._needs_tuples:
            callback = self._callbacks[i]
            if callback is not None and self._tuples[i]:
                callback.reset()
            self._tuples[i] = []
            self._episode_metadata[i] = {}
        self._start[i] = row

    def _begin_many(self, mask: np.ndarray, row: int) -> None:
        row = row if self._record_episodes else -1
        if self._needs_tuples:
            for i in np.flatnonzero(mask):
                self._begin(int(i), row)
        else:
            self._start[mask] = row

    def _allocate_obs(self, leaves: list[np.ndarray], spec: Any) -> None:
        rows = self._b.rew_buf.shape[0]
        self._b.obs_spec = spec
        self._b.obs_bufs = [np.zeros((rows, *leaf.shape), dtype=leaf.dtype) for leaf in leaves]

    def reset(
        self, *, seed: int | list[int | None] | None = None, options: dict[str, Any] | None = None
    ) -> tuple[Any, dict[str, Any]]:
        """Resets all sub-envs (or those in ``options["reset_mask"]``); unfinished episodes of
        the reset sub-envs are dropped and new ones start."""
        mask = None
        if options is not None and options.get("reset_mask") is not None:
            mask = np.array(options["reset_mask"], dtype=bool)  # the env may pop it
        obs, infos = self.env.reset(seed=seed, options=options)  # type: ignore[arg-type]
        leaves, spec = _leaves(obs)
        if mask is None or self._b.row < 0:
            self._b.seal()  # the rows are rewritten from 0
            self._drop(np.ones(self.num_envs, dtype=bool))
            shapes = [(b.shape[1:], b.dtype) for b in self._b.obs_bufs]
            if shapes != [(leaf.shape, leaf.dtype) for leaf in leaves]:
                self._allocate_obs(leaves, spec)
            self._b.row = 0
            self._last_info_row = -1
            for buf, leaf in zip(self._b.obs_bufs, leaves, strict=True):
                buf[0] = leaf
            self._reset_step_next[:] = False
            self._begin_many(np.ones(self.num_envs, dtype=bool), 0)
        else:
            if self._b.ends_at(self._b.row, mask):
                self._b.seal()  # row ``row`` of a masked sub-env holds a final observation
            self._drop(mask)
            for buf, leaf in zip(self._b.obs_bufs, leaves, strict=True):
                buf[self._b.row, mask] = leaf[mask]
            self._reset_step_next[mask] = False
            self._begin_many(mask, self._b.row)
        return obs, infos

    def _make_room(self) -> None:
        """Moves the rows still needed to the front, growing the buffers if half full."""
        active = self._start[self._start >= 0]
        low = min(int(active.min()), self._b.row) if active.size else self._b.row
        low = min(low, self._b.pending_low)
        keep = self._b.row + 1 - low
        rows = self._b.rew_buf.shape[0]
        new_rows = rows * 2 if keep > rows // 2 else rows
        buffers = [self._b.rew_buf, *self._b.obs_bufs, *(self._b.act_bufs or [])]
        moved = []
        for buf in buffers:
            target = buf if new_rows == rows else np.zeros((new_rows, *buf.shape[1:]), buf.dtype)
            target[:keep] = buf[low : self._b.row + 1]
            moved.append(target)
        self._b.rew_buf = moved[0]
        self._b.obs_bufs = moved[1 : 1 + len(self._b.obs_bufs)]
        if self._b.act_bufs is not None:
            self._b.act_bufs = moved[1 + len(self._b.obs_bufs) :]
        infos = self._row_infos[low : self._b.row + 1]
        self._row_infos = infos + [None] * (new_rows - keep)
        self._start[self._start >= 0] -= low
        self._b.row -= low
        self._b.shift(low)
        self._last_info_row -= low

    def step(self, actions: Any) -> tuple[Any, Any, Any, Any, dict[str, Any]]:
        """Steps every sub-env and records the transitions; ended episodes go to storage."""
        obs, rewards, terminations, truncations, infos = self.env.step(actions)
        if self._b.row >= 0:
            self._record(actions, obs, rewards, terminations, truncations, infos)
        return obs, rewards, terminations, truncations, infos

    def _record(
        self,
        actions: Any,
        obs: Any,
        rewards: Any,
        terminations: Any,
        truncations: Any,
        infos: dict[str, Any],
    ) -> None:
        if self._b.row + 1 == self._b.rew_buf.shape[0]:
            self._make_room()
        row = self._b.row + 1
        self._b.row = row
        obs_leaves, _ = _leaves(obs)
        for buf, leaf in zip(self._b.obs_bufs, obs_leaves, strict=True):
            buf[row] = leaf
        act_leaves, act_spec = self._action_leaves(actions)
        if self._b.act_bufs is None:
            rows = self._b.rew_buf.shape[0]
            self._b.act_spec = act_spec
            self._b.act_bufs = [np.zeros((rows, *a.shape), a.dtype) for a in act_leaves]
        for buf, leaf in zip(self._b.act_bufs, act_leaves, strict=True):
            buf[row] = leaf
        self._b.rew_buf[row] = rewards
        if infos:
            self._row_infos[row] = infos
            self._last_info_row = row
        else:
            self._row_infos[row] = None
        done = np.logical_or(terminations, truncations)  # a new array
        mode = self.autoreset_mode
        same_step = mode is AutoresetMode.SAME_STEP
        if mode is AutoresetMode.NEXT_STEP:
            reset_step = self._reset_step_next
            self._reset_step_next = done
            stepped = (self._start >= 0) & ~reset_step
            if reset_step.any():
                self._begin_many(reset_step, row)
        else:
            stepped = self._start >= 0
        if self._needs_tuples:
            for i in np.flatnonzero(stepped):
                self._record_tuple(int(i), obs, actions, rewards, terminations, truncations, infos)
        ended = np.flatnonzero(done & stepped)
        ended_steps = 0
        if ended.size and self.id is not None:
            ended_steps = self._end_many(ended, row, terminations, truncations, infos)
        if same_step:
            if done.any():
                self._begin_many(done, row)
        elif ended.size:
            self._drop(done)
        if ended.size:
            self._require_id("store a recorded episode")
            self._sink.ended(ended_steps, ended_steps * self._b.step_nbytes)

    def _action_leaves(self, actions: Any) -> tuple[list[np.ndarray], Any]:
        if type(actions) is np.ndarray:
            return [actions], None
        if not self._tree_actions:
            actions = np.asarray(actions)  # e.g. a list of Python ints
        return _leaves(actions)

    def _transition_obs(self, i: int, obs: Any, done: bool, infos: dict[str, Any]) -> Any:
        if done and self.autoreset_mode is AutoresetMode.SAME_STEP:
            return infos["final_obs"][i]
        leaves, spec = _leaves(obs)
        return _build(spec, [leaf[i] for leaf in leaves])

    def _step_info(self, i: int, row_info: dict[str, Any] | None, final: bool) -> dict[str, Any]:
        if not row_info:
            return {}
        if final and self.autoreset_mode is AutoresetMode.SAME_STEP:
            row_info = row_info.get("final_info") or {}
        info: dict[str, Any] = to_builtin(_unbatch_info(row_info, i))
        return info

    def _record_tuple(
        self,
        i: int,
        obs: Any,
        actions: Any,
        rewards: Any,
        terminations: Any,
        truncations: Any,
        infos: dict[str, Any],
    ) -> None:
        done = bool(terminations[i]) or bool(truncations[i])
        act_leaves, act_spec = self._action_leaves(actions)
        rl_tuple = self.rl_tuple_cls.from_env_step(
            self._transition_obs(i, obs, done, infos),
            _build(act_spec, [leaf[i] for leaf in act_leaves]),
            rewards[i],
            bool(terminations[i]),
            bool(truncations[i]),
            self._step_info(i, infos, final=done),
        )
        callback = self._callbacks[i]
        if callback is not None:
            self._episode_metadata[i] = dict(callback(rl_tuple))
        self._tuples[i].append(rl_tuple)

    def _end_many(
        self,
        ended: np.ndarray,
        end: int,
        terminations: Any,
        truncations: Any,
        infos: dict[str, Any],
    ) -> int:
        """Queues the episodes of sub-envs ``ended`` whose last transition is row ``end`` (their
        rows stay in the buffers until the next write gathers them); returns their transitions."""
        starts = self._start[ended]
        n = int(ended.size)
        metadata: list[dict[str, Any]] | None = None
        episode_infos: list[list[dict[str, Any]] | None] | None = None
        some_info = self._last_info_row > int(starts.min())  # a step of them had an info
        if self._needs_tuples or self.sub_env_key is not None or some_info:
            metadata = [{} for _ in range(n)]
            episode_infos = [None] * n
            for e, i in enumerate(ended.tolist()):
                start = int(starts[e])
                if self._needs_tuples:
                    episode_infos[e] = [tuple_info(t, self._extra_fields) for t in self._tuples[i]]
                    metadata[e] = self._episode_metadata[i]
                    callback = self._callbacks[i]
                    if callback is not None:
                        callback.reset()
                    self._tuples[i] = []
                    self._episode_metadata[i] = {}
                elif self._last_info_row > start:
                    rows = range(start + 1, end + 1)
                    row_infos = self._row_infos
                    if any(row_infos[r] for r in rows):
                        episode_infos[e] = [
                            self._step_info(i, row_infos[r], final=r == end) for r in rows
                        ]
                if self.sub_env_key is not None:
                    metadata[e] = {**metadata[e], self.sub_env_key: i}
        finals = None
        if self.autoreset_mode is AutoresetMode.SAME_STEP:
            final_obs = infos["final_obs"]
            finals = [[np.array(leaf) for leaf in _leaves(final_obs[i])[0]] for i in ended]
        self._b.add(
            ended,
            starts,
            end,
            np.asarray(terminations, dtype=bool)[ended],
            np.asarray(truncations, dtype=bool)[ended],
            self._require_id("store a recorded episode"),
            metadata if metadata is not None and any(metadata) else None,
            episode_infos if episode_infos is not None and any(episode_infos) else None,
            finals,
        )
        return int((end - starts).sum())

    def close(self, **kwargs: Any) -> None:
        """Drops unfinished episodes, writes the pending ones, then closes the vector env."""
        self._drop(np.ones(self.num_envs, dtype=bool))
        try:
            self._sink.flush()
        finally:
            self.env.close(**kwargs)
