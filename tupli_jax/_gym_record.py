"""Shared recording machinery of the Gymnasium adapters (``tupli_jax.gym``). Host side, numpy only.

- ``EpisodeSink``: holds finished episodes (packed ``PendingBatch`` columns from
  ``tupli_jax._gym_columns``, or single ``EpisodeData``) and writes them in batches, one
  ``record_episode_batch`` (one shard, no per-episode arrays) or ``record_episodes`` call per
  batch, while keeping pytupli's visibility rule (an episode is listed as soon as the step that
  ends it returns). How, by storage (see ``EpisodeSink``):

  1. a storage with the read-barrier hook ``add_read_barrier(flush)`` (tupli_jax's
     ``FileStorage``) runs the sink's ``flush`` before every episode read: batched writes,
     nothing patched;
  2. any other storage (pytupli's ``FileStorage``, an API client): every episode is written
     inside the step that ends it, as pytupli does; no foreign object is touched.

  Batches are written when they hold ``batch_steps`` transitions or ``batch_bytes`` bytes, when
  the oldest pending episode is ``interval_s`` old, before reads as above, on ``flush()`` /
  ``close()`` / ``list_episodes`` through the wrapper, when the sink is garbage collected and at
  exit.
- Custom ``RLTuple`` subclasses: their extra fields are kept per step in the info JSON under
  ``RL_TUPLE_FIELDS_KEY`` and restored by ``restore_tuple``.

Example:
    >>> class MyTuple(RLTuple):
    ...     q_value: float = 0.0
    >>> extra_tuple_fields(MyTuple), extra_tuple_fields(RLTuple)
    (('q_value',), ())
"""

from __future__ import annotations

import hashlib
import time
import warnings
import weakref
from collections.abc import Sequence
from typing import Any, Protocol

import jsonpickle
import numpy as np

from tupli_jax import _tree
from tupli_jax import benchmark as _benchmark
from tupli_jax._gym_columns import PendingBatch, PendingItem, merge_batches
from tupli_jax.episode import EpisodeData
from tupli_jax.schema import (
    BaseFilter,
    BenchmarkMetadata,
    BenchmarkQuery,
    Episode,
    EpisodeHeader,
    EpisodeItem,
    FilterAND,
    FilterEQ,
    RLTuple,
    to_builtin,
)
from tupli_jax.storage._files import no_gc
from tupli_jax.storage.base import TupliStorageError

__all__ = [
    "DEFAULT_BATCH_BYTES",
    "DEFAULT_BATCH_STEPS",
    "DEFAULT_INTERVAL_S",
    "READ_BARRIER_HOOK",
    "RL_TUPLE_FIELDS_KEY",
    "BenchmarkMixin",
    "EpisodeSink",
    "episode_tuples",
    "extra_tuple_fields",
    "restore_tuple",
]

RL_TUPLE_FIELDS_KEY = "__rl_tuple_fields__"
"""Info key holding the extra fields of a custom ``RLTuple`` subclass for one step."""

_BASE_TUPLE_FIELDS = frozenset(RLTuple.model_fields)

DEFAULT_BATCH_STEPS = 65536
"""Pending transitions that trigger a write (see ``EpisodeSink``)."""
DEFAULT_BATCH_BYTES = 32 * 2**20
"""Pending bytes (observations, actions, rewards) that trigger a write (see ``EpisodeSink``)."""
DEFAULT_INTERVAL_S = 1.0
"""Age of the oldest pending episode that triggers a write, in seconds."""

READ_BARRIER_HOOK = "add_read_barrier"
"""Name of the storage method a sink registers its ``flush`` with (see ``EpisodeSink``)."""


def extra_tuple_fields(rl_tuple_cls: type[RLTuple]) -> tuple[str, ...]:
    """Fields of a custom ``RLTuple`` subclass that pytupli's ``RLTuple`` lacks."""
    return tuple(name for name in rl_tuple_cls.model_fields if name not in _BASE_TUPLE_FIELDS)


