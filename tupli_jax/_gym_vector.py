"""``TupliVectorEnvWrapper``: records every sub-env of a Gymnasium ``VectorEnv`` into one store.

Steps are written time-major into growing numpy buffers ``[capacity, num_envs, ...]`` (one
vectorised assignment per leaf per step); each sub-env remembers the row its episode started at,
and an episode is cut out with one slice per leaf when it ends. The env's
``metadata["autoreset_mode"]`` decides what a row means:

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
import functools
import warnings
from typing import Any

import gymnasium
import numpy as np
from gymnasium.vector import AsyncVectorEnv, AutoresetMode, SyncVectorEnv, VectorEnv

from tupli_jax import _tree
from tupli_jax._gym_record import (
    BenchmarkMixin,
    EpisodeSink,
    extra_tuple_fields,
    make_episode,
    tuple_info,
)
from tupli_jax.episode import EpisodeData
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


def _identity(env: gymnasium.Env[Any, Any]) -> gymnasium.Env[Any, Any]:
    return env


class TupliVectorEnvWrapper(BenchmarkMixin, gymnasium.vector.VectorWrapper):
    """Records the episodes of every sub-env of a ``VectorEnv`` (pytupli's API, vectorised).

    Each finished episode is stored exactly as ``TupliEnvWrapper`` would store it for a single
    env run with the same seed and actions; all episodes that end on one step go to storage in
    one batch (batches may also span steps, see ``batch_steps``).

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
        batch_steps: int = 8192,
        interval_s: float = 1.0,
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
        self._sink = EpisodeSink(storage, batch_steps=batch_steps, interval_s=interval_s)
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
        self._extra_fields = extra_tuple_fields(rl_tuple_cls)
        self._needs_tuples = metadata_callback is not None or rl_tuple_cls is not RLTuple
        self._callbacks = [copy.deepcopy(metadata_callback) for _ in range(n)]
        self._tuples: list[list[RLTuple]] = [[] for _ in range(n)]
        self._episode_metadata: list[dict[str, Any]] = [{} for _ in range(n)]
        # Row of each sub-env's episode start (reset observation), -1 when not recording it.
        self._start = np.full(n, -1, dtype=np.int64)
        self._reset_step_next = np.zeros(n, dtype=bool)  # NEXT_STEP: next step is a reset step
        self._row = -1  # last written row; -1 before the first reset
        self._obs_spec: Any = None
        self._obs_bufs: list[np.ndarray] = []
        self._act_spec: Any = None
        self._act_bufs: list[np.ndarray] | None = None
        self._rew_buf = np.zeros((_INITIAL_ROWS, n), dtype=np.float64)
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
        rows = self._rew_buf.shape[0]
        self._obs_spec = spec
        self._obs_bufs = [np.zeros((rows, *leaf.shape), dtype=leaf.dtype) for leaf in leaves]

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
        if mask is None or self._row < 0:
            self._drop(np.ones(self.num_envs, dtype=bool))
            shapes = [(b.shape[1:], b.dtype) for b in self._obs_bufs]
            if shapes != [(leaf.shape, leaf.dtype) for leaf in leaves]:
                self._allocate_obs(leaves, spec)
            self._row = 0
            self._last_info_row = -1
            for buf, leaf in zip(self._obs_bufs, leaves, strict=True):
                buf[0] = leaf
            self._reset_step_next[:] = False
            self._begin_many(np.ones(self.num_envs, dtype=bool), 0)
        else:
            self._drop(mask)
            for buf, leaf in zip(self._obs_bufs, leaves, strict=True):
                buf[self._row, mask] = leaf[mask]
            self._reset_step_next[mask] = False
            self._begin_many(mask, self._row)
        return obs, infos

    def _make_room(self) -> None:
        """Moves the rows still needed to the front, growing the buffers if half full."""
        active = self._start[self._start >= 0]
        low = min(int(active.min()), self._row) if active.size else self._row
        keep = self._row + 1 - low
        rows = self._rew_buf.shape[0]
        new_rows = rows * 2 if keep > rows // 2 else rows
        buffers = [self._rew_buf, *self._obs_bufs, *(self._act_bufs or [])]
        moved = []
        for buf in buffers:
            target = buf if new_rows == rows else np.zeros((new_rows, *buf.shape[1:]), buf.dtype)
            target[:keep] = buf[low : self._row + 1]
            moved.append(target)
        self._rew_buf = moved[0]
        self._obs_bufs = moved[1 : 1 + len(self._obs_bufs)]
        if self._act_bufs is not None:
            self._act_bufs = moved[1 + len(self._obs_bufs) :]
        infos = self._row_infos[low : self._row + 1]
        self._row_infos = infos + [None] * (new_rows - keep)
        self._start[self._start >= 0] -= low
        self._row -= low
        self._last_info_row -= low

    def step(self, actions: Any) -> tuple[Any, Any, Any, Any, dict[str, Any]]:
        """Steps every sub-env and records the transitions; ended episodes go to storage."""
        obs, rewards, terminations, truncations, infos = self.env.step(actions)
        if self._row >= 0:
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
        if self._row + 1 == self._rew_buf.shape[0]:
            self._make_room()
        row = self._row + 1
        self._row = row
        obs_leaves, _ = _leaves(obs)
        for buf, leaf in zip(self._obs_bufs, obs_leaves, strict=True):
            buf[row] = leaf
        act_leaves, act_spec = self._action_leaves(actions)
        if self._act_bufs is None:
            rows = self._rew_buf.shape[0]
            self._act_spec = act_spec
            self._act_bufs = [np.zeros((rows, *a.shape), a.dtype) for a in act_leaves]
        for buf, leaf in zip(self._act_bufs, act_leaves, strict=True):
            buf[row] = leaf
        self._rew_buf[row] = rewards
        if infos:
            self._row_infos[row] = infos
            self._last_info_row = row
        else:
            self._row_infos[row] = None
        done = np.logical_or(terminations, truncations)
        mode = self.autoreset_mode
        same_step = mode is AutoresetMode.SAME_STEP
        if mode is AutoresetMode.NEXT_STEP:
            reset_step = self._reset_step_next
            self._reset_step_next = done.copy()
            stepped = (self._start >= 0) & ~reset_step
            if reset_step.any():
                self._begin_many(reset_step, row)
        else:
            stepped = self._start >= 0
        if self._needs_tuples:
            for i in np.flatnonzero(stepped):
                self._record_tuple(int(i), obs, actions, rewards, terminations, truncations, infos)
        ended = np.flatnonzero(done & stepped)
        episodes = []
        if ended.size and self.id is not None:
            episodes = [
                self._cut(int(i), row, bool(terminations[i]), bool(truncations[i]), infos)
                for i in ended
            ]
        if same_step:
            if done.any():
                self._begin_many(done, row)
        elif ended.size:
            self._drop(done)
        if ended.size:
            self._sink.add(episodes)
            self._require_id("store a recorded episode")

    def _action_leaves(self, actions: Any) -> tuple[list[np.ndarray], Any]:
        if type(actions) is not np.ndarray and not isinstance(
            self.single_action_space, gymnasium.spaces.Tuple | gymnasium.spaces.Dict
        ):
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

    def _cut(
        self, i: int, end: int, terminated: bool, truncated: bool, infos: dict[str, Any]
    ) -> EpisodeData:
        """Episode of sub-env ``i`` whose last transition is row ``end``."""
        start = int(self._start[i])
        if self.autoreset_mode is AutoresetMode.SAME_STEP:
            final_leaves, _ = _leaves(infos["final_obs"][i])
            obs_leaves = [
                np.concatenate([buf[start:end, i], final[None]])
                for buf, final in zip(self._obs_bufs, final_leaves, strict=True)
            ]
        else:
            obs_leaves = [buf[start : end + 1, i].copy() for buf in self._obs_bufs]
        assert self._act_bufs is not None
        act_leaves = [buf[start + 1 : end + 1, i].copy() for buf in self._act_bufs]
        rows = range(start + 1, end + 1)
        ep_infos: list[dict[str, Any]] | None
        if self._needs_tuples:
            ep_infos = [tuple_info(t, self._extra_fields) for t in self._tuples[i]]
            metadata = self._episode_metadata[i]
            callback = self._callbacks[i]
            if callback is not None:
                callback.reset()
            self._tuples[i] = []
            self._episode_metadata[i] = {}
        else:
            row_infos = self._row_infos
            ep_infos = None
            if self._last_info_row > start and any(row_infos[r] for r in rows):
                ep_infos = [self._step_info(i, row_infos[r], final=r == end) for r in rows]
            metadata = {}
        if self.sub_env_key is not None:
            metadata = {**metadata, self.sub_env_key: i}
        return make_episode(
            _build(self._obs_spec, obs_leaves),
            _build(self._act_spec, act_leaves),
            self._rew_buf[start + 1 : end + 1, i].copy(),
            terminated=terminated,
            truncated=truncated,
            benchmark_id=self._require_id("store a recorded episode"),
            metadata=metadata,
            infos=ep_infos,
        )

    def close(self, **kwargs: Any) -> None:
        """Drops unfinished episodes, writes the pending ones, then closes the vector env."""
        self._drop(np.ones(self.num_envs, dtype=bool))
        try:
            self._sink.flush()
        finally:
            self.env.close(**kwargs)
