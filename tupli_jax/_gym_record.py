"""Shared recording machinery of the Gymnasium adapters (``tupli_jax.gym``). Host side, numpy only.

- ``stack_trees`` / ``copy_tree``: per-episode column building for observation/action pytrees.
- ``EpisodeSink``: batches finished episodes into one ``record_episodes`` call per batch while
  keeping pytupli's visibility rule (an episode is listed as soon as the step that ends it
  returns). How, by storage (see ``EpisodeSink``):

  1. a storage with the read-barrier hook ``add_read_barrier(flush)`` runs the sink's ``flush``
     before every episode read: batched writes, nothing patched;
  2. tupli_jax's own ``FileStorage`` without that hook (until it lands): the sink wraps the
     episode-reading methods of that instance (``_READ_METHODS``) to flush first;
  3. any other storage (pytupli's ``FileStorage``, an API client): every episode is written
     inside the step that ends it, as pytupli does; no foreign object is touched.

  Batches are written when they hold ``batch_steps`` transitions, when the oldest pending
  episode is ``interval_s`` old, before reads as above, on ``flush()`` / ``close()`` /
  ``list_episodes`` through the wrapper, when the sink is garbage collected and at exit.
- Custom ``RLTuple`` subclasses: their extra fields are kept per step in the info JSON under
  ``RL_TUPLE_FIELDS_KEY`` and restored by ``restore_tuple``.

Example:
    >>> import numpy as np
    >>> stack_trees([{"a": np.zeros(2)}, {"a": np.ones(2)}])["a"].shape
    (2, 2)
"""

from __future__ import annotations

import copy
import functools
import hashlib
import time
import warnings
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import jsonpickle
import numpy as np

from tupli_jax import _tree
from tupli_jax import benchmark as _benchmark
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
from tupli_jax.storage.base import TupliStorageError
from tupli_jax.storage.file_storage import FileStorage

__all__ = [
    "READ_BARRIER_HOOK",
    "RL_TUPLE_FIELDS_KEY",
    "BenchmarkMixin",
    "EpisodeSink",
    "copy_tree",
    "episode_tuples",
    "extra_tuple_fields",
    "make_episode",
    "restore_tuple",
    "stack_trees",
]

RL_TUPLE_FIELDS_KEY = "__rl_tuple_fields__"
"""Info key holding the extra fields of a custom ``RLTuple`` subclass for one step."""

_BASE_TUPLE_FIELDS = frozenset(RLTuple.model_fields)

READ_BARRIER_HOOK = "add_read_barrier"
"""Name of the storage method a sink registers its ``flush`` with (see ``EpisodeSink``)."""

# Interim, for FileStorage without the hook: its methods that read or change stored episodes.
_READ_METHODS = (
    "list_episodes",
    "load_episode",
    "publish_episode",
    "unpublish_episode",
    "delete_episode",
    "delete_episodes",
    "delete_benchmark",
    "verify",
    "_episode_locations",
)
_SINKS_ATTR = "_tupli_gym_pending_sinks"


# ----------------------------------------------------------------------------------------------
# Columns
# ----------------------------------------------------------------------------------------------