def tuple_info(rl_tuple: RLTuple, extra_fields: Sequence[str]) -> dict[str, Any]:
    """The info stored for one step of a custom tuple: its info plus its extra fields."""
    info = to_builtin(dict(rl_tuple.info)) if rl_tuple.info else {}
    if extra_fields:
        info[RL_TUPLE_FIELDS_KEY] = {
            name: to_builtin(getattr(rl_tuple, name)) for name in extra_fields
        }
    return info


def restore_tuple(rl_tuple: RLTuple, rl_tuple_cls: type[RLTuple]) -> RLTuple:
    """Rebuilds ``rl_tuple_cls`` (extra fields included) from a tuple of the stored tuple view.

    Example:
        >>> t = RLTuple(state=[0.0], action=1, reward=1.0, info={RL_TUPLE_FIELDS_KEY: {}})
        >>> restore_tuple(t, RLTuple).info
        {}
    """
    info = dict(rl_tuple.info)
    fields = info.pop(RL_TUPLE_FIELDS_KEY, None) or {}
    data = {name: getattr(rl_tuple, name) for name in _BASE_TUPLE_FIELDS}
    data["info"] = info
    data.update(fields)
    return rl_tuple_cls.model_validate(data)


def _row(tree: Any, t: int) -> Any:
    if isinstance(tree, np.ndarray):
        return tree[t]
    leaves, spec = _tree.flatten(tree)
    return _tree.unflatten(spec, [leaf[t] for leaf in leaves])


def episode_tuples(episode: EpisodeData) -> list[RLTuple]:
    """pytupli's tuple view of an episode: tuple ``t`` holds the observation step ``t`` returned.

    Example:
        >>> from tupli_jax._gym_columns import make_episode
        >>> ep = make_episode(np.arange(3.0), np.array([0, 1]), np.ones(2), terminated=True,
        ...                   truncated=False, benchmark_id="b", metadata={}, infos=None)
        >>> [(t.state, t.terminal) for t in episode_tuples(ep)]
        [(1.0, False), (2.0, True)]
    """
    n = episode.length
    offset = 1 if episode.has_reset_observation else 0
    infos = episode.infos or [{}] * n
    return [
        RLTuple(
            state=to_builtin(_row(episode.observations, t + offset)),
            action=to_builtin(_row(episode.actions, t)),
            reward=float(episode.rewards[t]),
            info=infos[t] or {},
            terminal=bool(episode.terminated and t == n - 1),
            timeout=bool(episode.truncated and t == n - 1),
        )
        for t in range(n)
    ]


# ----------------------------------------------------------------------------------------------
# Batched writes with a read barrier
# ----------------------------------------------------------------------------------------------


class EpisodeSource(Protocol):
    """Something holding finished episodes a sink must write (``EpisodeColumns``)."""

    def drain(self) -> list[PendingItem]:
        """Takes every finished episode, in order."""
        ...


def _write(storage: Any, items: Sequence[PendingItem]) -> list[EpisodeHeader]:
    """Writes ``items`` in order: one ``record_episode_batch`` when they are packed columns of
    one layout without infos, else one ``record_episodes`` (or pytupli's ``record_episode``
    per episode on a storage with pytupli's interface only).

    The cyclic GC is paused meanwhile: a write builds a few objects per episode (catalog rows,
    headers) and nothing cyclic, and collections it would trigger cost ~13% of its time.
    """
    if not items:
        return []
    with no_gc():
        return _write_items(storage, items)


def _write_items(storage: Any, items: Sequence[PendingItem]) -> list[EpisodeHeader]:
    batches = [item for item in items if isinstance(item, PendingBatch)]
    record_batch = getattr(storage, "record_episode_batch", None)
    if callable(record_batch) and len(batches) == len(items):
        merged = merge_batches(batches)
        if merged is not None and merged.infos is None:
            return list(record_batch(merged.batch))  # a lazy EpisodeHeaders: built here
    episodes: list[EpisodeData] = []
    for item in items:
        if isinstance(item, PendingBatch):
            episodes.extend(item.episodes())
        else:
            episodes.append(item)
    record_many = getattr(storage, "record_episodes", None)
    if callable(record_many):
        headers = record_many(episodes)
        return headers
    # A storage with pytupli's interface only (pytupli's FileStorage or API client).
    return [
        storage.record_episode(
            Episode(benchmark_id=ep.benchmark_id, metadata=ep.metadata, tuples=episode_tuples(ep))
        )
        for ep in episodes
    ]


