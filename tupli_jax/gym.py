"""Gymnasium adapter: a drop-in for pytupli's ``TupliEnvWrapper`` and pytupli's public names.

A pytupli user changes only the import line::

    # from pytupli.benchmark import TupliEnvWrapper; from pytupli.storage import FileStorage
    from tupli_jax.gym import FileStorage, TupliEnvWrapper

Differences from pytupli (fixes and additions):

- Steps are recorded straight into packed columns (``tupli_jax._gym_columns``): per step one
  row assignment for the observation and two list appends (scalar action, reward); no pydantic
  object is built per step unless a ``metadata_callback`` or a custom ``rl_tuple_cls`` needs
  one, and nothing is stacked when an episode ends.
- The stored episode keeps the reset observation (``T + 1`` observations); the tuple view keeps
  pytupli's ``state`` = the observation returned by the step.
- ``store()`` returns the id; a ``reset()`` in the middle of an episode drops its unfinished
  steps; numpy rewards, numpy values in ``info`` and Python ``int`` actions are stored fine; an
  episode is stored only if every step of it was recorded (recording switched on mid-episode
  starts with the next ``reset()``).
- Episodes are written in batches (one ``record_episode_batch`` call, i.e. one shard, per batch;
  ``record_episodes`` for episodes with infos), yet in this process an episode is listed as
  soon as the step that ends it returns: reads through the storage object write the pending
  episodes first (the storage's ``add_read_barrier`` hook); ``wrapper.list_episodes``,
  ``flush()`` and ``close()`` write them explicitly. A storage without the hook (e.g.
  pytupli's) gets every episode written inside the step that ends it, as pytupli does. Pass
  ``batch_steps=0`` for that behaviour (durable per episode) on any storage.
- ``store()`` leaves the env as fast as it was: jsonpickle reads every object's ``__dict__``,
  which on CPython 3.11-3.12 slows all later attribute access on it (~16% per CartPole step
  after pytupli's ``store()``); tupli_jax encodes in a forked child where that is safe (Linux,
  CPython < 3.13, one Python thread, no JAX backend started; ``TUPLI_JAX_FORK_ENCODE=0`` turns
  it off), with the same text and hash (``tupli_jax._isolated``).
- Extra fields of a custom ``rl_tuple_cls`` survive the round trip (``list_episodes`` on the
  wrapper rebuilds them); ``load``/``deserialize_env`` use an allow-list loader (``trusted=True``
  to opt out for payloads you trust).

Example:
    >>> import gymnasium as gym
    >>> storage = FileStorage("tupli_store")  # doctest: +SKIP
    >>> env = TupliEnvWrapper(gym.make("CartPole-v1"), storage)  # doctest: +SKIP
    >>> bench_id = env.store(name="cartpole")  # doctest: +SKIP
    >>> obs, info = env.reset(seed=0)  # doctest: +SKIP
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, SupportsFloat

import gymnasium
import numpy as np

from tupli_jax._gym_columns import EpisodeColumns
from tupli_jax._gym_record import (
    DEFAULT_BATCH_BYTES,
    DEFAULT_BATCH_STEPS,
    DEFAULT_INTERVAL_S,
    BenchmarkMixin,
    EpisodeSink,
    extra_tuple_fields,
    tuple_info,
)
from tupli_jax._gym_vector import TupliVectorEnvWrapper
from tupli_jax.schema import (
    ArtifactMetadata,
    ArtifactMetadataItem,
    Benchmark,
    BenchmarkHeader,
    BenchmarkMetadata,
    BenchmarkQuery,
    Episode,
    EpisodeHeader,
    EpisodeItem,
    EpisodeMetadataCallback,
    FilterAND,
    FilterEQ,
    FilterGEQ,
    FilterGT,
    FilterIN,
    FilterLEQ,
    FilterLT,
    FilterNE,
    FilterOR,
    RLTuple,
    to_builtin,
)
from tupli_jax.storage.base import TupliStorage, TupliStorageError
from tupli_jax.storage.file_storage import FileStorage

if TYPE_CHECKING:
    from tupli_jax.dataset import TupliDataset

_ndarray = np.ndarray

__all__ = [
    "ArtifactMetadata",
    "ArtifactMetadataItem",
    "Benchmark",
    "BenchmarkHeader",
    "BenchmarkMetadata",
    "BenchmarkQuery",
    "Episode",
    "EpisodeHeader",
    "EpisodeItem",
    "EpisodeMetadataCallback",
    "FileStorage",
    "FilterAND",
    "FilterEQ",
    "FilterGEQ",
    "FilterGT",
    "FilterIN",
    "FilterLEQ",
    "FilterLT",
    "FilterNE",
    "FilterOR",
    "RLTuple",
    "TupliDataset",
    "TupliEnvWrapper",
    "TupliStorage",
    "TupliStorageError",
    "TupliVectorEnvWrapper",
]


def __getattr__(name: str) -> Any:
    # TupliDataset lives in tupli_jax.dataset, which imports heavier dependencies.
    if name == "TupliDataset":
        from tupli_jax.dataset import TupliDataset

        return TupliDataset
    raise AttributeError(f"module 'tupli_jax.gym' has no attribute {name!r}")


class TupliEnvWrapper(BenchmarkMixin, gymnasium.Wrapper[Any, Any, Any, Any]):
    """Records a Gymnasium env's episodes into a store; pytupli's ``TupliEnvWrapper`` API.

    Args:
        env: The Gymnasium env to wrap.
        storage: Where benchmarks and episodes go (``FileStorage`` or any ``TupliStorage``).
        benchmark_id: Id of an already stored benchmark (else call ``store()``).
        metadata_callback: Called with each recorded tuple; the dict returned for an episode's
            last tuple is its metadata; ``reset()`` after every stored or dropped episode.
        rl_tuple_cls: ``RLTuple`` subclass built per step (only when it differs from
            ``RLTuple`` or a callback needs tuples). The columns keep what the env returned;
            from the tuple, its ``info`` and its extra fields are stored (``list_episodes`` on
            the wrapper rebuilds the class).
        batch_steps: Write the finished episodes once they hold this many transitions (``0``:
            write each episode, durably, inside the step that ends it; also what a storage
            without a read barrier gets, see the module docs).
        interval_s: Also write once the oldest pending episode is this many seconds old.
        batch_bytes: Also write once the finished episodes hold this many bytes of
            observations, actions and rewards.

    Attributes:
        id: The benchmark id (``None`` until stored or given).
        storage: The storage.

    Example:
        >>> env = TupliEnvWrapper(gym.make("CartPole-v1"), FileStorage("s"))  # doctest: +SKIP
        >>> env.store(name="cartpole"); env.reset(seed=0); env.step(0)  # doctest: +SKIP
    """

    def __init__(
        self,
        env: gymnasium.Env[Any, Any],
        storage: TupliStorage,
        benchmark_id: str | None = None,
        metadata_callback: EpisodeMetadataCallback | None = None,
        rl_tuple_cls: type[RLTuple] = RLTuple,
        *,
        batch_steps: int = DEFAULT_BATCH_STEPS,
        interval_s: float = DEFAULT_INTERVAL_S,
        batch_bytes: int = DEFAULT_BATCH_BYTES,
    ) -> None:
        gymnasium.Wrapper.__init__(self, env)
        self.storage = storage
        self.id = benchmark_id
        self.metadata_callback = metadata_callback
        self.rl_tuple_cls = rl_tuple_cls
        self._record_episodes = True
        self._related_artifacts: list[str] = []
        # The episode in progress and the finished ones not yet written, as packed columns.
        self._columns = EpisodeColumns()
        self._sink = EpisodeSink(
            storage,
            batch_steps=batch_steps,
            interval_s=interval_s,
            batch_bytes=batch_bytes,
            source=self._columns,
        )
        self._extra_fields = extra_tuple_fields(rl_tuple_cls)
        # Tuples are built per step only when something consumes them.
        self._needs_tuples = metadata_callback is not None or rl_tuple_cls is not RLTuple
        self._recording = False  # an episode is being recorded
        # Per-step infos of the episode in progress; None while every step returned an empty
        # info (and no tuples are built).
        self._infos: list[dict[str, Any] | None] | None = None
        self._tuples: list[RLTuple] = []
        self._episode_metadata: dict[str, Any] = {}

    def _benchmark_env(self) -> Any:
        return self.env

    # -- recording ------------------------------------------------------------------------
    def activate_recording(self) -> None:
        """Records from the next ``reset()`` on (an episode is stored only if recorded whole)."""
        self._record_episodes = True

    def deactivate_recording(self) -> None:
        """Stops recording; the episode in progress is dropped."""
        self._record_episodes = False
        self._drop_episode()

    @property
    def tuple_buffer(self) -> list[RLTuple]:
        """The tuples of the episode in progress (pytupli's attribute; built on access)."""
        if not self._recording:
            return []
        if self._needs_tuples:
            return list(self._tuples)
        observations, actions, rewards = self._columns.current()
        infos = self._infos or [None] * len(actions)
        return [
            self.rl_tuple_cls.from_env_step(obs, act, rew, False, False, info or {})
            for obs, act, rew, info in zip(observations, actions, rewards, infos, strict=True)
        ]

    def _drop_episode(self) -> None:
        if self._recording:
            self._recording = False
            if self.metadata_callback is not None and self._columns.steps:
                self.metadata_callback.reset()
            self._columns.drop()

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[Any, dict[str, Any]]:
        """Resets the env; an unfinished recorded episode is dropped, a new one starts."""
        obs, info = self.env.reset(seed=seed, options=options)
        self._drop_episode()
        if self._record_episodes:
            self._columns.begin(obs)
            self._recording = True
            self._infos = [] if self._needs_tuples else None
            self._tuples = []
            self._episode_metadata = {}
        return obs, info

    def step(self, action: Any) -> tuple[Any, SupportsFloat, bool, bool, dict[str, Any]]:
        """Steps the env and records the transition; a finished episode is queued for storage.

        Returns:
            The env's ``(observation, reward, terminated, truncated, info)``, unchanged.

        Raises:
            TupliStorageError: An episode ended but the wrapper has no benchmark id, or a batch
                write failed.
        """
        result = self.env.step(action)
        if not self._recording:
            return result
        obs, reward, terminated, truncated, info = result
        cols = self._columns
        o = cols.obs_row
        if (  # EpisodeColumns.append's fast path, inlined (saves a call per step)
            type(action) is cols.act_scalar
            and type(obs) is _ndarray
            and obs.dtype is cols.obs_dtype
            and obs.shape == cols.obs_shape
            and o < cols.capacity
        ):
            cols.obs_buf[o] = obs  # type: ignore[index]
            cols.obs_row = o + 1
            cols.step_row += 1
            cols.actions.append(action)
            cols.rewards.append(reward)
        else:
            cols.append(obs, action, reward)
        if self._needs_tuples:
            self._record_tuple(obs, action, reward, terminated, truncated, info)
        elif info or self._infos is not None:
            self._record_info(info)
        if terminated or truncated:
            self._end_episode(bool(terminated), bool(truncated))
        return result

    def _record_info(self, info: dict[str, Any]) -> None:
        infos = self._infos
        if infos is None:  # the first non-empty info of the episode
            infos = self._infos = [None] * (self._columns.steps - 1)
        infos.append(to_builtin(info) if info else None)

    def _record_tuple(
        self,
        obs: Any,
        action: Any,
        reward: Any,
        terminated: Any,
        truncated: Any,
        info: dict[str, Any],
    ) -> None:
        rl_tuple = self.rl_tuple_cls.from_env_step(
            obs, action, reward, bool(terminated), bool(truncated), info
        )
        self._tuples.append(rl_tuple)
        assert self._infos is not None
        self._infos.append(tuple_info(rl_tuple, self._extra_fields))
        if self.metadata_callback is not None:
            self._episode_metadata = dict(self.metadata_callback(rl_tuple))

    def _end_episode(self, terminated: bool, truncated: bool) -> None:
        self._recording = False  # steps after the end are not recorded until reset()
        if self.metadata_callback is not None:
            self.metadata_callback.reset()
        if self.id is None:
            self._columns.drop()
            raise TupliStorageError(
                "an episode ended but this TupliEnvWrapper has no benchmark id; expected "
                "store() to be called (or benchmark_id to be given) before recording: call "
                "store(), or deactivate_recording() to run without recording"
            )
        infos = self._infos
        cols = self._columns
        steps = cols.end(
            terminated,
            truncated,
            self.id,
            self._episode_metadata,
            [info or {} for info in infos] if infos is not None and any(infos) else None,
        )
        self._sink.ended(steps, steps * cols.step_nbytes)

    def close(self) -> None:
        """Drops the unfinished episode, writes the pending ones, then closes the env."""
        self._drop_episode()
        try:
            self._sink.flush()
        finally:
            self.env.close()

    # -- loading --------------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        storage: TupliStorage,
        benchmark_id: str | None = None,
        metadata_callback: EpisodeMetadataCallback | None = None,
        rl_tuple_cls: type[RLTuple] = RLTuple,
        trusted: bool = False,
        *,
        batch_steps: int = DEFAULT_BATCH_STEPS,
        interval_s: float = DEFAULT_INTERVAL_S,
        batch_bytes: int = DEFAULT_BATCH_BYTES,
    ) -> TupliEnvWrapper:
        """Loads a stored benchmark and wraps its env.

        Args:
            storage: The storage holding the benchmark.
            benchmark_id: The benchmark's id.
            metadata_callback: As in the constructor.
            rl_tuple_cls: As in the constructor.
            trusted: Allow any callable in the stored payload (only for stores you trust).
            batch_steps: As in the constructor.
            interval_s: As in the constructor.
            batch_bytes: As in the constructor.

        Raises:
            TupliStorageError: Unknown id.
            UnsafePayloadError: The payload names something outside the allow-list.

        Example:
            >>> env = TupliEnvWrapper.load(storage, bench_id)  # doctest: +SKIP
        """
        if benchmark_id is None:
            raise TupliStorageError(
                "load() needs a benchmark_id; received None: pass the id store() returned"
            )
        stored = storage.load_benchmark(benchmark_id)
        env = cls.deserialize_env(stored.serialized, storage, trusted=trusted)
        return cls(
            env,
            storage,
            benchmark_id,
            metadata_callback,
            rl_tuple_cls,
            batch_steps=batch_steps,
            interval_s=interval_s,
            batch_bytes=batch_bytes,
        )