def copy_tree(tree: Any) -> Any:
    """A copy of ``tree`` whose arrays no later env call can change (envs may reuse buffers).

    Example:
        >>> a = np.zeros(2); b = copy_tree({"x": a}); a[0] = 1; float(b["x"][0])
        0.0
    """
    if type(tree) is np.ndarray:
        return tree.copy()
    if isinstance(tree, np.generic | bool | int | float | str) or tree is None:
        return tree
    if isinstance(tree, dict):
        return {k: copy_tree(v) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        items = [copy_tree(v) for v in tree]
        if type(tree) is list:
            return items
        return type(tree)(*items) if hasattr(tree, "_fields") else tuple(items)
    return copy.deepcopy(tree)


def stack_trees(trees: Sequence[Any]) -> Any:
    """Stacks same-structured pytrees along a new leading axis ``[T, ...]``.

    Python ints become ``int64``, Python floats ``float64`` (numpy's defaults); arrays keep their
    dtype.

    Example:
        >>> stack_trees([1, 2, 3]).tolist()
        [1, 2, 3]
    """
    first = trees[0]
    if type(first) is np.ndarray or isinstance(first, np.generic | bool | int | float):
        # np.array is ~3x faster than np.stack on short lists and refuses ragged input too.
        return np.array(trees)
    leaves0, spec = _tree.flatten(first)
    columns: list[list[np.ndarray]] = [[leaf] for leaf in leaves0]
    for tree in trees[1:]:
        leaves, other = _tree.flatten(tree)
        if len(leaves) != len(columns) or not _tree.specs_equal(spec, other):
            raise TypeError(
                f"an episode's observations/actions changed structure from {spec} to {other}; "
                "expected every step to return the same pytree structure: fix the env or "
                "its observation wrapper"
            )
        for column, leaf in zip(columns, leaves, strict=True):
            column.append(leaf)
    return _tree.unflatten(spec, [np.array(column) for column in columns])


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


def make_episode(
    observations: Any,
    actions: Any,
    rewards: np.ndarray,
    *,
    terminated: bool,
    truncated: bool,
    benchmark_id: str,
    metadata: dict[str, Any],
    infos: list[dict[str, Any]] | None,
) -> EpisodeData:
    """An ``EpisodeData`` with ``T + 1`` observations; discounts are 0 on a terminal last step.

    ``infos`` made only of empty dicts is dropped (``None``) so the store writes no info column.
    """
    discounts = np.ones(rewards.shape[0], dtype=np.float32)
    if terminated:
        discounts[-1] = 0.0
    if infos is not None and not any(infos):
        infos = None
    return EpisodeData(
        observations=observations,
        actions=actions,
        rewards=rewards,
        discounts=discounts,
        terminated=bool(terminated),
        truncated=bool(truncated),
        metadata=metadata,
        benchmark_id=benchmark_id,
        infos=infos,
        has_reset_observation=True,
    )


def _row(tree: Any, t: int) -> Any:
    if isinstance(tree, np.ndarray):
        return tree[t]
    leaves, spec = _tree.flatten(tree)
    return _tree.unflatten(spec, [leaf[t] for leaf in leaves])


def episode_tuples(episode: EpisodeData) -> list[RLTuple]:
    """pytupli's tuple view of an episode: tuple ``t`` holds the observation step ``t`` returned.

    Example:
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


def _write(storage: Any, episodes: list[EpisodeData]) -> list[EpisodeHeader]:
    record_many = getattr(storage, "record_episodes", None)
    if callable(record_many):
        headers: list[EpisodeHeader] = record_many(episodes)
        return headers
    # A storage with pytupli's interface only (pytupli's FileStorage or API client).
    return [
        storage.record_episode(
            Episode(benchmark_id=ep.benchmark_id, metadata=ep.metadata, tuples=episode_tuples(ep))
        )
        for ep in episodes
    ]


def _flush_at_exit(storage: Any, pending: list[EpisodeData]) -> None:
    """Finalizer: writes what is still pending when a sink dies or the interpreter exits."""
    if not pending:
        return
    batch = list(pending)
    pending.clear()
    try:
        _write(storage, batch)
    except Exception as exc:  # a finalizer must not raise
        warnings.warn(
            f"tupli_jax.gym: {len(batch)} recorded episode(s) could not be stored at exit: {exc}",
            RuntimeWarning,
            stacklevel=1,
        )


def _with_barrier(method: Callable[..., Any], sinks: weakref.WeakSet[EpisodeSink]) -> Any:
    @functools.wraps(method)
    def read_after_pending_writes(*args: Any, **kwargs: Any) -> Any:
        for sink in list(sinks):
            sink.flush()
        return method(*args, **kwargs)

    return read_after_pending_writes


def _install_barrier(storage: FileStorage, sink: EpisodeSink) -> None:
    """Interim read barrier for a ``FileStorage`` without ``add_read_barrier``: wraps that
    instance's episode-reading methods so that they flush the pending episodes first."""
    sinks: weakref.WeakSet[EpisodeSink] | None = getattr(storage, _SINKS_ATTR, None)
    if sinks is None:
        sinks = weakref.WeakSet()
        setattr(storage, _SINKS_ATTR, sinks)
        for name in _READ_METHODS:
            method = getattr(storage, name, None)
            if callable(method):
                setattr(storage, name, _with_barrier(method, sinks))
    sinks.add(sink)


def _make_visible_on_read(storage: Any, sink: EpisodeSink) -> bool:
    """Arranges for ``storage``'s readers to see the sink's pending episodes; False if this
    storage offers no way to, so that the sink must write every episode when it ends."""
    hook = getattr(storage, READ_BARRIER_HOOK, None)
    if callable(hook):
        hook(sink.flush)
        return True
    if isinstance(storage, FileStorage):
        _install_barrier(storage, sink)
        return True
    return False


class EpisodeSink:
    """Collects finished episodes and writes them to ``storage`` in batches.

    Args:
        storage: A ``TupliStorage`` (``record_episodes`` is used when present, else
            ``record_episode`` per episode in pytupli's tuple form).
        batch_steps: Write when the pending episodes hold at least this many transitions;
            ``0`` writes every episode when it ends (durable when ``step`` returns).
        interval_s: Write when the oldest pending episode is older than this (checked when an
            episode ends).

    Visibility: an episode is listed by ``storage.list_episodes`` (and every other episode
    read) as soon as the step that ended it returned, in this process:

    - if ``storage`` has ``add_read_barrier(flush)`` (the hook specified for ``FileStorage``:
      it holds ``flush`` weakly and calls it before every method that reads or changes stored
      episodes), the sink registers its ``flush`` there;
    - else, if ``storage`` is tupli_jax's ``FileStorage``, the sink wraps that instance's
      episode-reading methods (interim, until ``FileStorage`` has the hook);
    - else (pytupli's storage, an API client) ``batch_steps`` is ignored and every episode is
      written inside the step that ends it.

    Other processes see the episodes after the next write (at most ``batch_steps`` transitions
    or ``interval_s`` seconds later, or at ``close()``).

    Example:
        >>> sink = EpisodeSink(storage, batch_steps=4096, interval_s=1.0)  # doctest: +SKIP
        >>> sink.add([episode]); sink.flush()  # doctest: +SKIP
    """

    def __init__(self, storage: Any, *, batch_steps: int, interval_s: float) -> None:
        if batch_steps < 0 or interval_s < 0:
            raise ValueError(
                f"expected batch_steps >= 0 and interval_s >= 0, received {batch_steps} and "
                f"{interval_s}: pass 0 to write every episode as soon as it ends"
            )
        self._storage = storage
        self._batch_steps = int(batch_steps)
        self._interval_s = float(interval_s)
        self._pending: list[EpisodeData] = []
        self._pending_steps = 0
        self._oldest = 0.0
        if self._batch_steps > 0 and not _make_visible_on_read(storage, self):
            self._batch_steps = 0  # no way to flush before reads: pytupli's write-per-episode
        weakref.finalize(self, _flush_at_exit, storage, self._pending)

    @property
    def batched(self) -> bool:
        """Whether episodes are written in batches (else each inside the step ending it)."""
        return self._batch_steps > 0

    @property
    def pending(self) -> int:
        """Number of finished episodes not yet written."""
        return len(self._pending)

    def add(self, episodes: Sequence[EpisodeData]) -> None:
        """Queues finished episodes; writes the batch when a threshold is reached."""
        if not episodes:
            return
        now = time.monotonic()
        if not self._pending:
            self._oldest = now
        self._pending.extend(episodes)
        self._pending_steps += sum(ep.length for ep in episodes)
        if self._pending_steps >= self._batch_steps or now - self._oldest >= self._interval_s:
            self.flush()

    def flush(self) -> list[EpisodeHeader]:
        """Writes every pending episode in one ``record_episodes`` call; returns their headers.

        Raises:
            TupliStorageError: The storage refused the batch (the batch is dropped, not retried;
                the message says how many episodes were lost and why).
        """
        if not self._pending:
            return []
        batch = list(self._pending)
        self._pending.clear()  # in place: the finalizer holds this list
        self._pending_steps = 0
        try:
            return _write(self._storage, batch)
        except Exception as exc:
            ids = sorted({ep.benchmark_id for ep in batch})
            raise TupliStorageError(
                f"{len(batch)} recorded episode(s) of benchmark(s) {ids} could not be stored: "
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