def _count(items: Sequence[PendingItem]) -> int:
    return sum(len(i.batch) if isinstance(i, PendingBatch) else 1 for i in items)


class _Pending:
    """A sink's unwritten episodes: ``items`` then ``source``'s (no reference to the sink, so
    that a finalizer can write them when the sink dies)."""

    def __init__(self, source: EpisodeSource | None) -> None:
        self.items: list[PendingItem] = []
        self.source = source

    def take(self) -> list[PendingItem]:
        items, self.items = self.items, []
        if self.source is not None:
            items.extend(self.source.drain())
        return items


def _flush_at_exit(storage: Any, pending: _Pending) -> None:
    """Finalizer: writes what is still pending when a sink dies or the interpreter exits."""
    try:
        batch = pending.take()
        if batch:
            _write(storage, batch)
    except Exception as exc:  # a finalizer must not raise
        warnings.warn(
            f"tupli_jax.gym: recorded episodes could not be stored at exit: {exc}",
            RuntimeWarning,
            stacklevel=1,
        )


class EpisodeSink:
    """Collects finished episodes and writes them to ``storage`` in batches.

    Args:
        storage: A ``TupliStorage`` (``record_episode_batch`` / ``record_episodes`` are used when
            present, else ``record_episode`` per episode in pytupli's tuple form).
        batch_steps: Write when the pending episodes hold at least this many transitions;
            ``0`` writes every episode when it ends (durable when ``step`` returns).
        interval_s: Write when the oldest pending episode is older than this (checked when an
            episode ends).
        batch_bytes: Write when the pending episodes hold at least this many bytes of
            observations, actions and rewards (bounds the memory of large observations).
        source: Where finished episodes also wait (the single-env wrapper's ``EpisodeColumns``);
            report each with ``ended``. Episodes given to ``add`` go before the source's.

    Visibility: an episode is listed by ``storage.list_episodes`` (and every other episode
    read) as soon as the step that ended it returned, in this process:

    - if ``storage`` has ``add_read_barrier(flush)`` (tupli_jax's ``FileStorage``: it holds
      ``flush`` weakly and calls it before every method that reads or changes stored
      episodes), the sink registers its ``flush`` there;
    - else (pytupli's storage, an API client) ``batch_steps`` is ignored and every episode is
      written inside the step that ends it.

    Other processes see the episodes after the next write (at most ``batch_steps`` transitions
    or ``interval_s`` seconds later, or at ``close()``).

    Example:
        >>> sink = EpisodeSink(storage, batch_steps=4096, interval_s=1.0)  # doctest: +SKIP
        >>> sink.add([episode], episode.length); sink.flush()  # doctest: +SKIP
    """

    def __init__(
        self,
        storage: Any,
        *,
        batch_steps: int,
        interval_s: float,
        batch_bytes: int = DEFAULT_BATCH_BYTES,
        source: EpisodeSource | None = None,
    ) -> None:
        if batch_steps < 0 or interval_s < 0 or batch_bytes < 0:
            raise ValueError(
                f"expected batch_steps, interval_s and batch_bytes >= 0, received {batch_steps}, "
                f"{interval_s} and {batch_bytes}: pass batch_steps=0 to write every episode as "
                "soon as it ends"
            )
        self._storage = storage
        self._batch_steps = int(batch_steps)
        self._batch_bytes = int(batch_bytes)
        self._interval_s = float(interval_s)
        self._pending = _Pending(source)
        self._pending_steps = 0
        self._pending_bytes = 0
        self._oldest = 0.0
        if self._batch_steps > 0:
            hook = getattr(storage, READ_BARRIER_HOOK, None)
            if callable(hook):
                hook(self.flush)
            else:  # no way to flush before reads: pytupli's write-per-episode
                self._batch_steps = 0
        weakref.finalize(self, _flush_at_exit, storage, self._pending)

    @property
    def batched(self) -> bool:
        """Whether episodes are written in batches (else each inside the step ending it)."""
        return self._batch_steps > 0

    def add(self, items: Sequence[PendingItem], steps: int, nbytes: int = 0) -> None:
        """Queues finished episodes holding ``steps`` transitions (``nbytes`` bytes); writes
        the batch when a threshold is reached."""
        if items:
            self._pending.items.extend(items)
            self.ended(steps, nbytes)

    def ended(self, steps: int, nbytes: int = 0) -> None:
        """Notes that finished episodes of ``steps`` transitions (``nbytes`` bytes) wait here
        or in the source; writes the batch when a threshold is reached."""
        now = time.monotonic()
        if not self._pending_steps:
            self._oldest = now
        self._pending_steps += steps
        self._pending_bytes += nbytes
        if (
            self._pending_steps >= self._batch_steps
            or self._pending_bytes >= self._batch_bytes
            or now - self._oldest >= self._interval_s
        ):
            self.flush()

    def flush(self) -> list[EpisodeHeader]:
        """Writes every pending episode in one call; returns their headers.

        Raises:
            TupliStorageError: The storage refused the batch (the batch is dropped, not retried;
                the message says how many episodes were lost and why).
        """
        batch = self._pending.take()
        self._pending_steps = self._pending_bytes = 0
        if not batch:
            return []
        try:
            return _write(self._storage, batch)
        except Exception as exc:
            ids = sorted(
                {
                    i.batch.benchmark_id if isinstance(i, PendingBatch) else i.benchmark_id
                    for i in batch
                }
            )
            raise TupliStorageError(
                f"{_count(batch)} recorded episode(s) of benchmark(s) {ids} could not be stored: "
                f"{exc}. Expected the benchmark to exist in the store: call store() before "
                "recording, or deactivate_recording()"
            ) from exc


# ----------------------------------------------------------------------------------------------
# Benchmark management shared by the single and the vector wrapper (pytupli's API)
# ----------------------------------------------------------------------------------------------


class BenchmarkMixin:
    """pytupli's benchmark methods: serialize, hash, store, load, publish, delete, list.

    Subclasses set ``storage``, ``id``, ``rl_tuple_cls`` and ``_sink`` and implement
    ``_benchmark_env`` (the env that is serialized and hashed).
    """

    storage: Any
    id: str | None
    rl_tuple_cls: type[RLTuple]
    _sink: EpisodeSink
    _related_artifacts: list[str]

    def _benchmark_env(self) -> Any:
        raise NotImplementedError

    def _require_id(self, action: str) -> str:
        if self.id is None:
            raise TupliStorageError(
                f"cannot {action}: this wrapper has no benchmark id; expected store() to have "
                "been called or a benchmark_id to have been given (e.g. via load())"
            )
        return self.id

    def _get_hash(self, obj: Any) -> str:
        """SHA-256 of the jsonpickle encoding of ``obj`` (pytupli's benchmark hash).

        ``[env, metadata]`` is hashed with ``tupli_jax.benchmark.benchmark_hash`` (the same
        value, shared with the JAX recorder).
        """
        if isinstance(obj, list) and len(obj) == 2 and isinstance(obj[1], BenchmarkMetadata):
            return _benchmark.benchmark_hash(obj[0], obj[1])
        return hashlib.sha256(jsonpickle.encode(obj).encode("utf-8")).hexdigest()

    def serialize_env(self, env: Any) -> str:
        """Serializes ``env`` to pytupli's jsonpickle JSON, after the ``_serialize`` hook.

        The ids returned by ``_serialize`` are set as ``env.unwrapped.related_artifacts`` (on the
        env ``_serialize`` returned), as pytupli does.
        """
        env, related_artifacts = self._serialize(env)
        env.unwrapped.related_artifacts = related_artifacts
        self._related_artifacts = list(related_artifacts)
        return _benchmark.serialize_env(env)

    @classmethod
    def deserialize_env(cls, serialized_env: str, storage: Any, trusted: bool = False) -> Any:
        """Rebuilds an env from ``serialized_env`` (allow-list loader), then ``_deserialize``.

        Args:
            serialized_env: The benchmark's ``serialized`` JSON.
            storage: Storage the ``_deserialize`` hook loads artifacts from.
            trusted: Allow any callable in the payload (only for payloads you trust).

        Raises:
            UnsafePayloadError: The payload names a callable or class outside the allow-list.
        """
        env = _benchmark.deserialize_env(serialized_env, trusted=trusted)
        return cls._deserialize(env, storage)

    def _serialize(self, env: Any) -> tuple[Any, list[str]]:
        """Hook: store artifacts (csv files, models) and return ``(env, artifact_ids)``."""
        return env, []

    @classmethod
    def _deserialize(cls, env: Any, storage: Any) -> Any:
        """Hook: restore what ``_serialize`` moved out (``env.unwrapped.related_artifacts``)."""
        return env

    def _prepare_storage(self, metadata: BenchmarkMetadata) -> tuple[str, str]:
        """``(hash, serialized_env)`` of this benchmark; serialization runs first, as in pytupli."""
        env = self._benchmark_env()
        serialized_env = self.serialize_env(env)
        return self._get_hash([env, metadata]), serialized_env

    def store(
        self,
        name: str,
        description: str = "",
        difficulty: str | None = None,
        version: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> str:
        """Stores the benchmark and returns its id (also set as ``self.id``).

        An identical env with identical metadata returns the id already stored (hash dedup).

        Example:
            >>> bench_id = wrapper.store(name="cartpole", metadata={"seed": 0})  # doctest: +SKIP
        """
        bench_metadata = BenchmarkMetadata(
            name=name,
            description=description,
            difficulty=difficulty,
            version=version,
            extra=dict(metadata or {}),
        )
        benchmark_hash, serialized_env = self._prepare_storage(metadata=bench_metadata)
        header = self.storage.store_benchmark(
            benchmark_query=BenchmarkQuery(
                hash=benchmark_hash, serialized=serialized_env, metadata=bench_metadata
            )
        )
        self.id = str(header.id)
        return self.id

    def publish(self) -> None:
        """Publishes the benchmark (adds the ``global`` group to ``published_in``)."""
        _benchmark.publish_benchmark(self.storage, self._require_id("publish"))

    def flush(self) -> list[EpisodeHeader]:
        """Writes the recorded episodes still pending in one batch; returns their headers."""
        return self._sink.flush()

    def delete(self, delete_artifacts: bool = False, delete_episodes: bool = True) -> None:
        """Deletes the benchmark, by default its episodes, optionally its related artifacts."""
        bench_id = self._require_id("delete")
        self._sink.flush()
        env = self._benchmark_env()
        related = getattr(env.unwrapped, "related_artifacts", None) or self._related_artifacts
        _benchmark.delete_benchmark(
            self.storage,
            bench_id,
            delete_artifacts=delete_artifacts,
            delete_episodes=delete_episodes,
            related_artifacts=list(related or ()),
        )

    def list_episodes(
        self, filter: BaseFilter | None = None, include_tuples: bool = False
    ) -> list[EpisodeHeader] | list[EpisodeItem]:
        """This benchmark's episodes; with tuples, those are rebuilt as ``rl_tuple_cls``.

        Extra fields of a custom ``rl_tuple_cls`` come back (pytupli drops them).

        Example:
            >>> items = wrapper.list_episodes(FilterGEQ(key="n_tuples", value=10),
            ...                               include_tuples=True)  # doctest: +SKIP
        """
        own = FilterEQ(key="benchmark_id", value=self._require_id("list episodes"))
        combined = own if filter is None else FilterAND(filters=[own, filter])
        self._sink.flush()  # explicit: pending episodes are listed whatever the storage
        found = self.storage.list_episodes(combined, include_tuples=include_tuples)
        if not include_tuples:
            return list(found)
        items: list[EpisodeItem] = []
        for item in found:
            assert isinstance(item, EpisodeItem)
            tuples = [restore_tuple(t, self.rl_tuple_cls) for t in item.tuples]
            items.append(item.model_copy(update={"tuples": tuples}))
        return items
